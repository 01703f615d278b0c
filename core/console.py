"""Console output that a closed pipe or a hung-up terminal cannot turn into a failure.

``dyngan train ... 2>&1 | head -1`` closes the progress stream after one line; a closed terminal
(SIGHUP) does the same to every later write. Progress lines are a convenience, the run directory
is the record: a write that fails there stops the writing, never the work. Kept free of heavy
imports: the CLI uses it for its error line too.
"""

from __future__ import annotations

import os
import signal
from typing import Any

#: the process's own standard output and error, whose buffers Python flushes at exit
_STANDARD_FDS = (1, 2)


def write_failed(stream: Any) -> None:
    """After a write to ``stream`` failed (EPIPE, EIO): when it is the process's stdout or stderr,
    point that file descriptor at the null device, so that later writes to it (an error line, a
    library's warning, Python's flush at interpreter exit) succeed unseen instead of failing
    again, which at exit would turn a finished run into exit 1. Any other stream is left alone:
    its owner holds it, and the caller stops writing to it."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO, click's test streams, a closed file
        return
    if fd not in _STANDARD_FDS:
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(null, fd)
    except OSError:
        return
    finally:
        os.close(null)
    try:  # what the failed write left in the stream's buffer now drains into the null device
        stream.flush()
    except (OSError, ValueError):
        pass


def is_write_failure(error: BaseException, stream: Any) -> bool:
    """Whether ``error``, raised by writing to ``stream``, says the stream itself is gone: any
    OSError (a closed pipe, a terminal that hung up, a full disk under a redirect), or the
    ValueError of a stream that was closed."""
    if isinstance(error, OSError):
        return True
    return isinstance(error, ValueError) and bool(getattr(stream, "closed", False))


def safe_write(stream: Any, text: str) -> bool:
    """Write and flush ``text``; False when the stream is gone (``write_failed`` has then muted it
    if it is stdout or stderr)."""
    try:
        stream.write(text)
        stream.flush()
    except BlockingIOError:  # a non-blocking stream that is full for now: this line is lost, not the stream
        return True
    except (OSError, ValueError) as e:
        if not is_write_failure(e, stream):
            raise
        write_failed(stream)
        return False
    return True


def stop_signals() -> tuple[int, ...]:
    """The signals that stop training with a checkpoint (and a new run's set-up, removing it):
    SIGINT (Ctrl-C), SIGTERM and, where it exists, SIGHUP (the terminal closed) while it has its
    default disposition, which would kill the process unsaved. A SIGHUP that is ignored (``nohup``:
    a terminal that closes must not then stop the run) or that a program using dyngan as a library
    handles itself (to reload its settings, say) is left as it is."""
    sigs = [signal.SIGINT, signal.SIGTERM]
    hup = getattr(signal, "SIGHUP", None)
    if hup is not None:
        current = signal.getsignal(hup)
        if current is signal.SIG_DFL or getattr(current, "_dyngan_stop", False):  # dyngan's own: set-up's
            sigs.append(hup)
    return tuple(sigs)


def stop_handler(handler: Any) -> Any:
    """Mark ``handler`` as one of dyngan's own stop handlers (set-up's, training's): a SIGHUP that one
    of them holds counts as taken from its default disposition when training takes it over."""
    handler._dyngan_stop = True
    return handler
