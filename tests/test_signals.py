"""Ctrl-C, SIGTERM and SIGHUP during ``dyngan train``: a checkpoint is saved, the exit code is
128 + signal, and ``--resume`` finishes the run with its full step count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core import checkpoint as ckpt_io

from signal_helpers import signal_when_held, start_held

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

STEPS = 400  # the signal comes at step 10, the first logged step
TIMEOUT = 120  # seconds; a hung child fails the test instead of hanging it


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DYNGAN_NO_PICTURES="1", PYTHONUNBUFFERED="1")
    return env


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "core", "train", "--out", str(out), *extra]


def _args(out: Path) -> list[str]:
    return ["train", "--out", str(out), "--dataset", "grid25", "--device", "cpu", "--steps", str(STEPS),
            "--seed", "0", "-o", "dataset.n=2000", "--log-every", "10", "--eval-every", "0",
            "--checkpoint-every", "0", "-q"]


def _interrupt(tmp_path: Path, signum: int) -> tuple[Path, int, str, str]:
    """Train, deliver ``signum`` at the first logged step (step 10; tests/signal_helpers.py)."""
    out = tmp_path / "run"
    proc = start_held(tmp_path / "hold", _args(out), _env(), tmp_path, TIMEOUT)
    stdout, stderr = signal_when_held(proc, tmp_path / "hold", signum, TIMEOUT)
    return out, proc.returncode, stdout, stderr


def _checkpoints(out: Path) -> list[int]:
    return [s for s, _ in ckpt_io.list_checkpoints(out / "checkpoints")]


def _check_interrupted_run(out: Path, rc: int, stderr: str, expected_rc: int) -> int:
    assert rc == expected_rc, stderr
    assert "Traceback" not in stderr
    assert "--resume" in stderr  # tells the user how to continue
    steps = _checkpoints(out)
    assert len(steps) == 1, steps  # --checkpoint-every 0: this one was written by the signal
    stopped = steps[0]
    assert stopped == 10  # the step the signal came at: it is finished, then saved
    ck = ckpt_io.read(out / "checkpoints" / f"step-{stopped:08d}.json")  # verifies the checksum
    assert ck.step == stopped
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged and max(logged) <= stopped
    return stopped


def test_sigint_saves_exits_130_and_resume_finishes(tmp_path):
    out, rc, _, stderr = _interrupt(tmp_path, signal.SIGINT)
    stopped = _check_interrupted_run(out, rc, stderr, 130)

    res = subprocess.run(_train_cmd(out, "--resume", "-q"), capture_output=True, text=True, env=_env(),
                         cwd=str(tmp_path), timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out)
    steps = _checkpoints(out)
    assert steps[-1] == STEPS and stopped in steps
    ck = ckpt_io.read(out / "checkpoints" / f"step-{STEPS:08d}.json")
    assert ck.step == STEPS
    tensors = load_file(str(out / "checkpoints" / f"step-{STEPS:08d}.safetensors"))
    nets = [k for k in tensors if k.startswith(("G/", "D/"))]
    assert nets and all(bool(tensors[k].isfinite().all()) for k in nets)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in recs if "loss/d" in r]
    assert logged[-1] == STEPS
    assert logged == sorted(set(logged))  # each step logged once, in order, across the resume
    assert json.loads((out / "config.json").read_text())["steps"] == STEPS


def test_sigterm_saves_and_exits_143(tmp_path):
    out, rc, _, stderr = _interrupt(tmp_path, signal.SIGTERM)
    _check_interrupted_run(out, rc, stderr, 143)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP")
def test_sighup_saves_like_sigterm_and_exits_129(tmp_path):
    """A closed terminal (SIGHUP) used to end the run at once: exit 129, no checkpoint, and a run
    directory that neither a new run nor --resume could use."""
    out, rc, _, stderr = _interrupt(tmp_path, signal.SIGHUP)
    _check_interrupted_run(out, rc, stderr, 129)
    assert "interrupted by SIGHUP at step 10; checkpoint saved" in stderr
    res = subprocess.run(_train_cmd(out, "--resume", "-q"), capture_output=True, text=True, env=_env(),
                         cwd=str(tmp_path), timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert _checkpoints(out)[-1] == STEPS


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP")
def test_sighup_is_left_alone_when_the_process_ignores_it(tmp_path):
    """``nohup dyngan train ...``: the terminal closing must not stop the run."""
    out = tmp_path / "run"
    hold = tmp_path / "hold"
    hold.mkdir()
    script = hold / "pauser.py"
    from signal_helpers import PAUSER

    script.write_text(PAUSER)
    proc = subprocess.Popen([sys.executable, str(script), str(hold), str(TIMEOUT), *_args(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(tmp_path),
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    stdout, stderr = signal_when_held(proc, hold, signal.SIGHUP, TIMEOUT)
    assert proc.returncode == 0, stderr
    assert _checkpoints(out) == [STEPS]


def test_a_signal_during_the_final_evaluation_stops_after_it(tmp_path):
    """The final step is saved before its evaluation; a SIGTERM that comes while it scores (a
    long evaluation, a scheduler's grace period) ends the process with 143 once it is done,
    instead of being ignored (exit 0)."""
    import types

    from cli_helpers import assert_clean_error, invoke
    from core import hookimpl
    from core.components import Metric
    from core.testing import plugin_host

    class SignalledWhileScoring(Metric):
        name = "sig-at-eval"

        def compute(self, fake, real, dataset):
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop's flag: no exit here
            return {"sig-at-eval/x": 1.0}

    plugin = types.SimpleNamespace(register_metrics=hookimpl(lambda register: register(SignalledWhileScoring)))
    out = tmp_path / "run"
    with plugin_host(("sig", plugin)):
        res = invoke(["train", "--out", str(out), "--dataset", "grid25", "--device", "cpu", "--steps", "10",
                      "-o", "dataset.n=500", "--eval-every", "0", "--metrics", "sig-at-eval", "-q"])
    assert_clean_error(res, 143, "interrupted by SIGTERM during the final evaluation at step 10",
                       "the run is complete and saved")
    assert _checkpoints(out) == [10]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["sig-at-eval/x"] for e in evals] == [1.0]  # the evaluation finished and is logged


def test_sighup_is_taken_over_only_from_its_default_disposition():
    """A program using dyngan as a library that handles SIGHUP itself keeps its handler while it trains."""
    from core.console import stop_signals

    old = signal.getsignal(signal.SIGHUP)
    calls = []
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert signal.SIGHUP in stop_signals()
        for other in (signal.SIG_IGN, lambda signum, frame: calls.append(signum)):
            signal.signal(signal.SIGHUP, other)
            assert stop_signals() == (signal.SIGINT, signal.SIGTERM)
        from core.training import _SignalFlag

        with _SignalFlag():
            os.kill(os.getpid(), signal.SIGHUP)
        assert calls == [signal.SIGHUP]  # the program's handler ran, not training's stop
    finally:
        signal.signal(signal.SIGHUP, old)
