"""Corrupt, foreign and hostile files (issue 9): checkpoints, config.json, safetensors headers,
user data; and a scan of the source for anything that could execute data.

Every bad file gives a one-line error with exit code 2 (never a traceback, never a huge
allocation), and where an older good checkpoint exists, `--resume`, `sample` and `evaluate`
fall back to it. Runs are tiny (grid25, 2000 points, one thread).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import core
import core.errors
import core.rundir
from core import api
from core import checkpoint as ckpt_io
from cli_helpers import assert_clean_error, invoke, resign_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120

BASE = {"dataset": "grid25", "seed": 0, "device": "cpu", "threads": 1, "log_every": 10,
        "eval_every": 0, "options": {"dataset": {"n": 2000}}}


def settings(out, steps, **extra):
    s = json.loads(json.dumps(BASE))
    for kind, values in extra.pop("options", {}).items():
        s["options"].setdefault(kind, {}).update(values)
    s.update(steps=steps, out=str(out), **extra)
    return s


@pytest.fixture(autouse=True)
def _no_pictures(monkeypatch):
    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")




def ckpt_steps(run):
    return [s for s, _ in ckpt_io.list_checkpoints(Path(run) / "checkpoints")]


def all_bytes(run):
    """Every regular file of a run, with its bytes (a FIFO is listed by name only)."""
    return {str(p.relative_to(run)): p.read_bytes() if p.is_file() else "special"
            for p in sorted(Path(run).rglob("*")) if not p.is_dir()}


def same_final_networks(a, b):
    ta = load_file(str(Path(a) / "checkpoints" / f"step-{ckpt_steps(a)[-1]:08d}.safetensors"))
    tb = load_file(str(Path(b) / "checkpoints" / f"step-{ckpt_steps(b)[-1]:08d}.safetensors"))
    keys = [k for k in ta if k.startswith(("G/", "D/", "optim/"))]
    return bool(keys) and all(torch.equal(ta[k], tb[k]) for k in keys)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run20: checkpoints at 10 and 20; only10: the same without 20; straight30: the run to 30;
    foreign: a run of another model width (hidden 64)."""
    root = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYNGAN_NO_PICTURES", "1")
        api.train(settings(root / "run20", 20, checkpoint_every=10), quiet=True)
        api.train(settings(root / "straight30", 30, checkpoint_every=0), quiet=True)
        api.train(settings(root / "foreign", 10, checkpoint_every=10, options={"model": {"hidden": 64}}),
                  quiet=True)
    shutil.copytree(root / "run20", root / "only10")
    for p in (root / "only10" / "checkpoints").glob("step-00000020.*"):
        p.unlink()
    return root


# ----------------------------------------------------------------------- forging checkpoints


def _rewrite(ck: Path, tensors=None, blob=None, **meta_changes):
    """Replace step-20's tensor file and fix its JSON so that the checksum matches:
    a checkpoint that verifies but whose contents are wrong."""
    resign_checkpoint(ck / "step-00000020.json", tensors, blob, **meta_changes)


def _t(ck):
    return load_file(str(ck / "step-00000020.safetensors"))


def corrupt_truncated(ck, runs):
    p = ck / "step-00000020.safetensors"
    p.write_bytes(p.read_bytes()[:1000])


def corrupt_byte_edited(ck, runs):
    p = ck / "step-00000020.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))


def corrupt_json_edited(ck, runs):
    p = ck / "step-00000020.json"
    p.write_bytes(p.read_bytes().replace(b'"format"', b'"f\xffrmat"', 1))


def corrupt_wrong_model(ck, runs):
    src = runs / "foreign" / "checkpoints"
    shutil.copy(src / "step-00000010.safetensors", ck / "step-00000020.safetensors")
    meta = json.loads((src / "step-00000010.json").read_text())
    meta.update(step=20, tensors_file="step-00000020.safetensors")
    (ck / "step-00000020.json").write_text(json.dumps(meta))


def corrupt_renamed_tensor(ck, runs):
    t = _t(ck)
    key = next(k for k in t if k.startswith("G/") and k.endswith("weight"))
    t[key + "_x"] = t.pop(key)
    _rewrite(ck, t)


def _lengthen(ck, prefix, suffix, extra):
    """Rewrite the first tensor named PREFIX...SUFFIX as a flat one ``extra`` entries longer."""
    t = _t(ck)
    key = next(k for k in t if k.startswith(prefix) and k.endswith(suffix))
    t[key] = torch.zeros(t[key].numel() + extra)
    _rewrite(ck, t)


def corrupt_tensor_shape(ck, runs):
    _lengthen(ck, "G/", "bias", 3)


def corrupt_hostile_header(ck, runs):
    header = json.dumps({"G/x": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}).encode()
    _rewrite(ck, blob=struct.pack("<Q", len(header)) + header + b"\0" * 16)


def corrupt_meta_types(ck, runs):
    _rewrite(ck, components=[1, 2], partition_count="many")


