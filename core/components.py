"""The component contracts: one base class per kind.

This is what a plugin author reads. A component is a class with a unique
``name`` for its kind, an ``options`` schema and the methods below; a plugin
hands the class to ``register`` from the matching hook in ``core.hookspecs``.
The training loop creates one instance per run with the resolved options
(``self.opts``) and calls plain methods on it. Nothing here is called per
sample; the per-step methods (losses) run inside the hot loop and must stay on
the device: no ``.item()``, ``.cpu()`` or printing. Report numbers with
``ctx.report(name, tensor)``; the loop gathers them every few steps.

Anything a component must carry across a checkpoint goes in ``state_dict()``:
a flat mapping of string keys to tensors or JSON values (numbers, strings,
lists, dicts). Tensors are stored in safetensors, the rest in JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from .errors import OptionError
from .options import OPTION_TYPES, Option, OptionValues, check_value, resolve_options

if TYPE_CHECKING:  # torch is imported lazily so that `dyngan --help` stays instant
    import torch
    from torch import Tensor, nn

ReportFn = Callable[[str, "Tensor | float"], None]

__all__ = [
    "Component",
    "Option",
    "OptionError",
    "Dataset",
    "Model",
    "ConditioningSpec",
    "Conditioner",
    "Loss",
    "DStepContext",
    "GStepContext",
    "CollapseDetector",
    "Detection",
    "Partitioner",
    "PartitionUpdate",
    "Metric",
    "Preset",
    "TrainContext",
    "Comm",
    "KINDS",
]


class Component:
    """Base of every component.

    Class attributes to set:
      name: unique among the components of this kind (e.g. ``"ns"``).
      options: ``{key: Option(default, help, ...)}``; values reach the instance
        validated, as ``self.opts.key``.
    Set by dyngan: ``kind`` (by the base class) and ``plugin`` (the plugin that
    registered it, by the registry).
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Option]] = {}
    plugin: ClassVar[str | None] = None

    def __init__(self, **options: Any) -> None:
        self.opts = OptionValues(self.resolve_options(options))

    @classmethod
    def describe(cls) -> str:
        return f"{cls.kind} {cls.name!r}"

    @classmethod
    def resolve_options(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``values``; raises OptionError on a bad key or value."""
        return resolve_options(cls.describe(), cls.options, values)

    def state_dict(self) -> dict[str, Any]:
        """What must survive a checkpoint: string keys to tensors or JSON values."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (tensors arrive on the CPU)."""


# --------------------------------------------------------------------------- data


class Dataset(Component):
    """A training set that fits in memory.

    ``load`` returns every training sample as one float32 CPU tensor of shape
    ``(N, *data_shape)``; image data is scaled to [-1, 1]. It must be a pure
    function of the options and ``generator`` (the training set is fixed: the
    collapse detector relies on per-sample identity).
    """

    kind: ClassVar[str] = "dataset"
    #: the model used when the user names none
    default_model: ClassVar[str] = "mlp"
    #: metric names computed by ``dyngan evaluate`` and during training
    default_metrics: ClassVar[tuple[str, ...]] = ()
    #: how many generated samples ``dyngan evaluate`` scores by default
    eval_samples: ClassVar[int] = 2500

    def load(self, generator: "torch.Generator") -> "Tensor":
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """JSON facts the metrics need (e.g. ``{"centres": [...], "sigma": 0.05}``)."""
        return {}


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ConditioningSpec:
    """What a conditioner asks of the networks.

    g_dim: width of the code appended to the generator's input (0: none).
    d_dim: width of the code given to the discriminator (0: none).
    d_heads: number of discriminator output logits; with more than one, the
      logit of each sample's condition is used.
    capacity: number of condition slots (K_max); conditions are 0..capacity-1.
    """

    g_dim: int = 0
    d_dim: int = 0
    d_heads: int = 1
    capacity: int = 1


class Model(Component):
    """Builds a generator and a discriminator for a data shape.

    ``build`` returns ``(G, D)`` as ``nn.Module``s:
      ``G(z, code)``: z ``(B, z_dim)``, code ``(B, spec.g_dim)`` or None -> ``(B, *data_shape)``
      ``D(x, code)``: x ``(B, *data_shape)``, code ``(B, spec.d_dim)`` or None ->
        ``(logits (B, spec.d_heads), features (B, F))``; features are the
        penultimate activations (used by detectors and partitioners).
    Options should include ``z_dim``. ``output_range``: the interval G's outputs cannot leave
    (``(-1.0, 1.0)`` for a tanh output), or None when unbounded; the loop warns when the training
    data lie outside it.
    """

    kind: ClassVar[str] = "model"
    output_range: ClassVar[tuple[float, float] | None] = None

    @property
    def z_dim(self) -> int:
        return int(self.opts["z_dim"])

    def build(self, data_shape: tuple[int, ...], spec: ConditioningSpec) -> tuple["nn.Module", "nn.Module"]:
        raise NotImplementedError


#: where the training loop takes fake samples' conditions from (``Conditioner.fake_conditions``)
FAKE_CONDITIONS = ("prior", "prior-fresh", "real")


class Conditioner(Component):
    """How a condition id reaches the networks.

    ``spec()`` sizes the networks; ``generator_code()`` / ``discriminator_code()``
    return modules mapping condition ids ``(B,)`` (long) to codes ``(B, dim)``
    (or None); their parameters train with G and D respectively. Capacity is
    fixed so that adding conditions never resizes a network or an optimiser.
    ``fake_conditions``: ``"prior"`` draws fake conditions from the partition
    prior for each D step and the G step reuses the last draw, ``"prior-fresh"``
    draws them for the G step too, ``"real"`` reuses the real batch's labels.
    """

    kind: ClassVar[str] = "conditioner"

    def spec(self) -> ConditioningSpec:
        raise NotImplementedError

    def generator_code(self) -> "nn.Module | None":
        return None

    def discriminator_code(self) -> "nn.Module | None":
        return None

    @property
    def fake_conditions(self) -> str:
        return str(self.opts.get("fake_conditions", "prior"))


# --------------------------------------------------------------------------- losses


@dataclass
class DStepContext:
    """What a loss sees in a discriminator step.

    real / fake: the batches (fake is detached from G); real has
      ``requires_grad`` when the loss's ``wants_real_grad`` is true.
    real_logits / fake_logits: D's logits ``(B,)`` under each sample's condition.
    real_cond / fake_cond: condition ids ``(B,)``.
    discriminator: ``discriminator(x, cond) -> logits (B,)``, for penalties on
      other points (e.g. WGAN-GP interpolates).
    report: ``report(name, tensor)`` logs a scalar (gathered every few steps).
    """

    real: "Tensor"
    fake: "Tensor"
    real_logits: "Tensor"
    fake_logits: "Tensor"
    real_cond: "Tensor"
    fake_cond: "Tensor"
    discriminator: Callable[["Tensor", "Tensor"], "Tensor"]
    report: ReportFn
    generator: "torch.Generator | None" = None


@dataclass
class GStepContext:
    """What a loss sees in a generator step.

    fake_logits carry gradients to G. real_logits is given (detached) only when
    the loss sets ``needs_real_in_g_step``; otherwise None.
    """

    fake: "Tensor"
    fake_logits: "Tensor"
    fake_cond: "Tensor"
    real_logits: "Tensor | None"
    report: ReportFn


class Loss(Component):
    """A GAN objective on logits. Both methods return a scalar to minimise.

    Class or instance attributes the loop reads:
      d_steps: discriminator steps per generator step (WGAN-GP: 5).
      wants_real_grad: the real batch needs ``requires_grad`` (R1).
      differentiates_d: the D loss takes gradients through D and then backpropagates
        through them (R1, a gradient penalty); ``--compile`` then leaves D uncompiled,
        since torch.compile cannot differentiate a compiled module twice. Defaults to
        ``wants_real_grad``.
      needs_real_in_g_step: G's loss needs D's logits on a real batch (RaGAN).
      optimizer_defaults(): recommended ``{"lr_g", "lr_d", "betas"}``, used
        when the user sets none.
    Losses must stay finite for logits of +-100 and for a batch of one.
    """

    kind: ClassVar[str] = "loss"
    needs_real_in_g_step: ClassVar[bool] = False

    @property
    def d_steps(self) -> int:
        return 1

    @property
    def wants_real_grad(self) -> bool:
        return False

    @property
    def differentiates_d(self) -> bool:
        return bool(self.wants_real_grad)

    def optimizer_defaults(self) -> dict[str, Any]:
        return {}

    def d_loss(self, ctx: DStepContext) -> "Tensor":
        raise NotImplementedError

    def g_loss(self, ctx: GStepContext) -> "Tensor":
        raise NotImplementedError


# --------------------------------------------------------------------------- training-time context


class Comm:
    """Collective helpers; the single-process version does nothing.

    Under torchrun the loop passes a distributed implementation: detectors
    shard their work with ``shard(n)`` and gather with ``all_gather``; a
    decision made on rank 0 reaches every rank with ``broadcast``.
    """

    rank: int = 0
    world_size: int = 1

    def shard(self, n: int) -> tuple[int, int]:
        """The half-open index range ``[start, stop)`` of ``n`` items this rank handles."""
        per = -(-n // self.world_size)
        start = min(n, self.rank * per)
        return start, min(n, start + per)

    def all_gather(self, t: "Tensor") -> "Tensor":
        """Concatenate along dim 0 the tensors of all ranks, in rank order (shapes may differ in dim 0)."""
        return t

    def broadcast(self, t: "Tensor", src: int = 0) -> "Tensor":
        """Rank ``src``'s tensor on every rank (same shape and dtype everywhere)."""
        return t

    def all_reduce_mean(self, t: "Tensor") -> "Tensor":
        return t


@dataclass
class TrainContext:
    """What detectors and partitioners see when the loop calls them.

    data: the whole training set ``(N, *shape)`` on ``device``.
    labels: every sample's partition ``(N,)`` long, on ``device``.
    prior: probability of each condition slot ``(capacity,)``.
    generator(z, cond) / discriminator(x, cond, features=True) -> (logits, features):
      the current networks (call them under ``torch.no_grad()``; switch nothing).
    rng: a ``torch.Generator`` on ``device`` for the component's randomness.
    """

    step: int
    device: "torch.device"
    data: "Tensor"
    labels: "Tensor"
    prior: "Tensor"
    capacity: int
    z_dim: int
    generator: Callable[..., "Tensor"]
    discriminator: Callable[..., Any]
    rng: "torch.Generator"
    report: ReportFn
    comm: Comm = field(default_factory=Comm)
    batch_size: int = 1024


# --------------------------------------------------------------------------- detection and partitions


@dataclass
class Detection:
    """A detector's verdict over the whole training set.

    collapsed: bool ``(N,)``, the real samples the generator misses.
    fraction: 0-d float tensor, ``collapsed.mean()``.
    score: optional ``(N,)`` per-sample score (higher = more missed).
    features: optional ``(N, F)`` features for a partitioner.
    """

    collapsed: "Tensor"
    fraction: "Tensor"
    score: "Tensor | None" = None
    features: "Tensor | None" = None


def _described(value: Any) -> str:
    """``torch.float32(256,)`` for a tensor, else the type's name."""
    import torch

    return f"{value.dtype}{tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def detection_problems(det: Any, n: int) -> list[str]:
    """What is wrong with ``det`` as a ``Detection`` over ``n`` training samples (empty: nothing):
    its type; ``collapsed`` bool ``(n,)``; ``fraction`` a 0-d float tensor in [0, 1] (read: one
    host sync); ``score`` None or float ``(n,)``; ``features`` None or float ``(n, F)``. The
    training loop checks every detection with it; ``core.testing.check_detector`` adds value checks."""
    import torch

    if not isinstance(det, Detection):
        return [f"detect() returned {type(det).__name__}, not a core.components.Detection"]
    problems = []
    c = det.collapsed
    if not isinstance(c, torch.Tensor) or c.dtype != torch.bool or c.shape != (n,):
        problems.append(f"collapsed is {_described(c)}, expected torch.bool ({n},)")
    f = det.fraction
    if not isinstance(f, torch.Tensor) or f.dim() != 0 or not f.is_floating_point():
        problems.append(f"fraction is {_described(f)}, expected a 0-d float tensor")
    elif not (0.0 <= float(f) <= 1.0):  # NaN too
        problems.append(f"fraction is {float(f)}, not in [0, 1]")
    for name, rank in (("score", 1), ("features", 2)):
        t = getattr(det, name)
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != rank
                              or t.shape[0] != n):
            problems.append(f"{name} is {_described(t)}, expected None or a float tensor "
                            f"({n}{', F' if rank == 2 else ''})")
    return problems


class CollapseDetector(Component):
    """Finds the real samples the generator does not produce.

    ``setup(ctx)`` once before training (and again after a resume, after
    ``load_state_dict``); ``detect(ctx)`` every ``self.every`` steps (option
    ``every``). Batched on ``ctx.device``; no Python loop over samples.
    """

    kind: ClassVar[str] = "detector"

    @property
    def every(self) -> int:
        return int(self.opts["every"])

    def setup(self, ctx: TrainContext) -> None:
        pass

    def detect(self, ctx: TrainContext) -> Detection:
        raise NotImplementedError


@dataclass
class PartitionUpdate:
    """New labels for every training sample (values < capacity), and optionally a prior.

    With ``prior`` None, the loop sets prior[c] = |P_c| / N.
    """

    labels: "Tensor"
    prior: "Tensor | None" = None


class Partitioner(Component):
    """Splits the training set into conditions.

    ``partition(ctx, detection)`` is called every ``self.every`` steps (not on
    the run's final step, which no training would follow) with the latest
    detection: None when no detector runs, before its first detection, and after
    a partition that changed the labels until the detector runs again (that
    detection judged the samples under their former labels); it returns a ``PartitionUpdate`` or
    None to leave the partition as it is, and may then set ``skip_reason`` to say
    why (logged with the check and shown when it changes).
    """

    kind: ClassVar[str] = "partitioner"
    skip_reason: str | None = None

    @property
    def every(self) -> int:
        return int(self.opts["every"])

    def setup(self, ctx: TrainContext) -> None:
        pass

    def partition(self, ctx: TrainContext, detection: Detection | None) -> PartitionUpdate | None:
        raise NotImplementedError


def _count_option_problem(cls: type, base: type, key: str) -> str | None:
    """What keeps ``cls`` from a valid ``key``, where ``base`` reads that property from the option of
    the same name: the option must be a non-nullable integer with a minimum >= 1 and a default that
    meets it. None when it is, or when ``cls`` or one of its bases overrides the property."""
    if next((c for c in cls.__mro__ if key in vars(c)), None) is not base:
        return None  # overridden (a property or a plain value) by the class or one of its bases
    options = getattr(cls, "options", None)
    opt = options.get(key) if isinstance(options, Mapping) else None
    an = f"{'an' if key[0] in 'aeiou' else 'a'} `{key}` option"
    if opt is None:
        return f"has no `{key}` option"
    if not isinstance(opt, Option):
        return f"has {an} that is not an Option but {type(opt).__name__}"
    try:
        value_type: Any = opt.value_type
    except TypeError:
        value_type = None
    if value_type is not int:
        what = getattr(value_type, "__name__", "of no type")
        return f"has {an} that is {'an' if what[0] in 'aeiou' else 'a'} {what}, not an integer"
    low = opt.min
    if low is None:
        return f"has {an} with no minimum"
    if not isinstance(low, (int, float)) or isinstance(low, bool):
        return f"has {an} whose minimum {low!r} is not a number"
    if low < 1:
        return f"has {an} with the minimum {low:g}, below 1"
    if opt.nullable:
        return f"has {an} that is nullable"
    if not isinstance(opt.default, int) or isinstance(opt.default, bool) or opt.default < low:
        return f"has {an} whose default {opt.default!r} is not an integer >= {low:g}"
    return None


def every_problem(cls: type) -> str | None:
    """What keeps a detector or partitioner class from having a valid ``every``, None when nothing does
    (and for every other kind). Its base reads ``every`` from the option of that name, so the class must
    declare an integer ``every`` option with a minimum >= 1, or override the ``every`` property.

    Said by the registry when a plugin registers the class and by the test kit, both ending in how to fix it.
    """
    base = next((b for b in (CollapseDetector, Partitioner) if isinstance(cls, type) and issubclass(cls, b)), None)
    wrong = None if base is None else _count_option_problem(cls, base, "every")
    if wrong is None:
        return None
    method = "detect" if base is CollapseDetector else "partition"
    return (f"{wrong} (the training loop calls {method}() every `every` steps): add "
            f'`"every": Option(500, "{method} every this many steps", min=1)` to its `options`, '
            "or override the `every` property")


def z_dim_problem(cls: type) -> str | None:
    """What keeps a model class from having a valid ``z_dim``, None when nothing does (and for every
    other kind): the base reads it from the option of that name, so the class must declare an integer
    ``z_dim`` option with a minimum >= 1, or override the ``z_dim`` property. Said by the registry and
    the test kit; without it the run failed on a KeyError when it built the networks."""
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        return None
    wrong = _count_option_problem(cls, Model, "z_dim")
    if wrong is None:
        return None
    fix = ('add `"z_dim": Option(64, "size of the latent vector z", min=1)` to its `options`, or '
           "override the `z_dim` property")
    if wrong.startswith("has no "):
        return f"has no `z_dim` option (the size of G's latent input): {fix}"
    return f"has a `z_dim` option that is not a non-nullable integer with a minimum >= 1: {fix}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def schema_problem(cls: type) -> str | None:
    """What is wrong with a component class's ``options`` schema (or a preset's ``settings``), None when
    nothing is: ``options`` must map string keys to ``Option``s whose defaults pass their own checks, and a
    preset's ``settings`` must be a mapping (its ``options``, if any, a mapping of kind -> option values).

    Said by the registry when a plugin registers the class, as for ``every_problem``: otherwise the
    schema breaks with a traceback only when the component is used (``TypeError`` from a comparison,
    ``AttributeError`` on a non-Option).
    """
    options = getattr(cls, "options", None)
    if not isinstance(options, Mapping):
        return (f"has `options` = {_short(options)}, not a mapping of option names to Options: declare "
                '`options = {"name": Option(default, "what it does")}`')
    where = f"{getattr(cls, 'kind', '?')} {getattr(cls, 'name', '?')!r}"
    try:
        items = list(options.items())
    except Exception as e:  # noqa: BLE001 - a plugin's own Mapping may raise anything
        return f"has `options` that cannot be read ({type(e).__name__}: {e})"
    for key, opt in items:
        if not isinstance(key, str):
            return f"has an option key {_short(key)}, which is not a string"
        if not key.isidentifier():  # `-o kind.KEY=VALUE` and `self.opts.KEY` need a plain name
            return f"has an option key {key!r}, which is not a Python identifier (letters, digits, _)"
        if not isinstance(opt, Option):
            return (f"has option {key!r} = {_short(opt)}, which is not an Option (core.components.Option): "
                    f'write `"{key}": Option(default, "what it does")`')
        if opt.type is not None and not isinstance(opt.type, type):
            return f"has option {key!r} with type={_short(opt.type)}, which is not a type (int, float, bool or str)"
        if opt.default is None and opt.type is None:
            return f"has option {key!r} whose default is None and no type: give it `type=` (and `nullable=True`)"
        if opt.value_type not in OPTION_TYPES:  # a tuple or list: -o, TOML and config.json cannot carry it
            return (f"has option {key!r} of type {opt.value_type.__name__} (default {_short(opt.default)}); an "
                    "option holds an int, float, bool or str: split a pair into two options, or take a string "
                    "and parse it in the plugin")
        if (opt.min is not None or opt.max is not None) and opt.value_type not in (int, float):
            return (f"has option {key!r} with a min or max, but its type is {opt.value_type.__name__}, not a number "
                    f"(default {_short(opt.default)})")
        try:
            check_value(where, key, opt.default, opt)
        except OptionError as e:
            why = str(e).removeprefix(f"{where}: ")
            return f"has option {key!r} whose default {_short(opt.default)} fails its own schema ({why})"
        except Exception as e:  # noqa: BLE001 - e.g. min=0.0 for a string default: '<' not supported
            return (f"has option {key!r} whose default {_short(opt.default)} cannot be checked against its own "
                    f"schema ({type(e).__name__}: {e})")
    if isinstance(cls, type) and issubclass(cls, Preset):
        settings = getattr(cls, "settings", None)
        if not isinstance(settings, Mapping):
            return (f"has `settings` = {_short(settings)}, not a mapping of config keys to values "
                    '(e.g. `settings = {"loss": "ns", "options": {"loss": {...}}}`)')
        opts = settings.get("options")
        if opts is not None:
            if not isinstance(opts, Mapping):
                return f"has `settings['options']` = {_short(opts)}, not a mapping of component kinds to options"
            for kind, values in opts.items():
                if not isinstance(values, Mapping):
                    return (f"has `settings['options'][{kind!r}]` = {_short(values)}, not a mapping of "
                            "option names to values")
    return None


# --------------------------------------------------------------------------- metrics and presets


class Metric(Component):
    """Scores generated samples.

    ``supports(dataset)`` says whether the metric applies; ``compute`` returns
    ``{name: float}`` from generated samples ``fake`` ``(M, *shape)``, the
    training set ``real`` and the dataset (for ``info()``). Every key is
    prefixed by the metric's name and ``protocol`` names the protocol.
    """

    kind: ClassVar[str] = "metric"
    protocol: ClassVar[str] = ""

    def supports(self, dataset: Dataset) -> bool:
        return True

    def check(self, n_fake: int, n_real: int) -> None:
        """Optional: raise ``OptionError`` when ``compute`` cannot score ``n_fake`` generated samples
        against ``n_real`` training samples with these options. Called before training (with the
        run's eval_samples) and by ``evaluate`` (with its ``--n``), so that a setting that cannot
        work is refused at once, not at the first evaluation."""

    def compute(self, fake: "Tensor", real: "Tensor", dataset: Dataset) -> dict[str, float]:
        raise NotImplementedError


class Preset(Component):
    """A named bundle of settings for ``dyngan train --preset NAME``.

    ``settings``: config keys (``loss``, ``detector``, ``partitioner``,
    ``conditioner``, ``model``, ``steps``, ``lr_g`` ...) and per-kind options
    under ``options`` (``{"detector": {"delta": 0.2}}``). Flags and ``-o``
    override them.
    """

    kind: ClassVar[str] = "preset"
    settings: ClassVar[Mapping[str, Any]] = {}


KINDS: dict[str, type[Component]] = {
    "loss": Loss,
    "detector": CollapseDetector,
    "partitioner": Partitioner,
    "conditioner": Conditioner,
    "dataset": Dataset,
    "model": Model,
    "metric": Metric,
    "preset": Preset,
}
