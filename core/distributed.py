"""Data-parallel training over ``torch.distributed``, for runs started with torchrun.

``torchrun --nproc-per-node N -m core train ...`` starts N copies of the CLI; each finds
torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
``from_env()`` returns a ``DistComm`` joined to the others. Without them it returns None
and training is the single-process loop, untouched.

How a step is shared
  Every rank holds a full copy of G and D and draws its own batches. After each backward
  ``sync_grads(module)`` averages the gradients of all the module's trainable parameters
  with ONE flattened all-reduce, so the optimisers (one per network, as in the single-
  process loop) take the same step on every rank: the effective batch is
  ``batch_size x world_size``. The networks are deliberately not wrapped in
  ``DistributedDataParallel``: a GAN step runs D's backward, then G's through a frozen D,
  with two optimisers, and D's parameters take part in G's forward without being trained
  there; DDP's reducer hooks would fire (or wait for parameters that never get a
  gradient) at the wrong times. An explicit all-reduce per optimiser step has none of
  those pitfalls. A parameter whose gradient is None on a rank counts as zeros there, so
  every rank sends the same buffer; if no rank has a gradient for it, it stays None (Adam
  then skips it, as in a single process).
  BatchNorm running statistics (buffers) are not averaged; ``sync_buffers`` copies rank
  0's to the others at each log step, as DDP's ``broadcast_buffers`` would.

What else is collective
  ``sync_start``: every rank starts from rank 0's parameters, buffers and partition, and
  ranks > 0 derive their batch stream from rank 0's generator state and their rank
  (rank 0's stream is the single-process one, so checkpoints resume in either mode). A
  checkpoint also holds every other rank's random streams (``rng/rank<R>/...``, gathered to
  rank 0 when it saves), and a resume with as many processes continues each rank's own, so
  it is exact as in one process; with another number of processes they are derived again.
  ``all_reduce_mean`` averages the logged scalars; ``barrier`` follows each checkpoint
  (written by rank 0 alone) so that a failed write stops every rank. A stop signal
  (Ctrl-C, SIGTERM) on any rank rides on the gradient all-reduce, so every rank stops
  after the same step and rank 0 saves there (``watch``).

Failure
  ``init_process_group`` gets a timeout of ``DYNGAN_DIST_TIMEOUT`` seconds (default 120);
  with Gloo it bounds every collective, so a rank that dies or hangs makes the others
  fail within that time instead of waiting for ever (a dead peer usually closes its
  connections and they fail at once; torchrun then stops the rest). Keep the rank-0-only
  work between collectives (checkpoint writing) well under the timeout.

Backends: Gloo when CUDA is not available; otherwise ``cpu:gloo,cuda:nccl`` (NCCL for
CUDA tensors, Gloo for CPU ones). ``--device auto`` (or ``cuda``) puts each rank on
``cuda:LOCAL_RANK``.

Test hook: with ``DYNGAN_DEBUG_DUMP_DIR`` set, ``api.train`` has every rank write its
final networks, partition, prior and batch-generator state to ``rank<R>.safetensors``
there (``debug_dump``), so tests can compare the ranks exactly.

Trust: the ranks of one job trust each other (they exchange tensors and JSON, never
pickles); keep torchrun's rendezvous port on a network you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from .components import Comm

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

ENV_TIMEOUT = "DYNGAN_DIST_TIMEOUT"
ENV_DEBUG_DUMP = "DYNGAN_DEBUG_DUMP_DIR"
DEFAULT_TIMEOUT_S = 120.0
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 0.001, 365 * 24 * 3600.0
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    env = os.environ if environ is None else environ
    return all(k in env for k in TORCHRUN_VARS)


def timeout_from_env(environ: Mapping[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    raw = env.get(ENV_TIMEOUT, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:  # also NaN; torch counts the timeout in whole ms
        from .errors import UsageError

        raise UsageError(f"{ENV_TIMEOUT} must be a number of seconds between {MIN_TIMEOUT_S:g} and "
                         f"{MAX_TIMEOUT_S:g} (a year), got {raw!r}")
    return value


def from_env(environ: Mapping[str, str] | None = None) -> "DistComm | None":
    """A ``DistComm`` when started by torchrun, else None (single process)."""
    env = os.environ if environ is None else environ
    if not launched_by_torchrun(env):
        return None
    from .errors import UsageError

    def whole(name: str, low: int, high: int | None = None) -> int:
        raw = env[name]
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            rng = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise UsageError(f"the torchrun variable {name} must be an integer {rng}, got {raw!r}")
        return value

    world = whole("WORLD_SIZE", 1)
    whole("RANK", 0, world - 1)
    local_rank = whole("LOCAL_RANK", 0)
    whole("MASTER_PORT", 1, 65535)
    if not env["MASTER_ADDR"].strip():
        raise UsageError("the torchrun variable MASTER_ADDR is empty")
    return DistComm(local_rank=local_rank, timeout_s=timeout_from_env(env))


def collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective of torch.distributed that failed: another process of the
    job stopped, timed out or closed its connection (Gloo raises a RuntimeError from the
    collective's ``wait``, NCCL a ``DistBackendError``). Told by its type, else by where it was
    raised: the innermost frame is torch.distributed's own, not a component's."""
    try:
        import torch.distributed as dist

        if isinstance(error, getattr(dist, "DistError", ())):
            return True
    except ImportError:  # pragma: no cover - torch without distributed support
        return False
    if not isinstance(error, RuntimeError):
        return False
    tb, last = error.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and "/torch/distributed/" in last.tb_frame.f_code.co_filename.replace(os.sep, "/")