def corrupt_partition_count_inf(ck, runs):
    _rewrite(ck, partition_count=float("inf"))  # JSON Infinity: int() of it overflows


def corrupt_partition_count_zero(ck, runs):
    _rewrite(ck, partition_count=0)


def corrupt_optimiser_settings(ck, runs):
    meta = json.loads((ck / "step-00000020.json").read_text())
    meta["optim"]["G"]["param_groups"][0]["lr"] = "fast"
    (ck / "step-00000020.json").write_text(json.dumps(meta))


def corrupt_step_mismatch(ck, runs):
    _rewrite(ck, step=10**12)


def corrupt_path_escape(ck, runs):
    _rewrite(ck, tensors_file="../config.json")


def corrupt_fifo(ck, runs):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    p = ck / "step-00000020.safetensors"
    size = p.stat().st_size
    p.unlink()
    os.mkfifo(p)  # reading it would block forever
    _rewrite(ck, size=size)


def corrupt_nan_prior(ck, runs):
    t = _t(ck)
    t["train/prior"] = torch.full_like(t["train/prior"], float("nan"))
    _rewrite(ck, t)


def corrupt_optimiser_state_shape(ck, runs):
    _lengthen(ck, "optim/G/", "exp_avg", 1)


def _fill(ck, prefix, suffix, value):
    """Fill the first tensor named PREFIX...SUFFIX with ``value`` (a checkpoint that verifies)."""
    t = _t(ck)
    key = next(k for k in t if k.startswith(prefix) and k.endswith(suffix))
    t[key] = torch.full_like(t[key], value)
    _rewrite(ck, t)


def corrupt_nan_generator(ck, runs):
    _fill(ck, "G/", "weight", float("nan"))


def corrupt_inf_discriminator(ck, runs):
    _fill(ck, "D/", "bias", float("inf"))


def corrupt_negative_adam_step(ck, runs):
    _fill(ck, "optim/G/", "step", -5.0)


def corrupt_nan_adam_moment(ck, runs):
    _fill(ck, "optim/D/", "exp_avg", float("nan"))


CORRUPTIONS = {
    "nan-prior": (corrupt_nan_prior, "prior"),
    "optimiser-state-shape": (corrupt_optimiser_state_shape, "does not fit"),
    "nan-generator": (corrupt_nan_generator, "NaN or inf weights"),
    "inf-discriminator": (corrupt_inf_discriminator, "NaN or inf weights"),
    "negative-adam-step": (corrupt_negative_adam_step, "NaN, inf or a negative value"),
    "nan-adam-moment": (corrupt_nan_adam_moment, "NaN, inf or a negative value"),
    "truncated": (corrupt_truncated, "recorded"),
    "byte-edited": (corrupt_byte_edited, "checksum"),
    "json-edited": (corrupt_json_edited, "unreadable metadata"),
    "wrong-model": (corrupt_wrong_model, "does not fit"),
    "renamed-tensor": (corrupt_renamed_tensor, "does not fit"),
    "tensor-shape": (corrupt_tensor_shape, "does not fit"),
    "hostile-header": (corrupt_hostile_header, "not a valid safetensors file"),
    "meta-types": (corrupt_meta_types, "does not fit"),
    "partition-count-inf": (corrupt_partition_count_inf, "partition_count inf is not a count"),
    "partition-count-zero": (corrupt_partition_count_zero, "partition_count 0 is not a count"),
    "optimiser-settings": (corrupt_optimiser_settings, "does not fit"),
    "step-mismatch": (corrupt_step_mismatch, "bad step"),
    "path-escape": (corrupt_path_escape, "bad tensor file name"),
    "fifo": (corrupt_fifo, "not a regular file"),
}


