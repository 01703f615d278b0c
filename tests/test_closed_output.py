"""Progress output that can no longer be written (``dyngan train ... 2>&1 | head -1``, a closed
terminal) does not stop training: the run goes on to its final step and saves as usual, and exits
0 (or with the signal's code), without a traceback from Python's flush at exit."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core import checkpoint as ckpt_io
from core.training import Progress

from signal_helpers import close_output_when_held, start_held

STEPS = 200  # held at step 10, the first logged step; progress lines then every 10 steps, all failing
TIMEOUT = 120


class BrokenStream(io.StringIO):
    """A stream whose reader went away after ``good`` writes: every later write raises ``error``."""

    def __init__(self, good: int, error: OSError) -> None:
        super().__init__()
        self.good, self.error, self.attempts = good, error, 0

    def write(self, text: str) -> int:
        self.attempts += 1
        if self.attempts > self.good:
            raise self.error
        return super().write(text)


@pytest.mark.parametrize("error", [BrokenPipeError(errno.EPIPE, "Broken pipe"), OSError(errno.EIO, "I/O error")])
def test_progress_stops_writing_to_a_stream_that_failed_and_raises_nothing(error):
    stream = BrokenStream(1, error)
    progress = Progress(100, quiet=False, stream=stream)
    progress.message("run directory: somewhere")
    assert stream.getvalue() == "run directory: somewhere\n"
    progress.update(5, "D 1.0  G 1.0")  # fails: no exception, and the stream is given up
    assert progress.closed and stream.attempts == 2
    progress.update(100, "D 1.0  G 1.0", final=True)
    progress.message("step 100: mixture/modes 3")
    progress.warn("a warning")
    progress.tick(50)
    assert stream.attempts == 2  # nothing more was tried
    assert stream.getvalue() == "run directory: somewhere\n"


def test_a_stream_full_for_now_loses_a_line_not_the_progress():
    """A non-blocking stream that cannot take a write now (EAGAIN) is not gone: later lines go on."""
    class Busy(io.StringIO):
        busy = True

        def write(self, text: str) -> int:
            if self.busy:
                self.busy = False
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            return super().write(text)

    stream = Busy()
    progress = Progress(100, quiet=False, stream=stream)
    progress.message("first")  # lost
    progress.message("second")
    assert not progress.closed and stream.getvalue() == "second\n"


def test_a_progress_stream_that_is_no_broken_pipe_still_raises():
    """Only the stream's own failures are swallowed, not a bug that raises something else."""
    class Buggy(io.StringIO):
        def write(self, text: str) -> int:
            raise TypeError("not a stream failure")

    with pytest.raises(TypeError):
        Progress(10, quiet=False, stream=Buggy()).message("x")


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DYNGAN_NO_PICTURES="1", PYTHONUNBUFFERED="1")
    env.pop("DYNGAN_TRACEBACK", None)
    return env


def _args(out: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--dataset", "grid25", "--device", "cpu", "--threads", "1",
            "--steps", str(STEPS), "--seed", "0", "-o", "dataset.n=1000", "--log-every", "10",
            "--eval-every", "100", "--checkpoint-every", "0", *extra]


def _checkpoints(out: Path) -> list[int]:
    return [s for s, _ in ckpt_io.list_checkpoints(out / "checkpoints")]


def _assert_trained_to_the_end(out: Path) -> None:
    assert _checkpoints(out) == [STEPS]
    assert ckpt_io.read(out / "checkpoints" / f"step-{STEPS:08d}.json").step == STEPS  # verifies it
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss/d" in r] == list(range(10, STEPS + 1, 10))
    assert [r["step"] for r in recs if r.get("event") == "eval"] == [100, 200]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
@pytest.mark.parametrize("closed", ["stderr", "stdout-and-stderr"])
def test_training_goes_on_to_its_final_checkpoint_when_its_output_pipe_closes(tmp_path, closed):
    """``dyngan train ... 2>&1 >/dev/null | head -1`` used to die at the next progress line with exit
    1, saving nothing; with ``2>&1 | head -1`` the run directory printed on stdout at the end fails too."""
    out = tmp_path / "run"
    hold = tmp_path / "hold"
    merged = closed == "stdout-and-stderr"
    proc = start_held(hold, _args(out), _env(), tmp_path, TIMEOUT,
                      stderr=subprocess.STDOUT if merged else subprocess.PIPE)
    first = (proc.stdout if merged else proc.stderr).readline()
    assert first.startswith(f"run directory: {out}")

    def close() -> None:
        if proc.stderr is not None:
            proc.stderr.close()
        if merged:
            proc.stdout.close()

    rc = close_output_when_held(proc, hold, TIMEOUT, close)
    assert rc == 0
    if not merged:
        assert proc.stdout.read().strip() == str(out)  # stdout still works, and says where the run is
        proc.stdout.close()
    _assert_trained_to_the_end(out)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="a pseudo-terminal")
def test_training_goes_on_when_its_terminal_goes_away(tmp_path):
    """A closed terminal: every write to it then fails with EIO, not EPIPE."""
    out = tmp_path / "run"
    hold = tmp_path / "hold"
    master, slave = os.openpty()
    try:
        proc = start_held(hold, _args(out), _env(), tmp_path, TIMEOUT, stdout=slave, stderr=slave)
    finally:
        os.close(slave)

    def close() -> None:
        os.close(master)

    rc = close_output_when_held(proc, hold, TIMEOUT, close)
    assert rc == 0
    _assert_trained_to_the_end(out)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_with_a_closed_stderr_still_saves_and_exits_143(tmp_path):
    """The error line after the save cannot be written either: the exit code still says what
    happened (click turned the failing write into exit 1)."""
    out = tmp_path / "run"
    hold = tmp_path / "hold"
    proc = start_held(hold, _args(out, "-q"), _env(), tmp_path, TIMEOUT)
    rc = close_output_when_held(proc, hold, TIMEOUT, proc.stderr.close, signum=signal.SIGTERM)
    proc.stdout.close()
    assert rc == 143
    assert _checkpoints(out) == [10]
