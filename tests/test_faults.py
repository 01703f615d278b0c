"""Fault injection (issue 9): nothing is lost when a run is killed, interrupted, diverges,
meets a misbehaving plugin or a full disk, and a resumed run is bit-identical on the CPU.

Complements tests/test_signals.py (plain Ctrl-C / SIGTERM between steps) and the
fallback tests of tests/test_pipeline.py. Hostile files and data: tests/test_hostile_files.py.

Every run is tiny (grid25 with 2000 points, tens to hundreds of steps, one thread);
subprocesses are killed by a timeout rather than hanging the suite.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import core
from core import api, hookimpl
from core import checkpoint as ckpt_io
from cli_helpers import invoke
from signal_helpers import signal_when_held, start_held
from core.components import Option
from core.errors import RunFailure
from core.plugins import get_host
from core.testing import plugin_host
from dyngan_plugins.dyngan import DynGANDetector
from dyngan_plugins.losses import NonSaturatingLoss

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
TIMEOUT = 120  # seconds for any subprocess: a hang fails the test instead of the suite

BASE = {"dataset": "grid25", "seed": 0, "device": "cpu", "threads": 1, "log_every": 10,
        "eval_every": 0, "options": {"dataset": {"n": 2000}}}
FLAGS = ["--dataset", "grid25", "--device", "cpu", "--seed", "0", "--threads", "1",
         "--log-every", "10", "--eval-every", "0", "-o", "dataset.n=2000"]


def settings(out, steps, **extra):
    s = json.loads(json.dumps(BASE))
    opts = extra.pop("options", {})
    for kind, values in opts.items():
        s["options"].setdefault(kind, {}).update(values)
    s.update(steps=steps, out=str(out), **extra)
    return s


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DYNGAN_NO_PICTURES="1", PYTHONUNBUFFERED="1")
    return e


@pytest.fixture(autouse=True)
def _no_pictures(monkeypatch):
    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")


def ckpt_dir(run) -> Path:
    return Path(run) / "checkpoints"


def ckpt_steps(run):
    return [s for s, _ in ckpt_io.list_checkpoints(ckpt_dir(run))]


def final_tensors(run):
    steps = ckpt_steps(run)
    assert steps, f"no checkpoint in {run}"
    return load_file(str(ckpt_dir(run) / f"step-{steps[-1]:08d}.safetensors"))


def final_meta(run):
    return json.loads((ckpt_dir(run) / f"step-{ckpt_steps(run)[-1]:08d}.json").read_text())


def assert_identical(straight, resumed, prefixes=("G/", "D/", "optim/", "train/", "component/",
                                                   "rng/train", "rng/components")):
    """The final checkpoints hold bit-identical networks, optimiser and component state."""
    a, b = final_tensors(straight), final_tensors(resumed)
    keys = sorted(k for k in a if k.startswith(prefixes))
    assert any(k.startswith("G/") for k in keys) and any(k.startswith("optim/D/") for k in keys)
    assert keys == sorted(k for k in b if k.startswith(prefixes))
    differ = [k for k in keys if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"not bit-identical after resume: {differ[:8]}"
    ma, mb = final_meta(straight), final_meta(resumed)
    assert ma["components"] == mb["components"]
    assert ma["optim"] == mb["optim"] and ma["partition_count"] == mb["partition_count"]


def snapshot(run):
    """Every file of the run's checkpoint directory, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(ckpt_dir(run).iterdir())}


def debris(run):
    """Temporary files and tensor files without their committed JSON."""
    names = {p.name for p in ckpt_dir(run).iterdir()}
    tmp = {n for n in names if n.startswith(".") or ".tmp" in n}
    orphans = {n for n in names if n.endswith(".safetensors") and n[: -len(".safetensors")] + ".json" not in names}
    return tmp | orphans


def assert_committed_checkpoints_verify(run):
    steps = ckpt_steps(run)
    assert steps
    for s in steps:
        ck = ckpt_io.read(ckpt_dir(run) / f"step-{s:08d}.json")  # sizes and SHA-256 verified
        assert ck.step == s
        nets = [k for k in ck.tensors if k.startswith(("G/", "D/"))]
        assert nets and all(bool(ck.tensors[k].isfinite().all()) for k in nets)
    return steps