#: corruptions of what only a resumed run reads (optimiser, component state)
TRAINING_STATE_ONLY = {"meta-types", "partition-count-inf", "partition-count-zero", "optimiser-settings", "optimiser-state-shape", "negative-adam-step",
                       "nan-adam-moment"}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_newest_checkpoint_falls_back_and_alone_is_exit_2(tmp_path, runs, case):
    corrupt, reason = CORRUPTIONS[case]
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    ck = out / "checkpoints"
    corrupt(ck, runs)
    assert ckpt_steps(out) == [10, 20]

    # sample and evaluate use the step-10 generator (a bad training state does not stop them
    # from using step 20's generator, which is intact)
    sampler = 20 if case in TRAINING_STATE_ONLY else 10
    ref = runs / ("run20" if sampler == 20 else "only10")
    assert np.array_equal(api.sample(out, 5, seed=1), api.sample(ref, 5, seed=1))
    assert api.evaluate(out, n=50)["step"] == sampler
    res = invoke(["sample", str(out), "--n", "4", "--out", str(tmp_path / "s.npy")])
    assert res.exit_code == 0, res.output

    # alone (no older checkpoint): every command says what is wrong, exit 2, files untouched
    alone = tmp_path / "alone"
    shutil.copytree(runs / "run20", alone)
    corrupt(alone / "checkpoints", runs)
    for p in (alone / "checkpoints").glob("step-00000010.*"):
        p.unlink()
    before = all_bytes(alone)
    commands = [["train", "--resume", "--out", str(alone), "--steps", "30", "-q"]]
    if case not in TRAINING_STATE_ONLY:
        commands += [["sample", str(alone), "--n", "3", "--out", str(tmp_path / "t.npy")],
                     ["evaluate", str(alone), "--n", "50"]]
    for args in commands:
        assert_clean_error(invoke(args), 2, "no usable checkpoint", reason)
    assert all_bytes(alone) == before
    assert not (tmp_path / "t.npy").exists()

    # --resume warns, continues from step 10 and ends where the uninterrupted run does
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "30"])
    assert res.exit_code == 0, res.output
    assert "skipped newer checkpoint" in res.stderr and "using step 10" in res.stderr and reason in res.stderr
    if case == "renamed-tensor":  # torch's explanation follows its first line: it is kept
        assert "Missing key(s)" in res.stderr
    assert ckpt_steps(out)[-1] == 30
    assert same_final_networks(runs / "straight30", out)


def test_a_checkpoints_optimiser_settings_come_from_the_config(tmp_path, runs):
    """The JSON's Adam settings are not covered by the checksum: edited ones (betas 5, a negative
    learning rate, maximize) are replaced by the run's own, so the resume ends as the straight run."""
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    jpath = out / "checkpoints" / "step-00000020.json"
    meta = json.loads(jpath.read_text())
    meta["optim"]["G"]["param_groups"][0].update(betas=[5.0, 5.0], lr=-5.0, maximize=True)
    meta["optim"]["D"]["param_groups"][0].update(betas=[5.0, 5.0])
    jpath.write_text(json.dumps(meta))
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "30", "-q"])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "skipped" not in res.stderr  # step 20 was used
    assert same_final_networks(runs / "straight30", out)
    saved = json.loads((out / "checkpoints" / "step-00000030.json").read_text())["optim"]["G"]["param_groups"][0]
    assert saved["betas"] == [0.5, 0.999] and saved["lr"] == 1e-3 and saved["maximize"] is False


@pytest.mark.parametrize("processes", [0, -2, "two", True])
def test_a_nonsense_process_count_in_a_checkpoint_is_not_reported(tmp_path, runs, processes):
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    jpath = out / "checkpoints" / "step-00000020.json"
    jpath.write_text(json.dumps({**json.loads(jpath.read_text()), "processes": processes}))
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "30", "-q"])
    assert res.exit_code == 0 and "trained by" not in res.stderr, res.output
    assert same_final_networks(runs / "straight30", out)


def _resume_past_truncated(tmp_path, runs, steps, every, keep):
    """run20 with its step-20 checkpoint truncated, resumed to ``steps`` (checkpoints every ``every``,
    ``keep`` kept): the run directory and the CLI result."""
    out = _truncated_newest(tmp_path, runs)
    res = invoke(["train", "--resume", "--out", str(out), "--steps", str(steps), "--checkpoint-every", str(every),
                  "--keep-checkpoints", str(keep), "-q"])
    assert res.exit_code == 0, res.output
    return out, res


def test_pruning_never_keeps_an_unreadable_newer_checkpoint_instead_of_the_good_ones(tmp_path, runs):
    """A resume that skipped a corrupt newest checkpoint and stops before its step with a smaller
    --keep-checkpoints must keep what it wrote (it kept only the corrupt file, so the run was lost)."""
    out, res = _resume_past_truncated(tmp_path, runs, steps=15, every=5, keep=1)
    assert ckpt_steps(out) == [15]  # step 10 pruned; the skipped step-20 file moved aside, not counted
    assert "moved to checkpoints/damaged/" in res.stderr
    damaged = out / "checkpoints" / "damaged"
    assert sorted(p.name for p in damaged.iterdir()) == ["step-00000020.json", "step-00000020.safetensors"]
    assert len((damaged / "step-00000020.safetensors").read_bytes()) == 1000  # kept as it was
    res = invoke(["sample", str(out), "--n", "3", "--out", str(tmp_path / "s.npy")])
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output


def test_moving_a_skipped_checkpoint_aside_never_overwrites_and_says_when_it_cannot(tmp_path, runs):
    out = _truncated_newest(tmp_path, runs)
    damaged = out / "checkpoints" / "damaged"
    damaged.mkdir()
    (damaged / "step-00000020.json").write_text("an earlier resume's")
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "15", "-q"])
    assert res.exit_code == 0, res.output
    assert (damaged / "step-00000020.json").read_text() == "an earlier resume's"
    assert sorted(p.name for p in damaged.iterdir()) == [
        "step-00000020.1.json", "step-00000020.1.safetensors", "step-00000020.json"]
    # damaged/ is a file: nothing moves, and the warning says so
    out = _truncated_newest(tmp_path / "b", runs)
    (out / "checkpoints" / "damaged").write_text("not a folder")
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "15", "-q"])
    assert res.exit_code == 0, res.output
    warning = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warning) == 1 and "could not move step-00000020.safetensors: " in warning[0], res.stderr
    assert "left in place" in warning[0] and "moved to" not in warning[0]
    assert ckpt_steps(out) == [10, 15, 20]


