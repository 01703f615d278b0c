"""Checkpoints: safetensors for tensors, a JSON sidecar for everything else.

Layout: ``checkpoints/step-00001234.safetensors`` and ``step-00001234.json``.
Writing is atomic: each file goes to a temporary name, is fsynced and renamed;
the JSON, written last, is the commit marker and records the SHA-256 of the
tensor file. A checkpoint without its JSON, or whose tensor file does not
match the recorded hash, is ignored and the previous good one is used.
Nothing is ever unpickled: safetensors parses only a JSON header and raw bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import CheckpointError, RunFailure, one_line

FORMAT = "dyngan-checkpoint/1"
_NAME = re.compile(r"^step-(\d{8,})\.json$")
_TENSORS = re.compile(r"^step-(\d{8,})\.safetensors$")
_TMP = re.compile(r"^\.step-\d{8,}\.(?:json|safetensors)\.tmp-(\d+)$")
#: a checkpoint's JSON sidecar is small; a bigger one is not ours (and is not read into memory)
MAX_JSON_BYTES = 64 << 20
#: tensor-name prefixes of the networks' weights (generator, discriminator, G's weight average)
NETWORK_PREFIXES = ("G/", "D/", "G_ema/")
#: JSON entries that the tensor file's header repeats (as JSON text): what the weights' meaning
#: rests on, so that a hand-edited sidecar that still parses (a data shape of another layout with
#: as many values) is refused as damaged instead of trusted
SEALED = ("data_shape", "n_train")


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, Any]
    meta: dict[str, Any]
    path: Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it onto ``path``: a crash
    leaves either the old file or the new one (``write`` may stream, e.g. ``np.save``)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stem(step: int) -> str:
    return f"step-{step:08d}"


def save(directory: Path, step: int, tensors: dict[str, Any], meta: dict[str, Any], keep: int = 3) -> Path:
    """Write one checkpoint atomically and keep the newest ``keep``.

    Raises RunFailure (with the previous checkpoints untouched) if the disk is full
    or unwritable.
    """
    from safetensors.torch import save as st_save

    directory.mkdir(parents=True, exist_ok=True)
    stem = _stem(step)
    tensor_path = directory / f"{stem}.safetensors"
    json_path = directory / f"{stem}.json"
    # safetensors wants contiguous tensors that share no memory
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    try:
        header = {"format": FORMAT, "step": str(step)}
        header.update({k: json.dumps(meta[k]) for k in SEALED if k in meta})
        blob = st_save(plain, metadata=header)
        atomic_write_bytes(tensor_path, blob)
        record = dict(meta)
        record.update({
            "format": FORMAT,
            "step": step,
            "tensors_file": tensor_path.name,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "size": len(blob),
        })
        atomic_write_bytes(json_path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    except BaseException as e:
        if not json_path.exists():  # a tensor file without its JSON must not linger
            tensor_path.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        try:
            earlier = [s for s, _ in list_checkpoints(directory) if s != step]
        except Exception:  # noqa: BLE001 - cannot tell: say nothing about them
            earlier = None
        state = ("the previous checkpoint is intact" if earlier else
                 "no checkpoint of this run was written before it, so there is nothing to resume from"
                 if earlier is not None else "earlier checkpoints are left as they were")
        raise RunFailure(f"could not write checkpoint at step {step} in {directory}: {e.strerror or e}; "
                         f"{state}") from None
    _prune(directory, keep, step)
    return json_path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # exists but not ours, or cannot tell: leave its file alone
    return True


def _prune(directory: Path, keep: int, written: int) -> None:
    """Keep the newest ``keep`` checkpoints up to step ``written`` (the one just saved). A resume
    moves the checkpoints it skipped out of the way (``move_aside``); one with a later step still
    here is one it could not move: it neither counts toward ``keep`` nor is deleted, so the good
    checkpoints are never pruned in its favour."""
    entries = [e for e in list_checkpoints(directory) if e[0] <= written]
    for step, json_path in entries[:-keep] if keep > 0 else []:
        for p in (json_path, json_path.with_suffix(".safetensors")):
            try:
                p.unlink()
            except OSError:
                pass
    # debris of a process killed while writing: temporary files of dead processes, and
    # tensor files whose JSON (the commit marker) was never written. Only called by the
    # single writer of a run, right after its own checkpoint is committed.
    committed = {p.with_suffix(".safetensors").name for _, p in list_checkpoints(directory)}
    try:
        names = [p.name for p in directory.iterdir()]
    except OSError:
        return
    for name in names:
        m = _TMP.match(name)
        stale = (m is not None and not _pid_alive(int(m.group(1)))) or \
            (_TENSORS.match(name) is not None and name not in committed)
        if stale:
            try:
                (directory / name).unlink()
            except OSError:
                pass


#: where a resume moves the checkpoints it had to skip: kept for inspection, never listed again
DAMAGED = "damaged"


def move_aside(directory: Path, json_paths: list[Path]) -> tuple[list[str], list[str]]:
    """Move each checkpoint (its JSON and tensor file) into ``directory/damaged/``: ``(moved, failed)``,
    the names moved and, for what the system refused to move, ``NAME: reason``. A resume does this with
    the checkpoints newer than the one it loaded: none of them can continue the run, and left in place
    they would count toward ``keep`` once the resumed run passes their step. A name already taken
    in ``damaged/`` (an earlier resume's) gets a numbered one (``step-00000020.1.json``): nothing
    there is overwritten."""
    moved: list[str] = []
    failed: list[str] = []
    target = directory / DAMAGED
    for json_path in json_paths:
        pair = [p for p in (json_path.with_suffix(".safetensors"), json_path) if os.path.lexists(p)]
        n = 0
        while any(os.path.lexists(target / _numbered(p.name, n)) for p in pair):
            n += 1
        for p in pair:
            try:
                target.mkdir(exist_ok=True)
                os.replace(p, target / _numbered(p.name, n))
                moved.append(p.name)
            except OSError as e:
                failed.append(f"{p.name}: {e.strerror or e}")
    return moved, failed


def _numbered(name: str, n: int) -> str:
    """``step-00000020.json`` -> ``step-00000020.N.json`` (``n`` = 0: unchanged)."""
    if n == 0:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{n}.{ext}" if dot else f"{name}.{n}"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, json path)`` of the committed checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    out = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def read(json_path: Path) -> Checkpoint:
    """Read and verify one checkpoint; raises CheckpointError saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    # a FIFO, device or huge file under a checkpoint's name is refused before it is read
    _check_regular(json_path, MAX_JSON_BYTES)
    try:
        raw = json_path.read_bytes()
    except OSError as e:
        raise _cannot_read(json_path.name, e) from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{json_path.name}: unreadable metadata ({one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path.name}: not a {FORMAT} checkpoint")
    step = meta.get("step")
    named = _NAME.match(json_path.name)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or (named and int(named.group(1)) != step):
        raise CheckpointError(f"{json_path.name}: bad step {step!r}")
    tname = meta.get("tensors_file")
    if not isinstance(tname, str) or "/" in tname or "\\" in tname or tname.startswith("."):
        raise CheckpointError(f"{json_path.name}: bad tensor file name {tname!r}")
    size, digest = meta.get("size"), meta.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(digest, str):
        raise CheckpointError(f"{json_path.name}: bad size or checksum record")
    tpath = json_path.parent / tname
    st_size = _check_regular(tpath, None)
    if st_size != size:  # checked before reading: a huge or truncated file is never loaded
        raise CheckpointError(f"{tname}: {st_size} bytes, the checkpoint recorded {size} (truncated or replaced)")
    try:
        blob = tpath.read_bytes()
    except OSError as e:
        raise _cannot_read(tname, e) from None
    if len(blob) != size or hashlib.sha256(blob).hexdigest() != digest:
        raise CheckpointError(f"{tname}: contents do not match the recorded checksum (truncated or edited)")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tname}: not a valid safetensors file ({e})") from None
    sealed = _header_metadata(blob)
    for key in SEALED:  # checkpoints written before SEALED repeat nothing: nothing to compare
        if key in sealed:
            try:
                saved = json.loads(sealed[key])
            except (ValueError, RecursionError):  # not what save() wrote: it cannot match
                saved = sealed[key]
            if meta.get(key) != saved:
                was, now = (r if len(r) <= 80 else r[:77] + "..." for r in (repr(saved), repr(meta.get(key))))
                raise CheckpointError(f"{json_path.name}: its {key} {now} is not the {was} "
                                      f"its tensor file was saved with (edited)")
    for name, t in tensors.items():  # NaN weights are never saved: such a file was edited or damaged
        if name.startswith(NETWORK_PREFIXES) and t.is_floating_point() and not bool(t.isfinite().all()):
            raise CheckpointError(f"{tname}: {name} holds NaN or inf weights")
    return Checkpoint(step=step, tensors=tensors, meta=meta, path=json_path)


def _header_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file that ``st_load`` has already accepted
    (an 8-byte little-endian header length, then the JSON header)."""
    n = int.from_bytes(blob[:8], "little")
    try:
        found = json.loads(blob[8:8 + n]).get("__metadata__") or {}
    except (ValueError, AttributeError, RecursionError):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, str)} if isinstance(found, dict) else {}


class CheckpointUnreadable(CheckpointError):
    """The system refused to read a checkpoint's file (permission, I/O or network file-system
    error): its contents may well be intact, so a resume must not skip it as damaged."""


#: errors that say the file is not there as a checkpoint, i.e. damage rather than access
_ABSENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _cannot_read(name: str, error: OSError) -> CheckpointError:
    cls = CheckpointError if isinstance(error, _ABSENT) else CheckpointUnreadable
    return cls(f"{name}: cannot read ({error.strerror or error})")


def _check_regular(path: Path, limit: int | None) -> int:
    """The size of ``path``, a regular file (no FIFO or device), at most ``limit`` bytes."""
    import stat

    try:
        st = os.stat(path)
    except OSError as e:
        raise _cannot_read(path.name, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path.name}: not a regular file")
    if limit is not None and st.st_size > limit:
        raise CheckpointError(f"{path.name}: {st.st_size} bytes, too large for checkpoint metadata")
    return st.st_size


def not_a_folder(directory: Path) -> CheckpointError:
    """A run's checkpoints entry that is a file (or a link to one): named, never taken for a run
    that stopped before its first checkpoint."""
    return CheckpointError(f"{str(directory)!r} is not a folder, so the run's checkpoints are not where dyngan "
                           "keeps them; if they were moved, put the folder back there")


def load_latest(
    directory: Path,
    apply: Callable[[Checkpoint], None] | None = None,
    warn: Callable[[str], None] | None = None,
    *,
    skip_unreadable: bool = True,
) -> Checkpoint:
    """The newest checkpoint that reads, verifies and (with ``apply``) loads.

    Falls back to older ones with a warning; raises CheckpointError if none works.
    ``apply`` should raise CheckpointError when a checkpoint does not fit the run.
    With ``skip_unreadable`` False (a resume, which moves what it skips aside and trains on from
    an older step), a checkpoint the system refuses to read (``CheckpointUnreadable``) stops the
    search instead: the file may be intact once its access is fixed.
    """
    if os.path.lexists(directory) and not directory.is_dir():
        raise not_a_folder(directory)
    entries = list_checkpoints(directory)
    if not entries:
        raise CheckpointError(f"no checkpoint in {directory}")
    problems = []
    for step, json_path in reversed(entries):
        try:
            ckpt = read(json_path)
            if apply is not None:
                apply(ckpt)
            if problems and warn is not None:
                warn(f"skipped newer checkpoint(s): {'; '.join(problems)}; using step {ckpt.step}")
            return ckpt
        except CheckpointUnreadable as e:
            if not skip_unreadable:
                raise CheckpointUnreadable(
                    f"cannot resume from {directory}: {e}. The file may be intact, so it is neither skipped "
                    "nor moved: fix its access and resume again (or, to train on from the checkpoint "
                    f"before it, move {json_path.name} and its .safetensors file out of that folder)") from None
            problems.append(str(e))
        except CheckpointError as e:
            problems.append(str(e))
    raise CheckpointError("no usable checkpoint in " + str(directory) + ": " + "; ".join(problems))


# ---------------------------------------------------------------------- state flattening


def flatten_optimizer(prefix: str, state: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """Put an optimiser's tensors in ``tensors``; return the rest as JSON."""
    import torch

    js: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for idx, s in state["state"].items():
        entry = {}
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}/state/{idx}/{k}"] = v
            else:
                entry[k] = v
        js["state"][str(idx)] = entry
    return js


