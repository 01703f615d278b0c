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
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError, RunFailure

FORMAT = "dyngan-checkpoint/1"
_NAME = re.compile(r"^step-(\d{8,})\.json$")


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
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
        blob = st_save(plain, metadata={"format": FORMAT, "step": str(step)})
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
    except OSError as e:
        if not json_path.exists():  # a tensor file without its JSON must not linger
            tensor_path.unlink(missing_ok=True)
        raise RunFailure(f"could not write checkpoint at step {step} in {directory}: {e.strerror or e}; "
                         "the previous checkpoint is intact") from None
    _prune(directory, keep)
    return json_path


def _prune(directory: Path, keep: int) -> None:
    entries = list_checkpoints(directory)
    for step, json_path in entries[:-keep] if keep > 0 else []:
        for p in (json_path, json_path.with_suffix(".safetensors")):
            try:
                p.unlink()
            except OSError:
                pass


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

    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{json_path.name}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path.name}: not a {FORMAT} checkpoint")
    step = meta.get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{json_path.name}: bad step {step!r}")
    tname = meta.get("tensors_file")
    if not isinstance(tname, str) or "/" in tname or "\\" in tname or tname.startswith("."):
        raise CheckpointError(f"{json_path.name}: bad tensor file name {tname!r}")
    tpath = json_path.parent / tname
    try:
        blob = tpath.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{tname}: cannot read ({e.strerror or e})") from None
    if len(blob) != meta.get("size") or hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{tname}: contents do not match the recorded checksum (truncated or edited)")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tname}: not a valid safetensors file ({e})") from None
    return Checkpoint(step=step, tensors=tensors, meta=meta, path=json_path)


def load_latest(
    directory: Path,
    apply: Callable[[Checkpoint], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Checkpoint:
    """The newest checkpoint that reads, verifies and (with ``apply``) loads.

    Falls back to older ones with a warning; raises CheckpointError if none works.
    ``apply`` should raise CheckpointError when a checkpoint does not fit the run.
    """
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


def unflatten_optimizer(prefix: str, js: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx, entry in js.get("state", {}).items():
        state[int(idx)] = dict(entry)
    pre = prefix + "/state/"
    for key, t in tensors.items():
        if key.startswith(pre):
            idx, _, k = key[len(pre):].partition("/")
            state.setdefault(int(idx), {})[k] = t
    return {"state": state, "param_groups": js["param_groups"]}


def split_state(prefix: str, state: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """A component's state: tensors under ``prefix/key``, JSON values returned."""
    import torch

    js = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            tensors[f"{prefix}/{k}"] = v
        else:
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                raise RunFailure(f"state {prefix}/{k} is neither a tensor nor JSON-serialisable: {type(v).__name__}")
            js[k] = v
    return js


def join_state(prefix: str, js: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    out = dict(js)
    pre = prefix + "/"
    for k, t in tensors.items():
        if k.startswith(pre):
            out[k[len(pre):]] = t
    return out