@pytest.fixture(scope="module")
def straight30(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight30") / "r"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYNGAN_NO_PICTURES", "1")
        api.train(settings(out, 30, checkpoint_every=0), quiet=True)
    return out


KILL_STEPS = 400


@pytest.fixture(scope="module")
def straight_long(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight_long") / "r"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYNGAN_NO_PICTURES", "1")
        api.train(settings(out, KILL_STEPS, checkpoint_every=0), quiet=True)
    return out


def resume_cli(run, steps=None):
    args = ["train", "--resume", "--out", str(run), "-q"] + (["--steps", str(steps)] if steps else [])
    res = invoke(args)
    assert res.exit_code == 0, res.output
    return res


# ======================================================================= crash safety

# Runs `dyngan train ...` with os.replace patched: when the destination's name is TARGET, the
# process sends itself SIG (TIMES times) just before the rename, i.e. in the middle of writing
# a checkpoint (the temporary file is complete, the rename has not happened).
KILLER = r'''
import os, sys
target, sig, times = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
_replace = os.replace
def replace(src, dst, *a, **k):
    if os.path.basename(os.fspath(dst)) == target:
        for _ in range(times):
            os.kill(os.getpid(), sig)
    return _replace(src, dst, *a, **k)
os.replace = replace
from core.cli import main
main(sys.argv[4:])
'''


def run_killer(tmp_path, out, target, sig, times=1, steps=30):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    cmd = [sys.executable, str(script), target, str(int(sig)), str(times), "train", "--out", str(out),
           *FLAGS, "--steps", str(steps), "--checkpoint-every", "10", "-q"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=str(tmp_path), timeout=TIMEOUT)


@POSIX
@pytest.mark.parametrize("target", ["step-00000020.safetensors", "step-00000020.json"],
                         ids=["before-tensor-rename", "before-json-rename"])