def unflatten_optimizer(prefix: str, js: Any, tensors: dict[str, Any],
                        like: dict[str, Any] | None = None) -> dict[str, Any]:
    """An optimiser state dict from ``flatten_optimizer``'s parts; raises ValueError if the
    JSON is malformed or (given ``like``, the fresh optimiser's state dict) its param groups
    differ from the optimiser's in keys, sizes or value types. Given ``like``, the groups' settings
    (learning rate, betas, ...) are ``like``'s, which come from the run's config: the JSON is not
    covered by the tensor file's checksum, and a run's optimiser settings never change."""
    if not isinstance(js, dict) or not isinstance(js.get("state", {}), dict) \
            or not isinstance(js.get("param_groups"), list) \
            or not all(isinstance(g, dict) for g in js["param_groups"]):
        raise ValueError(f"{prefix}: malformed optimiser state")
    if like is not None:
        _check_param_groups(prefix, js["param_groups"], like["param_groups"])
    state: dict[int, dict[str, Any]] = {}
    for idx, entry in js.get("state", {}).items():
        if not isinstance(entry, dict):
            raise ValueError(f"{prefix}: malformed optimiser state")
        state[int(idx)] = dict(entry)
    pre = prefix + "/state/"
    for key, t in tensors.items():
        if key.startswith(pre):
            idx, _, k = key[len(pre):].partition("/")
            state.setdefault(int(idx), {})[k] = t
    groups = js["param_groups"] if like is None else \
        [{**g_now, "params": g_saved["params"]} for g_saved, g_now in zip(js["param_groups"], like["param_groups"])]
    return {"state": state, "param_groups": groups}


