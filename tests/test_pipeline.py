"""The training pipeline end to end: run directory, checkpoints, exact resume,
fallback to the previous good checkpoint, sample / evaluate, CLI errors, and
no host synchronisation on steps that do not log.

Runs are tiny (grid25 with 2000 points, tens of steps) so the file stays fast.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import shutil
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core import api, hookimpl
from core import checkpoint as ckpt_io
from core import rundir
from cli_helpers import invoke
from core.components import CollapseDetector, Detection, Loss, Metric, Option, PartitionUpdate, Partitioner
from dyngan_plugins.dyngan import DynGANDetector
from dyngan_plugins.conditioners import OneHotConditioner
from dyngan_plugins.losses import NonSaturatingLoss
from core.errors import CheckpointError, UsageError
from core.training import Trainer

SMALL = {"dataset": "grid25", "seed": 0, "device": "cpu", "log_every": 20, "eval_every": 0,
         "checkpoint_every": 30, "options": {"dataset": {"n": 2000}}}
SMALL_FLAGS = ["--dataset", "grid25", "--device", "cpu", "--seed", "0", "--log-every", "20",
               "--eval-every", "0", "-o", "dataset.n=2000"]


def small(out, steps=60, **extra):
    s = dict(SMALL)
    s["options"] = {k: dict(v) for k, v in SMALL["options"].items()}
    s.update(steps=steps, out=str(out), **extra)
    return s


def ckpt_steps(run_dir):
    return [s for s, _ in ckpt_io.list_checkpoints(Path(run_dir) / "checkpoints")]


def final_tensors(run_dir):
    steps = ckpt_steps(run_dir)
    assert steps, f"no checkpoint in {run_dir}"
    return load_file(str(Path(run_dir) / "checkpoints" / f"step-{steps[-1]:08d}.safetensors"))


def assert_same_networks(a, b):
    ta, tb = final_tensors(a), final_tensors(b)
    nets = sorted(k for k in ta if k.startswith(("G/", "D/")))
    assert nets and any(k.startswith("G/") for k in nets) and any(k.startswith("D/") for k in nets)
    assert nets == sorted(k for k in tb if k.startswith(("G/", "D/")))
    for k in nets:
        assert torch.equal(ta[k], tb[k]), f"{k} differs"


@pytest.fixture(scope="module")
def run60(tmp_path_factory):
    """A finished 60-step run, checkpoints at 30 and 60 (with its pictures, when
    matplotlib is installed). Read-only for the tests."""
    out = tmp_path_factory.mktemp("run60") / "r"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DYNGAN_NO_PICTURES", raising=False)
        result = api.train(small(out), quiet=True)
    return result, out


@pytest.fixture
def run60_copy(run60, tmp_path):
    """A copy of run60 that a test may train on and change."""
    out = tmp_path / "r"
    shutil.copytree(run60[1], out)
    return out


@pytest.fixture(autouse=True)
def _no_pictures(monkeypatch):
    # end-of-training pictures cost seconds (matplotlib); only run60 draws them
    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")


# ------------------------------------------------------------------ the run directory


def test_run_directory_contents(run60):
    result, out = run60
    assert result.run_dir == out and result.step == 60
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoints"}

    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["dataset"], cfg["model"], cfg["loss"]) == ("grid25", "mlp", "ns")
    assert cfg["steps"] == 60 and cfg["options"]["dataset"]["n"] == 2000
    assert cfg["dyngan_version"]
    for plugin in ("mixtures", "mlp", "losses"):
        assert plugin in cfg["plugins"], cfg["plugins"]
        assert isinstance(cfg["plugins"][plugin]["version"], str) and cfg["plugins"][plugin]["version"]

    lines = (out / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and isinstance(r["step"], int) for r in recs)
    logged = [r for r in recs if "loss/d" in r]
    assert [r["step"] for r in logged] == [20, 40, 60]
    for r in logged:
        assert isinstance(r["loss/d"], float) and isinstance(r["loss/g"], float)
        assert np.isfinite([r["loss/d"], r["loss/g"]]).all()

    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [
        "step-00000030.json", "step-00000030.safetensors", "step-00000060.json", "step-00000060.safetensors"]
    side = json.loads((ck / "step-00000060.json").read_text())
    assert side["step"] == 60 and side["tensors_file"] == "step-00000060.safetensors"
    t = load_file(str(ck / "step-00000060.safetensors"))
    for prefix in ("G/", "D/", "optim/G/", "optim/D/", "rng/"):
        assert any(k.startswith(prefix) for k in t), prefix
    assert {"train/labels", "train/prior", "rng/cpu", "rng/train"} <= set(t)


def test_nothing_is_a_pickle(run60):
    _, out = run60
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 6
    for p in files:
        head = p.read_bytes()[:2]
        assert not head.startswith(b"\x80"), f"{p} starts with the pickle magic"
        assert p.suffix in (".json", ".jsonl", ".safetensors", ".png", ".svg", ".npy"), p
    for p in (out / "checkpoints").glob("*.safetensors"):
        blob = p.read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n])  # safetensors: a JSON header, then raw bytes
        assert header["__metadata__"]["format"] == ckpt_io.FORMAT


def test_numbered_run_dirs_and_stdout_is_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", *SMALL_FLAGS, "--steps", "2", "-q"]
    first = invoke(args)
    assert first.exit_code == 0, first.output
    assert first.stdout == str(Path("runs") / "001") + "\n"
    second = invoke(args[:-1])  # not quiet: progress goes to stderr, stdout is still only the path
    assert second.exit_code == 0, second.output
    assert second.stdout == str(Path("runs") / "002") + "\n"
    for name in ("001", "002"):
        assert (tmp_path / "runs" / name / "config.json").is_file()
        assert ckpt_steps(tmp_path / "runs" / name) == [2]


def test_out_holding_a_run_is_refused_and_untouched(tmp_path):
    out = tmp_path / "r"
    api.train(small(out, steps=3), quiet=True)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = invoke(["train", *SMALL_FLAGS, "--steps", "5", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "already holds a run" in res.stderr and "--resume" in res.stderr
    assert "Traceback" not in res.output
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    with pytest.raises(UsageError):
        api.train(small(out, steps=5), quiet=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_without_a_run_exits_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (empty, tmp_path / "missing"):
        res = invoke(["train", "--resume", "--out", str(target), "--steps", "5"])
        assert res.exit_code == 2, res.output
        assert "not a run directory" in res.stderr
        assert "Traceback" not in res.output
    assert list(empty.iterdir()) == []
    assert not (tmp_path / "missing").exists()
    res = invoke(["train", "--resume", "--steps", "5"])  # no --out at all
    assert res.exit_code == 2 and "--out" in res.stderr


def test_resume_refuses_a_changed_setting(run60, tmp_path):
    _, src = run60
    out = tmp_path / "r"
    shutil.copytree(src, out)
    res = invoke(["train", "--resume", "--out", str(out), "--loss", "hinge"])
    assert res.exit_code == 2, res.output
    assert "loss" in res.stderr
    assert ckpt_steps(out) == [30, 60]


# ------------------------------------------------------------------ checkpoints and resume


def test_exact_resume_is_bit_identical(run60, tmp_path):
    _, straight = run60
    out = tmp_path / "stopped"
    first = api.train(small(out, steps=30), quiet=True)
    assert first.step == 30 and ckpt_steps(out) == [30]
    resumed = api.train({"out": str(out), "steps": 60}, resume=True, quiet=True)
    assert resumed.step == 60
    assert ckpt_steps(out) == [30, 60]
    assert_same_networks(straight, out)
    # optimiser state and random streams continue too
    ta, tb = final_tensors(straight), final_tensors(out)
    for k in ta:
        if k.startswith(("optim/", "rng/train")):
            assert torch.equal(ta[k], tb[k]), k
    # the logged losses after the resume point are the uninterrupted run's, logged once each
    def losses(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss/d"], r["loss/g"]) for r in recs if "loss/d" in r}

    a, b = losses(straight), losses(out)
    assert a[40] == b[40] and a[60] == b[60]
    steps_b = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
               if "loss/d" in json.loads(x)]
    assert len(steps_b) == len(set(steps_b))


def test_resume_from_a_checkpoint_written_on_another_device(run60, tmp_path):
    """A run trained on a GPU resumes on the CPU (seen on an H200: before the fix, the CUDA
    generators' 16-byte states were refused by the CPU generators and the run could not go on).
    Here the GPU checkpoint is imitated by giving the random streams a CUDA generator's shape."""
    _, src = run60
    out = tmp_path / "r"
    shutil.copytree(src, out)
    newest = ckpt_io.list_checkpoints(out / "checkpoints")[-1][1]
    ck = ckpt_io.read(newest)
    tensors = dict(ck.tensors)
    for k in ("rng/train", "rng/components"):
        assert tensors[k].numel() > 16  # a CPU generator's state
        tensors[k] = torch.arange(16, dtype=torch.uint8)  # a CUDA (Philox) generator's: seed and offset
    ckpt_io.save(out / "checkpoints", ck.step, tensors, ck.meta)
    stream = io.StringIO()
    result = api.train({"out": str(out), "steps": 70}, resume=True, quiet=False, stream=stream)
    assert result.step == 70 and ckpt_steps(out)[-1] == 70
    assert "random streams were saved on another kind of device" in stream.getvalue()
    assert "resuming from step 60" in stream.getvalue()  # continued, not started again
    res = invoke(["evaluate", str(out), "--json", "--n", "200"])
    assert res.exit_code == 0, res.output


def test_resume_may_change_the_machine_settings(run60, tmp_path):
    # --threads and --compile say how the machine runs the steps, not which run it is: a run
    # moved to another machine continues with its own number of threads
    _, src = run60
    out = tmp_path / "r"
    shutil.copytree(src, out)
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "70", "--threads", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert ckpt_steps(out)[-1] == 70
    result = api.train({"out": str(out), "steps": 80, "threads": 1, "compile": False}, resume=True, quiet=True)
    assert result.step == 80 and result.config["threads"] == 1


def test_resume_accepts_the_runs_own_settings_again(run60, tmp_path):
    """Repeating the settings the run was started with (``dyngan train -o dataset.n=2000 ...
    --resume``) is not a change and must be accepted."""
    _, src = run60
    out = tmp_path / "r"
    shutil.copytree(src, out)
    result = api.train(small(out, steps=70), resume=True, quiet=True)
    assert result.step == 70 and ckpt_steps(out)[-1] == 70
    res = invoke(["train", "--resume", "--out", str(out), *SMALL_FLAGS, "--steps", "80", "-q"])
    assert res.exit_code == 0, res.output
    assert ckpt_steps(out)[-1] == 80


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    out = tmp_path / "r"
    api.train(small(out, steps=40, checkpoint_every=10, keep_checkpoints=2), quiet=True)
    assert ckpt_steps(out) == [30, 40]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000030.json", "step-00000030.safetensors",
                     "step-00000040.json", "step-00000040.safetensors"]  # no temporary files left