def test_a_resume_past_a_skipped_checkpoint_keeps_the_good_ones(tmp_path, runs):
    """Once the resumed run checkpoints past the step of a checkpoint it skipped, that file counted
    toward --keep-checkpoints: a good checkpoint was pruned and the corrupt one kept."""
    out, _ = _resume_past_truncated(tmp_path, runs, steps=45, every=15, keep=3)
    assert ckpt_steps(out) == [15, 30, 45]  # the newest three, all good (was 20 (corrupt), 30, 45)
    for step in (15, 30, 45):
        ckpt_io.read(out / "checkpoints" / f"step-{step:08d}.json")  # each verifies
    assert (out / "checkpoints" / "damaged" / "step-00000020.safetensors").exists()



def _refuse_reading(monkeypatch, victim: Path, error: OSError) -> None:
    """Reading ``victim`` raises ``error`` (faked: the tests may run as root, who reads anything)."""
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self == victim:
            raise error
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


@pytest.mark.parametrize("which", ["safetensors", "json"])
@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(5, "Input/output error")],
                         ids=["denied", "io-error"])
def test_a_resume_stops_at_a_checkpoint_it_may_not_read_and_moves_nothing(tmp_path, runs, monkeypatch, which, error):
    """A checkpoint the system refuses to read (permissions, a network file system's hiccup) may be
    intact: a resume that skipped it would train on from the step before and move it to damaged/.
    It stops instead, names the file and the fix, and leaves the run as it was."""
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    before = all_bytes(out)
    _refuse_reading(monkeypatch, out / "checkpoints" / f"step-00000020.{which}", error)
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "30", "-q"])
    err = assert_clean_error(res, 2, f"step-00000020.{which}: cannot read ({error.strerror})",
                             "neither skipped nor moved", "move step-00000020.json and its .safetensors file")
    assert "moved to" not in err
    # read-only uses still fall back to the step before, with the usual warning
    res = invoke(["evaluate", str(out), "--n", "50"])
    assert res.exit_code == 0 and "skipped newer checkpoint(s): step-00000020" in res.stderr, res.output
    monkeypatch.undo()  # access restored
    assert all_bytes(out) == before  # nothing moved, pruned, trained or logged
    # the resume now uses step 20 and gives the uninterrupted run's networks
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "30", "-q"])
    assert res.exit_code == 0 and "skipped" not in res.stderr, res.output
    assert same_final_networks(runs / "straight30", out)


def test_a_missing_tensor_file_is_damage_and_is_still_skipped(tmp_path, runs):
    """A JSON whose tensor file is gone cannot become readable: it is skipped and moved aside."""
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    (out / "checkpoints" / "step-00000020.safetensors").unlink()
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "15", "-q"])
    assert res.exit_code == 0, res.output
    assert "step-00000020.safetensors: cannot read (No such file or directory)" in res.stderr
    assert "moved to checkpoints/damaged/" in res.stderr
    assert (out / "checkpoints" / "damaged" / "step-00000020.json").exists()
    assert ckpt_steps(out) == [10, 15]

def _truncated_newest(tmp_path, runs):
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    corrupt_truncated(out / "checkpoints", runs)
    return out


def test_sample_evaluate_and_quiet_resume_warn_about_a_skipped_checkpoint(tmp_path, runs):
    out = _truncated_newest(tmp_path, runs)
    for args in (["sample", str(out), "--n", "4", "--out", str(tmp_path / "s.npy")],
                 ["evaluate", str(out), "--n", "50"],
                 ["train", "--resume", "--out", str(out), "--steps", "30", "-q"]):
        res = invoke(args)
        assert res.exit_code == 0, res.output
        assert "Traceback" not in res.output
        warning = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")]
        assert len(warning) == 1, res.stderr
        for words in ("skipped newer checkpoint", "step-00000020.safetensors", "recorded", "using step 10"):
            assert words in warning[0], warning[0]
        assert "Warning" not in res.stdout and "warning" not in res.stdout
    # --quiet still silences the progress: the warning is all it printed
    assert "resuming from step" not in res.stderr and "step 30/30" not in res.stderr
    # the library takes its own warn callback (None: silent)
    out2 = _truncated_newest(tmp_path / "again", runs)
    told = []
    assert api.sample(out2, 3, warn=told.append).shape == (3, 2)
    assert len(told) == 1 and "using step 10" in told[0]
    assert api.evaluate(out2, n=50, warn=None)["step"] == 10


