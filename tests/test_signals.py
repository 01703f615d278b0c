"""Ctrl-C and SIGTERM during ``dyngan train``: a checkpoint is saved, the exit code is
128 + signal, and ``--resume`` finishes the run with its full step count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core import checkpoint as ckpt_io

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

STEPS = 400  # long enough to be still running when the signal comes (the first log is at step 10)
TIMEOUT = 120  # seconds; a hung child fails the test instead of hanging it


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DYNGAN_NO_PICTURES="1", PYTHONUNBUFFERED="1")
    return env


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "core", "train", "--out", str(out), *extra]


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        _train_cmd(out, "--dataset", "grid25", "--device", "cpu", "--steps", str(STEPS), "--seed", "0",
                   "-o", "dataset.n=2000", "--log-every", "10", "--eval-every", "0",
                   "--checkpoint-every", "0", "-q"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(out.parent))


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _wait_for_first_log(proc: subprocess.Popen, out: Path) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stdout, stderr = proc.communicate()
            pytest.fail(f"training ended (rc {proc.returncode}) before it could be interrupted:\n{stderr}")
        if metrics.exists() and '"loss/d"' in metrics.read_text():  # the first logged step, not the start event
            return
        time.sleep(0.02)
    _kill(proc)
    pytest.fail("no metrics line within the time limit")


def _interrupt(tmp_path: Path, signum: int) -> tuple[Path, int, str, str]:
    out = tmp_path / "run"
    proc = _start(out)
    try:
        _wait_for_first_log(proc, out)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        _kill(proc)
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
    assert 10 <= stopped < STEPS
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
