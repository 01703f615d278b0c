"""Sending a real signal to a ``dyngan train`` child process at a known step, without racing it.

Polling metrics.jsonl and then signalling raced the child: on a loaded machine the parent could
be descheduled while the child trained past the step it was meant to stop at, or to the end.
Here the child runs ``dyngan`` through a small wrapper that, right after the first logged step,
writes ``<dir>/paused`` and waits for ``<dir>/go``. The parent waits for ``paused``, sends the
signal (the kernel delivers it while the child sleeps, so its handler has run), then writes ``go``.
The child then finishes that step's periodic work and stops as any signalled run does.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

PAUSER = r'''
import os, sys, time
hold = sys.argv[1]
from core import training
_log_step = training.Trainer._log_step
def _log_step_then_wait(self, *a, **k):
    _log_step(self, *a, **k)
    if os.path.exists(os.path.join(hold, "paused")):
        return
    open(os.path.join(hold, "paused"), "w").close()
    deadline = time.monotonic() + float(sys.argv[2])
    while not os.path.exists(os.path.join(hold, "go")) and time.monotonic() < deadline:
        time.sleep(0.005)
training.Trainer._log_step = _log_step_then_wait
from core.cli import main
main(sys.argv[3:])
'''


def start_held(hold: Path, args: list[str], env: dict, cwd: Path, timeout: float,
               stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE) -> subprocess.Popen:
    """``dyngan ARGS`` in a child that waits at its first logged step (see the module doc)."""
    hold.mkdir(parents=True, exist_ok=True)
    script = hold / "pauser.py"
    script.write_text(PAUSER)
    return subprocess.Popen([sys.executable, str(script), str(hold), str(timeout), *args],
                            stdout=stdout, stderr=stderr, text=True, env=env, cwd=str(cwd))


def _wait_held(proc: subprocess.Popen, hold: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (hold / "paused").exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training ended (rc {proc.returncode}) before its first log:\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError("the child did not reach its first logged step in time")
        time.sleep(0.01)


def signal_when_held(proc: subprocess.Popen, hold: Path, signum: int, timeout: float) -> tuple[str, str]:
    """Wait for the child to hold, send ``signum``, release it; returns its (stdout, stderr).
    Fails (AssertionError) when the child ends or never holds within ``timeout``."""
    try:
        _wait_held(proc, hold, timeout)
        proc.send_signal(signum)
        (hold / "go").touch()
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def close_output_when_held(proc: subprocess.Popen, hold: Path, timeout: float, close: Callable[[], None],
                           signum: int | None = None) -> int:
    """Wait for the child to hold, run ``close`` (which closes the reading ends of its output, as
    ``| head -1`` does once it has its line), send ``signum`` if given, release the child; returns
    its exit code. Every write the child makes after this one fails (EPIPE / EIO)."""
    try:
        _wait_held(proc, hold, timeout)
        close()
        if signum is not None:
            proc.send_signal(signum)
        (hold / "go").touch()
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