def _truncate(p: Path):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip_byte(p: Path):
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01  # inside a tensor's raw bytes: still parses as safetensors
    p.write_bytes(bytes(data))


def _drop_json(p: Path):
    p.with_suffix(".json").unlink()  # an uncommitted checkpoint (crash between the two writes)


@pytest.mark.parametrize("corrupt", [_truncate, _flip_byte, _drop_json], ids=["truncated", "edited", "no-json"])
def test_corrupt_newest_checkpoint_falls_back(run60, tmp_path, corrupt):
    _, src = run60
    out, ref = tmp_path / "corrupt", tmp_path / "only30"
    shutil.copytree(src, out)
    shutil.copytree(src, ref)
    for p in (ref / "checkpoints").glob("step-00000060.*"):
        p.unlink()
    corrupt(out / "checkpoints" / "step-00000060.safetensors")

    got = api.sample(out, 7, seed=3)
    assert np.array_equal(got, api.sample(ref, 7, seed=3))  # the step-30 generator
    assert not np.array_equal(got, api.sample(src, 7, seed=3))
    assert api.evaluate(out, n=100)["step"] == 30


def test_resume_after_corrupt_newest_checkpoint(run60, tmp_path):
    """A corrupt step-60 checkpoint: resume falls back to step 30, trains to 60 again, and
    leaves a valid step-60 checkpoint identical to the uninterrupted run's."""
    _, src = run60
    out = tmp_path / "corrupt"
    shutil.copytree(src, out)
    _truncate(out / "checkpoints" / "step-00000060.safetensors")
    result = api.train({"out": str(out)}, resume=True, quiet=True)
    assert result.step == 60
    ck = ckpt_io.read(out / "checkpoints" / "step-00000060.json")  # verifies the checksum
    assert ck.step == 60
    assert_same_networks(src, out)


def test_all_checkpoints_corrupt_is_an_error(run60, tmp_path):
    _, src = run60
    out = tmp_path / "r"
    shutil.copytree(src, out)
    for p in (out / "checkpoints").glob("*.safetensors"):
        _truncate(p)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        api.sample(out, 3)
    res = invoke(["sample", str(out), "--n", "3", "--out", str(tmp_path / "s.npy")])
    assert res.exit_code == 2 and "no usable checkpoint" in res.stderr
    assert not (tmp_path / "s.npy").exists()


# ------------------------------------------------------------------ sample and evaluate


def test_sample_cli_writes_float32_npy(run60, tmp_path):
    _, run = run60
    f = tmp_path / "f.npy"
    res = invoke(["sample", str(run), "--n", "7", "--out", str(f)])
    assert res.exit_code == 0, res.output
    arr = np.load(f, allow_pickle=False)
    assert arr.dtype == np.float32 and arr.shape == (7, 2)
    assert np.isfinite(arr).all()
    again = tmp_path / "g.npy"
    assert invoke(["sample", str(run), "--n", "7", "--out", str(again)]).exit_code == 0
    assert np.array_equal(arr, np.load(again, allow_pickle=False))  # same seed, same samples
    other = tmp_path / "h.npy"
    assert invoke(["sample", str(run), "--n", "7", "--out", str(other), "--seed", "1"]).exit_code == 0
    assert not np.array_equal(arr, np.load(other, allow_pickle=False))


@pytest.mark.parametrize("args, needle", [
    (["--n", "0", "--out", "x.npy"], "--n"),
    (["--n", "3", "--out", "x.txt"], ".npy"),
])
def test_sample_cli_bad_input(run60, tmp_path, monkeypatch, args, needle):
    _, run = run60
    monkeypatch.chdir(tmp_path)
    res = invoke(["sample", str(run), *args])
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_sample_of_a_non_run_exits_2(tmp_path):
    res = invoke(["sample", str(tmp_path), "--n", "3", "--out", str(tmp_path / "s.npy")])
    assert res.exit_code == 2 and "not a run directory" in res.stderr


@pytest.mark.parametrize("n", ["0", "-5"])
def test_evaluate_refuses_a_sample_count_below_one(run60, n):
    _, run = run60
    res = invoke(["evaluate", str(run), "--n", n])
    assert res.exit_code == 2, res.output
    assert res.stderr == f"Error: --n must be at least 1, got {n}\n"