def peer_stopped(error: BaseException, run_dir: Path | None, discarded: bool = False) -> "Exception":
    """The one-line ``RunFailure`` for a collective that failed (``collective_failure``): another
    process stopped or timed out; where the run's checkpoints stand and how to go on (``discarded``:
    the new run, before its first step, was removed)."""
    from .errors import RunFailure, one_line
    from .rundir import CHECKPOINTS, list_checkpoints, resume_advice

    text = (f"another process of this torchrun job stopped or timed out ({type(error).__name__}: "
            f"{one_line(error, 240)}); its own output says why")
    if discarded:
        text += "; nothing was trained and the new run was removed"
    elif run_dir is not None:
        saved = list_checkpoints(Path(run_dir) / CHECKPOINTS)
        text += (f"; the checkpoints in {str(run_dir)!r} are intact (the newest: step {saved[-1][0]}); "
                 + resume_advice(run_dir, torchrun=True) if saved else
                 f"; no checkpoint of the run in {str(run_dir)!r} was written yet")
    return RunFailure(text)


def rank_seed(state: "Tensor", rank: int) -> int:
    """A seed for rank ``rank``'s batch stream, a pure function of rank 0's generator state."""
    h = hashlib.sha256(state.cpu().numpy().tobytes())
    h.update(int(rank).to_bytes(8, "little"))
    return int.from_bytes(h.digest()[:8], "little") >> 1


class _AgreedFlag:
    """The stop flag the training loop reads under torchrun: set on every rank after the same step."""

    def __init__(self, comm: "DistComm", local: Any) -> None:
        self.comm, self.local = comm, local

    @property
    def signum(self) -> int | None:
        return self.comm.agreed_signum


def _import_group_defaults() -> None:
    """Import ``torch.distributed.nn.functional`` while no process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated when the module is
    first imported. Torch imports it lazily (the first optimiser pulls in torch._dynamo, which
    imports it through FSDP); imported after ``init_process_group`` those defaults hold the
    group, so ``destroy_process_group`` cannot free it, Gloo's threads outlive ``close`` and the
    group is torn down during interpreter shutdown, where it sometimes aborted the process
    ("terminate called without an active exception", SIGABRT) after a finished run. Imported
    first, the defaults are None.
    """
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except Exception:  # noqa: BLE001 - an optional torch module; without it there is nothing to hold the group
        pass


