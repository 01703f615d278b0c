"""core.api.load_run and per-condition sampling (`dyngan sample --condition C`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core import api
from core.errors import UsageError
from cli_helpers import invoke, resign_checkpoint


def _train(out, **options):
    settings = {"dataset": "grid25", "steps": 40, "seed": 3, "device": "cpu", "out": str(out),
                "options": {"dataset": {"n": 2000}, **options}}
    if options:
        settings["preset"] = "dyngan"
    return api.train(settings, quiet=True).run_dir


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    # a detector that flags most samples at every step and a partition check every 10 steps:
    # several conditions open within the 40 steps
    return _train(tmp_path_factory.mktemp("dyn") / "run", detector={"every": 1, "lam": 1.0, "delta": 0.8},
                  partitioner={"every": 10})


def _last_partition_count(run_dir):
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["partition/count"] for e in events if e.get("event") == "partition"][-1]


def test_load_run_exposes_the_checkpoint(partitioned):
    run = api.load_run(partitioned)
    assert run.step == 40 and run.weights == "ema"  # the preset keeps a weight average of G
    assert run.conditions == [int(c) for c in torch.nonzero(run.prior > 0).flatten()]
    assert len(run.conditions) == _last_partition_count(partitioned) > 1
    # every training sample carries the label of a condition in use, and the prior is their share
    assert run.labels.shape[0] == run.real.shape[0] == 2000
    counts = torch.bincount(run.labels, minlength=run.prior.shape[0]).double()
    assert sorted(torch.unique(run.labels).tolist()) == run.conditions
    assert torch.allclose(run.prior.double(), counts / counts.sum(), atol=1e-6)
    assert api.load_run(partitioned, generator="raw").weights == "raw"


def test_one_condition_is_g_on_that_label_with_the_seeds_noise(partitioned):
    run = api.load_run(partitioned)
    c = run.conditions[-1]
    x = run.generate(300, seed=7, condition=c)
    z = torch.randn(300, run.z_dim, generator=torch.Generator().manual_seed(7))
    run.G.eval()
    with torch.no_grad():
        want = run.G(z, torch.full((300,), c, dtype=torch.long))
    assert torch.equal(x, want)
    # one seed, one noise: another condition maps the same z elsewhere
    other = run.generate(300, seed=7, condition=run.conditions[0])
    assert not torch.equal(other, x)
    # without a condition the conditions come from the prior (the samples `dyngan sample` writes)
    mixed = run.generate(300, seed=7)
    assert torch.equal(torch.from_numpy(api.sample(partitioned, 300, 7)), mixed)


def test_cli_sample_condition_writes_that_conditions_samples(partitioned, tmp_path):
    run = api.load_run(partitioned)
    c = run.conditions[1]
    out = tmp_path / "c.npy"
    res = invoke(["sample", str(partitioned), "--n", "50", "--seed", "2", "--condition", str(c),
                  "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"of condition {c}" in res.output
    arr = np.load(out, allow_pickle=False)
    assert arr.shape == (50, 2) and arr.dtype == np.float32
    assert np.array_equal(arr, run.generate(50, 2, condition=c).numpy())


@pytest.mark.parametrize("bad", ["29", "-1", "1000"])
def test_a_condition_not_in_use_is_a_usage_error(partitioned, tmp_path, bad):
    run = api.load_run(partitioned)
    assert int(bad) not in run.conditions
    out = tmp_path / "c.npy"
    res = invoke(["sample", str(partitioned), "--n", "5", "--condition", bad, "--out", str(out)])
    assert res.exit_code == 2
    assert f"condition {bad} is not in use" in res.output and "Traceback" not in res.output
    # it names the conditions the run uses
    assert f"it uses {api._ranges(run.conditions)} (conditions" in res.output
    assert not out.exists()


def test_an_unconditional_run_has_condition_zero_only(tmp_path):
    run_dir = _train(tmp_path / "ns")
    run = api.load_run(run_dir)
    assert run.conditions == [0] and run.weights == "raw"
    assert run.generate(20, 0, condition=0).shape == (20, 2)
    with pytest.raises(UsageError, match="condition 1 is not in use in this run; it uses 0 "):
        run.generate(20, 0, condition=1)
    with pytest.raises(UsageError, match="^n must be at least 1"):
        run.generate(0, 0)


def test_ranges_text():
    assert api._ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert api._ranges([3]) == "3" and api._ranges([]) == "none"


def test_the_readme_example_runs(partitioned, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8")
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", readme, re.M | re.S) if "load_run(" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0].replace('"runs/dyn"', repr(str(partitioned))), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    run = api.load_run(partitioned)
    assert [int(line.split()[0]) for line in lines] == run.conditions
    # the second column is the condition's prior, the third its number of training samples
    assert [int(line.split()[2]) for line in lines] == [int((run.labels == c).sum()) for c in run.conditions]


# --------------------------------------------------------------------------- partition labels that cannot be used


def forge_labels(run_dir, first):
    """Set the first partition label of the run's newest checkpoint to ``first`` (or, given a dtype,
    cast the labels to it), keeping the checkpoint valid, like an edited file."""
    from safetensors.torch import load

    from core import checkpoint as ckpt_io

    step, jpath = ckpt_io.list_checkpoints(run_dir / "checkpoints")[-1]
    tensors = load(jpath.with_suffix(".safetensors").read_bytes())
    if isinstance(first, torch.dtype):
        tensors["train/labels"] = tensors["train/labels"].to(first)
    else:
        tensors["train/labels"][0] = first
    resign_checkpoint(jpath, tensors)
    assert ckpt_io.read(jpath).step == step  # still a good checkpoint
    return jpath.name


def _capacity(run_dir):
    return int(api.load_run(run_dir, warn=None).prior.shape[0])


@pytest.mark.parametrize("bad", ["capacity", 2**62, -1, -(2**62), torch.float32])
def test_partition_labels_out_of_range_are_unusable_and_said_so(partitioned, tmp_path, bad):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(partitioned, run_dir)
    forge_labels(run_dir, _capacity(run_dir) - 1)  # the last condition: in range, used without a word
    warnings = []
    run = api.load_run(run_dir, warn=warnings.append)
    assert run.labels is not None and int(run.labels[0]) == run.prior.shape[0] - 1 and warnings == []
    bad = _capacity(run_dir) if bad == "capacity" else bad
    name = forge_labels(run_dir, bad)
    warnings = []
    run = api.load_run(run_dir, warn=warnings.append)
    assert run.step == 40 and warnings == []  # the checkpoint itself is used: its networks are fine
    assert run.labels is None
    assert len(warnings) == 1 and name in warnings[0] and "partition labels" in warnings[0], warnings
    assert ("not integers" if isinstance(bad, torch.dtype) else "out of range") in warnings[0]
    assert run.labels is None and len(warnings) == 1  # said once
    # sampling does not need the labels
    assert run.generate(20, seed=0).shape == (20, 2)




def test_labels_are_read_with_the_checkpoint_and_a_missing_tensor_is_said(partitioned, tmp_path):
    """``labels`` used to be read from the checkpoint file when first asked for: pruned meanwhile (a
    run still training), they were None without a word; a checkpoint without them said nothing."""
    import shutil

    from safetensors.torch import load

    from core import checkpoint as ckpt_io

    run_dir = tmp_path / "run"
    shutil.copytree(partitioned, run_dir)
    warnings = []
    run = api.load_run(run_dir, warn=warnings.append)
    want = load(ckpt_io.list_checkpoints(run_dir / "checkpoints")[-1][1].with_suffix(".safetensors").read_bytes())
    for p in (run_dir / "checkpoints").iterdir():
        p.unlink()  # as a training process pruning its checkpoints would
    assert run.labels is not None and torch.equal(run.labels, want["train/labels"].long()) and warnings == []
    shutil.rmtree(run_dir)
    shutil.copytree(partitioned, run_dir)
    step, jpath = ckpt_io.list_checkpoints(run_dir / "checkpoints")[-1]
    resign_checkpoint(jpath, {k: v for k, v in want.items() if k != "train/labels"})
    run = api.load_run(run_dir, warn=warnings.append)
    assert run.step == step and run.labels is None
    assert warnings == [f"{jpath.name}: holds no partition labels (no partitions shown)"]

def test_a_checkpoint_without_the_weight_average_of_a_run_that_keeps_one_is_skipped(tmp_path):
    """Every checkpoint of a --g-ema run holds G_ema: one without it (edited) is skipped with a warning,
    not sampled from its raw G as if the run kept no average."""
    from safetensors.torch import load

    from core import checkpoint as ckpt_io

    out = tmp_path / "ema"
    api.train({"out": str(out), "dataset": "grid25", "steps": 20, "checkpoint_every": 10, "log_every": 10,
               "eval_every": 0, "device": "cpu", "g_ema": 0.9, "options": {"dataset": {"n": 500}}}, quiet=True)
    step, jpath = ckpt_io.list_checkpoints(out / "checkpoints")[-1]
    tensors = {k: v for k, v in load(jpath.with_suffix(".safetensors").read_bytes()).items()
               if not k.startswith("G_ema/")}
    resign_checkpoint(jpath, tensors)
    warnings = []
    for generator in ("auto", "ema"):
        run = api.load_run(out, generator=generator, warn=warnings.append)
        assert run.step == 10 and run.weights == "ema"
    assert len(warnings) == 2 and all("no weights of the generator's average" in w for w in warnings), warnings


@pytest.mark.parametrize("call", ["load_run", "sample", "evaluate", "write_report", "resolve_settings", "train"])
@pytest.mark.parametrize("bad", [None, 123])
def test_a_run_directory_or_settings_of_the_wrong_type_is_a_usage_error(call, bad):
    """They used to raise pathlib's or dict()'s TypeError."""
    from core.report import write_report

    fn = {"load_run": api.load_run, "sample": lambda r: api.sample(r, 5), "evaluate": api.evaluate,
          "write_report": write_report, "resolve_settings": api.resolve_settings, "train": api.train}[call]
    want = "settings must be a mapping" if call in ("resolve_settings", "train") else "a run directory must be a path"
    with pytest.raises(UsageError, match=want):
        fn(bad)


def test_evaluate_refuses_a_run_without_metrics_instead_of_an_empty_score(tmp_path):
    run = api.train({"dataset": "grid25", "steps": 3, "seed": 0, "device": "cpu", "threads": 1, "metrics": [],
                     "eval_every": 0, "out": str(tmp_path / "nm"), "options": {"dataset": {"n": 300}}},
                    quiet=True).run_dir
    with pytest.raises(UsageError, match=r"nothing to evaluate: .* has no metrics \(it was trained with "
                                         r"--metrics none\)"):
        api.evaluate(run, n=50)
    res = invoke(["evaluate", str(run), "--json"])
    assert res.exit_code == 2 and res.stdout == "" and "Traceback" not in res.output
    assert res.stderr.startswith("Error: nothing to evaluate") and len(res.stderr.strip().splitlines()) == 1
    # sampling it still works, on a device given as torch users write it too
    assert api.sample(run, 4).shape == (4, 2)
    assert api.sample(run, 4, device=torch.device("cpu")).shape == (4, 2)
    assert api.load_run(run, device=torch.device("cpu")).device == torch.device("cpu")