# ----------------------------------------------------------------------- metrics.jsonl


def test_undecodable_metrics_lines_are_skipped_and_resume_keeps_the_good_ones(tmp_path, runs):
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    metrics = out / "metrics.jsonl"
    good = metrics.read_bytes().splitlines()
    assert good and all(json.loads(line)["step"] <= 20 for line in good)
    # invalid UTF-8, a line cut by a crash, and invalid UTF-8 inside an otherwise good line
    with open(metrics, "ab") as f:
        f.write(b"\xff\xfe\n" + b'{"step": 3, "loss/d": 0.5, "x": "\xc3"}\n' + b'{"step": 19, "loss/')
    want = [json.loads(line) for line in good]
    assert core.rundir.read_metrics(out) == want
    assert api.load_run(out).metrics == want
    pytest.importorskip("matplotlib")
    res = invoke(["report", str(out), "--n", "100"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "30", "-q"])
    assert res.exit_code == 0, res.output
    after = metrics.read_bytes().splitlines()
    assert after[:len(good)] == good  # every good line kept, the corrupt ones dropped
    assert all(json.loads(line.decode("ascii"))["step"] >= 20 for line in after[len(good):])  # the new ones
    assert max(json.loads(line)["step"] for line in after) == 30


def _metrics_folder(p):
    p.unlink()
    p.mkdir()
    (p / "x").write_text("not a metrics log")


def _metrics_fifo(p):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    p.unlink()
    os.mkfifo(p)  # reading or appending would block forever


@pytest.mark.parametrize("make", [_metrics_folder, _metrics_fifo], ids=["folder", "fifo"])
def test_metrics_jsonl_that_is_not_a_regular_file_is_exit_2(tmp_path, runs, make):
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    make(out / "metrics.jsonl")
    before = all_bytes(out)
    commands = [["train", "--resume", "--out", str(out), "--steps", "30", "-q"]]
    try:
        import matplotlib  # noqa: F401
        commands.append(["report", str(out), "--n", "100"])
    except ImportError:
        pass
    for args in commands:
        assert_clean_error(invoke(args), 2, "metrics.jsonl", "not a regular file")
        assert all_bytes(out) == before  # no pictures, no checkpoint, nothing truncated
    with pytest.raises(core.errors.CheckpointError, match="not a regular file"):
        core.rundir.read_metrics(out)


# ----------------------------------------------------------------------- paths that are not run directories


@pytest.mark.parametrize("make", [_metrics_folder, _metrics_fifo], ids=["folder", "fifo"])
def test_a_config_json_that_is_not_a_regular_file_is_named_as_such(tmp_path, runs, make):
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    make(out / "config.json")
    for args in (["sample", str(out), "--n", "3", "--out", str(tmp_path / "s.npy")], ["evaluate", str(out)],
                 ["train", "--resume", "--out", str(out), "-q"]):
        assert_clean_error(invoke(args), 2, "config.json is not a regular file")


def test_a_file_given_as_run_directory_says_it_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("hello")
    for args in (["sample", str(afile), "--n", "10", "--out", str(tmp_path / "x.npy")],
                 ["evaluate", str(afile)], ["report", str(afile)]):
        err = assert_clean_error(invoke(args), 2, "is not a run directory (it is a file)", str(afile))
        assert "does not exist" not in err
    assert afile.read_text() == "hello" and not (tmp_path / "x.npy").exists()
    assert_clean_error(invoke(["evaluate", str(tmp_path / "nope")]), 2, "(it does not exist)")


def test_an_empty_run_directory_argument_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # would have said "'.' is not a run directory (no config.json)"
    for args in (["sample", "", "--n", "3", "--out", "x.npy"], ["evaluate", " "], ["report", ""]):
        err = assert_clean_error(invoke(args), 2, "RUN_DIR is empty")
        assert "'.'" not in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------- --device of sample / evaluate / report


BAD_DEVICES = ["garbage", "cuda:x", "cuda:-1", "cuda:01", "CPU", " cpu", "mps", "meta", "cuda:\u0663"]


@pytest.mark.parametrize("device", BAD_DEVICES + (["cuda", "cuda:0"] if not torch.cuda.is_available() else []))
def test_a_bad_or_missing_device_is_exit_2_for_sample_and_evaluate(tmp_path, runs, device):
    run = runs / "run20"
    before = all_bytes(run)
    needle = "CUDA is not available" if device in ("cuda", "cuda:0") else "must be auto, cpu, cuda or cuda:N"
    for args in (["sample", str(run), "--n", "10", "--out", str(tmp_path / "o.npy"), "--device", device],
                 ["evaluate", str(run), "--n", "50", "--device", device]):
        assert_clean_error(invoke(args), 2, needle, repr(device))
    assert not (tmp_path / "o.npy").exists()
    # train checks --device the same way, before it creates anything
    res = invoke(["train", "--steps", "2", "--device", device, "--out", str(tmp_path / "t"), "-q"])
    assert_clean_error(res, 2, needle)
    assert not (tmp_path / "t").exists()
    with pytest.raises(core.errors.UsageError, match="device"):
        api.load_run(run, device=device)
    pytest.importorskip("matplotlib")
    from core.report import write_report

    with pytest.raises(core.errors.UsageError, match="device"):
        write_report(run, n=50, device=device)
    assert all_bytes(run) == before


