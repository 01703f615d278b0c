"""The run directory: config.json, metrics.jsonl, checkpoints/ and pictures."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_bytes, list_checkpoints
from .errors import CheckpointError, RunFailure, UsageError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
#: a config.json is a few kilobytes; a bigger one is refused unread
MAX_CONFIG_BYTES = 16 << 20


def next_numbered(root: Path) -> Path:
    """``runs/001``, ``runs/002`` ...: one past the highest number already there."""
    highest = 0
    try:
        if root.is_dir():
            for p in root.iterdir():
                if re.fullmatch(r"\d+", p.name):
                    highest = max(highest, int(p.name))
    except OSError as e:
        raise path_error(root, e) from None
    return root / f"{highest + 1:03d}"


def path_error(path: Path | str, error: OSError) -> UsageError:
    """A path given by the user that cannot even be looked at (a name too long for the file system,
    a folder without search permission, an I/O error): one line naming it, for exit code 2."""
    return UsageError(f"cannot use {str(path)!r}: {error.strerror or error}")


def is_run(path: Path) -> bool:
    """Whether ``path`` holds a run (its config.json); UsageError (``path_error``) when ``path``
    cannot be looked at."""
    try:
        return (path / CONFIG).is_file()
    except OSError as e:
        raise path_error(path, e) from None


#: run directory that ``create`` made -> the folders above it that it made for it, nearest first: a
#: run removed before it began (``discard_unstarted``) takes them along when it leaves them empty; a
#: folder that existed before (an empty --out the user made) is never removed
_MADE_PARENTS: dict[Path, list[Path]] = {}


def _missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, nearest first."""
    out = []
    for parent in path.parents:
        try:
            if parent.exists():
                break
        except OSError:
            break
        out.append(parent)
    return out