class DistComm(Comm):
    """``Comm`` over an initialised default process group (see the module docstring)."""

    def __init__(self, *, local_rank: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S,
                 backend: str | None = None) -> None:
        import datetime

        import torch
        import torch.distributed as dist

        self._dist = dist
        cuda = torch.cuda.is_available()
        if backend is None:
            backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        if cuda and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
        self._owns_group = False
        if not dist.is_initialized():
            _import_group_defaults()
            try:
                dist.init_process_group(backend=backend, init_method="env://",
                                        timeout=datetime.timedelta(seconds=timeout_s))
            except Exception as e:  # noqa: BLE001 - a rendezvous that cannot complete, said plainly
                from .errors import RunFailure

                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise RunFailure(
                    f"the processes of this torchrun job could not meet ({type(e).__name__}: {first}); "
                    f"check that all WORLD_SIZE processes were started and that MASTER_ADDR:MASTER_PORT "
                    f"is reachable ({ENV_TIMEOUT} sets how long to wait)") from None
            self._owns_group = True
        self.backend = backend
        self.timeout_s = timeout_s
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = local_rank
        # stop-signal agreement (see watch / sync_grads)
        self._local_flag: Any = None
        self._stop_acc: "Tensor | None" = None
        self._syncs = 0
        self.agreed_signum: int | None = None
        self._all_used: dict[tuple[int, Any], "Tensor"] = {}

    # ------------------------------------------------------------------ devices

    def map_device(self, device: "torch.device") -> "torch.device":
        """``cuda`` without an index (what ``--device auto`` gives) becomes ``cuda:LOCAL_RANK``."""
        import torch

        if device.type == "cuda" and device.index is None:
            if self.local_rank >= torch.cuda.device_count():
                from .errors import UsageError

                raise UsageError(
                    f"local rank {self.local_rank} has no GPU of its own ({torch.cuda.device_count()} on this "
                    "machine): start at most that many processes per node (--nproc-per-node) or use --device cpu")
            return torch.device("cuda", self.local_rank)
        return device

    # ------------------------------------------------------------------ the Comm contract

    def all_gather(self, t: "Tensor") -> "Tensor":
        """Concatenation along dim 0 of every rank's ``t``, in rank order; dim 0 may differ per rank."""
        import torch

        dist = self._dist
        t = t.detach().contiguous()
        is_bool = t.dtype == torch.bool
        if is_bool:
            t = t.to(torch.uint8)
        shape = torch.tensor(list(t.shape), dtype=torch.long, device=t.device)
        shapes = [torch.empty_like(shape) for _ in range(self.world_size)]
        dist.all_gather(shapes, shape)
        shapes_l = [s.tolist() for s in shapes]
        if any(s[1:] != list(t.shape[1:]) for s in shapes_l):
            raise ValueError(f"all_gather: ranks hold tensors of shapes {shapes_l}; only dim 0 may differ")
        sizes = [s[0] for s in shapes_l]
        m = max(sizes)
        padded = t
        if t.shape[0] < m:
            padded = torch.cat([t, t.new_zeros((m - t.shape[0], *t.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        out = torch.cat([p[:n] for p, n in zip(parts, sizes)])
        return out.bool() if is_bool else out

    def broadcast(self, t: "Tensor", src: int = 0) -> "Tensor":
        """Rank ``src``'s tensor on every rank, as a new tensor (``t`` is left as it was)."""
        import torch

        out = t.detach().clone().contiguous()
        is_bool = out.dtype == torch.bool
        if is_bool:
            out = out.to(torch.uint8)
        self._dist.broadcast(out, src)
        return out.bool() if is_bool else out

    def all_reduce_mean(self, t: "Tensor") -> "Tensor":
        """The mean over ranks (integer tensors are averaged as float32)."""
        import torch

        out = t.detach().clone().contiguous()
        if not out.is_floating_point():
            out = out.to(torch.float32)
        self._dist.all_reduce(out)
        return out.div_(self.world_size)

    # ------------------------------------------------------------------ what the trainer uses

    def barrier(self) -> None:
        """Wait for every rank (a one-element Gloo all-reduce, so the timeout bounds it)."""
        import torch

        self._dist.all_reduce(torch.zeros(1))

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s JSON-able ``obj`` on every rank, as JSON through CPU tensors (no pickle;
        tuples arrive as lists)."""
        import torch

        dist = self._dist
        payload = json.dumps(obj).encode() if self.rank == src else b""
        size = torch.tensor([len(payload)], dtype=torch.long)
        dist.broadcast(size, src)
        buf = torch.zeros(int(size), dtype=torch.uint8)
        if self.rank == src:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(buf, src)
        return obj if self.rank == src else json.loads(buf.numpy().tobytes().decode())

    def broadcast_tensors_(self, tensors: Iterable["Tensor"], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values: one broadcast per (device, dtype)."""
        import torch

        groups: dict[tuple[Any, Any], list[Tensor]] = {}
        for t in tensors:
            if t.numel():
                groups.setdefault((t.device, t.dtype), []).append(t)
        for (_, dtype), ts in groups.items():
            wire = torch.uint8 if dtype == torch.bool else dtype
            flat = torch.cat([t.detach().reshape(-1).to(wire) for t in ts])
            self._dist.broadcast(flat, src)
            offset = 0
            with torch.no_grad():
                for t in ts:
                    n = t.numel()
                    t.copy_(flat[offset:offset + n].view(t.shape).to(dtype))
                    offset += n

    def sync_start(self, modules: Sequence["nn.Module"], tensors: Sequence["Tensor"],
                   generator: "torch.Generator", derive: bool = True) -> None:
        """Rank 0's parameters, buffers and ``tensors`` everywhere; ranks > 0 get their own batch
        stream, derived from rank 0's (``derive``; False: this rank's own was restored from a
        checkpoint of as many processes and is kept)."""
        states = [v for m in modules for v in m.state_dict().values()]
        self.broadcast_tensors_([*states, *tensors])
        if self.rank > 0 and derive:
            generator.manual_seed(rank_seed(generator.get_state(), self.rank))

    def sync_buffers(self, *modules: "nn.Module") -> None:
        """Rank 0's floating-point buffers (BatchNorm statistics) on every rank."""
        bufs = [b for m in modules for b in m.buffers() if b.is_floating_point()]
        if bufs:
            self.broadcast_tensors_(bufs)

    def watch(self, flag: Any) -> _AgreedFlag:
        """Wrap the trainer's signal flag: its ``signum`` becomes the agreed one (see sync_grads)."""
        self._local_flag = flag
        self._stop_acc = None
        self._syncs = 0
        self.agreed_signum = None
        return _AgreedFlag(self, flag)

    def sync_grads(self, module: "nn.Module") -> None:
        """Average the gradients of ``module``'s trainable parameters over the ranks: one all-reduce.

        The buffer also carries, per parameter, how many ranks have a gradient for it,
        and whether this rank received a stop signal (with its number). Nothing here
        reads a device value back in the common case (every parameter has a gradient).
        """
        import torch

        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            return
        dev = params[0].device
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        have = [p.grad is not None for p in params]
        parts = [p.grad.reshape(-1).to(dtype) if h else torch.zeros(p.numel(), device=dev, dtype=dtype)
                 for p, h in zip(params, have)]
        if all(have):
            key = (len(params), dev)
            used = self._all_used.get(key)
            if used is None or used.dtype != dtype:
                used = self._all_used[key] = torch.ones(len(params), device=dev, dtype=dtype)
        else:  # rare: a parameter unused in this step on this rank
            used = torch.tensor([float(h) for h in have], device=dev, dtype=dtype)
        local_sig = getattr(self._local_flag, "signum", None)
        stop = torch.full((2,), 0.0, device=dev, dtype=dtype)
        if local_sig is not None:
            stop.fill_(1.0)
            stop[1] = float(local_sig)
        flat = torch.cat([*parts, used, stop])
        self._dist.all_reduce(flat)
        n = flat.numel() - len(params) - 2
        avg = flat[:n].div_(self.world_size)
        offset = 0
        counts = None
        for i, (p, h) in enumerate(zip(params, have)):
            k = p.numel()
            view = avg[offset:offset + k].view_as(p)
            offset += k
            if h:
                p.grad.copy_(view)
            else:
                if counts is None:
                    counts = flat[n:n + len(params)].tolist()
                if counts[i] > 0:
                    p.grad = view.to(p.dtype).clone()
        self._agree_stop(flat[-2:])

    def _agree_stop(self, reduced: "Tensor") -> None:
        """Accumulate the stop votes; read them every call on the CPU, every 32nd on a GPU
        (reading is a host synchronisation, which the hot loop otherwise avoids).

        Every rank makes the same calls in the same order, so all read the same sums
        at the same call and set the agreed signal after the same step.
        """
        if self._local_flag is None or self.agreed_signum is not None:
            return
        if self._stop_acc is None:
            self._stop_acc = reduced.clone()
        else:
            self._stop_acc.add_(reduced)
        self._syncs += 1
        every = 1 if reduced.device.type == "cpu" else 32
        if self._syncs % every:
            return
        count, total = self._stop_acc.tolist()
        if count > 0:
            local = getattr(self._local_flag, "signum", None)
            self.agreed_signum = int(local) if local is not None else int(round(total / count))

    def close(self) -> None:
        """Leave the process group (if this object created it)."""
        if self._owns_group and self._dist.is_initialized():
            self._dist.destroy_process_group()
        self._owns_group = False


def debug_dump(trainer: Any, directory: str | os.PathLike[str] | None = None) -> Path | None:
    """Test hook: write this rank's final state to ``<dir>/rank<R>.safetensors`` (``DYNGAN_DEBUG_DUMP_DIR``).

    Tensors ``G/...``, ``D/...``, ``G_ema/...`` when kept (state dicts), ``labels``, ``prior``, ``gen`` (the batch
    generator's state); metadata ``step`` and ``world_size``.
    """
    from safetensors.torch import save_file

    directory = directory if directory is not None else os.environ.get(ENV_DEBUG_DUMP)
    if not directory:
        return None
    rank = int(getattr(trainer.comm, "rank", 0))
    tensors: dict[str, Any] = {}
    for prefix, net in trainer.named_networks().items():
        for k, v in net.state_dict().items():
            tensors[f"{prefix}/{k}"] = v.detach().cpu().contiguous().clone()
    tensors["labels"] = trainer.labels.detach().cpu().clone()
    tensors["prior"] = trainer.prior.detach().cpu().clone()
    tensors["gen"] = trainer.gen.get_state().cpu().clone()
    meta = {"step": str(int(trainer.step)), "world_size": str(int(getattr(trainer.comm, "world_size", 1)))}
    path = Path(directory) / f"rank{rank}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path