def _kind(v: Any) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return type(v).__name__
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, (list, tuple)):
        return "sequence of " + ",".join(_kind(x) for x in v)
    return type(v).__name__


#: which kernels Adam steps with (None or a bool, by torch's choice or --adam-impl): a run's own
#: choice, not part of its saved state; the optimiser's current value is kept
_IMPL_KEYS = ("fused", "foreach")


def _check_param_groups(prefix: str, saved: list, current: list) -> None:
    if len(saved) != len(current):
        raise ValueError(f"{prefix}: {len(saved)} parameter groups, the optimiser has {len(current)}")
    for g_saved, g_now in zip(saved, current):
        if "params" not in g_saved:
            raise ValueError(f"{prefix}: parameter group without params")
        # keys of another torch version (missing or extra) are torch's business; shared ones must agree
        for k, v in g_now.items():
            if k not in g_saved or k in _IMPL_KEYS:
                continue
            w = g_saved[k]
            if k == "params":
                if not isinstance(w, list) or len(w) != len(v) or not all(type(i) is int for i in w):
                    raise ValueError(f"{prefix}: parameter group does not match the network's parameters")
            elif _kind(w) != _kind(v) or (_kind(v) == "number" and not math.isfinite(w)):
                raise ValueError(f"{prefix}: parameter group setting {k!r} is {w!r}")


