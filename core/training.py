"""The training pipeline: build a run from its resolved config, train, checkpoint, resume.

The loop knows no method by name. It alternates discriminator and generator
steps with the chosen loss, and calls the detector, partitioner and metrics at
their own intervals through their contracts. Per step it does no host
synchronisation: scalars are gathered every ``log_every`` steps.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt_io
from . import console, memory, rundir
from .components import (
    CollapseDetector,
    Comm,
    Component,
    Conditioner,
    ConditioningSpec,
    Dataset,
    Detection,
    detection_problems,
    DStepContext,
    FAKE_CONDITIONS,
    GStepContext,
    Loss,
    Metric,
    Model,
    Partitioner,
    PartitionUpdate,
    TrainContext,
)
from .config import ADAM_IMPL
from .errors import (
    CheckpointError,
    ComponentFailure,
    DataError,
    DivergenceError,
    DynganError,
    OptionError,
    OutOfMemory,
    RunFailure,
    UsageError,
    component_label,
    is_out_of_memory,
    one_line,
    out_of_memory,
)
from .networks import ConditionalDiscriminator, ConditionalGenerator, build_networks
from .registry import Registry


def rate_text(rate: float) -> str:
    """Steps per second for the progress line: whole numbers when fast, two significant digits when
    slow (a large model on a CPU can run below one step a second, which ``:.0f`` shows as 0)."""
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"


def eval_text(step: int, vals: Mapping[str, float]) -> str:
    """One progress line for an evaluation: each metric's headline values (``metric/key``; the
    nested ones, such as ``mixture/dyngan/hq1``, are in metrics.jsonl), four significant digits."""
    shown = {k: v for k, v in vals.items() if k.count("/") <= 1} or dict(vals)

    def text(v: float) -> str:
        whole = isinstance(v, int) or (math.isfinite(v) and float(v).is_integer() and abs(v) < 1e15)
        return str(int(v)) if whole else f"{v:.4g}"

    return f"step {step}: " + "  ".join(f"{k} {text(v)}" for k, v in shown.items())


class Interrupted(DynganError):
    """Training stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, step: int, run_dir: Path, torchrun: bool = False, complete: bool = False) -> None:
        self.signum, self.step, self.run_dir = signum, step, run_dir
        self.exit_code = 128 + signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if complete:  # during the final evaluation, which finished: nothing is left to resume
            super().__init__(f"interrupted by {name} during the final evaluation at step {step}; the run is "
                             f"complete and saved in {run_dir}")
        else:
            super().__init__(f"interrupted by {name} at step {step}; checkpoint saved in {run_dir}; "
                             + rundir.resume_advice(run_dir, torchrun))


class Aborted(DynganError):
    """A second Ctrl-C / SIGTERM while stopping: training ended at once, without a new checkpoint.
    With ``before_start``, the first one, before the training loop began (loading, setting up)."""

    def __init__(self, signum: int, step: int, run_dir: Path, before_start: bool = False,
                 discarded: bool = False, torchrun: bool = False) -> None:
        self.signum, self.step, self.run_dir, self.before_start = signum, step, run_dir, before_start
        self.torchrun = torchrun
        self.exit_code = 128 + signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        saved = rundir.list_checkpoints(Path(run_dir) / rundir.CHECKPOINTS)
        advice = rundir.resume_advice(run_dir, torchrun)
        if before_start:
            then = ("nothing was trained and the new run was removed" if discarded else
                    f"its checkpoints are as they were; {advice}" if saved else
                    f"nothing was trained; delete {str(run_dir)!r} to train there again")
            super().__init__(f"interrupted by {name} before the first training step (step {step}): {then}")
            return
        then = (f"the ones already written are intact); {advice}"
                if saved else
                f"and none was written before it), so the run cannot be resumed: delete {str(run_dir)!r} "
                "and train again")
        super().__init__(f"stopped at once by a second {name} after step {step}; no checkpoint was written "
                         f"for it ({then}")


#: name of the generator's weight average (``--g-ema``); its checkpoint tensors are ``G_ema/...``
EMA_NAME = "G_ema"
#: optimiser state that is a count or a second moment: never negative in a real run
_NON_NEGATIVE_STATE = ("step", "exp_avg_sq", "max_exp_avg_sq")
EMA_PREFIX = EMA_NAME + "/"


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device for a ``device`` setting (a name, or a ``torch.device`` as a torch user of the
    Python API passes it); UsageError for a malformed name or a device this machine lacks."""
    from .config import check_device

    if isinstance(name, torch.device):
        name = str(name)
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    return dev


def check_amp(cfg: Mapping[str, Any], device: torch.device) -> None:
    if cfg.get("amp") == "bf16" and device.type != "cuda":
        raise UsageError("--amp bf16 needs a CUDA device")


def make_adam(params: Any, impl: str, lr: float, betas: tuple[float, float]
              ) -> tuple[torch.optim.Adam, str | None]:
    """Adam over ``params`` with the kernels ``impl`` names, and a note for the user when the
    device has no fused kernel (then: foreach). The three give the same step up to rounding."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, **ADAM_IMPL[impl]), None
    except RuntimeError as e:  # fused=True on a device without the kernel (torch names the supported ones)
        if impl != "fused":
            raise
        return (torch.optim.Adam(params, lr=lr, betas=betas, foreach=True),
                f"--adam-impl fused: not available here ({str(e).splitlines()[0]}); using foreach")


class EpochBatches:
    """The real batches of ``--sampling epoch``: shuffled epochs, each training sample once per
    epoch, the last partial batch dropped (as the DynGAN 2D code trains). Batches are numbered
    0, 1, ... over the run's D steps (with several D steps per G step, as WGAN-GP's 5, each takes
    the next batch). Batch ``b`` of a rank is a pure function of (seed, salt, b - origin, rank,
    processes), so a resume continues the same order from the checkpoint's two small values
    (``state()``). Under torchrun the ranks share each epoch's permutation and take disjoint
    slices of it, as torch's DistributedSampler does: an epoch is ``N // (batch_size x
    processes)`` D steps of every rank. ``restart`` begins a new order at a batch number (a
    rollback; a resume with another number of processes or on another kind of device). One
    permutation per epoch, made on the training device; a batch is a slice of it (no host read)."""

    def __init__(self, n: int, batch: int, seed: int, device: torch.device, rank: int = 0,
                 processes: int = 1) -> None:
        self.n, self.batch, self.seed, self.device = n, batch, seed, device
        self.rank, self.processes = rank, processes
        self.per_epoch = n // (batch * processes)
        if self.per_epoch == 0:
            need = batch * processes
            size = f"{batch:,} x {processes} processes = {need:,}" if processes > 1 else f"{batch:,}"
            raise UsageError(
                f"--sampling epoch needs one full batch per epoch ({size} training samples), and the "
                f"dataset has {n:,}; use a smaller --batch-size" + (", fewer processes" if processes > 1 else "")
                + " or --sampling replacement")
        self.restart("", 0)

    def restart(self, salt: str, origin: int) -> None:
        """From batch number ``origin`` on, epochs begin anew in orders keyed by ``salt``."""
        self.salt, self.origin = salt, origin
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def state(self) -> dict[str, Any]:
        return {"salt": self.salt, "origin": self.origin}

    def order(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s permutation of the N sample indices (the same on every rank)."""
        key = f"dyngan epoch order {self.seed} {epoch}" + (f" {self.salt}" if self.salt else "")
        digest = hashlib.sha256(key.encode()).digest()
        g = torch.Generator(device=self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return torch.randperm(self.n, generator=g, device=self.device)

    def __call__(self, b: int) -> torch.Tensor:
        """The sample indices ``(batch,)`` of this rank's batch number ``b``."""
        epoch, k = divmod(b - self.origin, self.per_epoch)
        if epoch != self._epoch:
            self._order, self._epoch = self.order(epoch), epoch
        start = (k * self.processes + self.rank) * self.batch
        return self._order[start:start + self.batch]


def check_data(x: Any, where: str) -> torch.Tensor:
    """A dataset's tensor must be float, non-empty, (N, ...) and finite."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{where} returned {type(x).__name__}, not a tensor")
    if x.dim() < 2 or x.shape[0] == 0 or x.numel() == 0:
        raise DataError(f"{where} returned shape {tuple(x.shape)}; expected (N, ...) with N > 0")
    if not x.is_floating_point():
        raise DataError(f"{where} returned dtype {x.dtype}; expected a floating-point tensor")
    bad = ~torch.isfinite(x)
    if bad.any():
        n = int(bad.flatten(1).any(1).sum())
        first = int(bad.flatten(1).any(1).nonzero()[0])
        raise DataError(f"{where}: {n} sample(s) contain NaN or inf (first: sample {first})")
    return x.float().contiguous()


@dataclass
class Components:
    """The instantiated components of a run, by slot."""

    dataset: Dataset
    model: Model
    loss: Loss
    detector: CollapseDetector | None
    partitioner: Partitioner | None
    conditioner: Conditioner | None
    metrics: list[Metric] = field(default_factory=list)

    def stateful(self) -> dict[str, Component]:
        out: dict[str, Component] = {}
        for slot in ("dataset", "model", "loss", "detector", "partitioner", "conditioner"):
            c = getattr(self, slot)
            if c is not None:
                out[slot] = c
        return out


def instantiate(cfg: dict[str, Any], registry: Registry) -> Components:
    opts = cfg["options"]

    def build(kind: str, name: str, values: dict[str, Any]) -> Any:
        cls = registry.get(kind, name)
        try:
            return cls(**values)
        except DynganError:
            raise
        except Exception as e:  # a plugin's __init__ raised
            raise ComponentFailure(kind, name, cls.plugin, "__init__", e) from e

    def make(slot: str, kind: str) -> Any:
        name = cfg.get(slot)
        return None if name is None else build(kind, name, opts.get(slot, {}))

    # runs saved before metric options existed have none in their config: the defaults
    metric_opts = opts.get("metric", {})
    metrics = [build("metric", m, metric_opts.get(m, {})) for m in cfg.get("metrics", [])]
    return Components(
        dataset=make("dataset", "dataset"),
        model=make("model", "model"),
        loss=make("loss", "loss"),
        detector=make("detector", "detector"),
        partitioner=make("partitioner", "partitioner"),
        conditioner=make("conditioner", "conditioner"),
        metrics=metrics,
    )


def call_component(component: Component, method: str, *args: Any) -> Any:
    """Call a component method; an exception becomes ComponentFailure naming plugin and component."""
    try:
        return getattr(component, method)(*args)
    except DynganError:
        raise
    except (Exception, SystemExit) as e:  # a plugin's sys.exit() is its failure, not the run's end
        from .distributed import collective_failure

        if collective_failure(e):  # torchrun: another process stopped, not this component's fault
            raise
        raise ComponentFailure(component.kind, component.name, component.plugin, method, e) from e


def read_trait(component: Component, key: str, convert: Callable[[Any], Any] | None = None) -> Any:
    """A component's attribute ``key`` (a plugin's property may raise), passed through ``convert``
    when given; its exception fails naming the plugin and the attribute. Read once, at set-up."""
    try:
        value = getattr(component, key)
        return convert(value) if convert is not None else value
    except Exception as e:
        raise ComponentFailure(component.kind, component.name, component.plugin, key, e) from e


#: the loop's own tensors a TrainContext lends to components: never to be changed in place
_LENT = ("data", "labels", "prior")


def call_with_context(component: Component, method: str, ctx: Any, *args: Any) -> Any:
    """``call_component`` for a method given the loop's ``TrainContext``: a component that changes
    the training data, the partition labels or the prior in place (a relabelling must come back as
    a PartitionUpdate, which the loop checks) fails naming itself, before anything is saved.
    Checked by the tensors' version counters: no copy, no synchronisation."""
    before = [getattr(ctx, name)._version for name in _LENT]
    out = call_component(component, method, ctx, *args)
    changed = [f"ctx.{name}" for name, v in zip(_LENT, before) if getattr(ctx, name)._version != v]
    if changed:
        raise ComponentFailure(component.kind, component.name, component.plugin, method, RuntimeError(
            f"changed {' and '.join(changed)} in place; they are the training loop's own (a partitioner "
            "returns new labels and prior in a PartitionUpdate; clone a tensor before changing it)"))
    return out