def test_sigkill_in_the_middle_of_a_checkpoint_write(tmp_path, straight30, target):
    out = tmp_path / "run"
    proc = run_killer(tmp_path, out, target, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # the step-20 checkpoint was never committed; step 10 is intact and verifies
    assert assert_committed_checkpoints_verify(out) == [10]
    left = debris(out)
    assert left, "the kill should have left a temporary file behind"
    if target.endswith(".json"):
        assert "step-00000020.safetensors" in left  # tensors renamed, commit marker missing
    # --resume works, ignores the debris, cleans it up and ends bit-identical
    resume_cli(out)
    assert ckpt_steps(out)[-1] == 30
    assert_committed_checkpoints_verify(out)
    assert debris(out) == set()
    assert_identical(straight30, out)


def _sigkill_after_first_checkpoint(tmp_path, out, delay, why):
    """Train KILL_STEPS steps with a checkpoint every 2; SIGKILL ``delay`` seconds after the first.
    None when the kill came after the final step was saved."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "core", "train", "--out", str(out), *FLAGS, "--steps", str(KILL_STEPS),
         "--checkpoint-every", "2", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ckpt_steps(out):
            assert proc.poll() is None, f"{why}: training ended early: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, f"{why}: no checkpoint in time"
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is not None:
            assert proc.returncode == 0, f"{why}: {proc.communicate()[1]}"
            return None
        proc.kill()  # SIGKILL: no handler runs, whatever the process was doing
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    if ckpt_steps(out)[-1] == KILL_STEPS:  # killed while scoring the saved final step: not mid-run
        return None
    return proc


@POSIX
def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path, straight_long):
    seed = int(os.environ.get("DYNGAN_FAULT_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    for attempt in range(3):
        delay = rng.uniform(0.0, 0.8)
        for tries in range(4):  # a fast machine can reach the last step within the delay: shorten it
            out = tmp_path / f"run{attempt}-{tries}"
            why = f"attempt {attempt}, kill {delay:.3f}s after the first checkpoint (DYNGAN_FAULT_SEED={seed})"
            proc = _sigkill_after_first_checkpoint(tmp_path, out, delay, why)
            if proc is not None:
                break
            delay /= 4
        else:
            raise AssertionError(f"{why}: every run finished before the kill; make KILL_STEPS larger")
        assert proc.returncode == -signal.SIGKILL, why
        steps = assert_committed_checkpoints_verify(out)
        assert steps[-1] < KILL_STEPS, why
        resume_cli(out)
        assert ckpt_steps(out)[-1] == KILL_STEPS, why
        assert debris(out) == set(), why
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        logged = [r["step"] for r in recs if "loss/d" in r]
        assert logged == list(range(10, KILL_STEPS + 1, 10)), why  # each step once, in order
        assert_identical(straight_long, out)


def _plant(run, kind):
    """Debris that a crash at step 30 could leave beside good checkpoints at 10 and 20."""
    ck = ckpt_dir(run)
    good = (ck / "step-00000020.safetensors").read_bytes()
    if kind == "stray-tmp":
        (ck / ".step-00000030.safetensors.tmp-999999999").write_bytes(good[: len(good) // 3])
        (ck / ".step-00000030.json.tmp-999999999").write_text("{")
    elif kind == "tensors-without-json":
        (ck / "step-00000030.safetensors").write_bytes(good)
    elif kind == "json-with-truncated-tensors":
        (ck / "step-00000030.safetensors").write_bytes(good[: len(good) // 2])
        meta = json.loads((ck / "step-00000020.json").read_text())
        meta.update(step=30, tensors_file="step-00000030.safetensors")
        (ck / "step-00000030.json").write_text(json.dumps(meta))
    elif kind == "empty-json":  # a torn write on a filesystem that does not order rename and data
        (ck / "step-00000030.safetensors").write_bytes(good)
        (ck / "step-00000030.json").write_bytes(b"")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["stray-tmp", "tensors-without-json", "json-with-truncated-tensors",
                                  "empty-json"])
def test_crash_debris_is_ignored_and_resume_is_exact(tmp_path, straight30, kind):
    out = tmp_path / "r"
    api.train(settings(out, 20, checkpoint_every=10), quiet=True)
    _plant(out, kind)
    # sample and evaluate use step 20; resume continues from 20
    assert api.evaluate(out, n=50)["step"] == 20
    result = api.train({"out": str(out), "steps": 30}, resume=True, quiet=True)
    assert result.step == 30
    assert_committed_checkpoints_verify(out)
    assert debris(out) == set()
    assert_identical(straight30, out)


def _fail_at(name_part, error):
    """A replacement for os.replace / os.fsync that raises ``error`` for files named like ``name_part``."""

    def path_of(arg):
        if isinstance(arg, int):  # fsync(fd): the file's name from /proc
            try:
                return os.readlink(f"/proc/self/fd/{arg}")
            except OSError:
                return ""
        return os.fspath(arg)

    def fake(real):
        def f(*args, **kw):
            if name_part in os.path.basename(path_of(args[-1] if real is os.replace else args[0])):
                raise error
            return real(*args, **kw)

        return f

    return fake


def test_a_failed_first_checkpoint_does_not_claim_an_earlier_one(tmp_path, monkeypatch):
    out = tmp_path / "r"
    make = _fail_at("step-00000010.", OSError(errno.EFBIG, os.strerror(errno.EFBIG)))
    monkeypatch.setattr(ckpt_io.os, "replace", make(os.replace))
    with pytest.raises(RunFailure) as e:
        api.train(settings(out, 20, checkpoint_every=10), quiet=True)
    monkeypatch.undo()
    assert "could not write checkpoint at step 10" in str(e.value) and "intact" not in str(e.value)
    assert "no checkpoint of this run was written before it, so there is nothing to resume from" in str(e.value)
    assert not list((out / "checkpoints").glob("*"))  # no tensor file left without its JSON


@pytest.mark.parametrize("where", ["replace-tensors", "replace-json", "fsync"])
def test_failed_rename_or_fsync_keeps_the_previous_checkpoint(tmp_path, monkeypatch, straight30, where):
    if where == "fsync" and not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name an fd")
    out = tmp_path / "r"
    api.train(settings(out, 10, checkpoint_every=10), quiet=True)
    before = snapshot(out)
    err = OSError(errno.EIO, os.strerror(errno.EIO))
    make = _fail_at("step-00000020." + ("json" if where == "replace-json" else ""), err)
    if where == "fsync":
        monkeypatch.setattr(ckpt_io.os, "fsync", make(os.fsync))
    else:
        monkeypatch.setattr(ckpt_io.os, "replace", make(os.replace))
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "30", "-q"])
    monkeypatch.undo()
    assert res.exit_code == 1, res.output
    assert "could not write checkpoint at step 20" in res.stderr and "previous checkpoint is intact" in res.stderr
    assert "Traceback" not in res.output
    assert snapshot(out) == before  # nothing half-written is left, nothing old is touched
    resume_cli(out, 30)
    assert_identical(straight30, out)


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes (some bytes do reach the file)."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            self._f.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("which", ["safetensors", "json"])
def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch, straight30, which):
    out = tmp_path / "r"
    api.train(settings(out, 10, checkpoint_every=10), quiet=True)
    before = snapshot(out)
    real_open = open

    def full_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        name = os.path.basename(os.fspath(path))
        if "w" in mode and "step-00000020" in name and name.split(".")[2] == which:
            return _FullDisk(f, room=100)
        return f

    monkeypatch.setattr(ckpt_io, "open", full_open, raising=False)  # the module's own `open`
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "30", "-q"])
    monkeypatch.undo()
    assert res.exit_code == 1, res.output
    assert "No space left on device" in res.stderr and "step 20" in res.stderr
    assert "previous checkpoint is intact" in res.stderr and "Traceback" not in res.output
    assert snapshot(out) == before
    assert ckpt_io.load_latest(ckpt_dir(out)).step == 10
    resume_cli(out, 30)  # space again: the run goes on, exactly
    assert_identical(straight30, out)


def test_disk_full_in_the_metrics_log(tmp_path, monkeypatch):
    out = tmp_path / "r"
    api.train(settings(out, 10, checkpoint_every=10), quiet=True)
    before = snapshot(out)
    import core.rundir as rundir_mod

    real_open = open

    def full_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return _FullDisk(f, room=10) if str(path).endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(rundir_mod, "open", full_open, raising=False)
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "30", "-q"])
    monkeypatch.undo()
    assert res.exit_code == 1, res.output
    assert "metrics.jsonl" in res.stderr and "No space left on device" in res.stderr
    assert "Traceback" not in res.output
    assert snapshot(out) == before


# ======================================================================= signals

@POSIX
def test_sigterm_at_an_arbitrary_step_then_resume_is_bit_identical(tmp_path, straight_long):
    # a real SIGTERM from another process, at step 10: not a checkpoint step (--checkpoint-every 0)
    out = tmp_path / "run"
    hold = tmp_path / "hold"
    proc = start_held(hold, ["train", "--out", str(out), *FLAGS, "--steps", str(KILL_STEPS),
                             "--checkpoint-every", "0", "-q"], env(), tmp_path, TIMEOUT)
    _, stderr = signal_when_held(proc, hold, signal.SIGTERM, TIMEOUT)
    assert proc.returncode == 143, stderr
    (stopped,) = assert_committed_checkpoints_verify(out)
    assert stopped == 10
    resume_cli(out)
    assert ckpt_steps(out)[-1] == KILL_STEPS
    assert_identical(straight_long, out)


@POSIX
def test_sigterm_during_a_checkpoint_write_finishes_it_then_stops(tmp_path, straight30):
    out = tmp_path / "run"
    proc = run_killer(tmp_path, out, "step-00000020.json", signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr
    assert "SIGTERM" in proc.stderr and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    steps = assert_committed_checkpoints_verify(out)  # the interrupted write completed
    assert steps[:2] == [10, 20] and len(steps) == 3 and 20 < steps[2] < 30  # then it stopped
    assert debris(out) == set()
    resume_cli(out)
    assert_identical(straight30, out)


@POSIX
def test_second_ctrl_c_during_a_checkpoint_write_exits_130_leaving_the_previous(tmp_path, straight30):
    out = tmp_path / "run"
    proc = run_killer(tmp_path, out, "step-00000020.safetensors", signal.SIGINT, times=2)
    assert proc.returncode == 130, proc.stderr
    assert "second Ctrl-C" in proc.stderr and "--resume" in proc.stderr
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr
    assert assert_committed_checkpoints_verify(out) == [10]
    assert debris(out) == set()  # the temporary file was removed on the way out
    resume_cli(out)
    assert_identical(straight30, out)


# ======================================================================= exact resume

EXACT_CASES = {
    # DynGAN with fast intervals: stop after the partition at step 40
    "dyngan": dict(preset="dyngan", options={
        "detector": {"every": 20, "delta": 1.0, "lam": 0.5},
        "partitioner": {"every": 40, "tau": 0.0}}, total=120, stop=60),
    # the debiased score keeps a per-sample weight, reset with the score of relabelled samples
    "dyngan-debias": dict(preset="dyngan", options={
        "detector": {"every": 20, "delta": 1.0, "lam": 0.5, "debias": True, "reset_relabelled": True},
        "partitioner": {"every": 40, "tau": 0.0}}, total=120, stop=60),
    # the partitioner at 80 uses the detection of step 60, made before the stop at 70
    "dyngan-stale-detection": dict(preset="dyngan", options={
        "detector": {"every": 30, "delta": 1.0, "lam": 0.5},
        "partitioner": {"every": 40, "tau": 0.0}}, total=120, stop=70),
    # k-means partitions draw from the components' random stream
    "kmeans": dict(partitioner="kmeans", conditioner="onehot", options={
        "partitioner": {"every": 30, "k": 5, "restarts": 2}}, total=90, stop=45),
    # no DynGAN: WGAN-GP draws its interpolation weights from the training stream, 5 D steps
    "wgan-gp": dict(loss="wgan-gp", total=40, stop=25),
}


def _events(run, name):
    recs = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in recs if r.get("event") == name]


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_resume_with_and_without_dyngan(tmp_path, case):
    spec = dict(EXACT_CASES[case])
    total, stop = spec.pop("total"), spec.pop("stop")
    a, b = tmp_path / "straight", tmp_path / "stopped"
    api.train(settings(a, total, checkpoint_every=0, **json.loads(json.dumps(spec))), quiet=True)
    first = api.train(settings(b, stop, checkpoint_every=0, **json.loads(json.dumps(spec))), quiet=True)
    assert first.step == stop and ckpt_steps(b) == [stop]
    resumed = api.train({"out": str(b), "steps": total}, resume=True, quiet=True)
    assert resumed.step == total
    assert_identical(a, b)
    ta, tb = final_tensors(a), final_tensors(b)
    assert torch.equal(ta["rng/cpu"], tb["rng/cpu"])
    if case.startswith("dyngan") or case == "kmeans":
        parts = _events(a, "partition")
        assert parts == _events(b, "partition")
        assert any(len(p["partition/sizes"]) > 1 for p in parts), "no partition happened"
        if case == "dyngan":
            assert any(p["step"] < stop for p in parts)  # stopped after a partition
            assert _events(a, "detection") == _events(b, "detection")
        if case == "dyngan-stale-detection":
            assert any(stop < p["step"] < stop + 30 for p in parts)
        assert any(k.startswith("component/detector/") for k in ta) or case == "kmeans"
        if case == "dyngan-debias":
            assert "component/detector/weight" in ta and torch.equal(ta["component/detector/weight"],
                                                                     tb["component/detector/weight"])
        assert not torch.equal(ta["train/labels"], torch.zeros_like(ta["train/labels"]))
    if case == "dyngan":
        # metadata records dyngan's version and that of every plugin used
        host = get_host()
        cfg = json.loads((a / "config.json").read_text())
        used = {host.registry.get(kind, cfg[slot]).plugin for slot, kind in
                [("dataset", "dataset"), ("model", "model"), ("loss", "loss"), ("detector", "detector"),
                 ("partitioner", "partitioner"), ("conditioner", "conditioner")]}
        used |= {host.registry.get("metric", m).plugin for m in cfg["metrics"]}
        assert {"dyngan", "losses", "mixtures", "mlp"} <= used
        for run in (a, b):
            meta = final_meta(run)
            assert meta["dyngan_version"] == core.__version__
            assert set(meta["plugins"]) == used
            for name in used:
                assert meta["plugins"][name]["version"] == host.plugins[name].version
                assert isinstance(meta["plugins"][name]["version"], str)


# ======================================================================= faulty plugins


class NaNAfter(NonSaturatingLoss):
    """The NS loss, NaN from D-step ``at`` on (or only there, with ``once``)."""

    name = "nan-after"
    options = {**NonSaturatingLoss.options,
               "at": Option(1_000_000, "the d_loss call (1 = first) from which the loss is NaN", min=1),
               "once": Option(False, "NaN at that one call only (a transient fault)")}

    def __init__(self, **options):
        super().__init__(**options)
        self.calls = 0

    def d_loss(self, ctx):
        self.calls += 1
        loss = super().d_loss(ctx)
        at = self.opts.at
        if (self.calls == at) if self.opts.once else (self.calls >= at):
            loss = loss * float("nan")
        return loss


class RaisingLoss(NonSaturatingLoss):
    name = "raising-loss"
    armed = False

    def d_loss(self, ctx):
        if RaisingLoss.armed:
            raise ZeroDivisionError("injected fault in d_loss")
        return super().d_loss(ctx)


class FloatLoss(NonSaturatingLoss):
    """g_loss returns a Python float: nothing to backpropagate."""

    name = "float-loss"

    def g_loss(self, ctx):
        return float(super().g_loss(ctx).detach())


class VectorLoss(NonSaturatingLoss):
    """d_loss returns the per-sample losses instead of their mean."""

    name = "vector-loss"

    def d_loss(self, ctx):
        import torch.nn.functional as F

        return F.softplus(-ctx.real_logits) + F.softplus(ctx.fake_logits)


class RaisingDetector(DynGANDetector):
    name = "raising-detector"
    armed = False

    def detect(self, ctx):
        if RaisingDetector.armed:
            raise KeyError("injected fault in detect")
        return super().detect(ctx)


class FaultyPlugin:
    @staticmethod
    @hookimpl
    def register_losses(register):
        register(NaNAfter)
        register(RaisingLoss)
        register(FloatLoss)
        register(VectorLoss)

    @staticmethod
    @hookimpl
    def register_collapse_detectors(register):
        register(RaisingDetector)


@pytest.fixture
def faulty():
    RaisingLoss.armed = RaisingDetector.armed = False
    with plugin_host(("faulty", FaultyPlugin), strict=True) as host:
        yield host
    RaisingLoss.armed = RaisingDetector.armed = False


DIVERGE = ["--loss", "nan-after", "-o", "loss.at=13", "--log-every", "5", "--checkpoint-every", "10",
           "--steps", "40"]


@pytest.mark.parametrize("name, method, what", [("float-loss", "g_loss", "returned float"),
                                                 ("vector-loss", "d_loss", "a tensor of shape (")])
def test_a_loss_returning_no_scalar_tensor_is_named(tmp_path, faulty, name, method, what):
    res = invoke(["train", "--out", str(tmp_path / "r"), *FLAGS, "--loss", name, "--steps", "5", "-q"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    msg = res.stderr
    assert f"loss '{name}' (plugin 'faulty') raised in {method}()" in msg
    assert what in msg and "not a 0-d tensor" in msg


def test_nan_loss_stops_naming_step_and_component(tmp_path, faulty):
    out = tmp_path / "r"
    args = ["train", "--out", str(out), *FLAGS, *DIVERGE, "-q"]
    res = invoke(args)
    assert res.exit_code == 1, res.output
    msg = res.stderr
    assert "Traceback" not in res.output
    assert "step 15" in msg and "'nan-after'" in msg and "'faulty'" in msg and "nan" in msg.lower()
    assert "last good checkpoint (step 10)" in msg
    assert assert_committed_checkpoints_verify(out) == [10]  # no NaN weights were saved
    events = _events(out, "divergence")
    assert [e["step"] for e in events] == [15]
    # the kept checkpoint is usable
    assert api.evaluate(out, n=50)["step"] == 10


def test_nan_in_the_weights_is_refused_at_save(tmp_path, faulty):
    out = tmp_path / "r"
    # NaN from step 13, logged only at 40: the checkpoint at 20 would hold NaN weights
    res = invoke(["train", "--out", str(out), *FLAGS, "--loss", "nan-after", "-o", "loss.at=13",
                  "--log-every", "40", "--checkpoint-every", "10", "--steps", "40", "-q"])
    assert res.exit_code == 1, res.output
    assert "NaN or inf" in res.stderr and "step 20" in res.stderr and "Traceback" not in res.output
    assert "weights" in res.stderr and "loss 'nan-after' (plugin 'faulty')" in res.stderr
    assert assert_committed_checkpoints_verify(out) == [10]


@pytest.mark.parametrize("sampling", ["replacement", "epoch"])
def test_rollback_survives_a_transient_nan(tmp_path, faulty, sampling):
    out = tmp_path / "r"
    res = invoke(["train", "--out", str(out), *FLAGS, *DIVERGE, "-o", "loss.once=true",
                  "--on-divergence", "rollback", "--sampling", sampling])
    assert res.exit_code == 0, res.output
    assert ckpt_steps(out)[-1] == 40
    assert_committed_checkpoints_verify(out)
    rollbacks = _events(out, "rollback")
    assert [(r["step"], r["diverged_at"], r["attempt"]) for r in rollbacks] == [(10, 15, 1)]
    # the record says what diverged (the divergence record itself went with the rolled-back steps)
    assert rollbacks[0]["name"] == "loss/d" and rollbacks[0]["value"] == "nan"  # (JSON has no NaN: a string)
    # and the progress says it went on, not that training stopped
    said = [ln for ln in res.stderr.splitlines() if "rolled back" in ln]
    assert len(said) == 1 and "rolled back to the last good checkpoint (step 10)" in said[0], res.stderr
    assert "at step 15 with loss 'nan-after' (plugin 'faulty')" in said[0] and "training stopped" not in said[0]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss/d" in r] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(isinstance(r["loss/d"], float) for r in recs if "loss/d" in r)
    # shuffled epochs: a new order from the step rolled back to (the batches that diverged are not replayed)
    meta = json.loads((out / "checkpoints" / "step-00000040.json").read_text())
    assert meta.get("sampling") == ({"salt": "rollback 1 at step 10", "origin": 10} if sampling == "epoch" else None)


def test_rollback_gives_up_on_a_persistent_nan(tmp_path, faulty):
    out = tmp_path / "r"
    res = invoke(["train", "--out", str(out), *FLAGS, *DIVERGE, "--on-divergence", "rollback", "-q"])
    assert res.exit_code == 1, res.output
    assert "'nan-after'" in res.stderr and "Traceback" not in res.output
    assert [r["attempt"] for r in _events(out, "rollback")] == [1, 2, 3]
    assert assert_committed_checkpoints_verify(out) == [10]


@pytest.mark.parametrize("component", ["loss", "detector"])
def test_a_plugin_raising_in_a_component_method(tmp_path, faulty, component):
    out = tmp_path / "r"
    extra = (["--loss", "raising-loss"] if component == "loss"
             else ["--detector", "raising-detector", "-o", "detector.every=10"])
    res = invoke(["train", "--out", str(out), *FLAGS, *extra, "--checkpoint-every", "10", "--steps", "20", "-q"])
    assert res.exit_code == 0, res.output
    before = snapshot(out)
    assert set(before) == {"step-00000010.json", "step-00000010.safetensors",
                           "step-00000020.json", "step-00000020.safetensors"}
    (RaisingLoss if component == "loss" else RaisingDetector).armed = True
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "40", "-q"])
    assert res.exit_code == 1, res.output
    msg = res.stderr
    assert "Traceback" not in res.output and "plugin 'faulty'" in msg
    if component == "loss":
        assert "loss 'raising-loss'" in msg and "d_loss()" in msg and "ZeroDivisionError" in msg
    else:
        assert "detector 'raising-detector'" in msg and "detect()" in msg and "KeyError" in msg
    assert snapshot(out) == before  # the run's checkpoints, byte for byte
    # and the library raises the same as an exception naming plugin, component and method
    with pytest.raises(RunFailure) as info:
        api.train({"out": str(out), "steps": 40}, resume=True, quiet=True)
    e = info.value
    assert (e.kind, e.plugin, e.method) == ((component, "faulty", "d_loss") if component == "loss"
                                            else (component, "faulty", "detect"))
    assert snapshot(out) == before


def test_checkpoint_records_test_plugin_in_metadata(tmp_path, faulty):
    out = tmp_path / "r"
    res = invoke(["train", "--out", str(out), *FLAGS, "--loss", "raising-loss", "--steps", "3", "-q"])
    assert res.exit_code == 0, res.output
    meta = final_meta(out)
    assert "faulty" in meta["plugins"] and "mixtures" in meta["plugins"]
    assert meta["plugins"]["mixtures"]["version"] == core.__version__
    assert meta["plugins"]["faulty"] == {"distribution": None, "version": None}  # not installed: no version