def split_state(prefix: str, state: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """A component's state: tensors under ``prefix/key``, JSON values returned; ValueError naming
    the key of a value that is neither."""
    import torch

    if not isinstance(state, Mapping):
        raise ValueError(f"its state_dict() returned {type(state).__name__}, not a dict of str keys (an empty "
                         "dict when it keeps no state)")
    js = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise ValueError(f"its state_dict() has the key {k!r} ({type(k).__name__}); keys must be strings "
                             "(a checkpoint's JSON and tensor names are)")
        if isinstance(v, torch.Tensor):
            if v.layout != torch.strided:
                raise ValueError(f"its state_dict() value {k!r} is a {v.layout} tensor; a checkpoint keeps dense "
                                 "tensors (call .to_dense() on it)")
            tensors[f"{prefix}/{k}"] = v
        else:
            try:
                json.dumps(v)
            except (TypeError, ValueError) as e:
                raise ValueError(f"its state_dict() value {k!r} ({type(v).__name__}) is neither a tensor nor JSON "
                                 f"({e}); a checkpoint keeps each tensor under its own key and other values as "
                                 "JSON (numbers, strings, lists and dicts of them)") from None
            js[k] = v
    return js


def join_state(prefix: str, js: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(js, dict):
        raise ValueError(f"{prefix}: malformed component state")
    out = dict(js)
    pre = prefix + "/"
    for k, t in tensors.items():
        if k.startswith(pre):
            out[k[len(pre):]] = t
    return out


# ---------------------------------------------------------------------- the last detection


def split_detection(det: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    """A detector's Detection (a dataclass): tensors under ``detection/FIELD``, the rest as JSON."""
    import dataclasses

    import torch

    fields: dict[str, Any] = {}
    for f in dataclasses.fields(det):
        v = getattr(det, f.name)
        if isinstance(v, torch.Tensor):
            tensors[f"detection/{f.name}"] = v
        else:
            try:
                json.dumps(v)  # a Detection's fields are tensors or plain values
            except (TypeError, ValueError) as e:
                raise ValueError(f"its Detection's field {f.name!r} ({type(v).__name__}) is neither a tensor nor "
                                 f"JSON ({e}); a checkpoint keeps the last detection for an exact resume") from None
            fields[f.name] = v
    return {"type": f"{type(det).__module__}:{type(det).__qualname__}", "fields": fields}


def join_detection(js: Any, tensors: dict[str, Any], detector_cls: type | None, device: Any) -> Any:
    """Rebuild a saved Detection. Its class is looked up by name among the Detection classes
    of ``core.components`` and of the detector's own (already imported) module; nothing is
    imported or executed from the checkpoint. Raises ValueError if the record is malformed."""
    import dataclasses
    import sys

    from .components import Detection

    if not isinstance(js, dict) or not isinstance(js.get("fields"), dict) or not isinstance(js.get("type"), str):
        raise ValueError("malformed detection record")
    cls: type = Detection
    module, _, name = js["type"].partition(":")
    if detector_cls is not None and module == detector_cls.__module__ and name.isidentifier():
        found = getattr(sys.modules.get(module), name, None)
        if isinstance(found, type) and issubclass(found, Detection) and dataclasses.is_dataclass(found):
            cls = found
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {k: v for k, v in js["fields"].items() if k in names}
    for k, t in tensors.items():
        if k.startswith("detection/") and k[len("detection/"):] in names:
            kwargs[k[len("detection/"):]] = t.to(device)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"malformed detection record ({e})") from None