# ----------------------------------------------------------------------- config.json


def _cfg(runs):
    return json.loads((runs / "run20" / "config.json").read_text())


CONFIGS = {
    "garbage": (lambda runs: b"\x00\xff\xfe garbage", "unreadable"),
    "not-an-object": (lambda runs: b"[1, 2, 3]", "not a dyngan run configuration"),
    "future-version": (lambda runs: json.dumps({**_cfg(runs), "dyngan_version": "9.0.0",
                                                "sampler": "fancy"}).encode(), "unknown setting 'sampler'"),
    "wrong-types": (lambda runs: json.dumps({**_cfg(runs), "steps": "many"}).encode(), "steps"),
    "unknown-component": (lambda runs: json.dumps({**_cfg(runs), "loss": "from-the-future"}).encode(),
                          "from-the-future"),
    "malformed-record": (lambda runs: json.dumps({**_cfg(runs), "plugins": ["x"]}).encode(), "plugins"),
    "deeply-nested": (lambda runs: b"[" * 200_000 + b"]" * 200_000, "unreadable"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_foreign_or_garbage_config_is_exit_2(tmp_path, runs, case):
    make, needle = CONFIGS[case]
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    (out / "config.json").write_bytes(make(runs))
    before = all_bytes(out)
    commands = [["train", "--resume", "--out", str(out), "--steps", "30", "-q"]]
    if case != "malformed-record":  # the plugins record matters only to a resumed run
        commands += [["sample", str(out), "--n", "3", "--out", str(tmp_path / "s.npy")],
                     ["evaluate", str(out), "--n", "50"]]
    for args in commands:
        assert_clean_error(invoke(args), 2, needle)
    assert all_bytes(out) == before


def test_huge_config_is_refused_unread(tmp_path, runs):
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    with open(out / "config.json", "wb") as f:
        f.truncate(1 << 30)  # sparse: a 1 GiB config.json
    for args in (["train", "--resume", "--out", str(out), "-q"], ["evaluate", str(out)]):
        assert_clean_error(invoke(args), 2, "too large")


def test_config_of_another_version_with_known_settings_resumes(tmp_path, runs):
    """The version is a record, not a setting: an older run with settings this version knows resumes."""
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    cfg = _cfg(runs)
    cfg["dyngan_version"] = "0.0.1"
    cfg["plugins"]["mixtures"]["version"] = "0.0.1"
    (out / "config.json").write_text(json.dumps(cfg))
    assert api.train({"out": str(out), "steps": 30}, resume=True, quiet=True).step == 30
    meta = json.loads((out / "checkpoints" / "step-00000030.json").read_text())
    assert meta["dyngan_version"] == core.__version__  # the versions that wrote this checkpoint
    assert meta["plugins"]["mixtures"]["version"] == core.__version__
    assert same_final_networks(runs / "straight30", out)


# ----------------------------------------------------------------------- hostile safetensors


def _st(header, body=b"", length=None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + body


HOSTILE_SAFETENSORS = {
    "huge-shape": _st({"x": {"dtype": "F32", "shape": [2**40, 2], "data_offsets": [0, 2**43]}}, b"\0" * 32),
    "huge-shape-small-offsets": _st({"x": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 16]}},
                                    b"\0" * 16),
    "offsets-past-eof": _st({"x": {"dtype": "F32", "shape": [1000, 2], "data_offsets": [0, 8000]}}, b"\0" * 64),
    "header-longer-than-file": _st({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                                   b"\0" * 8, length=10**6),
    "header-length-2^63": _st(b"{}", length=2**63),
    "non-json-header": _st(b"\x80\x04\x95 this is not json", b"\0" * 8),
    "overflowing-shape": _st({"x": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}},
                             b"\0" * 16),
    "unknown-dtype": _st({"x": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "overlapping": _st({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "y": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "too-short": b"\x05\x00",
    "empty": b"",
}

_HOSTILE_PROBE = textwrap.dedent(r'''
    import hashlib, json, resource, sys
    from pathlib import Path
    import numpy, safetensors.torch, torch  # loaded before the cap below is measured
    from core import checkpoint as ckpt_io
    from core.errors import DynganError
    from dyngan_plugins.files import TensorFile
    # 2 GiB of address space beyond what the imports took (a CUDA build of torch maps several):
    # the smallest tensor these headers claim is 4 TiB
    used = next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (used + (2 << 30), used + (2 << 30)))
    results = {}
    for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
        blob = f.read_bytes()
        ck = f.parent / "ck" / f.stem
        ck.mkdir(parents=True)
        (ck / "step-00000001.safetensors").write_bytes(blob)
        (ck / "step-00000001.json").write_text(json.dumps({
            "format": ckpt_io.FORMAT, "step": 1, "tensors_file": "step-00000001.safetensors",
            "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}))
        out = {}
        for where, load in (("checkpoint", lambda: ckpt_io.read(ck / "step-00000001.json")),
                            ("dataset", lambda: TensorFile(path=str(f)).load(None))):
            try:
                load()
                out[where] = ["loaded", ""]
            except DynganError as e:
                out[where] = [type(e).__name__, str(e), e.exit_code]
            except BaseException as e:
                out[where] = [type(e).__name__, str(e)[:300]]
        results[f.stem] = out
    print(json.dumps(results))
''')


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS caps the probe's memory on Linux")
def test_hostile_safetensors_headers_fail_cleanly_without_allocating(tmp_path):
    for name, blob in HOSTILE_SAFETENSORS.items():
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _HOSTILE_PROBE, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=TIMEOUT, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr  # no crash, no MemoryError escaping
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(HOSTILE_SAFETENSORS)
    for name, out in results.items():
        kind, msg, code = out["checkpoint"]
        assert kind == "CheckpointError" and code == 2, (name, out)
        assert "safetensors" in msg and "step-00000001.safetensors" in msg, (name, msg)
        kind, msg, code = out["dataset"]
        assert kind == "DataError" and code == 2, (name, out)
        assert f"{name}.safetensors" in msg and "safetensors" in msg, (name, msg)


# ----------------------------------------------------------------------- bad data


def _npy_header(shape, descr="<f4"):
    h = ("{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))).encode()
    h += b" " * (63 - (10 + len(h)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h


def _save_npy(path, arr):
    np.save(path, arr, allow_pickle=False)


BAD_DATA = {
    "nan": (lambda p: _save_npy(p, np.where(np.arange(200).reshape(100, 2) == 77, np.nan, 0.5).astype("f4")),
            ".npy", "1 NaN"),
    "inf": (lambda p: _save_npy(p, np.where(np.arange(200).reshape(100, 2) == 3, -np.inf, 0.5)), ".npy", "inf"),
    "scalar": (lambda p: _save_npy(p, np.float32(3.0)), ".npy", "single number"),
    "no-samples": (lambda p: _save_npy(p, np.zeros((0, 2), "f4")), ".npy", "empty"),
    "empty-file": (lambda p: p.write_bytes(b""), ".npy", "not a readable .npy"),
    "empty-safetensors": (lambda p: p.write_bytes(b""), ".safetensors", "not a readable .safetensors"),
    "huge-declared-npy": (lambda p: p.write_bytes(_npy_header((10**12, 2)) + b"\0" * 64), ".npy",
                          "declares shape"),
    "huge-declared-safetensors": (lambda p: p.write_bytes(HOSTILE_SAFETENSORS["huge-shape"]), ".safetensors",
                                  "not a readable .safetensors"),
    "text": (lambda p: p.write_text("1,2\n3,4\n"), ".npy", "not a readable .npy"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_exit_2_before_training(tmp_path, monkeypatch, case):
    make, suffix, needle = BAD_DATA[case]
    monkeypatch.chdir(tmp_path)
    data = tmp_path / f"data{suffix}"
    make(data)
    out = tmp_path / "run"
    args = ["train", "--dataset", "tensor-file", "-o", f"dataset.path={data}", "--device", "cpu",
            "--steps", "5", "--out", str(out), "-q"]
    err = assert_clean_error(invoke(args), 2, needle)
    assert str(data) in err
    assert not out.exists()  # nothing trained, and --out stays free for the corrected data
    _save_npy(data.with_suffix(".npy"), np.random.default_rng(0).normal(size=(64, 2)).astype("f4"))
    res = invoke(["train", "--dataset", "tensor-file", "-o", f"dataset.path={data.with_suffix('.npy')}",
                  "--device", "cpu", "--steps", "2", "--eval-every", "0", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output


def test_data_too_large_for_memory_is_refused_before_reading(tmp_path, monkeypatch):
    from dyngan_plugins import files

    data = tmp_path / "big.npy"
    _save_npy(data, np.zeros((1000, 2), "f4"))
    monkeypatch.setattr(files, "_memory_bytes", lambda: 4096)  # a machine with 4 KiB of memory
    read = []
    monkeypatch.setattr(np, "load", lambda *a, **k: read.append(a) or pytest.fail("read the data"))
    res = invoke(["train", "--dataset", "tensor-file", "-o", f"dataset.path={data}", "--device", "cpu",
                  "--steps", "2", "--out", str(tmp_path / "run"), "-q"])
    assert_clean_error(res, 2, "GiB of memory", str(data))
    assert read == []


# ----------------------------------------------------------------------- no code execution from data

BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
BANNED_CALLS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                ("jit", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"), ("torch", "package")}


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")  # e.g. f(x).eval
    return list(reversed(parts))


def scan(source: str, filename: str = "<src>") -> list[str]:
    """Places in ``source`` that could execute data: pickle-like modules, torch.load,
    yaml.load, eval/exec, and np.load without allow_pickle=False."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in BANNED_MODULES:
                found.append(f"{where} from {node.module} import ...")
            if mod in ("torch", "yaml", "numpy") and any(a.name in ("load", "unsafe_load") for a in node.names):
                found.append(f"{where} from {node.module} import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in (["eval"], ["exec"], ["__import__"]):
                found.append(f"{where} {name[0]}()")
            elif len(name) >= 2 and (name[-2], name[-1]) in BANNED_CALLS:
                found.append(f"{where} {'.'.join(name)}()")
            elif len(name) >= 2 and name[-1] == "load" and name[-2] in ("np", "numpy"):
                safe = any(k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                           for k in node.keywords)
                if not safe:
                    found.append(f"{where} {'.'.join(name)}() without allow_pickle=False")
            elif name[-1:] == ["getattr"] and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and node.args[1].value in ("eval", "exec", "load", "loads"):
                base = _dotted(node.args[0])
                if base[:1] and base[0] in BANNED_MODULES | {"builtins", "torch", "yaml"}:
                    found.append(f"{where} getattr({'.'.join(base)}, {node.args[1].value!r})")
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = textwrap.dedent('''
        import pickle
        import cloudpickle as cp
        from marshal import loads
        from torch import load
        import numpy as np, torch, yaml
        torch.load("x")
        yaml.load(open("c"))
        np.load("a.npy")
        np.load("a.npy", allow_pickle=True)
        eval("1")
        exec("x = 1")
        torch.jit.load("m")
        getattr(pickle, "loads")
    ''')
    found = scan(bad)
    assert len(found) == 12, found
    ok = textwrap.dedent('''
        import numpy as np, json, yaml
        np.load("a.npy", allow_pickle=False)
        json.loads("{}")
        yaml.safe_load("a: 1")
        model.eval()
        torch.compile(G)
        copy.deepcopy(net).eval()
        ast.literal_eval("[1]")
    ''')
    assert scan(ok) == []


def test_no_code_execution_from_data_in_the_source():
    files = sorted((ROOT / "core").rglob("*.py")) + sorted((ROOT / "dyngan_plugins").rglob("*.py"))
    assert len(files) > 20
    found = []
    for f in files:
        found += scan(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))
    assert found == [], "code that could execute data:\n" + "\n".join(found)


@pytest.mark.parametrize("key, forged", [("data_shape", [2, 1]), ("data_shape", [1, 2]), ("n_train", 499)])
def test_a_sidecar_edited_to_another_data_layout_is_skipped_as_damaged(tmp_path, runs, key, forged):
    """The tensor file repeats what the weights mean (``checkpoint.SEALED``): a JSON edited to a data
    shape with as many values, which the networks would still load, is caught and the previous
    checkpoint used, with a warning, by sample and evaluate alike."""
    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    jpath = out / "checkpoints" / "step-00000020.json"
    meta = json.loads(jpath.read_text())
    assert meta[key] != forged
    meta[key] = forged
    jpath.write_text(json.dumps(meta))
    with pytest.raises(core.errors.CheckpointError, match=f"its {key} .* is not the .* its tensor file was saved with"):
        ckpt_io.read(jpath)
    res = invoke(["sample", str(out), "--n", "3", "--out", str(tmp_path / "s.npy")])
    assert res.exit_code == 0, res.output
    assert "using step 10" in res.stderr and "(edited)" in res.stderr
    assert np.load(tmp_path / "s.npy").shape == (3, 2)
    assert api.evaluate(out, n=50, warn=None)["step"] == 10
    # the untouched sidecar still reads, and the header holds the values as JSON
    assert ckpt_io.read(out / "checkpoints" / "step-00000010.json").meta["data_shape"] == [2]


def test_a_forged_sealed_value_nested_too_deeply_is_damage_not_a_traceback(tmp_path, runs):
    from safetensors.torch import save

    out = tmp_path / "r"
    shutil.copytree(runs / "run20", out)
    jpath = out / "checkpoints" / "step-00000020.json"
    blob = save(_t(out / "checkpoints"), metadata={"format": ckpt_io.FORMAT, "step": "20",
                                                   "data_shape": "[" * 200_000 + "]" * 200_000})
    resign_checkpoint(jpath, blob=blob)
    with pytest.raises(core.errors.CheckpointError, match="its data_shape .* is not the"):
        ckpt_io.read(jpath)
    res = invoke(["sample", str(out), "--n", "3", "--out", str(tmp_path / "s.npy")])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "using step 10" in res.stderr and len(res.stderr) < 1000  # the forged value is cut short