def create(path: Path | None, root: Path = Path("runs")) -> Path:
    """Make a new run directory; refuses one that already holds a run."""
    if path is None:
        root_abs = root
        for _ in range(100):
            path = next_numbered(root_abs)
            made = _missing_parents(path)
            try:
                path.mkdir(parents=True, exist_ok=False)
                _MADE_PARENTS[path] = made
                return path
            except FileExistsError:
                continue
            except OSError as e:
                raise UsageError(f"cannot create run directory {str(path)!r}: {e.strerror or e}") from None
        raise UsageError(f"cannot find a free run directory under {str(root)!r}")
    check_new(path)
    made = _missing_parents(path)
    try:
        existed = path.exists()
        path.mkdir(parents=True, exist_ok=True)
        if not existed:
            _MADE_PARENTS[path] = made
    except OSError as e:
        raise UsageError(f"cannot create run directory {str(path)!r}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"run directory {str(path)!r} is not writable")
    return path


def check_new(path: Path) -> None:
    """UsageError unless ``path`` can become a new run directory (it may exist, empty of runs)."""
    try:
        exists_not_dir = path.exists() and not path.is_dir()
        configured = is_run(path)
        held = configured or bool(list_checkpoints(path / CHECKPOINTS))
    except OSError as e:  # a name too long, a folder without search permission: exit 2, not a traceback
        raise path_error(path, e) from None
    if exists_not_dir:
        raise UsageError(f"--out {str(path)!r} exists and is not a directory")
    if held and not configured:  # --resume would refuse it too: say what is missing instead
        raise UsageError(
            f"{str(path)!r} holds checkpoints of a run but not its {CONFIG}; restore that file to resume "
            "the run, or choose another --out"
        )
    if held:
        raise UsageError(
            f"{str(path)!r} already holds a run; use --resume to continue it or choose another --out"
        )


def resume_advice(run_dir: Path | str, torchrun: bool = False) -> str:
    """How to continue the run in ``run_dir``: ``dyngan train --out RUN --resume``, or under torchrun
    (``torchrun``) the same torchrun command with --resume."""
    if torchrun:
        return f"continue with the same torchrun command and --resume (... -m core train --out {run_dir} --resume)"
    return f"continue with: dyngan train --out {run_dir} --resume"


def _only_start_events(metrics: Path) -> bool:
    """Whether ``metrics`` (a regular file, not a link) holds nothing but step-0 ``start`` events."""
    if metrics.is_symlink() or not metrics.is_file():
        return False
    try:
        records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError:  # a line it cannot read: not a log it may discard
        return False
    return all(isinstance(r, dict) and r.get("event") == "start" and r.get("step") == 0 for r in records)


def discard_unstarted(path: Path, start_records: bool = False) -> bool:
    """Remove the config.json of a run that failed or was interrupted before training began (no
    checkpoints, no metrics but an empty metrics.jsonl, or with ``start_records`` one holding only
    the ``start`` events written before the first step), and the directory if ``create`` made it and
    that leaves it empty; anything else is left alone. Whether the run is gone (its config.json
    removed)."""
    metrics = path / METRICS
    try:
        if list_checkpoints(path / CHECKPOINTS) or (path / CHECKPOINTS).exists() or \
                (metrics.exists() and (not metrics.is_file() or metrics.stat().st_size > 0)
                 and not (start_records and _only_start_events(metrics))):
            return False
    except OSError:  # cannot tell: leave it alone (and do not mask the error that brought us here)
        return False
    try:
        metrics.unlink(missing_ok=True)
        (path / CONFIG).unlink(missing_ok=True)
    except OSError:
        return False
    if path in _MADE_PARENTS:  # made for this run: it goes if that leaves it empty, as do its new parents
        try:
            path.rmdir()
            for parent in _MADE_PARENTS.pop(path):
                parent.rmdir()
        except OSError:
            pass
    return True


def write_config(path: Path, config: dict[str, Any]) -> None:
    atomic_write_bytes(path / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


#: the settings a resume may change that belong to the run, not to one invocation (core.api's
#: _RESUMABLE adds the machine's: device, threads and compile): a resume writes a change of them to
#: config.json, so that a later plain ``--resume`` (after Ctrl-C, say) keeps it
SCHEDULE = ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints")
#: what the evaluations measure: these and the metric options (``options.metric``) may change on a
#: resume too (evaluation draws from its own random stream, so training goes on unchanged) and are
#: recorded like the schedule
EVALUATION = ("metrics", "eval_samples")


def record_schedule(path: Path, config: dict[str, Any]) -> None:
    """Write ``config``'s schedule (``SCHEDULE``), evaluation settings (``EVALUATION``), metric
    options and the plugins it uses that config.json does not list yet (a metric's) into the run's
    config.json where they differ, atomically."""
    saved = read_config(path)
    changed = {k: config[k] for k in (*SCHEDULE, *EVALUATION) if k in config and saved.get(k) != config[k]}
    metric_opts = (config.get("options") or {}).get("metric")
    saved_opts = saved.get("options") if isinstance(saved.get("options"), dict) else {}
    if metric_opts is not None and saved_opts.get("metric") != metric_opts:
        changed["options"] = {**saved_opts, "metric": metric_opts}
    # the plugin of a metric the resume added joins the run's record of the plugins it used
    plugins, saved_plugins = config.get("plugins"), saved.get("plugins")
    if isinstance(plugins, dict) and isinstance(saved_plugins, dict) and set(plugins) - set(saved_plugins):
        changed["plugins"] = {**saved_plugins, **{k: v for k, v in plugins.items() if k not in saved_plugins}}
    if not changed:
        return
    try:
        write_config(path, {**saved, **changed})
    except OSError as e:
        raise UsageError(f"cannot write to run directory {str(path)!r}: {e.strerror or e}") from None


def read_config(path: Path) -> dict[str, Any]:
    f = path / CONFIG
    try:
        why = None
        if not path.is_dir():
            why = "it is a file" if path.is_file() else "it is not a directory" if path.exists() \
                else "it does not exist"
        elif not f.is_file():  # a FIFO or a link to a device is there, but no configuration
            why = f"its {CONFIG} is not a regular file" if f.exists() else f"no {CONFIG}"
    except OSError as e:  # a name too long, a folder without search permission: exit 2, not a traceback
        raise path_error(path, e) from None
    if why is not None:
        raise UsageError(f"{str(path)!r} is not a run directory ({why})")
    try:
        size = f.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{f}: unreadable ({e.strerror or e})") from None
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{f}: {size} bytes, too large to be a dyngan run configuration")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{f}: unreadable ({text})") from None
    if not isinstance(cfg, dict) or "dataset" not in cfg or "loss" not in cfg:
        raise CheckpointError(f"{f}: not a dyngan run configuration")
    return cfg


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep the fact visible
    return v


class MetricsLog:
    """Appends one JSON object per line; flushed on every write so a crash loses nothing logged."""

    def __init__(self, path: Path) -> None:
        self.path = path / METRICS
        self._failed = False
        _check_regular(self.path)  # a FIFO would block the open, a folder fail it
        try:
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise RunFailure(f"cannot write {self.path}: {e.strerror or e}") from None

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._f.flush()
        except OSError as e:  # disk full, quota, a vanished directory: one clear error
            self._failed = True
            raise RunFailure(f"cannot write {self.path}: {e.strerror or e}; "
                             "the checkpoints already written are intact") from None

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            if not self._failed:  # a failed write was reported already; do not mask it
                raise

    def truncate_after(self, step: int, partition_made: bool = False) -> None:
        """On resume: drop records logged after the checkpoint's step (they will be logged again).
        ``partition_made``: the checkpoint's partition check is pending (its step was a final one),
        so a partition record of that step came after it, from a resume since, and is made again."""
        self._f.close()
        keep = []
        for line, rec in _records(self.path):  # lines cut by a crash or undecodable are dropped
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and (rec["step"] > step or (
                    partition_made and rec["step"] == step and rec.get("event") in ("partition", "partition-check"))):
                continue
            keep.append(line)
        try:
            atomic_write_bytes(self.path, ("\n".join(keep) + ("\n" if keep else "")).encode())
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            self._failed = True
            raise RunFailure(f"cannot write {self.path}: {e.strerror or e}") from None


def _check_regular(f: Path) -> bool:
    """Whether ``f`` exists; raises CheckpointError when it is there but not a regular file
    (a folder, a FIFO that would block the reader, a device)."""
    try:
        mode = os.stat(f).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise CheckpointError(f"{f}: unreadable ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{f}: not a regular file; move it away to use this run")
    return True


def _records(f: Path) -> list[tuple[str, Any]]:
    """``(line, parsed JSON)`` for each line of ``f`` that decodes and parses; a line cut by a
    crash, undecodable bytes or other garbage is skipped. A missing file has none."""
    if not _check_regular(f):
        return []
    try:
        data = f.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{f}: unreadable ({e.strerror or e})") from None
    out = []
    for raw in data.split(b"\n"):
        try:
            line = raw.decode("utf-8").rstrip("\r")
            rec = json.loads(line)
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        out.append((line, rec))
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``path``'s metrics.jsonl; corrupt lines are skipped. Raises CheckpointError
    when metrics.jsonl is not a regular file or cannot be read."""
    return [rec for _, rec in _records(path / METRICS) if isinstance(rec, dict)]


class RunLock:
    """An exclusive lock on a run directory while a process trains in it (``flock`` on the
    directory itself, so no file is added, and none that a resume replaces: a lock on config.json
    stayed on the old file once a resume that changes ``--steps`` rewrote it, and let a second
    process in): a second ``train`` into the same directory is refused instead of writing
    metrics.jsonl and checkpoints under the first. Released on exit, also when the process dies.
    A no-op where ``fcntl`` is missing (Windows)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:
            return self
        if not (self.path / CONFIG).exists():
            return self  # no config.json: no run, nothing is training here
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return self
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise UsageError(f"another dyngan process is training in {str(self.path)!r}; wait for it to "
                             "finish (or stop it) before resuming this run") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