def test_evaluate_cli_json(run60):
    _, run = run60
    res = invoke(["evaluate", str(run), "--json", "--n", "500"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["step"] == 60 and data["samples"] == 500 and data["dataset"] == "grid25"
    keys = [k for k in data["metrics"] if k.startswith("mixture/")]
    assert keys, data["metrics"]
    for k in keys:
        assert isinstance(data["metrics"][k], (int, float))
    assert 0 <= data["metrics"]["mixture/modes"] <= 25


# ------------------------------------------------------------------ CLI errors


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "grid52"], "did you mean 'grid25'"),
    (["--loss", "hinj"], "did you mean 'hinge'"),
    (["-o", "dataset.n=lots"], "'n'"),
    (["-o", "dataset.sigma=-1"], "'sigma'"),
    (["-o", "model.hiden=3"], "did you mean 'hidden'"),
    (["--steps", "0"], "steps"),
])
def test_train_cli_bad_input_exit_2_and_no_run_dir(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    res = invoke(["train", "--steps", "2", *args])
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no runs/ created for a bad config


def test_unwritable_out_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for out in (blocker / "run", blocker):
        res = invoke(["train", *SMALL_FLAGS, "--steps", "2", "--out", str(out)])
        assert res.exit_code == 2, (out, res.output)
        assert "Traceback" not in res.output
        assert str(out) in res.stderr
    assert blocker.read_text() == "not a directory"


def test_dry_run_creates_no_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke(["train", *SMALL_FLAGS, "--steps", "2", "--dry-run"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert cfg["steps"] == 2 and cfg["options"]["dataset"]["n"] == 2000
    assert list(tmp_path.iterdir()) == []


def test_dry_run_resume_shows_the_runs_config(run60, tmp_path):
    _, src = run60
    out = tmp_path / "r"
    shutil.copytree(src, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "90", "--dry-run"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert cfg["steps"] == 90 and cfg["options"]["dataset"]["n"] == 2000
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------ no host synchronisation


_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__",
                 "__format__", "__repr__", "__str__")
#: the phases that run at their own intervals and may gather scalars to the host
_ALLOWED_PHASES = Trainer.PERIODIC_PHASES


def _count_loop_syncs(monkeypatch, settings):
    """Train with every host-synchronising Tensor method wrapped.

    Returns (calls outside the periodic phases, calls inside them, number of log calls,
    steps run). A call is counted while ``Trainer._loop`` runs and no periodic phase is
    active. Calls made by ``torch.optim`` itself are not counted: non-capturable Adam keeps
    its step counter as a CPU scalar and reads it with ``.item()``, which never waits for
    an accelerator.
    """
    import core.training as T

    optim_dir = os.path.dirname(torch.optim.__file__)
    state = {"loop": 0, "phase": 0, "logs": 0}
    bad: collections.Counter = collections.Counter()
    allowed: collections.Counter = collections.Counter()

    def wrap_method(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if state["loop"]:
                f = sys._getframe(1)
                where = f.f_code.co_filename
                if not where.startswith(optim_dir):
                    key = (name, where, f.f_lineno)
                    (allowed if state["phase"] else bad)[key] += 1
            return orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in _SYNC_METHODS:
        wrap_method(name)

    def around(name, counter_key):
        orig = getattr(T.Trainer, name)

        def wrapper(self, *a, **k):
            state[counter_key] += 1
            if name == "_log_step":
                state["logs"] += 1
            try:
                return orig(self, *a, **k)
            finally:
                state[counter_key] -= 1

        monkeypatch.setattr(T.Trainer, name, wrapper)

    around("_loop", "loop")
    for phase in _ALLOWED_PHASES:
        around(phase, "phase")
    result = api.train(settings, quiet=True)
    return bad, allowed, state["logs"], result.step


_SYNC_CASES = {
    "ns": {},
    "wgan-gp": {"loss": "wgan-gp"},  # several critic steps, gradient penalty
    # conditional path (labels, prior), with detection and partitioning at their own steps
    "dyngan": {"preset": "dyngan", "options": {"dataset": {"n": 2000}, "detector": {"every": 10},
                                               "partitioner": {"every": 20}}},
    "g-ema": {"g_ema": 0.99},
    # shuffled epochs (a new permutation every 15 steps of 2,000 points, on the device), and the G
    # step drawing its own fake conditions
    "epoch": {"sampling": "epoch", "options": {"dataset": {"n": 2000}}},
    "prior-fresh": {"preset": "dyngan", "options": {"dataset": {"n": 2000}, "conditioner": {
        "fake_conditions": "prior-fresh"}}},  # the weight average updated after every generator step
}


@pytest.mark.parametrize("case", list(_SYNC_CASES))
def test_no_host_sync_on_steps_that_do_not_log(tmp_path, monkeypatch, case):
    # 40 steps, logging at 25 and 40: the other 38 steps (14 of them after the last log
    # but one) must make no .item()/.cpu()/.tolist()/float()/bool()/printing of a tensor
    settings = small(tmp_path / "r", steps=40, log_every=25, checkpoint_every=0)
    settings.update(_SYNC_CASES[case])
    bad, allowed, logs, steps = _count_loop_syncs(monkeypatch, settings)
    assert steps == 40
    assert logs == 2
    assert sum(allowed.values()) > 0  # the counter sees the logging steps' gathering
    if case == "dyngan":
        events = {r.get("event") for r in [json.loads(x) for x in
                                           (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]}
        assert "detection" in events  # the periodic phases did run inside the checked loop
    assert not bad, "host synchronisation inside the training loop: " + ", ".join(
        f"{n} at {Path(f).name}:{line} x{c}" for (n, f, line), c in bad.items())


def test_sync_counter_catches_a_per_step_item(tmp_path, monkeypatch):
    """The check above fails if a per-step ``.item()`` creeps into the loop (here: in the loss)."""
    from core.plugins import get_host

    cls = get_host().registry.get("loss", "ns")
    orig = cls.g_loss

    def g_loss(self, ctx):
        out = orig(self, ctx)
        out.item()
        return out

    monkeypatch.setattr(cls, "g_loss", g_loss)
    bad, _, _, steps = _count_loop_syncs(monkeypatch, small(tmp_path / "r", steps=20, log_every=50,
                                                            checkpoint_every=0))
    assert steps == 20
    assert sum(c for (name, _, _), c in bad.items() if name == "item") == 20


def test_no_partition_on_the_final_step(tmp_path):
    """A partition at the last step would never be trained on: the loop skips it, and only it."""
    cfg = small(tmp_path / "run", steps=60, partitioner="kmeans", conditioner="onehot")
    cfg["options"].update(partitioner={"every": 20, "k": 4, "restarts": 1}, conditioner={"capacity": 8})
    res = api.train(cfg, quiet=True)
    events = [r["step"] for r in res.metrics if r.get("event") in ("partition", "partition-check")]
    assert events == [20, 40], events


@pytest.mark.parametrize("preset", [None, "dyngan"])
def test_a_resume_makes_the_partition_check_its_last_final_step_skipped(tmp_path, preset):
    """A run extended by resumes that each ended on a check step never partitioned (a long-run QA
    pass: 16,000 steps in 1,000-step resumes stayed at one condition where a run that never stopped
    opened four). The skipped check is kept in the checkpoint and made before the next step: the
    resumed run is the run that never stopped, bit for bit."""
    def cfg(out, steps):
        c = small(out, steps=steps, checkpoint_every=20)
        if preset is None:
            c.update(partitioner="kmeans", conditioner="onehot")
            c["options"].update(partitioner={"every": 20, "k": 3, "restarts": 1}, conditioner={"capacity": 8})
        else:  # the detection of the skipped step is kept for it (detector every 10, checks every 20)
            c["preset"] = "dyngan"
            c["options"].update(detector={"every": 10}, partitioner={"every": 20, "tau": 0.0})
        return c

    whole = api.train(cfg(tmp_path / "whole", 60), quiet=True)
    api.train(cfg(tmp_path / "parts", 20), quiet=True)
    api.train({**cfg(tmp_path / "parts", 40), "out": str(tmp_path / "parts")}, resume=True, quiet=True)
    parts = api.train({**cfg(tmp_path / "parts", 60), "out": str(tmp_path / "parts")}, resume=True, quiet=True)

    def checks(res):
        return [(r["step"], r["event"]) for r in res.metrics if r.get("event") in ("partition", "partition-check")]

    assert checks(parts) == checks(whole)
    assert [step for step, _ in checks(whole)] == [20, 40]
    if preset is None:
        assert [event for _, event in checks(whole)] == ["partition", "partition"]
    a, b = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "parts")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_detection_a_checkpoint_cannot_keep_still_saves_the_final_step(tmp_path):
    """A third-party Detection subclass with a field that is neither a tensor nor JSON (the docs
    allow extra fields): a final step on a check step kept the detection for the pending check,
    failed and lost the final checkpoint (a review of the pending check). Now the step is saved
    without it, with a warning, and a resume goes on to the next check as before."""
    import dataclasses

    from core.components import Detection
    from core.testing import plugin_host

    @dataclasses.dataclass
    class RichDetection(Detection):
        per_mode: list = dataclasses.field(default_factory=list)

    class RichDetector(DynGANDetector):
        name = "rich"

        def detect(self, ctx):
            d = super().detect(ctx)
            return RichDetection(d.collapsed, d.fraction, d.score, d.features, per_mode=[d.fraction.clone()])

    plugin = types.SimpleNamespace(register_collapse_detectors=hookimpl(lambda register: register(RichDetector)))
    cfg = small(tmp_path / "r", steps=20, checkpoint_every=10, detector="rich", partitioner="dyngan",
                conditioner="onehot")
    cfg["options"].update(detector={"every": 10}, partitioner={"every": 20})
    stream = io.StringIO()
    with plugin_host(("qa", plugin), strict=True):
        res = api.train(cfg, quiet=False, stream=stream)
        assert res.step == 20 and ckpt_steps(tmp_path / "r") == [10, 20]
        assert "a resume goes on to the next partition check" in stream.getvalue()
        meta = json.loads((tmp_path / "r" / "checkpoints" / "step-00000020.json").read_text())
        assert "partition_pending" not in meta and "detection" not in meta
        res = api.train({**cfg, "steps": 30}, resume=True, quiet=True)
        assert res.step == 30


def test_a_rollback_to_a_pending_check_logs_the_partition_once(tmp_path):
    """The resume makes the pending check of step 20; a divergence before the next checkpoint
    rolls back to step 20, whose check is made again: its first record must go (it was kept,
    logging the partition twice), as must one from an interrupted resume before."""
    from core.testing import plugin_host

    class OnceNaN(NonSaturatingLoss):
        name = "once-nan"
        fire_at: int | None = None
        calls = 0

        def d_loss(self, ctx):
            loss = super().d_loss(ctx)
            if OnceNaN.fire_at is not None:
                OnceNaN.calls += 1
                if OnceNaN.calls == OnceNaN.fire_at:
                    loss = loss * float("nan")
            return loss

    plugin = types.SimpleNamespace(register_losses=hookimpl(lambda register: register(OnceNaN)))
    cfg = small(tmp_path / "r", steps=20, checkpoint_every=20, log_every=5, loss="once-nan",
                partitioner="kmeans", conditioner="onehot", on_divergence="rollback")
    cfg["options"].update(partitioner={"every": 20, "k": 3, "restarts": 1}, conditioner={"capacity": 8})
    with plugin_host(("qa", plugin), strict=True):
        api.train(cfg, quiet=True)
        OnceNaN.fire_at = 7  # NaN at the resume's 7th step, before its next checkpoint
        res = api.train({**cfg, "steps": 40}, resume=True, quiet=True)
    events = [(r["step"], r["event"]) for r in res.metrics if r.get("event") in ("partition", "rollback")]
    assert events == [(20, "rollback"), (20, "partition")], events


# ------------------------------------------------------------------ a failing evaluation


class _FailsMetric(Metric):
    """A metric that raises when it computes (it has no check, so training starts)."""

    name = "fails"

    def compute(self, fake, real, dataset):
        raise ValueError("this metric always fails")


@hookimpl
def _register_failing_metric(register):
    register(_FailsMetric)


@pytest.fixture
def failing_metric():
    from core.testing import plugin_host

    plugin = types.SimpleNamespace(register_metrics=_register_failing_metric)
    with plugin_host(("failing-metric", plugin)) as host:
        yield host


def test_a_failing_final_evaluation_keeps_the_trained_steps(tmp_path, failing_metric):
    # the metric fails, after all the training
    out = tmp_path / "r"
    res = invoke(["train", *SMALL_FLAGS, "--steps", "12", "--checkpoint-every", "0", "--out", str(out),
                  "-o", "dataset.n=200", "--metrics", "fails", "-q"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert "saved at step 12" in res.stderr and "dyngan evaluate" in res.stderr
    assert ckpt_steps(out) == [12]
    # the saved run is whole: it draws samples, and scores with enough of them
    res = invoke(["sample", str(out), "--n", "10", "--out", str(tmp_path / "s.npy")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "s.npy").shape == (10, 2)


def test_a_failing_intermediate_evaluation_saves_its_step_before_stopping(tmp_path, failing_metric):
    out = tmp_path / "r"
    res = invoke(["train", *SMALL_FLAGS, "--steps", "30", "--checkpoint-every", "0", "--eval-every", "10",
                  "--out", str(out), "-o", "dataset.n=200", "--metrics", "fails", "-q"])
    assert res.exit_code == 1, res.output
    assert "saved at step 10" in res.stderr
    assert ckpt_steps(out) == [10]


def test_eval_samples_that_cannot_fit_are_refused_before_training(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("eval_samples = 99999999999999\n")
    out = tmp_path / "r"
    res = invoke(["train", *SMALL_FLAGS, "--steps", "5", "--config", str(cfg), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "eval_samples" in res.stderr and "GiB" in res.stderr and "Traceback" not in res.output
    assert not (out / "checkpoints").exists()  # nothing trained, and --out is free again
    res = invoke(["train", *SMALL_FLAGS, "--steps", "5", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output


def test_resume_to_fewer_steps_than_done_says_there_is_nothing_to_train(run60, tmp_path):
    _, src = run60
    out = tmp_path / "r"
    shutil.copytree(src, out)
    stream = io.StringIO()
    result = api.train({"out": str(out), "steps": 40}, resume=True, quiet=False, stream=stream)
    assert result.step == 60 and ckpt_steps(out) == [30, 60]
    assert "already at step 60 of --steps 40: nothing to train" in stream.getvalue()
    assert json.loads((out / "config.json").read_text())["steps"] == 60  # a no-op resume keeps the length
    # no step ran, so no "start" record (README: the wall-clock time of a process's first step)
    starts = [r for r in rundir.read_metrics(out) if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["step"] == 0


def test_a_resume_with_nothing_to_train_still_records_new_intervals_and_metric_settings(run60_copy):
    out = run60_copy
    before = json.loads((out / "config.json").read_text())
    res = invoke(["train", "--resume", "--out", str(out), "--keep-checkpoints", "1", "--eval-every", "7",
                  "-o", "metric.hq_sigmas=2", "-q"])
    assert res.exit_code == 0 and res.stderr == "", res.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["keep_checkpoints"], cfg["eval_every"], cfg["options"]["metric"]["mixture"]["hq_sigmas"]) == (1, 7, 2.0)
    assert cfg["steps"] == before["steps"] == 60 and ckpt_steps(out) == [30, 60]
    # ... and the next plain resume uses them
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "70", "--checkpoint-every", "5", "-q"])
    assert res.exit_code == 0, res.output
    assert ckpt_steps(out) == [70]
    evals = [r for r in rundir.read_metrics(out) if r.get("event") == "eval" and r["step"] > 60]
    assert [r["step"] for r in evals] == [63, 70]


def test_a_second_process_cannot_train_in_a_run_directory_in_use(run60, tmp_path):
    # the first "process" holds the run's lock (as api.train does while it trains)
    from core import rundir

    _, src = run60
    out = tmp_path / "r"
    shutil.copytree(src, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with rundir.RunLock(out):
        # the first process's resume changed --steps: config.json was replaced by a new file
        (out / "config.new").write_bytes((out / "config.json").read_bytes())
        os.replace(out / "config.new", out / "config.json")
        res = invoke(["train", "--resume", "--out", str(out), "--steps", "70", "-q"])
        assert res.exit_code == 2, res.output
        assert "another dyngan process is training in" in res.stderr and "Traceback" not in res.output
        # --dry-run checks --out as train does: it printed the config without a word (a QA pass)
        res = invoke(["train", "--resume", "--out", str(out), "--steps", "70", "--dry-run"])
        assert res.exit_code == 2 and "another dyngan process is training in" in res.stderr, res.output
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "70", "-q"])  # released: it goes on
    assert res.exit_code == 0, res.output
    assert ckpt_steps(out)[-1] == 70


def test_a_run_that_stopped_before_its_first_checkpoint_says_what_to_do(run60, tmp_path):
    _, src = run60
    out = tmp_path / "r"
    shutil.copytree(src, out)
    shutil.rmtree(out / "checkpoints")  # as a run that diverged before its first checkpoint
    (out / "checkpoints").mkdir()
    for args in (["train", "--resume", "--out", str(out), "--steps", "5"],
                 ["train", *SMALL_FLAGS, "--steps", "5", "--out", str(out)]):
        res = invoke(args)
        assert res.exit_code == 2, res.output
        assert "stopped before its first checkpoint" in res.stderr and "delete that directory" in res.stderr


# ------------------------------------------------------------------ bad input around a saved run


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("metrics", [[5], 5, [[1]]], ids=["list-of-int", "int", "nested-list"])
def test_bad_metrics_in_a_saved_config_exit_2_on_every_command(run60, tmp_path, metrics):
    _, src = run60
    out = _edited_copy(src, tmp_path / "r", metrics=metrics)
    for args in (["sample", str(out), "--n", "5", "--out", str(tmp_path / "s.npy")],
                 ["evaluate", str(out), "--n", "50"], ["report", str(out), "--n", "50"],
                 ["train", "--resume", "--out", str(out), "--steps", "70", "-q"]):
        res = invoke(args)
        assert res.exit_code == 2, (args, res.output)
        assert "Traceback" not in res.output
        assert "config.json is invalid" in res.stderr and "'metrics'" in res.stderr, res.stderr


def test_a_damaged_config_json_is_named_as_such_not_as_a_plugin_problem(run60, tmp_path):
    _, src = run60
    out = _edited_copy(src, tmp_path / "r", seed=-1)
    res = invoke(["evaluate", str(out), "--n", "50"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "config.json is invalid" in res.stderr and "'seed' must be >= 0" in res.stderr
    assert "installed plugins" not in res.stderr
    # a component no installed plugin has is still reported as a plugin problem
    gone = _edited_copy(src, tmp_path / "g", loss="uninstalled-loss")
    res = invoke(["evaluate", str(gone), "--n", "50"])
    assert res.exit_code == 2 and "cannot be loaded with the installed plugins" in res.stderr


def test_a_saved_config_with_json_floats_for_counts_still_resumes(run60, tmp_path):
    _, src = run60
    out = _edited_copy(src, tmp_path / "r", batch_size=128.0, steps=60.0)
    result = api.train({"out": str(out), "steps": 61}, resume=True, quiet=True)
    assert result.step == 61


def test_an_empty_out_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    for extra in ([], ["--resume"]):
        res = invoke(["train", *SMALL_FLAGS, "--steps", "2", "--out", "", "-q", *extra])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and "--out is empty" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    with pytest.raises(UsageError, match="--out is empty"):
        api.train(small("", steps=2), quiet=True)


def test_resume_says_the_dataset_cannot_change_not_that_an_option_is_unknown(run60, tmp_path):
    _, src = run60
    res = invoke(["train", "--resume", "--dry-run", "--out", str(src), "--dataset", "ring8"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "the dataset cannot change" in res.stderr and "'grid25', not 'ring8'" in res.stderr
    assert "unknown option" not in res.stderr
    res = invoke(["train", "--resume", "--dry-run", "--out", str(src), "--dataset", "grid25", "--metrics", "mixture"])
    assert res.exit_code == 0, res.output
    # no component is written as TOML and the CLI write it, not as Python's None
    res = invoke(["train", "--resume", "--dry-run", "--out", str(src), "--loss", "none"])
    assert res.exit_code == 2 and "the loss cannot change; it was 'ns', not none (" in res.stderr, res.output


def test_resume_names_only_the_changed_options(run60, tmp_path):
    _, src = run60
    res = invoke(["train", "--resume", "--dry-run", "--out", str(src), "-o", "dataset.n=3000",
                  "-o", "model.hidden=64"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    msg = res.stderr.strip()
    assert "dataset.n was 2000, not 3000" in msg and "model.hidden was 128, not 64" in msg
    assert len(msg) < 400 and "'sigma'" not in msg, msg
    res = invoke(["train", "--resume", "--dry-run", "--out", str(src), "-o", "dataset.n=2000"])
    assert res.exit_code == 0, res.output


def test_a_plain_resume_keeps_the_schedule_a_resume_changed(run60_copy):
    """``--resume --steps 80`` interrupted at step 70: the ``dyngan train --out X --resume`` that
    the interrupt message suggests must go on to 80 (config.json records the new length and
    checkpoint interval), not stop with "already at step 70 of --steps 60"."""
    out = run60_copy
    api.train({"out": str(out), "steps": 80, "checkpoint_every": 10, "threads": 1}, resume=True, quiet=True)
    saved = json.loads((out / "config.json").read_text())
    assert (saved["steps"], saved["checkpoint_every"]) == (80, 10)
    assert saved["threads"] is None  # the machine's settings are per invocation, not recorded
    (out / "checkpoints" / "step-00000080.safetensors").unlink()  # as if stopped after step 70
    (out / "checkpoints" / "step-00000080.json").unlink()
    res = invoke(["train", "--resume", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert ckpt_steps(out)[-1] == 80


def test_a_resume_may_change_what_evaluations_measure_and_trains_the_same(run60, tmp_path):
    """--metrics and -o metric.* may change on --resume: evaluation draws from its own random stream,
    so the weights are those of a resume without the change; config.json records the new settings,
    so a later plain --resume keeps them; the saved options of a metric no longer chosen are dropped."""
    runs = {}
    for name, extra in (("plain", []), ("other", ["--metrics", "mixture,prdc", "-o", "metric.hq_sigmas=2",
                                                   "-o", "metric.prdc.k=3"])):
        out = tmp_path / name
        shutil.copytree(run60[1], out)
        res = invoke(["train", "--resume", "--out", str(out), "--steps", "80", "--eval-every", "10", "-q", *extra])
        assert res.exit_code == 0, res.output
        runs[name] = out
    a, b = final_tensors(runs["plain"]), final_tensors(runs["other"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = {n: [r for r in map(json.loads, (runs[n] / "metrics.jsonl").read_text().splitlines())
                 if r.get("event") == "eval" and r["step"] > 60] for n in runs}
    assert [r["step"] for r in evals["other"]] == [70, 80] and "prdc/precision" in evals["other"][0]
    assert not any("prdc/precision" in r for r in evals["plain"])
    for p, o in zip(evals["plain"], evals["other"]):  # the same samples scored within 2 sigma, not 3
        assert o["mixture/hq"] == o["mixture/dyngan/hq2"] and p["mixture/hq"] == p["mixture/dyngan/hq3"]
    saved = json.loads((runs["other"] / "config.json").read_text())
    assert saved["metrics"] == ["mixture", "prdc"]
    assert saved["options"]["metric"]["mixture"]["hq_sigmas"] == 2.0 and saved["options"]["metric"]["prdc"]["k"] == 3
    # a plain resume keeps them; another --metrics drops the options of the metric it leaves out
    res = invoke(["train", "--resume", "--dry-run", "--out", str(runs["other"]), "--steps", "90"])
    assert res.exit_code == 0 and json.loads(res.stdout)["options"]["metric"]["prdc"]["k"] == 3, res.output
    res = invoke(["train", "--resume", "--dry-run", "--out", str(runs["other"]), "--metrics", "prdc"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["options"]["metric"] == {"prdc": saved["options"]["metric"]["prdc"]}
    # what no chosen metric has is refused as for a new run
    for extra, needle in ((["-o", "metric.nope=1"], "no chosen metric has it"),
                          (["--metrics", "mixture", "-o", "metric.prdc.k=3"], "metric 'prdc' is not chosen"),
                          (["--metrics", "nope"], "nope")):
        res = invoke(["train", "--resume", "--dry-run", "--out", str(runs["other"]), *extra])
        assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.output, (extra, res.output)


def test_keep_checkpoints_is_a_flag_and_may_change_on_resume(run60_copy):
    out = run60_copy
    assert ckpt_steps(out) == [30, 60]
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "70", "--checkpoint-every", "5",
                  "--keep-checkpoints", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert ckpt_steps(out) == [70]
    assert json.loads((out / "config.json").read_text())["keep_checkpoints"] == 1
    res = invoke(["train", "--resume", "--out", str(out), "--keep-checkpoints", "0", "-q"])
    assert res.exit_code == 2 and "keep_checkpoints" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("rate,text", [(0.004, "0.004"), (0.256, "0.26"), (3.14, "3.1"), (441.7, "442")])
def test_progress_rate_keeps_digits_for_slow_runs(rate, text):
    from core.training import rate_text

    assert rate_text(rate) == text


def test_a_partition_check_that_makes_none_logs_why_and_says_it_once(tmp_path):
    stream = io.StringIO()
    s = small(tmp_path / "r", steps=40, preset="dyngan", checkpoint_every=0)
    s["options"].update(detector={"every": 10}, partitioner={"every": 10, "tau": 1.0})
    api.train(s, quiet=False, stream=stream)
    checks = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
              if '"partition-check"' in ln]
    assert [c["step"] for c in checks] == [10, 20, 30]  # none at the final step
    assert all("below tau (1.0)" in c["reason"] for c in checks)
    assert stream.getvalue().count("no new partition: the collapse fraction is below tau") == 1


def test_a_metric_that_cannot_score_eval_samples_is_refused_before_training(tmp_path):
    out = tmp_path / "r"
    cfg = tmp_path / "c.toml"
    cfg.write_text('metrics = "prdc"\neval_samples = 3\n')
    res = invoke(["train", *SMALL_FLAGS, "--steps", "5", "--config", str(cfg), "--out", str(out), "-q"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "k=5 needs more than 5 generated" in res.stderr and "3 generated" in res.stderr
    assert not out.exists() or not any(out.rglob("*.safetensors"))  # refused before the first step
    # and evaluate refuses a --n the metric cannot score, naming the way out
    res = invoke(["train", *SMALL_FLAGS, "--steps", "5", "--metrics", "prdc", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    res = invoke(["evaluate", str(out), "--n", "4"])
    assert res.exit_code == 2 and "-o metric.prdc.k" in res.stderr and "Traceback" not in res.output


def test_a_chosen_metric_that_does_not_apply_to_the_dataset_is_warned_about(tmp_path):
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).normal(size=(300, 3)).astype("float32"))
    out = tmp_path / "r"
    res = invoke(["train", "--dataset", "tensor-file", "-o", f"dataset.path={data}", "--metrics", "mixture,prdc",
                  "--steps", "5", "--device", "cpu", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "metric 'mixture' does not apply to dataset 'tensor-file' and is skipped" in res.stderr
    res = invoke(["evaluate", str(out), "--n", "100"])
    assert res.exit_code == 0 and "does not apply" in res.stderr and "prdc/precision" in res.output


def test_a_slow_run_shows_a_heartbeat_between_logged_steps(monkeypatch):
    from core import training

    clock = [0.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])
    stream = io.StringIO()  # not a terminal: a heartbeat after 60 s without a line
    p = training.Progress(100, quiet=False, stream=stream)
    clock[0] = 30.0
    p.tick(3)
    assert stream.getvalue() == ""
    clock[0] = 61.0
    p.tick(6)
    assert stream.getvalue() == "step 6/100 (  6%)  0.098 steps/s (losses at the next logged step)\n"
    clock[0] = 62.0
    p.update(11, "D 1.0  G 1.0  0.1 steps/s")  # 5 steps since the last line: shown
    clock[0] = 100.0
    p.tick(12)  # 38 s since the last line: nothing yet
    assert stream.getvalue().count("\n") == 2
    quiet = io.StringIO()
    q = training.Progress(100, quiet=True, stream=quiet)
    clock[0] = 1000.0
    q.tick(50)
    assert quiet.getvalue() == ""


def test_the_heartbeat_runs_in_the_training_loop(tmp_path, monkeypatch):
    from core import training

    monkeypatch.setattr(training.Progress, "HEARTBEAT", {True: 0.0, False: 0.0})
    stream = io.StringIO()
    api.train(small(tmp_path / "r", steps=10, log_every=5, checkpoint_every=0), quiet=False, stream=stream)
    beats = [ln for ln in stream.getvalue().splitlines() if "losses at the next logged step" in ln]
    assert [ln.split()[1] for ln in beats] == ["1/10", "2/10", "3/10", "4/10", "6/10", "7/10", "8/10", "9/10"]


def test_a_slow_phase_without_steps_says_what_it_is_doing(monkeypatch):
    import time

    from core import training

    monkeypatch.setattr(training.Progress, "SLOW_NOTICE", 0.05)
    stream = io.StringIO()
    p = training.Progress(100, quiet=False, stream=stream)
    with p.slow("loading dataset 'x'"):
        pass  # quick: nothing shown, and the timer does not fire later
    time.sleep(0.2)
    assert stream.getvalue() == ""
    with p.slow("step 5: scoring 100 samples"):
        time.sleep(0.3)
    assert stream.getvalue() == "step 5: scoring 100 samples ...\n"
    quiet = io.StringIO()
    with training.Progress(100, quiet=True, stream=quiet).slow("loading"):
        time.sleep(0.2)
    assert quiet.getvalue() == ""


def test_training_says_when_loading_is_slow_and_shows_each_evaluation(tmp_path, monkeypatch):
    import time

    from core import training

    monkeypatch.setattr(training.Progress, "SLOW_NOTICE", 0.05)
    real = training.load_dataset

    def slow_load(comps, seed):
        time.sleep(0.3)
        return real(comps, seed)

    monkeypatch.setattr(training, "load_dataset", slow_load)
    stream = io.StringIO()
    run = api.train(small(tmp_path / "r", steps=10, log_every=5, checkpoint_every=0, eval_every=5),
                    quiet=False, stream=stream)
    lines = stream.getvalue().splitlines()
    assert "loading dataset 'grid25' ..." in lines
    evals = [ln for ln in lines if ln.startswith("step ") and "mixture/modes" in ln]
    assert [ln.split(":")[0] for ln in evals] == ["step 5", "step 10"]
    logged = [json.loads(ln) for ln in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in logged if r.get("event") == "eval"][-1]
    modes = int(final["mixture/modes"])
    assert f"mixture/modes {modes}  mixture/hq" in evals[-1]
    assert "mixture/dyngan/" not in evals[-1]  # the nested values stay in metrics.jsonl


def test_a_run_whose_data_file_moved_says_where_it_looks_and_how_to_point_it_elsewhere(tmp_path):
    data = tmp_path / "d.npy"
    np.save(data, np.random.default_rng(0).normal(size=(300, 2)).astype("float32"))
    out = tmp_path / "r"
    res = invoke(["train", "--dataset", "tensor-file", "-o", f"dataset.path={data}", "--steps", "5",
                  "--device", "cpu", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    data.rename(tmp_path / "moved.npy")
    for cmd in (["evaluate", str(out)], ["report", str(out)], ["train", "--out", str(out), "--resume", "--steps", "8"]):
        res = invoke(cmd)
        assert res.exit_code == 2 and "Traceback" not in res.output, (cmd, res.output)
        assert "cannot read its training data" in res.stderr and str(data) in res.stderr, (cmd, res.stderr)
        assert "config.json" in res.stderr
    # pointed at the new place (config.json edited), the run works again
    cfg = json.loads((out / "config.json").read_text())
    cfg["options"]["dataset"]["path"] = str(tmp_path / "moved.npy")
    (out / "config.json").write_text(json.dumps(cfg))
    res = invoke(["train", "--out", str(out), "--resume", "--steps", "8", "-q"])
    assert res.exit_code == 0, res.output


def test_data_outside_what_the_generator_can_output_is_warned_about(tmp_path):
    data = tmp_path / "u8.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, size=(64, 1, 8, 8)).astype("float32"))
    base = ["train", "--dataset", "tensor-file", "-o", f"dataset.path={data}", "--model", "dcgan",
            "-o", "model.channels=4", "--steps", "2", "--device", "cpu", "--metrics", "none", "-q"]
    res = invoke([*base, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "can only output values in [-1, 1]" in res.stderr and "dataset.scale=minmax" in res.stderr
    res = invoke([*base, "--out", str(tmp_path / "b"), "-o", "dataset.scale=minmax"])
    assert res.exit_code == 0 and "can only output" not in res.stderr, res.output


class _ZeroEveryDetector(DynGANDetector):
    name = "zero-every"

    @property
    def every(self):
        return 0


@hookimpl
def _register_zero_every(register):
    register(_ZeroEveryDetector)


def test_a_detector_whose_every_is_not_a_positive_integer_fails_clearly(tmp_path):
    from core.testing import plugin_host

    with plugin_host(("zero-every", types.SimpleNamespace(register_collapse_detectors=_register_zero_every))):
        res = invoke(["train", *SMALL_FLAGS, "--steps", "5", "--detector", "zero-every", "--partitioner", "dyngan",
                      "--conditioner", "onehot", "--out", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "detector 'zero-every' (plugin 'zero-every') raised in every()" in res.stderr
    assert "must be an integer >= 1, got 0" in res.stderr


class _UnknownFakeConditions(OneHotConditioner):
    name = "odd-fakes"

    @property
    def fake_conditions(self):
        return "uniform"


@hookimpl
def _register_odd_fakes(register):
    register(_UnknownFakeConditions)


def test_a_conditioner_with_fake_conditions_the_loop_does_not_know_fails_clearly(tmp_path):
    from core.testing import plugin_host

    with plugin_host(("odd-fakes", types.SimpleNamespace(register_conditioners=_register_odd_fakes))):
        res = invoke(["train", *SMALL_FLAGS, "--steps", "5", "--conditioner", "odd-fakes",
                      "--out", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "conditioner 'odd-fakes' (plugin 'odd-fakes') raised in fake_conditions()" in res.stderr
    assert "returned 'uniform'; the training loop knows prior, prior-fresh, real" in res.stderr
    assert not (tmp_path / "r").exists()  # refused before training: no run left behind


class _NoDSteps(NonSaturatingLoss):
    name = "no-d-steps"

    @property
    def d_steps(self):
        return 0  # the G step would have no fake batch


class _ExitingLoss(NonSaturatingLoss):
    name = "exiting"

    def d_loss(self, ctx):
        raise SystemExit(0)  # a plugin's sys.exit() must not end the run as a success


@hookimpl
def _register_odd_losses(register):
    register(_NoDSteps)
    register(_ExitingLoss)


@pytest.mark.parametrize("loss, message", [
    # refused before training
    ("no-d-steps", "loss 'no-d-steps' (plugin 'odd-losses') raised in d_steps(): ValueError: returned 0; it must "
                   "be an int >= 1"),
    # fails in the first step: as before any step finished, the new run is removed too
    ("exiting", "loss 'exiting' (plugin 'odd-losses') raised in d_loss(): SystemExit: 0"),
])
def test_a_loss_that_breaks_the_loop_fails_clearly(tmp_path, loss, message):
    from core.testing import plugin_host

    with plugin_host(("odd-losses", types.SimpleNamespace(register_losses=_register_odd_losses))):
        res = invoke(["train", *SMALL_FLAGS, "--steps", "5", "--loss", loss, "--out", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert message in res.stderr
    assert not (tmp_path / "r").exists()  # no run left behind: the same --out trains once it is fixed


class _BadMetric(Metric):
    """A metric whose result ``mode`` picks (set by the test) breaks the contract."""

    name = "bad"
    mode = "inplace"

    def compute(self, fake, real, dataset):
        if self.mode == "inplace":
            real[:5].mul_(0)  # a view: the training set itself changes
            return {"bad/x": 1.0}
        if self.mode == "clash":
            return {"mixture/modes": 999.0}
        if self.mode == "prefix":
            return {"modes": 3.0}
        if self.mode == "tensor":
            return {"bad/x": torch.ones(())}
        return 1.5


@hookimpl
def _register_bad_metric(register):
    register(_BadMetric)


@pytest.mark.parametrize("mode, needle", [
    ("inplace", "modified its input in place"),
    ("clash", "key 'mixture/modes': every key must start with 'bad/'"),
    ("prefix", "key 'modes': every key must start with 'bad/'"),
    ("float", "returned float, not a dict of bad/KEY -> number"),
])
def test_a_metric_that_breaks_its_contract_fails_naming_it(tmp_path, monkeypatch, mode, needle):
    from core.testing import plugin_host

    monkeypatch.setattr(_BadMetric, "mode", mode)
    with plugin_host(("bad-metric", types.SimpleNamespace(register_metrics=_register_bad_metric))):
        res = invoke(["train", *SMALL_FLAGS, "--steps", "4", "--metrics", "mixture,bad",
                      "--out", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "metric 'bad' (plugin 'bad-metric') raised in compute()" in res.stderr and needle in res.stderr


def test_a_metric_may_return_0d_tensors(tmp_path, monkeypatch):
    from core.testing import plugin_host

    monkeypatch.setattr(_BadMetric, "mode", "tensor")
    with plugin_host(("bad-metric", types.SimpleNamespace(register_metrics=_register_bad_metric))):
        res = api.train(small(tmp_path / "r", steps=4, metrics="bad", checkpoint_every=0), quiet=True)
    assert [r["bad/x"] for r in res.metrics if r.get("event") == "eval"] == [1.0]


def test_a_second_train_while_the_first_has_not_checkpointed_says_it_is_in_use(tmp_path):
    from core import rundir

    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"dataset": "grid25", "loss": "ns"}))
    with rundir.RunLock(out):
        for args in (SMALL_FLAGS, ["--resume"]):
            res = invoke(["train", *args, "--steps", "5", "--out", str(out), "-q"])
            assert res.exit_code == 2, res.output
            assert "another dyngan process is training in" in res.stderr and "delete" not in res.stderr


def test_a_second_ctrl_c_before_any_checkpoint_does_not_advise_resuming(tmp_path):
    import signal as sig

    from core.training import Aborted

    (tmp_path / "checkpoints").mkdir()
    text = str(Aborted(sig.SIGINT, 19, tmp_path))
    assert "cannot be resumed" in text and "--resume" not in text
    api.train(small(tmp_path / "r", steps=2, checkpoint_every=0), quiet=True)
    assert "continue with: dyngan train" in str(Aborted(sig.SIGINT, 3, tmp_path / "r"))


class _NoGradLoss(Loss):
    name = "no-grad"

    def d_loss(self, ctx):
        return torch.tensor(0.0)

    def g_loss(self, ctx):
        return -ctx.fake_logits.mean()


@hookimpl
def _register_no_grad_loss(register):
    register(_NoGradLoss)


def test_a_loss_without_a_gradient_fails_naming_it(tmp_path):
    from core.testing import plugin_host

    with plugin_host(("no-grad", types.SimpleNamespace(register_losses=_register_no_grad_loss))):
        res = invoke(["train", *SMALL_FLAGS, "--steps", "4", "--loss", "no-grad", "--out", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "loss 'no-grad' (plugin 'no-grad') raised in d_loss()" in res.stderr and "no gradient" in res.stderr


def test_dry_run_refuses_what_train_would_refuse_before_reading_data(run60, tmp_path):
    _, src = run60
    for args, needle in ((["--amp", "bf16", "--device", "cpu"], "--amp bf16 needs a CUDA device"),
                         (["--out", ""], "--out is empty"),
                         (["--out", str(src)], "already holds a run")):
        res = invoke(["train", *SMALL_FLAGS, "--dry-run", *args])
        assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.output, (args, res.output)
    if not torch.cuda.is_available():
        res = invoke(["train", "--dry-run", "--device", "cuda"])
        assert res.exit_code == 2 and "CUDA is not available" in res.stderr
    res = invoke(["train", *SMALL_FLAGS, "--dry-run", "--out", str(tmp_path / "new")])
    assert res.exit_code == 0 and json.loads(res.stdout)["dataset"] == "grid25"
    assert not (tmp_path / "new").exists()  # a dry run creates nothing


def test_a_resumed_run_whose_metric_settings_cannot_work_says_where_to_change_them(run60_copy):
    out = run60_copy
    cfg = json.loads((out / "config.json").read_text())
    # as a run saved before metrics were checked up front
    cfg["metrics"], cfg["eval_samples"], cfg["options"]["metric"] = ["prdc"], 3, {}
    (out / "config.json").write_text(json.dumps(cfg))
    res = invoke(["train", "--out", str(out), "--resume", "--steps", "70", "-q"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "k=5 needs more than 5" in res.stderr and "-o metric.KEY=VALUE or --metrics" in res.stderr
    res = invoke(["train", "--out", str(out), "--resume", "--steps", "70", "-q", "-o", "metric.k=2"])  # as it says
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["options"]["metric"]["prdc"]["k"] == 2


class _EveryFourDetector(CollapseDetector):
    """Flags sample 0 every 4 steps."""

    name = "every-four"
    options = {"every": Option(4, "detect every this many steps", min=1)}

    def detect(self, ctx):
        collapsed = torch.zeros(ctx.data.shape[0], dtype=torch.bool, device=ctx.device)
        collapsed[0] = True
        return Detection(collapsed=collapsed, fraction=collapsed.float().mean())


class _RecordingPartitioner(Partitioner):
    """Every 2 steps, records whether it got a detection and, when it did, moves sample 0 to the
    other of two conditions (a change of the labels)."""

    name = "recording"
    options = {"every": Option(2, "check every this many steps", min=1)}
    seen: list[tuple[int, bool]] = []

    def partition(self, ctx, detection):
        type(self).seen.append((ctx.step, detection is not None))
        if detection is None:
            return None
        labels = ctx.labels.clone()
        labels[0] = 1 - labels[0]
        return PartitionUpdate(labels=labels)


@hookimpl
def _register_recording_detector(register):
    register(_EveryFourDetector)


@hookimpl
def _register_recording_partitioner(register):
    register(_RecordingPartitioner)


def test_a_partition_that_changes_labels_uses_up_its_detection(tmp_path):
    """A partitioner checking more often than the detector runs used to get, after a partition, the
    detection taken before it (judging the samples under their former labels), so one verdict could
    open conditions at several checks. It now gets None until the detector runs again."""
    from core.testing import plugin_host

    _RecordingPartitioner.seen = []
    plugin = types.SimpleNamespace(register_collapse_detectors=_register_recording_detector,
                                   register_partitioners=_register_recording_partitioner)
    with plugin_host(("recording", plugin)):
        res = invoke(["train", *SMALL_FLAGS, "--steps", "13", "--detector", "every-four", "--partitioner",
                      "recording", "--conditioner", "onehot", "--out", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 0, res.output
    # detections at 4, 8, 12; checks at 2, 4, ..., 12: each detection serves the check of its own
    # step, which changes the labels, so the checks at 6 and 10 get none
    assert _RecordingPartitioner.seen == [(2, False), (4, True), (6, False), (8, True), (10, False), (12, True)]
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "partition"] == [4, 8, 12]


def test_a_log_step_that_is_also_a_detection_and_partition_step_keeps_the_losss_reports(tmp_path):
    """The detection and the partition check used to clear the reports of the training step before
    it was logged, so loss/r1 (and mmnsat/R, loss/gp) vanished from every log line at their steps."""
    out = tmp_path / "r"
    res = invoke(["train", *SMALL_FLAGS, "--steps", "60", "--preset", "dyngan", "--g-ema", "0", "--out", str(out),
                  "-q", "-o", "loss.r1_gamma=0.1", "-o", "detector.every=20", "-o", "partitioner.every=40"])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "loss/d" in r}
    assert sorted(logged) == [20, 40, 60]  # --log-every 20: each a detection step, 40 a partition check too
    assert all("loss/r1" in r and math.isfinite(r["loss/r1"]) for r in logged.values()), logged
    assert [r["step"] for r in records if r.get("event") == "detection"] == [20, 40, 60]
    assert any(r.get("event") in ("partition", "partition-check") and r["step"] == 40 for r in records)
    # and the detection's own reports are in its own record, not in the step's
    detection = next(r for r in records if r.get("event") == "detection")
    assert "collapse/fraction" in detection and "loss/r1" not in detection


def test_the_final_step_is_saved_once(tmp_path, monkeypatch):
    """The final step's state was built twice (the loop saved it, then saved again after the loop,
    building the whole state before seeing it was on disk)."""
    built = []
    state = Trainer.state

    def counting_state(self):
        built.append(self.step)
        return state(self)

    monkeypatch.setattr(Trainer, "state", counting_state)
    res = invoke(["train", *SMALL_FLAGS, "--steps", "30", "--checkpoint-every", "20", "--out", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 0, res.output
    assert built == [20, 30]
    assert ckpt_steps(tmp_path / "r") == [20, 30]