def load_dataset(comps: Components, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    data = call_component(comps.dataset, "load", gen)
    return check_data(data, f"dataset {comps.dataset.name!r}")


@torch.no_grad()
def generate(
    G: torch.nn.Module,
    n: int,
    z_dim: int,
    prior: torch.Tensor,
    device: torch.device,
    generator: torch.Generator,
    batch: int = 4096,
    condition: int | None = None,
    out_device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
    model: Component | None = None,
    data_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """``n`` float32 samples with conditions drawn from ``prior``, in eval mode, batched; with
    ``condition``, every sample of that one condition (``generator`` then draws only the noise).
    With ``model`` (the run's model component), an exception of G's, or samples that are not
    ``(batch, *data_shape)`` floats, fail as a ``ComponentFailure`` naming it.

    The samples are written batch by batch into one tensor on ``out_device`` (default ``device``;
    the CPU keeps a GPU's samples off its memory): the only full-size copy. ``progress`` is told
    the number of samples drawn so far after each batch of a draw of several.

    Raises ``OutOfMemory`` (before the allocation, once the first batch shows a sample's size) when
    the ``n`` samples alone would not fit in the memory ``out_device`` has available, with a margin:
    past that the OS kills the process."""
    out_device = device if out_device is None else torch.device(out_device)
    was_training = G.training
    G.eval()
    out: torch.Tensor | None = None
    try:
        for start in range(0, n, batch):
            b = min(batch, n - start)
            if condition is None:
                cond = torch.multinomial(prior, b, replacement=True, generator=generator)
            else:
                cond = torch.full((b,), condition, dtype=torch.long, device=device)
            z = torch.randn(b, z_dim, device=device, generator=generator)
            if model is None:
                x = G(z, cond)
            else:
                x = _forward(model, "G.forward", G, z, cond)
                if start == 0:
                    problem = sample_problem(x, b, data_shape)
                    if problem is not None:
                        raise ComponentFailure(model.kind, model.name, model.plugin, "G.forward",
                                               ValueError(f"in eval mode {problem}"))
            if b == n:  # one batch: already allocated, nothing to refuse
                return x.detach().to(out_device, torch.float32)
            if out is None:
                _check_fits(n, tuple(x.shape[1:]), out_device)
                out = torch.empty((n, *x.shape[1:]), dtype=torch.float32, device=out_device)
            out[start:start + b].copy_(x)
            if progress is not None:
                progress(start + b)
    finally:
        G.train(was_training)
    return out if out is not None else torch.empty(0)


def _forward(model: Component, where: str, net: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``net(*args)``, one of the run's networks (or a conditioner's code module): its exception
    fails naming ``model``, the component that built it (an allocation failure stays itself, for the
    callers that turn it into advice)."""
    try:
        return net(*args, **kwargs)
    except DynganError:
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise
        raise ComponentFailure(model.kind, model.name, model.plugin, where, e) from e


def _backward(loss: Component, method: str, value: torch.Tensor) -> None:
    """``value.backward()`` for the loss ``method`` returned: autograd's error (an in-place change
    of a tensor it needs, a second backward) fails naming the loss, and saying that the model's
    forward may be the cause (autograd's message does not say which); an allocation failure, or a
    collective that failed under torchrun, stays itself."""
    try:
        value.backward()
    except RuntimeError as e:
        from .distributed import collective_failure

        if is_out_of_memory(e) or collective_failure(e):
            raise
        raise ComponentFailure(loss.kind, loss.name, loss.plugin, method, RuntimeError(
            f"back-propagating the value it returned failed (in the loss or in the model's forward, which "
            f"autograd cannot tell apart): {one_line(e)}")) from e


def check_codes(conditioner: Component, G: ConditionalGenerator, D: ConditionalDiscriminator,
                spec: ConditioningSpec, cond: torch.Tensor) -> None:
    """A conditioner's code modules must map the condition ids ``cond`` ``(B,)`` to floating-point
    codes ``(B, dim)`` of its spec's widths: else ComponentFailure naming the conditioner (the model
    was blamed for the shape error that followed). Run once, by ``Trainer``'s probe."""
    for method, code, dim in (("generator_code", G.code, spec.g_dim), ("discriminator_code", D.code, spec.d_dim)):
        if code is None:
            continue
        out = _forward(conditioner, method, code, cond)
        want = (cond.shape[0], dim)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or tuple(out.shape) != want:
            got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"{out.dtype} {tuple(out.shape)}"
            raise ComponentFailure(conditioner.kind, conditioner.name, conditioner.plugin, method, ValueError(
                f"its module maps {cond.shape[0]} condition ids to {got}; the ConditioningSpec promises "
                f"floating-point codes of shape {want}"))


def sample_problem(x: Any, batch: int, data_shape: tuple[int, ...] | None) -> str | None:
    """What is wrong with G's output ``x`` for ``batch`` samples of data ``data_shape``, or None."""
    if not isinstance(x, torch.Tensor):
        return f"G returned {type(x).__name__}, not a tensor"
    if not x.is_floating_point():
        return f"G returned a tensor of dtype {x.dtype}, not a floating-point one"
    want = (batch, *data_shape) if data_shape is not None else None
    if want is not None and tuple(x.shape) != want:
        return f"G returned samples of shape {tuple(x.shape)} for {batch} samples of data shaped {tuple(data_shape)}"
    return None


#: the share of a device's available memory that drawn samples may take (the rest: the process,
#: the networks and a batch's activations, and what other processes allocate meanwhile)
SAMPLE_MEMORY_SHARE = 0.85


def _memory_bytes(device: torch.device) -> int | None:
    """Memory of ``device`` available now, or None where it cannot be told: for a GPU the free
    memory plus what torch's allocator holds unused, for the CPU Linux's ``MemAvailable`` (physical
    RAM where that is missing)."""
    try:
        if device.type == "cuda":
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(torch.cuda.mem_get_info(device)[0]) + max(0, int(cached))
        return memory.cpu_available()
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


def _scalar(comp: Any, method: str, value: Any) -> torch.Tensor:
    """``value`` when it is the 0-d tensor a loss method must return (a host-side check of type
    and rank: no synchronisation), else the component's failure, naming its plugin."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        if value.requires_grad:
            return value
        raise ComponentFailure(comp.kind, comp.name, comp.plugin, method, ValueError(
            "returned a 0-d tensor that does not depend on the networks (no gradient): compute it from "
            "ctx's logits, without .detach(), .item() or torch.tensor(...)"))
    what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    raise ComponentFailure(comp.kind, comp.name, comp.plugin, method,
                           TypeError(f"returned {what}, not a 0-d tensor to minimise"))


def valid_prior(prior: torch.Tensor, capacity: int) -> bool:
    """A condition prior as a checkpoint must hold it: ``capacity`` finite weights >= 0 that
    do not all vanish (sampling draws conditions from it)."""
    return (prior.shape == (capacity,) and bool(torch.isfinite(prior).all()) and not bool((prior < 0).any())
            and float(prior.sum()) > 0)


def labels_problem(labels: torch.Tensor, n: int, capacity: int) -> str | None:
    """Why ``labels`` cannot be the partition of ``n`` training samples into ``capacity`` conditions
    (the length of the condition prior), or None when they can: one integer label per sample, each
    in [0, capacity). A resume skips a checkpoint with such labels; sample, evaluate and report
    (core.api's ``Run.labels``) ignore them."""
    if labels.dim() != 1 or labels.shape[0] != n:
        return f"do not fit the training data (shape {tuple(labels.shape)} for {n} samples)"
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return f"are not integers (dtype {labels.dtype})"
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= capacity):
        return f"out of range (not all in [0, {capacity}))"
    return None


def _short_of_memory(need: int, device: torch.device, share: float = 1.0) -> int | None:
    """The memory ``device`` has available, in bytes, when ``need`` bytes exceed ``share`` of it,
    else None (also where it cannot be told)."""
    have = _memory_bytes(device)
    return have if have is not None and need > have * share else None


def _check_fits(n: int, shape: tuple[int, ...], device: torch.device) -> None:
    """Refuse ``n`` float32 samples of ``shape`` that would take more than ``SAMPLE_MEMORY_SHARE``
    of the memory ``device`` has available."""
    need = n * math.prod(shape) * 4
    have = _short_of_memory(need, device, SAMPLE_MEMORY_SHARE)
    if have is not None:
        raise OutOfMemory(f"{n:,} samples of shape {shape} need {need / 2**30:,.1f} GiB, more than "
                          f"{SAMPLE_MEMORY_SHARE:.0%} of the {have / 2**30:,.1f} GiB available on {device.type}; "
                          "draw fewer (--n)")


def check_metrics(comps: Components, n_fake: int, n_real: int) -> list[str]:
    """Refuse (``OptionError``) a metric that cannot score ``n_fake`` samples against ``n_real`` with its
    options (``Metric.check``); returns a warning for each chosen metric that does not apply to the
    dataset (``score`` skips those)."""
    skipped = []
    for m in comps.metrics:
        if call_component(m, "supports", comps.dataset):
            call_component(m, "check", int(n_fake), int(n_real))
        else:
            skipped.append(m.name)
    if not skipped:
        return []
    return [f"metric{'s' if len(skipped) > 1 else ''} {', '.join(map(repr, skipped))} "
            f"{'do' if len(skipped) > 1 else 'does'} not apply to dataset {comps.dataset.name!r} and "
            f"{'are' if len(skipped) > 1 else 'is'} skipped (`dyngan train --dataset {comps.dataset.name} --dry-run` "
            "shows the dataset's own metrics)"]


def score(comps: Components, fake: torch.Tensor, real: torch.Tensor) -> tuple[dict[str, float], dict[str, str]]:
    """The run's metrics that apply to its dataset: ``(values, {metric: protocol})``.

    Under ``no_grad``. A metric must return ``{"NAME/...": number}`` and leave ``fake`` and
    ``real`` (the training set itself) as they were: an in-place change is caught by the tensors'
    version counters (shared with their views), a wrong result by its type and keys; either
    fails naming the metric and its plugin."""
    values: dict[str, float] = {}
    protocols: dict[str, str] = {}
    for m in comps.metrics:
        if not call_component(m, "supports", comps.dataset):
            continue
        versions = (fake._version, real._version)
        with torch.no_grad():
            out = call_component(m, "compute", fake, real, comps.dataset)
        if (fake._version, real._version) != versions:
            raise ComponentFailure(m.kind, m.name, m.plugin, "compute", ValueError(
                "it modified its input in place (`real` is the training set itself): copy before changing it"))
        values.update(_metric_values(m, out, values))
        protocols[m.name] = m.protocol
    return values, protocols


def _metric_values(m: Component, out: Any, earlier: Mapping[str, float]) -> dict[str, float]:
    """A metric's result as ``{key: float}``, else its failure: a mapping of keys that start with
    ``NAME/`` and that no earlier metric gave, to real numbers (or 0-d tensors)."""
    def fail(why: str) -> ComponentFailure:
        return ComponentFailure(m.kind, m.name, m.plugin, "compute", TypeError(why))

    if not isinstance(out, Mapping):
        raise fail(f"returned {type(out).__name__}, not a dict of {m.name}/KEY -> number")
    vals: dict[str, float] = {}
    for k, v in out.items():
        if not isinstance(k, str) or not k.startswith(f"{m.name}/"):
            raise fail(f"returned key {k!r}: every key must start with {m.name + '/'!r}")
        if k in earlier:
            raise fail(f"returned key {k!r}, which another metric gave too")
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise fail(f"returned {type(v).__name__} for {k!r}, not a number")
        try:
            vals[k] = float(v)
        except OverflowError:  # an int past float's range
            raise fail(f"returned for {k!r} an integer of {int(v).bit_length()} bits, too large for a float") from None
    return vals


class Progress:
    """Step, losses, steps/s and collapse state: one updating line on a terminal, periodic lines otherwise."""

    def __init__(self, total: int, quiet: bool, stream: Any = None, warnings: bool = True) -> None:
        import sys

        self.total = total
        self.quiet = quiet
        self.warnings = warnings  # warn() shows its text even when quiet (not on torchrun's ranks > 0)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # a write to the stream failed (a closed pipe, a terminal that hung up): nothing more is
        # written to it, and training goes on (the run directory and metrics.jsonl are the record)
        self.closed = False
        self.every = max(1, total // 20)
        self._last_line_step = -1
        self._width = 0
        # the last line written (time, step): a slow run shows a heartbeat between logged steps
        self._shown = (time.monotonic(), 0)

    #: seconds without output after which ``tick`` shows the step and rate (terminal / log file)
    HEARTBEAT = {True: 2.0, False: 60.0}

    def tick(self, step: int) -> None:
        """Called every step between logged ones: when nothing was shown for ``HEARTBEAT`` seconds
        (a large model on a CPU, a long --log-every), show the step and rate, without the losses
        (reading those would synchronise with the device)."""
        if self.quiet:
            return
        now = time.monotonic()
        since, at = self._shown
        if now - since < self.HEARTBEAT[self.tty]:
            return
        rate = (step - at) / max(1e-9, now - since)
        self._line(step, f"{rate_text(rate)} steps/s (losses at the next logged step)", force=True)

    def update(self, step: int, text: str, final: bool = False) -> None:
        if self.quiet:
            return
        self._line(step, text, final=final)

    def _line(self, step: int, text: str, final: bool = False, force: bool = False) -> None:
        pct = 100.0 * step / max(1, self.total)
        line = f"step {step}/{self.total} ({pct:3.0f}%)  {text}"
        if self.tty:
            pad = max(0, self._width - len(line))
            self._emit("\r" + line + " " * pad + ("\n" if final else ""))
            self._width = len(line)
        elif final or force or step - self._last_line_step >= self.every or self._last_line_step < 0:
            self._emit(line + "\n")
            self._last_line_step = step
        else:
            return
        self._shown = (time.monotonic(), step)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        self._write(text)

    #: seconds a phase without steps (loading the data, an evaluation) runs before ``slow`` says so
    SLOW_NOTICE = 3.0

    @contextlib.contextmanager
    def slow(self, text: str) -> Iterator[None]:
        """Shows ``text`` followed by "..." when the block runs longer than ``SLOW_NOTICE`` seconds,
        so a long phase without steps (a large dataset loading, 26,000 samples being scored, a
        metric training its classifier) is not silence. Nothing is shown for a quick block."""
        if self.quiet:
            yield
            return
        timer = threading.Timer(self.SLOW_NOTICE, self._write, (text + " ...",))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            timer.join()

    def warn(self, text: str) -> None:
        """A warning (e.g. checkpoints skipped as corrupt): shown even with --quiet."""
        if self.warnings:
            self._write(f"warning: {text}")

    def _write(self, text: str) -> None:
        if self.tty and self._width:
            text = "\n" + text
            self._width = 0
        self._emit(text + "\n")

    def _emit(self, text: str) -> None:
        """Write and flush ``text``, unless an earlier write failed. A failing write (EPIPE from a
        closed pipe, EIO from a hung-up terminal) must not stop training: it ends the progress
        output alone (``console.write_failed`` points a broken stdout / stderr at the null device,
        so that Python's flush at exit does not fail the finished run either)."""
        if self.closed:
            return
        if not console.safe_write(self.stream, text):
            self.closed = True


class _SignalFlag:
    """SIGINT / SIGTERM / SIGHUP set a flag that the loop checks between steps, so no step is cut in
    half."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.second: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_SignalFlag":
        if threading.current_thread() is threading.main_thread():
            for s in console.stop_signals():
                self._old[s] = signal.signal(s, self._handle)
        return self

    @console.stop_handler
    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second Ctrl-C: stop now, without saving
            self.second = signum
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: list[dict[str, Any]]
    config: dict[str, Any]


class Trainer:
    """One training run. ``Trainer(cfg, registry, run_dir).run()``."""

    #: the methods the loop calls at their own intervals: the only places where it may wait for
    #: the device (gather scalars, read the partition); checked by tests/test_pipeline.py and,
    #: on a GPU, benchmarks/cuda_checks.py
    PERIODIC_PHASES = ("_log_step", "_eval", "save", "_detect", "_partition")

    def __init__(
        self,
        cfg: dict[str, Any],
        registry: Registry,
        run_dir: Path,
        *,
        resume: bool = False,
        quiet: bool = False,
        comm: Comm | None = None,
        stream: Any = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.comm = comm or Comm()
        self.is_main = self.comm.rank == 0
        self.world_size = int(getattr(self.comm, "world_size", 1))
        self.progress = Progress(cfg["steps"], quiet or not self.is_main, stream, warnings=self.is_main)
        self.device = resolve_device(cfg["device"])
        map_device = getattr(self.comm, "map_device", None)  # torchrun: cuda -> cuda:LOCAL_RANK
        if map_device is not None:
            self.device = map_device(self.device)
        self.comps = instantiate(cfg, registry)
        self.fake_conditions = self._fake_conditions()
        self.d_steps, self.wants_real_grad, self.needs_real_in_g_step, self.differentiates_d = self._loss_traits()
        self._reports: dict[str, Any] = {}
        self._skip_reason: str | None = None  # the partitioner's last reason for no partition
        self._build()

    # ------------------------------------------------------------------ building

    def _fake_conditions(self) -> str | None:
        """The conditioner's ``fake_conditions`` (None without one), read once; it must be one the
        loop knows (a plugin's own value would otherwise silently train as another)."""
        c = self.comps.conditioner
        if c is None:
            return None
        value = read_trait(c, "fake_conditions")
        if value not in FAKE_CONDITIONS:
            raise ComponentFailure(c.kind, c.name, c.plugin, "fake_conditions", ValueError(
                f"returned {value!r}; the training loop knows {', '.join(FAKE_CONDITIONS)}"))
        return value

    def _loss_traits(self) -> tuple[int, bool, bool, bool]:
        """The loss's ``d_steps``, ``wants_real_grad``, ``needs_real_in_g_step`` and
        ``differentiates_d``, read once: an int >= 1 (with 0 the G step would have no fake batch)
        and three truth values."""
        lo = self.comps.loss
        d_steps = read_trait(lo, "d_steps")
        if not isinstance(d_steps, int) or isinstance(d_steps, bool) or d_steps < 1:
            raise ComponentFailure(lo.kind, lo.name, lo.plugin, "d_steps", ValueError(
                f"returned {d_steps!r}; it must be an int >= 1 (discriminator steps per generator step)"))
        return (d_steps, read_trait(lo, "wants_real_grad", bool), read_trait(lo, "needs_real_in_g_step", bool),
                read_trait(lo, "differentiates_d", bool))

    def _build(self) -> None:
        cfg, comps, dev = self.cfg, self.comps, self.device
        seed = cfg["seed"]
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        torch.manual_seed(seed)
        with self.progress.slow(f"loading dataset {comps.dataset.name!r}"):
            self.data = load_dataset(comps, seed).to(dev)
        self.N = self.data.shape[0]
        self.data_shape = tuple(self.data.shape[1:])
        if comps.metrics:  # refused now rather than after the training the evaluation would end
            n_eval = int(cfg["eval_samples"])
            try:
                warnings = check_metrics(comps, n_eval, self.N)
            except OptionError as e:
                if not self.resume:
                    raise
                # a run saved before metric settings were checked up front: say how to change them
                raise OptionError(f"{e}. --resume takes other metric settings: -o metric.KEY=VALUE or "
                                  f"--metrics (eval_samples: in {str(self.run_dir / rundir.CONFIG)!r})") from None
            for warning in warnings:
                self.progress.warn(warning)
            need = n_eval * math.prod(self.data_shape) * 4  # float32 samples
            have = _short_of_memory(need, dev)
            if have is not None:
                raise UsageError(
                    f"eval_samples {n_eval:,}: the samples alone would need {need / 2**30:,.1f} GiB, more than "
                    f"the {have / 2**30:,.1f} GiB of {dev.type}; set a smaller eval_samples")
        need = 2 * int(cfg["batch_size"]) * math.prod(self.data_shape) * 4  # a real and a fake float32 batch
        have = _short_of_memory(need, dev)
        if have is not None:
            raise OutOfMemory(f"batch size {cfg['batch_size']:,}: a real and a fake batch alone would need "
                              f"{need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of {dev.type}; "
                              "use a smaller --batch-size")
        try:
            G, D, spec = build_networks(comps.model, comps.conditioner, self.data_shape)
        except DynganError:
            raise
        except Exception as e:
            m = comps.model
            raise ComponentFailure(m.kind, m.name, m.plugin, "build", e) from e
        self.spec = spec
        self._check_output_range()
        self._check_intervals()
        self.G, self.D = G.to(dev), D.to(dev)
        # an exponential moving average of G's weights (cfg g_ema > 0): what sampling and metrics use
        self.ema_decay = float(cfg.get("g_ema") or 0.0)
        self.G_ema: torch.nn.Module | None = None
        if self.ema_decay > 0:
            self.G_ema = copy.deepcopy(self.G).requires_grad_(False)
            # the pairs _ema_update works on (load_state_dict copies in place: they stay valid)
            self._ema_params = list(self.G_ema.parameters())
            self._g_params = list(self.G.parameters())
            self._ema_buffers = list(zip(self.G_ema.buffers(), self.G.buffers()))
        self.z_dim = comps.model.z_dim
        self.capacity = spec.capacity
        self._probe_networks()
        betas = tuple(cfg["betas"])
        self.opt_g, adam_note = make_adam(self.G.parameters(), cfg["adam_impl"], cfg["lr_g"], betas)
        self.opt_d, _ = make_adam(self.D.parameters(), cfg["adam_impl"], cfg["lr_d"], betas)
        self.labels = torch.zeros(self.N, dtype=torch.long, device=dev)
        self.prior = torch.zeros(self.capacity, device=dev)
        self.prior[0] = 1.0
        self.gen = torch.Generator(device=dev).manual_seed(seed)
        self.comp_rng = torch.Generator(device=dev).manual_seed(seed + 1)
        self.epoch_batches = EpochBatches(self.N, int(cfg["batch_size"]), seed, dev, int(self.comm.rank),
                                          self.world_size) if cfg.get("sampling") == "epoch" else None
        self.step = 0
        self._saved_step: int | None = None
        self._own_streams = False  # this rank's random streams came from the checkpoint (torchrun)
        self.last_detection: Detection | None = None
        self.partition_count = 1
        # a partition check due at a final step, which skips it: kept in the checkpoint, made by a
        # resume that trains on (else a chain of resumes ending on check steps never partitions)
        self._partition_pending = False
        self._warned_detection = False  # a detection a checkpoint cannot keep: said once
        self.last_fraction: float | None = None
        # the callables the hot loop uses (compiled when asked)
        self.G_call: Callable[..., torch.Tensor] = self.G
        self.D_call: Callable[..., Any] = self.D
        self.notes: list[str] = [adam_note] if adam_note else []  # said once the run starts
        if cfg.get("compile"):
            self.G_call = torch.compile(self.G)
            if self.differentiates_d:
                # torch.compile's autograd has no double backward: R1 or a gradient penalty
                # through a compiled D fails at the first step
                self.notes.append(f"--compile: D stays uncompiled, because loss '{comps.loss.name}' "
                                  "differentiates through it (R1 or a gradient penalty)")
            else:
                self.D_call = torch.compile(self.D)
        check_amp(cfg, dev)

    def _probe_networks(self) -> None:
        """One forward of G and D at the run's batch size before training, in train mode as the loop
        runs them: a model whose samples do not have the data's shape, or whose D does not give one
        logit and a row of features per sample, fails here naming it rather than as a shape error
        deep in the loop. No side effects: no gradients, BatchNorm statistics and the random
        streams are restored (the run is the same with or without it)."""
        m, dev, B = self.comps.model, self.device, int(self.cfg["batch_size"])
        gen = torch.Generator(device=dev).manual_seed(0)
        z = torch.randn(B, self.z_dim, device=dev, generator=gen)
        cond = torch.zeros(B, dtype=torch.long, device=dev)
        saved = [(b, b.detach().clone()) for net in (self.G, self.D) for b in net.buffers()]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                if self.comps.conditioner is not None:
                    check_codes(self.comps.conditioner, self.G, self.D, self.spec, cond)
                x = _forward(m, "G.forward", self.G, z, cond)
                problem = sample_problem(x, B, self.data_shape)
                if problem is not None:
                    raise ComponentFailure(m.kind, m.name, m.plugin, "G.forward", ValueError(problem))
                out = _forward(m, "D.forward", self.D, x, cond, features=True)
                logits, feats = out
                if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.shape != (B,):
                    got = (type(logits).__name__ if not isinstance(logits, torch.Tensor)
                           else f"{logits.dtype} {tuple(logits.shape)}")
                    raise ComponentFailure(m.kind, m.name, m.plugin, "D.forward", ValueError(
                        f"D must give one floating-point logit per sample ({B} for a batch of {B}"
                        + (f", from its {self.spec.d_heads} heads" if self.spec.d_heads > 1 else "")
                        + f"); got {got}"))
                if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != B:
                    got = type(feats).__name__ if not isinstance(feats, torch.Tensor) else f"shape {tuple(feats.shape)}"
                    raise ComponentFailure(m.kind, m.name, m.plugin, "D.forward", ValueError(
                        f"D must return (logits, features) with features shaped (batch, F); got {got}"))
        finally:
            with torch.no_grad():
                for b, v in saved:
                    b.copy_(v)

    def context(self) -> TrainContext:
        return TrainContext(
            step=self.step,
            device=self.device,
            data=self.data,
            labels=self.labels,
            prior=self.prior,
            capacity=self.capacity,
            z_dim=self.z_dim,
            generator=self.G,
            discriminator=self.D,
            rng=self.comp_rng,
            report=self._report,
            comm=self.comm,
            batch_size=max(1024, self.cfg["batch_size"]),
        )

    def _check_intervals(self) -> None:
        """A detector's or partitioner's ``every`` must be an integer >= 1 (a plugin may override it);
        read here once, the loop uses these values (``self.every``)."""
        self.every: dict[str, int] = {}
        for comp in (self.comps.detector, self.comps.partitioner):
            if comp is None:
                continue
            every = read_trait(comp, "every")
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise ComponentFailure(comp.kind, comp.name, comp.plugin, "every",
                                       ValueError(f"`every` must be an integer >= 1, got {every!r}"))
            self.every[comp.kind] = every

    def _check_output_range(self) -> None:
        """Warn when the data lie outside what G can output (``Model.output_range``): 0-255 pixels
        for a tanh generator train without an error and never match (one host read, at set-up)."""
        bounds = getattr(self.comps.model, "output_range", None)
        if not bounds or self.N == 0:
            return
        lo, hi = float(bounds[0]), float(bounds[1])
        span = torch.aminmax(self.data)
        dmin, dmax = float(span.min), float(span.max)
        slack = 1e-3 * (hi - lo)
        if dmin < lo - slack or dmax > hi + slack:
            self.progress.warn(
                f"the training data span [{dmin:.4g}, {dmax:.4g}], but model {self.comps.model.name!r} can only "
                f"output values in [{lo:g}, {hi:g}]: scale the data into that range (tensor-file: "
                "-o dataset.scale=minmax)")

    def _report(self, name: str, value: Any) -> None:
        self._reports[name] = value

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, net in self.named_networks().items():
            for k, v in net.state_dict().items():
                tensors[f"{name}/{k}"] = v
        meta: dict[str, Any] = {
            "optim": {
                "G": ckpt_io.flatten_optimizer("optim/G", self.opt_g.state_dict(), tensors),
                "D": ckpt_io.flatten_optimizer("optim/D", self.opt_d.state_dict(), tensors),
            },
            "components": {},
            "partition_count": self.partition_count,
            "dyngan_version": self.cfg.get("dyngan_version"),
            "plugins": self.cfg.get("plugins", {}),
            "data_shape": list(self.data_shape),
            "n_train": self.N,
            "processes": self.world_size,  # torchrun: the effective batch is batch_size x processes
        }
        tensors["train/labels"] = self.labels
        tensors["train/prior"] = self.prior
        tensors.update({f"rng/{k}": v for k, v in self._rng_states().items()})
        for slot, comp in self.comps.stateful().items():
            st = call_component(comp, "state_dict")
            try:
                meta["components"][slot] = ckpt_io.split_state(f"component/{slot}", st, tensors)
            except ValueError as e:  # the component's bug: named like one that raises
                raise ComponentFailure(comp.kind, comp.name, comp.plugin, "state_dict", e) from None
        det, part = self.comps.detector, self.comps.partitioner
        # the partitioner may use a detection of an earlier step (its interval not a multiple of
        # the detector's): keep it for an exact resume
        pending = self._partition_pending
        exact = part is not None and det is not None and bool(self.every[part.kind] % self.every[det.kind])
        if self.last_detection is not None and (exact or pending):
            own: dict[str, Any] = {}  # (merged only when the whole detection can be kept)
            try:
                meta["detection"] = ckpt_io.split_detection(self.last_detection, own)
                tensors.update(own)
            except ValueError as e:
                if exact:  # the detector's result: named like a detect() that raised
                    raise ComponentFailure(det.kind, det.name, det.plugin, "detect", e) from None
                # kept only for the check this final step skipped: without it a resume goes on to
                # the next check, as before there was a pending check (the run itself is saved)
                pending = False
                if not self._warned_detection:
                    self._warned_detection = True
                    self.progress.warn(f"detector {det.name!r}: {e}; a resume goes on to the next "
                                       "partition check instead of making the one this final step skipped")
        meta["last_fraction"] = self.last_fraction
        if pending:
            meta["partition_pending"] = True
        if self.epoch_batches is not None:
            meta["sampling"] = self.epoch_batches.state()
        return tensors, meta

    def _apply(self, ck: ckpt_io.Checkpoint) -> None:
        t, meta = ck.tensors, ck.meta
        if meta.get("data_shape") != list(self.data_shape) or meta.get("n_train") != self.N:
            raise CheckpointError(
                f"{ck.path.name}: made for data of shape {meta.get('data_shape')} x {meta.get('n_train')}, "
                f"this run has {list(self.data_shape)} x {self.N}")
        try:
            for name, net in self.named_networks().items():
                prefix = name + "/"
                net.load_state_dict({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)})
            self.opt_g.load_state_dict(ckpt_io.unflatten_optimizer("optim/G", meta["optim"]["G"], t,
                                                                   self.opt_g.state_dict()))
            self.opt_d.load_state_dict(ckpt_io.unflatten_optimizer("optim/D", meta["optim"]["D"], t,
                                                                   self.opt_d.state_dict()))
            for opt in (self.opt_g, self.opt_d):  # Adam's moments: their parameter's shape, finite
                for group in opt.param_groups:
                    for p in group["params"]:
                        for key, v in opt.state.get(p, {}).items():
                            if not isinstance(v, torch.Tensor):
                                continue
                            if v.dim() > 0 and v.shape != p.shape:
                                raise ValueError(f"optimiser state {key!r} has shape {tuple(v.shape)}, "
                                                 f"its parameter {tuple(p.shape)}")
                            if v.is_floating_point() and not bool(torch.isfinite(v).all()) or \
                                    key in _NON_NEGATIVE_STATE and bool((v < 0).any()):
                                raise ValueError(f"optimiser state {key!r} holds NaN, inf or a negative value")
            labels, prior = t["train/labels"], t["train/prior"]
            if labels.shape != self.labels.shape or not valid_prior(prior, self.capacity):
                raise ValueError("partition labels or prior do not match this run")
            problem = labels_problem(labels, self.N, self.capacity)
            if problem is not None:
                raise ValueError(f"partition labels {problem}")
            self.labels.copy_(labels)
            self.prior.copy_(prior)
            torch.set_rng_state(t["rng/cpu"])
            # saved on another kind of device (a CUDA generator's state is not a CPU one's), the
            # random streams cannot move: they restart from the seed and step, below
            rng_moved = t["rng/train"].shape != self.gen.get_state().shape
            if not rng_moved:
                self.gen.set_state(t["rng/train"])
                self.comp_rng.set_state(t["rng/components"])
            if self.device.type == "cuda" and "rng/cuda" in t:
                torch.cuda.set_rng_state(t["rng/cuda"], self.device)
            # torchrun: this rank's own streams, when the checkpoint holds them (rank 0's are above)
            own_streams = not rng_moved and self._restore_rank_rngs(t, meta)
            was = meta.get("processes", 1)
            moved = isinstance(was, int) and not isinstance(was, bool) and was >= 1 and was != self.world_size
            if self.epoch_batches is not None:
                self._restore_epoch_order(meta.get("sampling"), ck.step, (
                    f"{self.world_size} process{'es' if self.world_size > 1 else ''}" if moved
                    else f"{self.device.type}" if rng_moved else None))
            if moved:
                b = self.cfg["batch_size"]
                self.progress.warn(f"this run was trained by {was} process{'es' if was > 1 else ''} (effective batch "
                                  f"{was * b}) and goes on with {self.world_size} (effective batch "
                                  f"{self.world_size * b}): the same settings, another batch from here on"
                                  + (", and a new epoch begins" if self.epoch_batches is not None else ""))
            partition_count = meta.get("partition_count", 1)
            if not isinstance(partition_count, int) or isinstance(partition_count, bool) \
                    or not 1 <= partition_count <= self.capacity:
                raise ValueError(f"partition_count {partition_count!r} is not a count from 1 to {self.capacity}")
            pending = meta.get("partition_pending", False)
            if not isinstance(pending, bool):
                raise ValueError(f"partition_pending {pending!r} is not true or false")
            det_js = meta.get("detection")
            detection = None if det_js is None else ckpt_io.join_detection(
                det_js, t, type(self.comps.detector) if self.comps.detector is not None else None, self.device)
            fraction = meta.get("last_fraction")
            comp_js = meta.get("components", {})
            states = {slot: ckpt_io.join_state(f"component/{slot}", comp_js.get(slot, {}), t)
                      for slot in self.comps.stateful()}
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
            # torch's load_state_dict puts the missing and unexpected keys on the lines after its first
            raise CheckpointError(f"{ck.path.name} does not fit this run: {one_line(e, 300)}") from None
        for slot, comp in self.comps.stateful().items():
            try:
                call_component(comp, "load_state_dict", states[slot])
            except ComponentFailure as e:  # most likely a foreign or edited state: try an older checkpoint
                raise CheckpointError(f"{ck.path.name} does not fit this run: {e}") from None
        self.partition_count = partition_count
        self._partition_pending = pending
        self._own_streams = own_streams
        self.last_detection = detection
        self.last_fraction = float(fraction) if isinstance(fraction, (int, float)) else None
        self.step = ck.step
        if rng_moved:
            self.gen.manual_seed(self.cfg["seed"] + 2_000_003 + ck.step)
            self.comp_rng.manual_seed(self.cfg["seed"] + 2_000_004 + ck.step)
            self.progress.warn(
                f"the checkpoint's random streams were saved on another kind of device than "
                f"{self.device.type}; they restart from the seed, so the continuation differs from "
                f"one on the original device" + (" (and a new epoch begins)" if self.epoch_batches is not None else ""))

    def save(self) -> None:
        if self._saved_step == self.step:
            return  # this state is already on disk (just loaded or just written); alike on every rank
        nets = [("generator", self.G), ("discriminator", self.D)]
        if self.G_ema is not None:
            nets.append(("generator's weight average", self.G_ema))
        # on every rank: same verdict; one host read for all the weights
        finite = torch.stack([torch.isfinite(p).all() for _, net in nets for p in net.parameters()])
        if not bool(finite.all()):
            what = next(w for w, net in nets if not all(bool(torch.isfinite(p).all()) for p in net.parameters()))
            m, loss = self.comps.model, self.comps.loss
            raise DivergenceError(
                f"the {what}'s weights became NaN or inf by step {self.step} (model {m.name!r}, "
                f"{component_label(loss.kind, loss.name, loss.plugin)}); not saving them (the last good "
                "checkpoint is kept)")
        rank_rngs = self._gather_rank_rngs()  # every rank: a collective under torchrun
        if self.is_main:
            self._write_checkpoint(rank_rngs)
        barrier = getattr(self.comm, "barrier", None)
        if barrier is not None:  # torchrun: a failed write on rank 0 stops every rank
            barrier()
        self._saved_step = self.step

    def _write_checkpoint(self, rank_rngs: Mapping[str, torch.Tensor] | None = None) -> None:
        """Rank 0's state, with ``rank_rngs`` (torchrun: the other ranks' random streams, from
        ``_gather_rank_rngs``) beside its own."""
        tensors, meta = self.state()
        tensors.update(rank_rngs or {})
        directory = self.run_dir / rundir.CHECKPOINTS
        ckpt_io.save(directory, self.step, tensors, meta, keep=self.cfg["keep_checkpoints"])
        self._saved_step = self.step

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """This process's random streams by checkpoint name (``rng/<name>``): torch's global CPU
        stream, the batches', the components' and, on a GPU, torch's CUDA stream."""
        states = {"cpu": torch.get_rng_state(), "train": self.gen.get_state(),
                  "components": self.comp_rng.get_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def _gather_rank_rngs(self) -> dict[str, torch.Tensor]:
        """Under torchrun, on rank 0: every other rank's random streams, as checkpoint tensors
        ``rng/rank<R>/<name>``, so that a resume with as many processes continues each rank's own
        stream (``_restore_rank_rngs``); one gather, on the training device (NCCL takes CUDA
        tensors only), at checkpoint steps. Empty in a single process and on ranks > 0."""
        if self.world_size < 2:
            return {}
        states = self._rng_states()
        flat = torch.cat([v.reshape(-1) for v in states.values()]).to(self.device)
        every = self.comm.all_gather(flat.unsqueeze(0)).cpu()  # (world_size, bytes), the same layout on all
        if not self.is_main:
            return {}
        out: dict[str, torch.Tensor] = {}
        for r in range(1, self.world_size):
            offset = 0
            for name, v in states.items():
                out[f"rng/rank{r}/{name}"] = every[r, offset:offset + v.numel()].clone()
                offset += v.numel()
        return out

    def _restore_rank_rngs(self, t: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> bool:
        """On a rank > 0 resuming a checkpoint of as many processes that holds this rank's random
        streams: continue them, and say so (True). Otherwise (another number of processes, a
        checkpoint from before these were saved, one of another device kind) False: ``sync_start``
        derives this rank's batch stream from rank 0's, as for a new run."""
        rank = int(getattr(self.comm, "rank", 0))
        if rank == 0 or meta.get("processes") != self.world_size:
            return False
        current = self._rng_states()
        saved = {name: t.get(f"rng/rank{rank}/{name}") for name in current}
        if not all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.shape == current[name].shape
                   for name, v in saved.items()):
            return False
        try:
            self._set_rng_states(saved)
        except (RuntimeError, ValueError):  # a state torch refuses: rank 0's, derived as before
            self._set_rng_states(current)
            return False
        return True

    def _set_rng_states(self, states: Mapping[str, torch.Tensor]) -> None:
        torch.set_rng_state(states["cpu"])
        self.gen.set_state(states["train"])
        self.comp_rng.set_state(states["components"])
        if "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"], self.device)

    def _sync_ranks(self) -> None:
        """Under torchrun (core.distributed): rank 0's networks (parameters and buffers) and
        partition on every rank; ranks > 0 then draw their own batches, from a stream derived
        from rank 0's generator state and their rank (rank 0's is the single-process stream),
        unless the checkpoint just loaded held their own streams (``_restore_rank_rngs``)."""
        sync_start = getattr(self.comm, "sync_start", None)
        own, self._own_streams = self._own_streams, False
        if sync_start is not None:
            sync_start(list(self.named_networks().values()), [self.labels, self.prior], self.gen,
                       derive=not own)

    def load_latest(self) -> int:
        directory = self.run_dir / rundir.CHECKPOINTS
        notes: list[str] = []
        ck = ckpt_io.load_latest(directory, self._apply, notes.append, skip_unreadable=False)
        if notes:
            note = notes[0]
            if self.is_main:  # the run's one writer: the newer, unusable checkpoints go aside
                newer = [p for step, p in ckpt_io.list_checkpoints(directory) if step > ck.step]
                moved, failed = ckpt_io.move_aside(directory, newer)
                if moved:
                    note += (f"; moved to {rundir.CHECKPOINTS}/{ckpt_io.DAMAGED}/ (kept for inspection; "
                             "never loaded again nor counted by --keep-checkpoints)")
                if failed:
                    note += (f"; could not move {'; '.join(failed)} to {rundir.CHECKPOINTS}/{ckpt_io.DAMAGED}/: "
                             "left in place, it is skipped again by a later resume and counts toward "
                             "--keep-checkpoints once the run passes its step")
            self.progress.warn(note)
        self._saved_step = ck.step
        return ck.step

    # ------------------------------------------------------------------ events

    def _setup_components(self) -> None:
        ctx = self.context()
        if self.comps.detector is not None:
            call_with_context(self.comps.detector, "setup", ctx)
        if self.comps.partitioner is not None:
            call_with_context(self.comps.partitioner, "setup", ctx)

    def _clock(self) -> float:
        """Start time of a periodic phase: on an accelerator, once the queued training steps
        are done, so that the phase's ``seconds`` hold its own work alone."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _detect(self, log: rundir.MetricsLog | None) -> None:
        det = self.comps.detector
        assert det is not None
        with self._own_reports():
            self._run_detection(det, log)

    def _run_detection(self, det: Any, log: rundir.MetricsLog | None) -> None:
        t0 = self._clock()
        with torch.no_grad():
            result = call_with_context(det, "detect", self.context())
        wrong = detection_problems(result, self.N)
        if wrong:  # what the partitioner would otherwise trip over, or silently misread
            raise ComponentFailure(det.kind, det.name, det.plugin, "detect", TypeError(
                f"must return a Detection over the N = {self.N} training samples: {'; '.join(wrong)}"))
        self.last_detection = result
        frac = float(result.fraction)
        self.last_fraction = frac
        rec = {"step": self.step, "event": "detection", "collapse/fraction": frac,
               "collapse/count": int(result.collapsed.sum()), "seconds": round(time.perf_counter() - t0, 6)}
        rec.update(self._gather_reports())
        if log is not None:
            log.write(rec)

    def _partition(self, log: rundir.MetricsLog | None) -> None:
        part = self.comps.partitioner
        assert part is not None
        with self._own_reports():
            self._run_partition(part, log)

    def _run_partition(self, part: Any, log: rundir.MetricsLog | None) -> None:
        t0 = self._clock()
        with torch.no_grad():
            upd = call_with_context(part, "partition", self.context(), self.last_detection)
        if upd is None:
            rec = {"step": self.step, "event": "partition-check", "changed": False,
                   "seconds": round(time.perf_counter() - t0, 6)}
            rec.update(self._gather_reports())  # on every rank: it is a collective under torchrun
            rec["partition/count"] = self.partition_count  # the loop's own count, an int as in `partition`
            # a partitioner may say why it made none (optional ``skip_reason``): logged, and shown
            # when it differs from the last check's
            reason = getattr(part, "skip_reason", None)
            if isinstance(reason, str) and reason:
                rec["reason"] = reason
                if reason != self._skip_reason:
                    self.progress.message(f"step {self.step}: no new partition: {reason}")
            self._skip_reason = reason
            if log is not None:
                log.write(rec)
            return
        self._skip_reason = None
        if not isinstance(upd, PartitionUpdate):
            raise ComponentFailure(part.kind, part.name, part.plugin, "partition",
                                   TypeError("must return a PartitionUpdate or None"))
        integral = isinstance(upd.labels, torch.Tensor) and not upd.labels.is_floating_point() \
            and not upd.labels.is_complex() and upd.labels.dtype != torch.bool
        labels = upd.labels.to(self.device, torch.long) if integral else None
        # the rules a checkpoint's labels and prior are held to (labels_problem, valid_prior), in the
        # words of a partitioner's mistake
        if labels is None or labels_problem(labels, self.N, self.capacity) is not None:
            got = (f"labels of type {type(upd.labels).__name__}" if not isinstance(upd.labels, torch.Tensor)
                   else f"labels of dtype {upd.labels.dtype}, not an integer one" if labels is None
                   else f"labels of shape {tuple(labels.shape)}" if labels.shape != (self.N,)
                   else f"values in [{int(labels.min())}, {int(labels.max())}]")
            raise ComponentFailure(part.kind, part.name, part.plugin, "partition", ValueError(
                f"labels must have shape ({self.N},) with values in [0, {self.capacity}); got {got}"))
        sizes = torch.bincount(labels, minlength=self.capacity)
        prior = sizes.float() / self.N if upd.prior is None else upd.prior.to(self.device, torch.float32) \
            if isinstance(upd.prior, torch.Tensor) and not upd.prior.is_complex() else None
        if prior is None or not valid_prior(prior, self.capacity):
            got = (f"{type(upd.prior).__name__}" if prior is None else f"shape {tuple(prior.shape)}"
                   if prior.shape != (self.capacity,) else str([round(v, 4) for v in prior[:8].tolist()])
                   + (" ..." if self.capacity > 8 else ""))
            raise ComponentFailure(part.kind, part.name, part.plugin, "partition", ValueError(
                f"prior must be a tensor of {self.capacity} finite, non-negative entries (one per condition) "
                f"with a positive sum; got {got}"))
        changed = int((labels != self.labels).sum())
        if changed:
            # the detection judged the samples under their former labels: a later check gets None
            # until the detector runs again (a partitioner's interval need not be a multiple of the
            # detector's), so one verdict cannot open conditions twice
            self.last_detection = None
        self.labels.copy_(labels)
        self.prior.copy_(prior / prior.sum())
        sizes_list = sizes.tolist()
        while len(sizes_list) > 1 and sizes_list[-1] == 0:
            sizes_list.pop()
        self.partition_count = int((sizes > 0).sum())
        rec = {"step": self.step, "event": "partition", "partition/count": self.partition_count,
               "partition/sizes": sizes_list, "partition/relabelled": changed,
               "seconds": round(time.perf_counter() - t0, 6)}
        rec = {**self._gather_reports(), **rec}  # the loop's own fields win over same-named reports
        if log is not None:
            log.write(rec)
        self.progress.message(f"step {self.step}: partition -> {self.partition_count} conditions "
                              f"(sizes {sizes_list}, {changed} samples relabelled)")

    def evaluate(self, n: int | None = None) -> dict[str, float]:
        n = n or self.cfg["eval_samples"]
        g = torch.Generator(device=self.device).manual_seed(self.cfg["seed"] + 7919 * (self.step + 1))
        fake = generate(self.sampling_generator, n, self.z_dim, self.prior, self.device, g,
                        model=self.comps.model, data_shape=self.data_shape)
        return score(self.comps, fake, self.data)[0]

    def named_networks(self) -> dict[str, torch.nn.Module]:
        """The run's networks by checkpoint prefix: ``G``, ``D`` and, when kept, ``G_ema``."""
        nets: dict[str, torch.nn.Module] = {"G": self.G, "D": self.D}
        if self.G_ema is not None:
            nets[EMA_NAME] = self.G_ema
        return nets

    @property
    def sampling_generator(self) -> torch.nn.Module:
        """The generator that samples and metrics use: the weight average when the run keeps one."""
        return self.G_ema if self.G_ema is not None else self.G

    def _ema_update(self) -> None:
        """G_ema <- d * G_ema + (1 - d) * G, with d = min(g_ema, (1 + t) / (10 + t)) at step t
        (a short warm-up so early averages are not dominated by the initial weights); buffers
        (BatchNorm statistics) are copied. All on the device, no host synchronisation."""
        assert self.G_ema is not None
        t = self.step
        d = min(self.ema_decay, (1.0 + t) / (10.0 + t))
        with torch.no_grad():
            torch._foreach_lerp_(self._ema_params, self._g_params, 1.0 - d)
            for b_ema, b in self._ema_buffers:
                b_ema.copy_(b)

    @contextlib.contextmanager
    def _own_reports(self) -> Iterator[None]:
        """A detection or partition collects its components' reports apart: the values the
        training step reported (the loss's, logged at a --log-every step that falls on the same
        step) are kept for the step's own record."""
        kept, self._reports = self._reports, {}
        try:
            yield
        finally:
            self._reports = kept

    def _gather_reports(self) -> dict[str, float]:
        if not self._reports:
            return {}
        names = list(self._reports)
        vals = []
        for v in self._reports.values():
            vals.append(v.detach().float().mean() if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
        # stacked on the device, averaged over ranks there, then one transfer to the host
        stacked = self.comm.all_reduce_mean(torch.stack([v.to(self.device) for v in vals]))
        out = dict(zip(names, stacked.tolist()))
        self._reports.clear()
        return out

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        cfg = self.cfg
        log = rundir.MetricsLog(self.run_dir) if self.is_main else None
        sigflag: _SignalFlag | None = None
        try:
            if self.resume:
                self.load_latest()
                if log is not None:
                    log.truncate_after(self.step, partition_made=self._partition_pending)
                self.progress.message(f"resuming from step {self.step}")
                if self.step >= cfg["steps"]:
                    self.progress.message(f"the run is already at step {self.step} of --steps {cfg['steps']}: "
                                          "nothing to train (a larger --steps extends it)")
                    if self.is_main:  # a new interval or metric setting still holds for the next --resume
                        rundir.record_schedule(self.run_dir, {k: v for k, v in cfg.items() if k != "steps"})
                elif self.is_main:  # the checkpoint loaded: keep a new --steps for the next plain --resume
                    rundir.record_schedule(self.run_dir, cfg)
            self._sync_ranks()
            self._setup_components()
            for note in self.notes:
                self.progress.message(note)
            if log is not None and self.step < cfg["steps"]:  # wall-clock time of the first step (start-up)
                log.write({"step": self.step, "event": "start", "time": time.time(), "processes": self.world_size})
            rollbacks = 0
            with _SignalFlag() as flag:
                sigflag = flag
                watch = getattr(self.comm, "watch", None)
                if watch is not None:  # torchrun: a signal on any rank stops all after the same step
                    flag = watch(flag)
                while True:
                    try:
                        self._loop(log, flag)
                        break
                    except DivergenceError as e:
                        if cfg.get("on_divergence") != "rollback" or rollbacks >= 3 or not \
                                ckpt_io.list_checkpoints(self.run_dir / rundir.CHECKPOINTS):
                            raise
                        rollbacks += 1
                        self._rollback(e, rollbacks, log)
            return TrainResult(self.run_dir, self.step, rundir.read_metrics(self.run_dir), cfg)
        except KeyboardInterrupt as e:  # a second signal (or Ctrl-C / SIGTERM before the loop): exit 128 + signal
            signum = (sigflag.second if sigflag is not None else None) or getattr(e, "signum", None) or signal.SIGINT
            raise Aborted(signum, self.step, self.run_dir, before_start=sigflag is None,
                          torchrun=self.world_size > 1) from None
        finally:
            if log is not None:
                log.close()

    def _restore_epoch_order(self, saved: Any, step: int, new_on: str | None) -> None:
        """``--sampling epoch`` at a checkpoint of ``step``: continue the saved order (``saved``, from
        ``EpochBatches.state``), or begin a new epoch on ``new_on``, when the run goes on with
        another number of processes (the epochs' slices no longer fit) or on another kind of device
        (whose generators draw other permutations). ValueError for a saved state that cannot be
        this run's."""
        eb = self.epoch_batches
        assert eb is not None
        batches = step * self.d_steps
        if saved is None:  # a checkpoint written before the order was saved: the run's first order
            saved = {"salt": "", "origin": 0}
        salt, origin = (saved.get("salt"), saved.get("origin")) if isinstance(saved, dict) else (None, None)
        if not isinstance(salt, str) or len(salt) > 200 or not salt.isprintable() or not isinstance(origin, int) \
                or isinstance(origin, bool) or not 0 <= origin <= batches:  # (isprintable: no lone surrogates)
            raise ValueError(f"its epoch order {saved!r} cannot be this run's at step {step}")
        if new_on is not None:
            eb.restart(f"{new_on} from step {step}", batches)
        else:
            eb.restart(salt, origin)

    def _rollback(self, error: DivergenceError, attempt: int, log: rundir.MetricsLog | None) -> None:
        """Reload the last good checkpoint and go on with a fresh random stream (the same one would
        diverge again), and with --sampling epoch a new epoch order from there."""
        bad_step = self.step
        self.load_latest()
        self.gen.manual_seed(self.cfg["seed"] + 1_000_003 * attempt + self.step)
        if self.epoch_batches is not None:
            self.epoch_batches.restart(f"rollback {attempt} at step {self.step}",
                                       self.step * self.d_steps)
        self._own_streams = False  # the new stream is rank 0's: the others derive theirs from it
        self._sync_ranks()
        if log is not None:
            log.truncate_after(self.step, partition_made=self._partition_pending)
            log.write({"step": self.step, "event": "rollback", "diverged_at": bad_step, "attempt": attempt,
                       **error.record})
        self._setup_components()
        self.progress.message(f"{error.cause}; rolled back to the last good checkpoint (step {self.step}) with a "
                              f"new random stream (attempt {attempt} of 3)")

    def _loop(self, log: rundir.MetricsLog | None, flag: _SignalFlag) -> None:
        cfg, dev = self.cfg, self.device
        B, N, steps = cfg["batch_size"], self.N, cfg["steps"]
        G, D, G_call, D_call = self.G, self.D, self.G_call, self.D_call
        opt_g, opt_d, loss = self.opt_g, self.opt_d, self.comps.loss
        data, labels, prior, gen, z_dim = self.data, self.labels, self.prior, self.gen, self.z_dim
        report = self._report
        d_steps = self.d_steps
        real_grad = self.wants_real_grad
        g_needs_real = self.needs_real_in_g_step
        conditional = self.comps.conditioner is not None
        fake_from_prior = self.fake_conditions in ("prior", "prior-fresh")
        g_draws_own = self.fake_conditions == "prior-fresh"
        zero_cond = torch.zeros(B, dtype=torch.long, device=dev)
        d_params = [p for p in D.parameters()]
        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.get("amp") == "bf16")
        det, part = self.comps.detector, self.comps.partitioner
        det_every, part_every = self.every.get("detector", 0), self.every.get("partitioner", 0)
        log_every, eval_every, ck_every = cfg["log_every"], cfg["eval_every"], cfg["checkpoint_every"]
        sync_grads = getattr(self.comm, "sync_grads", None)
        ema = self.G_ema is not None
        epoch_batches = self.epoch_batches

        def d_interp(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return D_call(x, c)

        if self._partition_pending and part is not None and self.step < steps:
            # the check the last invocation skipped at its final step: done now, as a run that
            # never stopped did it at that step (same detection, D and random stream)
            self._partition(log)
            self._partition_pending = False
        t_last, s_last = time.perf_counter(), self.step
        tick = self.progress.tick
        loss_d = loss_g = None
        G.train()
        D.train()
        while self.step < steps:
            # ---- discriminator step(s)
            for j in range(d_steps):
                if epoch_batches is None:
                    idx = torch.randint(N, (B,), device=dev, generator=gen)
                else:
                    idx = epoch_batches(self.step * d_steps + j)
                real = data[idx]
                if conditional:
                    real_cond = labels[idx]
                    fake_cond = torch.multinomial(prior, B, replacement=True, generator=gen) \
                        if fake_from_prior else real_cond
                else:
                    real_cond = fake_cond = zero_cond
                z = torch.randn(B, z_dim, device=dev, generator=gen)
                with amp:
                    with torch.no_grad():
                        fake = G_call(z, fake_cond)
                    if real_grad:
                        real.requires_grad_(True)
                    real_logits = D_call(real, real_cond)
                    fake_logits = D_call(fake, fake_cond)
                loss_d = _scalar(loss, "d_loss", call_component(loss, "d_loss", DStepContext(
                    real, fake, real_logits, fake_logits, real_cond, fake_cond, d_interp, report, gen)))
                opt_d.zero_grad(set_to_none=True)
                _backward(loss, "d_loss", loss_d)
                if sync_grads is not None:
                    sync_grads(D)
                opt_d.step()
            # ---- generator step (D frozen: no weight gradients computed for it)
            for p in d_params:
                p.requires_grad_(False)
            if g_draws_own:
                fake_cond = torch.multinomial(prior, B, replacement=True, generator=gen)
            z = torch.randn(B, z_dim, device=dev, generator=gen)
            with amp:
                fake = G_call(z, fake_cond)
                fake_logits = D_call(fake, fake_cond)
                real_logits_g = None
                if g_needs_real:
                    with torch.no_grad():
                        real_logits_g = D_call(real.detach(), real_cond)
            loss_g = _scalar(loss, "g_loss", call_component(
                loss, "g_loss", GStepContext(fake, fake_logits, fake_cond, real_logits_g, report)))
            opt_g.zero_grad(set_to_none=True)
            _backward(loss, "g_loss", loss_g)
            if sync_grads is not None:
                sync_grads(G)
            opt_g.step()
            if ema:
                self._ema_update()
            for p in d_params:
                p.requires_grad_(True)
            self.step += 1
            s = self.step

            # ---- periodic work, at completed-step counts
            final = s == steps
            if det is not None and s % det_every == 0:
                self._detect(log)
            # metrics before a partition of the same step, as the reference code scores its run:
            # after it, the model would be scored on conditions it has not been trained on yet.
            # A failing metric must not cost the steps trained since the last checkpoint: its
            # error waits until this step is saved (the final step saves before it evaluates).
            eval_error: Exception | None = None
            if eval_every and s % eval_every == 0 and not final:
                eval_error = self._eval(log)  # raised below, after the save
            # not on the final step: no training would follow a new split, so the saved model
            # would draw conditions it never learnt; the checkpoint keeps the check pending, and a
            # resumed, longer run makes it before its first step
            if part is not None and s % part_every == 0:
                if final:
                    self._partition_pending = True
                else:
                    self._partition(log)
            if s % log_every == 0 or final:
                now = time.perf_counter()
                rate = (s - s_last) / max(1e-9, now - t_last)
                t_last, s_last = now, s
                self._log_step(log, loss_d, loss_g, rate)
            else:
                tick(s)  # a heartbeat when nothing was shown for a while (no device sync)
            if flag.signum is not None:
                self.save()
                self.progress.message(f"stopped at step {s}; checkpoint saved")
                raise Interrupted(flag.signum, s, self.run_dir, torchrun=self.world_size > 1)
            if (ck_every and s % ck_every == 0) or final or eval_error is not None:
                self.save()
            if eval_error is not None:
                raise eval_error
            if final:
                eval_error = self._eval(log)
                if eval_error is not None:
                    raise eval_error
                # a signal during the final evaluation (the step is saved): stop as a signal
                # says, after it (under torchrun each rank by its own flag: no collective follows)
                signum = getattr(flag, "local", flag).signum
                if signum is not None:
                    raise Interrupted(signum, s, self.run_dir, torchrun=self.world_size > 1, complete=True)
        if self.step >= steps:
            self.save()  # a no-op when this step is already on disk

    def _after_failed_eval(self, error: Exception | None, rank: int | None = None) -> Exception:
        """``error`` of an evaluation at a step that is already saved, saying so: the trained
        steps are safe, and ``dyngan evaluate`` can score them again with other settings. Under
        torchrun ``rank`` names the rank whose evaluation failed; on the other ranks (``error``
        None, or not the one shown) a short line says which, that process showing the error."""
        where = "" if rank is None else f" on rank {rank}"
        if rank is not None and rank != self.comm.rank:
            where += " (that process shows the error)"
        note = (f"the evaluation at step {self.step} failed{where}; the run is saved at step {self.step} "
                f"(`dyngan evaluate {self.run_dir}` scores it again; `--resume` continues it)")
        if rank is not None and rank != self.comm.rank:
            out: Exception = RunFailure(note)
        elif error is None:  # not reached: the rank that failed has its error
            out = RunFailure(note)
        elif is_out_of_memory(error):
            out = out_of_memory(error, f"scoring {self.cfg['eval_samples']:,} samples at step {self.step}",
                                f"set a smaller eval_samples in a --config file; {note}")
        elif isinstance(error, DynganError):
            error.args = (f"{error.args[0] if error.args else error}; {note}",) + tuple(error.args[1:])
            return error
        else:
            out = RunFailure(f"{type(error).__name__}: {error}; {note}")
        out.__cause__ = error  # DYNGAN_TRACEBACK=1 shows where it came from
        return out

    def _log_step(self, log: rundir.MetricsLog | None, loss_d: Any, loss_g: Any, rate: float) -> None:
        sync_buffers = getattr(self.comm, "sync_buffers", None)
        if sync_buffers is not None:  # torchrun: rank 0's BatchNorm statistics everywhere
            sync_buffers(self.G, self.D)
        self._reports["loss/d"] = loss_d
        self._reports["loss/g"] = loss_g
        vals = self._gather_reports()
        bad = [k for k, v in vals.items() if not math.isfinite(v)]
        if bad:
            self._diverged(bad[0], vals[bad[0]], log)
        rec = {"step": self.step, "steps_per_s": float(f"{rate:.3g}"), **vals}
        if log is not None:
            log.write(rec)
        text = f"D {vals['loss/d']:.4f}  G {vals['loss/g']:.4f}  {rate_text(rate)} steps/s"
        if self.comps.detector is not None and self.last_fraction is not None:
            text += f"  collapse {self.last_fraction:.3f}"
        if self.comps.partitioner is not None:
            text += f"  partitions {self.partition_count}"
        self.progress.update(self.step, text, final=self.step == self.cfg["steps"])

    def _eval(self, log: rundir.MetricsLog | None) -> Exception | None:
        """Score and log the metrics. A failure is returned, not raised, as the error to raise once
        the step is saved (``_after_failed_eval``): a failing metric must not cost the steps trained
        since the last checkpoint. Under torchrun every rank evaluates, and the ranks agree whether
        any failed (one small all-reduce, at evaluation steps only), so that all of them save and
        stop together: a rank that failed alone used to leave the others in another collective
        (Gloo aborted, the error unseen, the step unsaved). The first rank that failed shows its
        error; the others say which rank that was."""
        if not self.comps.metrics:
            return None
        error: Exception | None = None
        try:
            with self.progress.slow(f"step {self.step}: scoring {self.cfg['eval_samples']:,} samples"):
                vals = self.evaluate()
            if log is not None and vals:
                log.write({"step": self.step, "event": "eval", **vals})
            if vals:
                self.progress.message(eval_text(self.step, vals))
        except Exception as e:  # noqa: BLE001 - returned, raised after the save
            error = e
        if self.world_size < 2:
            return None if error is None else self._after_failed_eval(error)
        mine = torch.zeros(self.world_size, device=self.device)
        if error is not None:
            mine[self.comm.rank] = 1.0
        failed = [r for r, v in enumerate(self.comm.all_reduce_mean(mine).tolist()) if v > 0]
        return self._after_failed_eval(error, failed[0]) if failed else None

    def _diverged(self, name: str, value: float, log: rundir.MetricsLog | None) -> None:
        comp = self.comps.loss
        where = component_label(comp.kind, comp.name, comp.plugin)
        existing = ckpt_io.list_checkpoints(self.run_dir / rundir.CHECKPOINTS)
        kept = f"the last good checkpoint (step {existing[-1][0]}) is kept" if existing else "no checkpoint was saved yet"
        if log is not None:
            log.write({"step": self.step, "event": "divergence", "name": name, "value": value})
        cause = f"{name} is {value} at step {self.step} with {where}"
        # cause and record: what a rollback says and logs in place of the record its truncation drops
        raise DivergenceError(f"{cause}; training stopped; {kept}", cause, {"name": name, "value": value})
