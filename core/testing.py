"""A small test kit for plugin authors (and for dyngan's own tests).

Load your plugin into a throwaway host and check your components against the
contracts of ``core.components``::

    from core.testing import plugin_host, check_options_schema, check_state_roundtrip, check_loss
    import my_plugin

    def test_my_loss():
        with plugin_host(my_plugin, strict=True) as host:
            cls = host.registry.get("loss", "my-loss")
            check_options_schema(cls)
            check_state_roundtrip(cls())
            check_loss(cls)

Inside the ``with`` block the host is the process-wide one (``core.plugins.get_host``),
so the library and the CLI (``click.testing.CliRunner``) see your plugin; on exit the
previous host and the CLI's command list are put back.

The checks raise ``AssertionError`` listing every problem they found, so pytest shows
them all at once. torch is imported only inside the checks that need it.

Conformance checks by kind (each runs the component on the CPU, twice from the same
seed, and fails if the two runs differ):

- ``check_loss(cls, options)``: ``d_loss`` / ``g_loss`` are finite scalars with finite
  gradients for ordinary logits, logits of +-100 and a batch of one;
- ``check_detector(cls, options)``: ``setup`` and ``detect`` on a tiny training context
  (``tiny_train_context``: a 2D mixture and a small conditional MLP G and D) give a
  ``Detection`` of the right shapes and dtypes, leave the networks untouched, and a
  detector restored from its ``state_dict`` detects exactly as the original goes on to;
- ``check_dataset(cls, options)``: ``load`` returns a finite float32 CPU tensor
  ``(N, ...)``, the same one for the same seed, and ``info()`` is JSON.

``check_deterministic(run)`` and ``assert_same(a, b)`` are the building blocks, for
checks of your own.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

from .components import every_problem, schema_problem, z_dim_problem
from .errors import OptionError, PluginError, UsageError
from .options import Option, check_value
from .plugins import PluginHost, load_plugins, set_host

__all__ = [
    "plugin_host",
    "check_options_schema",
    "check_state_roundtrip",
    "check_loss",
    "check_detector",
    "check_dataset",
    "check_metric",
    "check_deterministic",
    "assert_same",
    "tiny_mixture",
    "tiny_networks",
    "tiny_train_context",
    "single_thread",
]


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block, then restore the count.

    Tiny test networks gain nothing from a second intra-op thread, and on a
    busy machine the threads fight each other (several times slower).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _name_and_object(plugin: Any) -> tuple[str, Any]:
    if isinstance(plugin, tuple):
        if len(plugin) != 2 or not isinstance(plugin[0], str):
            raise TypeError(f"a plugin given as a tuple must be (name, object), got {plugin!r}")
        return plugin
    name = getattr(plugin, "__name__", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{plugin!r} has no __name__; pass it as a (name, object) tuple")
    return name, plugin


@contextmanager
def plugin_host(
    *plugins: ModuleType | object | tuple[str, object],
    builtins: bool = True,
    env: Mapping[str, str] | None = None,
    strict: bool = False,
) -> Iterator[PluginHost]:
    """A fresh ``PluginHost`` with ``plugins`` added, installed as the process-wide host.

    plugins: modules, or objects with ``@hookimpl`` functions, named by their
      ``__name__``; or ``(name, object)`` tuples.
    builtins: first load the installed entry points with ``load_plugins(env)``
      (so ``DYNGAN_LOAD_PLUGINS`` / ``DYNGAN_BLOCK_PLUGINS`` apply; ``env``
      defaults to ``os.environ``); False starts from an empty host.
      A plugin that is also installed (so already loaded from its entry point
      under its entry-point name) is not added a second time.
    strict: raise ``PluginError`` if one of ``plugins`` fails to load. By
      default a failure is recorded as ``host.plugins[name].error``, exactly as
      ``load_plugins`` records a broken installed plugin.

    The plugins' ``register_commands`` hooks run when each plugin loads (on a
    stand-in group, as for installed plugins), and the commands they made are
    added to the ``dyngan`` click group. On exit the previous host and the group's commands are restored, and so is
    the ``plugin`` attribute of the component classes (shared by every host).
    """
    from .cli import cli  # click only; no torch

    host = load_plugins(env) if builtins else PluginHost()
    infos = []
    for plugin in plugins:
        name, obj = _name_and_object(plugin)
        if host.pm.is_registered(obj):  # installed as well: already loaded from its entry point
            infos.append(host.plugins[host.pm.get_name(obj)])
            continue
        # no distribution: a module's own __version__, when it has one, is what a run records
        version = getattr(obj, "__version__", None)
        infos.append(host.add_plugin(name, lambda obj=obj: obj, module=getattr(obj, "__name__", ""),
                                     version=version if isinstance(version, str) else None))
    commands_before = dict(cli.commands)
    # the group loads plugin commands lazily, once per host; put back which host it loaded,
    # so that the real host's commands still load after the block
    lazy_loaded_before = cli._commands_host
    previous = set_host(host)
    try:
        cli._load_plugin_commands()
        broken = [f"{i.name}: {i.error}" for i in infos if i.error is not None]
        if strict and broken:
            raise PluginError("plugin failed to load: " + "; ".join(broken))
        yield host
    finally:
        set_host(previous)
        if previous is not None:
            _restore_plugin_names(host, previous)
        cli.commands.clear()
        cli.commands.update(commands_before)
        cli._commands_host = lazy_loaded_before


def _restore_plugin_names(used: PluginHost, restored: PluginHost) -> None:
    """``cls.plugin`` is a class attribute, set by whichever host registered the class last: give
    the classes the throwaway host registered back the plugin name the restored host knows them by
    (a run's config.json records plugins by that name)."""
    from .components import KINDS

    for kind in KINDS:
        for name, cls in used.registry.items(kind):
            try:
                again = restored.registry.get(kind, name)
            except UsageError:
                continue
            if again is cls:
                cls.plugin = restored.registry._plugin_of.get((kind, name), cls.plugin)


# --------------------------------------------------------------------------- conformance checks


def check_options_schema(cls: type) -> None:
    """Check a component class's ``options`` schema.

    Every option is an ``Option`` under a string key that is a Python
    identifier (``self.opts.key``), has a help text, a resolvable type and a
    default that its own schema accepts; ``cls.resolve_options({})`` returns
    exactly the defaults. A detector or partitioner declares an integer ``every``
    option with a minimum >= 1 or overrides the ``every`` property (what registering
    it requires); nothing else registering would refuse (``schema_problem``), such as a
    min or max on an option that is not a number.
    """
    where = f"{getattr(cls, 'kind', '?')} {getattr(cls, 'name', cls.__name__)!r}"
    problems: list[str] = []
    options = getattr(cls, "options", None)
    if not isinstance(options, Mapping):
        raise AssertionError(f"{where}: `options` must be a mapping of name -> Option, got {options!r}")
    for key, opt in options.items():
        if not isinstance(key, str) or not key.isidentifier():
            problems.append(f"option key {key!r} is not a Python identifier")
        if not isinstance(opt, Option):
            problems.append(f"option {key!r} is {type(opt).__name__}, not core.options.Option")
            continue
        if not isinstance(opt.help, str) or not opt.help.strip():
            problems.append(f"option {key!r} has no help text")
        try:
            opt.value_type
        except TypeError as e:
            problems.append(f"option {key!r}: {e}")
            continue
        if (opt.min is not None or opt.max is not None) and opt.value_type not in (int, float):
            problems.append(f"option {key!r} has a min or max, but its type is {opt.value_type.__name__}, "
                            "not a number")
            continue
        try:
            check_value(where, key, opt.default, opt)
        except OptionError as e:
            problems.append(f"option {key!r}: its default is invalid under its own schema ({e})")
        except Exception as e:  # noqa: BLE001 - a schema the option checks cannot apply
            problems.append(f"option {key!r}: its default cannot be checked against its own schema "
                            f"({type(e).__name__}: {e})")
        if opt.choices is not None and not opt.choices:
            problems.append(f"option {key!r} has an empty tuple of choices")
        if opt.min is not None and opt.max is not None and opt.min > opt.max:
            problems.append(f"option {key!r} has min {opt.min} > max {opt.max}")
    if not problems:  # anything else registering the class would refuse
        refused = schema_problem(cls)
        if refused is not None:
            problems.append(f"registering the class would be refused: it {refused}")
    if not problems:
        try:
            resolved = cls.resolve_options({})
        except Exception as e:  # noqa: BLE001 - report whatever it raised
            problems.append(f"resolve_options({{}}) raised {type(e).__name__}: {e}")
        else:
            defaults = {k: o.default for k, o in options.items()}
            if resolved != defaults:
                problems.append(f"resolve_options({{}}) returned {resolved!r}, not the defaults {defaults!r}")
    for wrong in (every_problem(cls), z_dim_problem(cls)):  # registering the class would be refused
        if wrong is not None:
            problems.append(f"the class {wrong}")
    if problems:
        raise AssertionError(f"{where}: " + "; ".join(problems))


def check_state_roundtrip(component: Any) -> None:
    """Check ``state_dict()`` / ``load_state_dict()`` through a checkpoint-like round trip.

    ``state_dict()`` must map str keys to tensors or JSON-serialisable values.
    The state then goes the way a checkpoint takes it (tensors through
    safetensors to the CPU, the rest through JSON) into ``load_state_dict``,
    and a second ``state_dict()`` must hold equal keys, dtypes, shapes and values.
    """
    where = type(component).__name__
    stage = ["state_dict()"]
    _guarded(lambda: _roundtrip(component, where, stage), stage, where, [])()


def _roundtrip(component: Any, where: str, stage: list[str]) -> None:
    """``check_state_roundtrip``'s checks; ``stage[0]`` names the component's method being called."""
    import torch
    from safetensors.torch import load as st_load, save as st_save

    state = component.state_dict()
    if not isinstance(state, Mapping):
        raise AssertionError(f"{where}.state_dict() returned {type(state).__name__}, not a mapping")
    problems: list[str] = []
    tensors: dict[str, Any] = {}
    js: dict[str, Any] = {}
    for k, v in state.items():
        if not isinstance(k, str):
            problems.append(f"key {k!r} is not a str")
        elif isinstance(v, torch.Tensor):
            tensors[k] = v.detach().to("cpu").contiguous().clone()
        else:
            try:
                js[k] = json.loads(json.dumps(v))
            except (TypeError, ValueError) as e:
                problems.append(f"value of {k!r} is neither a tensor nor JSON-serialisable ({type(v).__name__}: {e})")
    if problems:
        raise AssertionError(f"{where}.state_dict(): " + "; ".join(problems))

    restored = dict(js)
    if tensors:
        restored.update(st_load(st_save(tensors)))
    stage[0] = "load_state_dict()"
    component.load_state_dict(restored)
    stage[0] = "state_dict() after load_state_dict()"
    again = component.state_dict()
    if not isinstance(again, Mapping) or set(again) != set(state):
        got = sorted(again) if isinstance(again, Mapping) else again
        raise AssertionError(f"{where}: keys after load_state_dict are {got!r}, before {sorted(state)!r}")
    for k, before in state.items():
        after = again[k]
        if k in tensors:
            if not isinstance(after, torch.Tensor):
                problems.append(f"{k!r} was a tensor and came back as {type(after).__name__}")
                continue
            b, a = tensors[k], after.detach().to("cpu")
            if a.dtype != b.dtype or a.shape != b.shape:
                problems.append(f"{k!r} changed from {b.dtype}{tuple(b.shape)} to {a.dtype}{tuple(a.shape)}")
            elif not (torch.equal(a, b) or (b.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))):
                problems.append(f"{k!r} has different values after the round trip")
        else:
            try:  # compare as JSON text: NaN equals NaN there, and 1 differs from 1.0
                same = json.dumps(after, sort_keys=True) == json.dumps(js[k], sort_keys=True)
            except (TypeError, ValueError):
                same = False
            if not same:
                problems.append(f"{k!r} was {js[k]!r} and came back as {after!r}")
    if problems:
        raise AssertionError(f"{where} state round trip: " + "; ".join(problems))


def _through_checkpoint(state: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``state`` the way a checkpoint gives it back: tensors through safetensors (CPU), the rest through JSON."""
    import torch
    from safetensors.torch import load as st_load, save as st_save

    tensors: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise AssertionError(f"{where}.state_dict(): key {k!r} is not a str")
        if isinstance(v, torch.Tensor):
            tensors[k] = v.detach().to("cpu").contiguous().clone()
        else:
            try:
                out[k] = json.loads(json.dumps(v))
            except (TypeError, ValueError) as e:
                raise AssertionError(f"{where}.state_dict(): value of {k!r} is neither a tensor nor JSON ({e})") from None
    if tensors:
        out.update(st_load(st_save(tensors)))
    return out


# --------------------------------------------------------------------------- determinism


def assert_same(a: Any, b: Any, where: str = "result") -> None:
    """Raise ``AssertionError`` unless ``a`` and ``b`` are identical.

    Tensors must agree in dtype, shape and every value (NaN where NaN); dataclasses
    field by field (and be of one type); mappings key by key; lists and tuples item by
    item; floats exactly (NaN equals NaN); anything else by ``==``.
    """
    problems: list[str] = []
    _compare(a, b, where, problems)
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise AssertionError("; ".join(problems[:10]) + more)


def _compare(a: Any, b: Any, where: str, problems: list[str]) -> None:
    import dataclasses
    import math
    import sys

    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    if torch is not None and isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            problems.append(f"{where}: a tensor, then {type(b).__name__}")
            return
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{where}: {a.dtype}{tuple(a.shape)}, then {b.dtype}{tuple(b.shape)}")
            return
        x, y = a.detach().cpu(), b.detach().cpu()
        if x.is_floating_point() or x.is_complex():
            same = bool(((x == y) | (x.isnan() & y.isnan())).all())
        else:
            same = torch.equal(x, y)
        if not same:
            diff = (x != y) & ~((x.isnan() & y.isnan()) if x.is_floating_point() else torch.zeros_like(x, dtype=torch.bool))
            problems.append(f"{where}: {int(diff.sum())} of {x.numel()} values differ")
        return
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        if type(a) is not type(b):
            problems.append(f"{where}: {type(a).__name__}, then {type(b).__name__}")
            return
        for f in dataclasses.fields(a):
            _compare(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}", problems)
        return
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) != set(b):
            got = sorted(map(str, b)) if isinstance(b, Mapping) else type(b).__name__
            problems.append(f"{where}: keys {sorted(map(str, a))}, then {got}")
            return
        for k in a:
            _compare(a[k], b[k], f"{where}[{k!r}]", problems)
        return
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            problems.append(f"{where}: {type(a).__name__} of {len(a)}, then {b!r:.80}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{where}[{i}]", problems)
        return
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    try:
        same = bool(a == b)
    except Exception:  # noqa: BLE001 - an object whose == cannot answer
        same = a is b
    if not same:
        problems.append(f"{where}: {a!r:.80}, then {b!r:.80}")


def check_deterministic(run: Callable[[], Any], *, runs: int = 2, what: str = "run") -> Any:
    """Call ``run()`` ``runs`` times; every result must equal the first (``assert_same``).

    ``run`` should build everything it needs from a fixed seed (a fresh component, a
    fresh ``torch.Generator``). Returns the first result.
    """
    first = run()
    for i in range(1, runs):
        try:
            assert_same(first, run(), what)
        except AssertionError as e:
            raise AssertionError(f"not deterministic under a fixed seed (call {i + 1} differs from call 1): {e}") from None
    return first


# --------------------------------------------------------------------------- a tiny training context


#: the four modes of ``tiny_mixture``
_TINY_CENTRES = [[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]]


def tiny_mixture(n: int = 256, *, seed: int = 0, sigma: float = 0.05) -> "Any":
    """``(n, 2)`` float32: four Gaussians at (+-1, +-1), sample i in mode i % 4."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor(_TINY_CENTRES)
    modes = torch.arange(n) % 4
    return (centres[modes] + sigma * torch.randn(n, 2, generator=g)).float()


def tiny_networks(
    data_shape: tuple[int, ...] = (2,), *, z_dim: int = 8, capacity: int = 2, hidden: int = 32, seed: int = 0
) -> tuple[Any, Any]:
    """A small conditional MLP pair with the calling convention of ``TrainContext``.

    ``G(z, cond) -> (B, *data_shape)``; ``D(x, cond) -> logits (B,)`` and
    ``D(x, cond, features=True) -> (logits (B,), features (B, hidden))``; conditions
    reach both networks as one-hot codes of width ``capacity``, and D has one head per
    condition. Initialised from ``seed`` without touching torch's global random state.
    """
    import math

    import torch
    from torch import nn

    width = math.prod(data_shape)

    class TinyGenerator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(z_dim + capacity, hidden), nn.ReLU(), nn.Linear(hidden, width))

        def forward(self, z: "torch.Tensor", cond: "torch.Tensor") -> "torch.Tensor":
            code = nn.functional.one_hot(cond.long(), capacity).to(z.dtype)
            return self.net(torch.cat([z, code], 1)).view(z.shape[0], *data_shape)

    class TinyDiscriminator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(width + capacity, hidden), nn.LeakyReLU(0.2))
            self.head = nn.Linear(hidden, capacity)

        def forward(self, x: "torch.Tensor", cond: "torch.Tensor", features: bool = False) -> Any:
            code = nn.functional.one_hot(cond.long(), capacity).to(x.dtype)
            f = self.body(torch.cat([x.flatten(1), code], 1))
            logits = self.head(f).gather(1, cond.long().view(-1, 1)).view(-1)  # each sample's own head
            return (logits, f) if features else logits

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyGenerator(), TinyDiscriminator()


def tiny_train_context(
    data: "Any" = None,
    *,
    seed: int = 0,
    capacity: int = 2,
    z_dim: int = 8,
    networks: tuple[Any, Any] | None = None,
    step: int = 0,
    batch_size: int = 64,
    report: Callable[[str, Any], None] | None = None,
) -> Any:
    """A ``TrainContext`` on the CPU for testing detectors and partitioners.

    data: the training set (default ``tiny_mixture()``); sample i has label
    ``i % capacity`` and the prior is the label frequencies. networks: ``(G, D)``
    with the calling convention of ``tiny_networks`` (default: ``tiny_networks``
    for the data's shape, ``z_dim`` and ``capacity``, seeded with ``seed``).
    ``rng`` is seeded with ``seed + 1``; ``report`` defaults to one that drops values.
    """
    import torch

    from .components import Comm, TrainContext

    data = tiny_mixture(seed=seed) if data is None else data
    data = data.detach().to("cpu").float()
    n = int(data.shape[0])
    labels = torch.arange(n) % capacity
    prior = torch.bincount(labels, minlength=capacity).float() / n
    if networks is None:
        networks = tiny_networks(tuple(data.shape[1:]), z_dim=z_dim, capacity=capacity, seed=seed)
    G, D = networks
    return TrainContext(
        step=step,
        device=torch.device("cpu"),
        data=data,
        labels=labels,
        prior=prior,
        capacity=capacity,
        z_dim=z_dim,
        generator=G,
        discriminator=D,
        rng=torch.Generator().manual_seed(seed + 1),
        report=report if report is not None else (lambda name, value: None),
        comm=Comm(),
        batch_size=batch_size,
    )


def _check_reports(reports: list[tuple[Any, Any]], where: str, problems: list[str]) -> None:
    import torch

    for name, value in reports:
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: reported a value under the name {name!r}")
        elif isinstance(value, torch.Tensor):
            if value.numel() != 1:
                problems.append(f"{where}: report {name!r} is a tensor of shape {tuple(value.shape)}, not a scalar")
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            problems.append(f"{where}: report {name!r} is {type(value).__name__}, not a tensor or a number")


def _run_twice(run: Callable[[], Any], where: str, problems: list[str], what: str) -> Any:
    """``run()``'s result, after a second ``run()`` gave the same (else a problem); fails on problems."""
    first = run()
    _fail(where, problems)
    try:
        assert_same(first, run(), what)
    except AssertionError as e:
        problems.append(f"not deterministic under a fixed seed (two runs differ): {e}")
    _fail(where, problems)
    return first


def _fail(where: str, problems: list[str]) -> None:
    if problems:
        raise AssertionError(f"{where}: " + "; ".join(problems))


def _guarded(run: Callable[[], Any], stage: list[str], where: str, problems: list[str]) -> Callable[[], Any]:
    """``run`` that turns an exception of the component's into an AssertionError naming the call
    ``stage[0]`` was at (``run`` keeps it current), as the training loop would name the component."""

    def guarded() -> Any:
        try:
            return run()
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - the component's own error: list it as a problem
            problems.append(f"{stage[0]} raised {type(e).__name__}: {e}")
            _fail(where, problems)
            raise

    return guarded


# --------------------------------------------------------------------------- losses


def check_loss(loss_cls: type, options: Mapping[str, Any] | None = None, *, batch: int = 16, seed: int = 0) -> None:
    """Check a ``Loss`` class on the CPU, from ``loss_cls(**options)``.

    For ordinary logits, logits of +100 and -100 (both sides, and opposite sides)
    and a batch of one: ``d_loss`` and ``g_loss`` return finite 0-d float tensors
    that depend on the logits, with finite gradients (for D's parameters and for
    G's output); ``real_logits`` in the G step is given exactly when
    ``needs_real_in_g_step``, and ``ctx.real`` needs grad exactly when
    ``wants_real_grad`` (as in the training loop). Two runs from the same seed give
    identical losses, gradients and reports. Also checks ``d_steps``,
    ``wants_real_grad`` and ``optimizer_defaults()``.
    """
    import torch

    from .components import DStepContext, GStepContext

    options = dict(options or {})
    where = f"loss {getattr(loss_cls, 'name', loss_cls)!r}"
    problems: list[str] = []
    stage = ["__init__()"]
    loss = _guarded(lambda: loss_cls(**options), stage, where, problems)()
    stage[0] = "optimizer_defaults()"
    defaults = _guarded(loss.optimizer_defaults, stage, where, problems)()
    d_steps = loss.d_steps
    if not isinstance(d_steps, int) or isinstance(d_steps, bool) or d_steps < 1:
        problems.append(f"d_steps is {d_steps!r}, not an int >= 1")
    if not isinstance(loss.wants_real_grad, bool):
        problems.append(f"wants_real_grad is {loss.wants_real_grad!r}, not a bool")
    if not isinstance(loss.needs_real_in_g_step, bool):
        problems.append(f"needs_real_in_g_step is {loss.needs_real_in_g_step!r}, not a bool")
    from .config import optimizer_defaults_problem

    wrong = optimizer_defaults_problem(defaults or {})  # as training reads it: None is no recommendation
    if wrong is not None:  # what training refuses, in the same words
        problems.append(f"optimizer_defaults() {wrong}")
    _fail(where, problems)

    def scalar(value: Any, what: str) -> bool:
        if not isinstance(value, torch.Tensor):
            problems.append(f"{what} returned {type(value).__name__}, not a tensor")
        elif value.dim() != 0 or not value.is_floating_point():
            problems.append(f"{what} returned {value.dtype}{tuple(value.shape)}, not a 0-d float tensor")
        elif not bool(torch.isfinite(value)):
            problems.append(f"{what} is {float(value.detach())}")
        elif not value.requires_grad:
            problems.append(f"{what} does not depend on the logits (no gradient)")
        else:
            return True
        return False

    def run_case(case: str, b: int, shift_real: float, shift_fake: float) -> dict[str, Any]:
        lo = loss_cls(**options)
        g = torch.Generator().manual_seed(seed)
        # a linear D, l(x) = x.w + shift: logits near the shift, with a graph to x and w
        w = (0.5 * torch.randn(2, 1, generator=g)).requires_grad_(True)
        real = torch.randn(b, 2, generator=g)
        fake = torch.randn(b, 2, generator=g)
        fake_g = torch.randn(b, 2, generator=g).requires_grad_(True)  # stands in for G's output
        cond = torch.zeros(b, dtype=torch.long)
        reports: list[tuple[Any, Any]] = []

        def report(name: str, value: Any) -> None:
            reports.append((name, value.detach().clone() if isinstance(value, torch.Tensor) else value))

        def disc(x: "torch.Tensor", c: "torch.Tensor") -> "torch.Tensor":
            return (x.flatten(1) @ w).view(-1) + shift_real

        if lo.wants_real_grad:
            real.requires_grad_(True)
        real_logits = (real @ w).view(-1) + shift_real
        fake_logits = (fake @ w).view(-1) + shift_fake
        out: dict[str, Any] = {}
        ctx = DStepContext(real, fake, real_logits, fake_logits, cond, cond, disc, report,
                           torch.Generator().manual_seed(seed + 1))
        try:
            ld = lo.d_loss(ctx)
        except Exception as e:  # noqa: BLE001 - report which case broke it
            problems.append(f"{case}: d_loss raised {type(e).__name__}: {e}")
        else:
            if scalar(ld, f"{case}: d_loss"):
                (gw,) = torch.autograd.grad(ld, w, allow_unused=True)
                if gw is None:
                    problems.append(f"{case}: d_loss has no gradient for D's parameters")
                elif not bool(torch.isfinite(gw).all()):
                    problems.append(f"{case}: d_loss has a non-finite gradient for D's parameters")
                out.update(d_loss=ld.detach(), d_grad=gw)
        w_frozen = w.detach()  # the G step: D's weights get no gradient
        fake_logits_g = (fake_g @ w_frozen).view(-1) + shift_fake
        real_logits_g = ((real.detach() @ w_frozen).view(-1) + shift_real) if lo.needs_real_in_g_step else None
        try:
            lg = lo.g_loss(GStepContext(fake_g, fake_logits_g, cond, real_logits_g, report))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{case}: g_loss raised {type(e).__name__}: {e}")
        else:
            if scalar(lg, f"{case}: g_loss"):
                (gf,) = torch.autograd.grad(lg, fake_g, allow_unused=True)
                if gf is None:
                    problems.append(f"{case}: g_loss has no gradient for the generated samples")
                elif not bool(torch.isfinite(gf).all()):
                    problems.append(f"{case}: g_loss has a non-finite gradient for the generated samples")
                out.update(g_loss=lg.detach(), g_grad=gf)
        _check_reports(reports, case, problems)
        out["reports"] = reports
        return out

    cases = [
        ("ordinary logits", batch, 0.0, 0.0),
        ("logits of +100", batch, 100.0, 100.0),
        ("logits of -100", batch, -100.0, -100.0),
        ("real logits +100, fake -100", batch, 100.0, -100.0),
        ("real logits -100, fake +100", batch, -100.0, 100.0),
        ("a batch of one", 1, 0.0, 0.0),
    ]
    for case, b, sr, sf in cases:
        before = len(problems)
        first = run_case(case, b, sr, sf)
        if len(problems) == before:
            try:
                assert_same(first, run_case(case, b, sr, sf), case)
            except AssertionError as e:
                problems.append(f"not deterministic under a fixed seed: {e}")
    _fail(where, problems)


# --------------------------------------------------------------------------- detectors


def check_detector(
    detector_cls: type,
    options: Mapping[str, Any] | None = None,
    *,
    data: "Any" = None,
    seed: int = 0,
    detections: int = 2,
    capacity: int = 2,
    z_dim: int = 8,
    networks: tuple[Any, Any] | None = None,
) -> Any:
    """Check a ``CollapseDetector`` class on a tiny CPU training context; returns its first ``Detection``.

    The class must have a valid ``every`` (as ``check_options_schema`` checks) and an
    instance's ``every`` must be an int >= 1. Then it runs as the training loop does
    (``tiny_train_context(data, ...)``): ``setup(ctx)``,
    then ``detections`` calls of ``detect(ctx)`` under ``torch.no_grad()`` at steps
    ``every, 2*every, ...``. Each ``Detection`` must have ``collapsed`` bool ``(N,)``,
    ``fraction`` a 0-d float tensor in [0, 1] that is positive exactly when some
    sample is collapsed, ``score`` None or finite float ``(N,)``, ``features`` None or
    finite float ``(N, F)``, no tensor with a gradient, everything on the CPU; reports
    must be scalars. G and D must be left as they were (weights and train/eval mode).
    Resume: a fresh instance given ``state_dict()`` through a checkpoint round trip,
    then ``setup``, must detect exactly what the original detects next (same ``rng``
    state). Finally the whole sequence runs again from the same seed and must give
    identical results.
    """
    import dataclasses

    import torch

    from .components import Detection, detection_problems

    options = dict(options or {})
    where = f"detector {getattr(detector_cls, 'name', detector_cls)!r}"
    every_wrong = every_problem(detector_cls)
    problems: list[str] = [f"the class {every_wrong}"] if every_wrong is not None else []
    _fail(where, problems)

    def check_detection(det: Any, n: int, label: str) -> None:
        wrong = detection_problems(det, n)  # types, dtypes, shapes, fraction's range: as the loop checks
        problems.extend(f"{label}: {w}" for w in wrong)
        if not isinstance(det, Detection):
            return
        fine = {name for name in ("collapsed", "fraction", "score", "features")
                if not any(w.startswith(name + " ") for w in wrong)}
        c, f = det.collapsed, det.fraction
        if {"collapsed", "fraction"} <= fine and (float(f) > 0) != bool(c.any()):
            problems.append(f"{label}: fraction is {float(f)} but {int(c.sum())} samples are collapsed")
        for name in ("score", "features"):
            t = getattr(det, name)
            if t is not None and name in fine and not bool(torch.isfinite(t).all()):
                problems.append(f"{label}: {name} has NaN or inf")
        for fld in dataclasses.fields(det):
            t = getattr(det, fld.name)
            if isinstance(t, torch.Tensor):
                if t.requires_grad:
                    problems.append(f"{label}: {fld.name} requires grad (compute it under torch.no_grad())")
                if t.device.type != "cpu":
                    problems.append(f"{label}: {fld.name} is on {t.device}, not on ctx.device (cpu)")

    stage = ["__init__()"]  # what run() is calling: named when it raises

    def run() -> dict[str, Any]:
        reports: list[tuple[Any, Any]] = []

        def report(name: str, value: Any) -> None:
            reports.append((name, value.detach().clone() if isinstance(value, torch.Tensor) else value))

        ctx = tiny_train_context(data, seed=seed, capacity=capacity, z_dim=z_dim, networks=networks, report=report)
        nets = (ctx.generator, ctx.discriminator)
        weights = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in nets]
        modes = [[sub.training for sub in m.modules()] for m in nets]
        n = int(ctx.data.shape[0])
        stage[0] = "__init__()"
        det = detector_cls(**options)
        try:
            every = det.every
        except Exception as e:  # noqa: BLE001 - the loop would die on it: report it as a problem
            problems.append(f"reading `every` raised {type(e).__name__}: {e}")
            every = 1
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            problems.append(f"every is {every!r}, not an int >= 1")
            every = 1
        stage[0] = "setup()"
        det.setup(ctx)
        results = []
        for i in range(detections):
            ctx.step = (i + 1) * every
            stage[0] = "detect()"
            with torch.no_grad():
                results.append(det.detect(ctx))
            check_detection(results[-1], n, f"detection {i + 1}")
        # resume: the state as a checkpoint keeps it, into a fresh instance, same rng state
        stage[0] = "state_dict()"
        state = _through_checkpoint(det.state_dict(), type(det).__name__)
        rng_state = ctx.rng.get_state()
        ctx.step += every
        stage[0] = "detect()"
        with torch.no_grad():
            going_on = det.detect(ctx)
        check_detection(going_on, n, f"detection {detections + 1}")
        stage[0] = "load_state_dict()"
        restored = detector_cls(**options)
        restored.load_state_dict(state)
        rng = torch.Generator().manual_seed(0)
        rng.set_state(rng_state)
        ctx2 = dataclasses.replace(ctx, rng=rng)
        stage[0] = "setup() after load_state_dict()"
        restored.setup(ctx2)
        stage[0] = "detect() after resume"
        with torch.no_grad():
            resumed = restored.detect(ctx2)
        check_detection(resumed, n, "detection after resume")
        if not problems:
            try:
                assert_same(going_on, resumed, "detection")
            except AssertionError as e:
                problems.append("a detector restored from its state_dict (then setup) does not detect what the "
                                "original detects next (state missing from state_dict(), or randomness not drawn "
                                f"from ctx.rng?): {e}")
        for m, before, mode in zip(nets, weights, modes):
            after = m.state_dict()
            if any(not torch.equal(before[k], after[k]) for k in before):
                problems.append(f"{type(m).__name__}'s weights changed during setup/detect")
            if [sub.training for sub in m.modules()] != mode:
                problems.append(f"{type(m).__name__}'s train/eval mode was left changed")
        _check_reports(reports, "report", problems)
        return {"detections": results + [going_on, resumed], "reports": reports}

    return _run_twice(_guarded(run, stage, where, problems), where, problems, "run")["detections"][0]


# --------------------------------------------------------------------------- datasets


def check_dataset(dataset_cls: type, options: Mapping[str, Any] | None = None, *, seed: int = 0) -> Any:
    """Check a ``Dataset`` class; returns the loaded tensor.

    ``dataset_cls(**options).load(torch.Generator().manual_seed(seed))`` must return a
    float32 CPU tensor ``(N, ...)`` with N >= 1, every value finite, and the very same
    tensor when called again from the same seed (on a fresh instance). ``info()``
    must be a JSON-serialisable dict (also the same twice); ``default_model`` a name,
    ``default_metrics`` a tuple of names, ``eval_samples`` an int >= 1.
    """
    import torch

    options = dict(options or {})
    where = f"dataset {getattr(dataset_cls, 'name', dataset_cls)!r}"
    problems: list[str] = []
    if not isinstance(getattr(dataset_cls, "default_model", None), str) or not dataset_cls.default_model:
        problems.append(f"default_model is {getattr(dataset_cls, 'default_model', None)!r}, not a model name")
    metrics = getattr(dataset_cls, "default_metrics", None)
    if not isinstance(metrics, tuple) or not all(isinstance(m, str) and m for m in metrics):
        problems.append(f"default_metrics is {metrics!r}, not a tuple of metric names")
    ev = getattr(dataset_cls, "eval_samples", None)
    if not isinstance(ev, int) or isinstance(ev, bool) or ev < 1:
        problems.append(f"eval_samples is {ev!r}, not an int >= 1")

    stage = ["__init__()"]  # what run() is calling: named when it raises

    def run() -> tuple[Any, Any]:
        stage[0] = "__init__()"
        ds = dataset_cls(**options)
        stage[0] = "load()"
        x = ds.load(torch.Generator().manual_seed(seed))
        stage[0] = "info()"
        info = ds.info()
        try:
            info = json.loads(json.dumps(info))
        except (TypeError, ValueError) as e:
            problems.append(f"info() is not JSON-serialisable: {e}")
        return x, info

    run = _guarded(run, stage, where, problems)
    x, info = run()
    if not isinstance(x, torch.Tensor):
        problems.append(f"load() returned {type(x).__name__}, not a tensor")
    else:
        if x.dtype != torch.float32:
            problems.append(f"load() returned dtype {x.dtype}, not torch.float32")
        if x.device.type != "cpu":
            problems.append(f"load() returned a tensor on {x.device}, not on the CPU")
        if x.dim() < 2 or x.shape[0] < 1 or x.numel() == 0:
            problems.append(f"load() returned shape {tuple(x.shape)}, expected (N, ...) with N >= 1")
        elif x.is_floating_point() and not bool(torch.isfinite(x).all()):
            problems.append("load() returned NaN or inf")
        if x.requires_grad:
            problems.append("load() returned a tensor that requires grad")
    if not isinstance(info, dict):
        problems.append(f"info() returned {type(info).__name__}, not a dict")
    _fail(where, problems)
    again = run()
    try:
        assert_same((x, info), again, "(load, info)")
    except AssertionError as e:
        problems.append(f"not deterministic under a fixed seed: {e}")
    _fail(where, problems)
    return x


def check_metric(
    metric_cls: type,
    options: Mapping[str, Any] | None = None,
    *,
    dataset: Any = None,
    fake: Any = None,
    real: Any = None,
) -> dict[str, float]:
    """Check a ``Metric`` class as the training loop scores with it; returns its values.

    ``metric_cls(**options)`` must support ``dataset`` (default: four Gaussians at (+-1, +-1),
    sigma 0.05, whose ``info()`` gives ``centres`` and ``sigma``), accept ``check(len(fake),
    len(real))``, and ``compute(fake, real, dataset)`` under ``no_grad`` must return
    ``{"NAME/...": finite number}``, leave ``fake`` and ``real`` unchanged, and give the same values
    on a fresh instance. ``fake`` and ``real`` default to 512 and 256 samples of that mixture.
    """
    import math

    import torch

    from .components import Dataset
    from .errors import ComponentFailure, DynganError
    from .training import _metric_values

    class _TinyMixture(Dataset):
        name = "tiny-mixture"

        def load(self, generator: Any) -> Any:
            return tiny_mixture(256)

        def info(self) -> dict[str, Any]:
            return {"centres": _TINY_CENTRES, "sigma": 0.05}

    options = dict(options or {})
    where = f"metric {getattr(metric_cls, 'name', metric_cls)!r}"
    dataset = dataset if dataset is not None else _TinyMixture()
    fake = fake if fake is not None else tiny_mixture(512, seed=1)
    real = real if real is not None else tiny_mixture(256, seed=2)
    problems: list[str] = []

    stage = ["__init__()"]  # what run() is calling: named when it raises

    def run() -> dict[str, float]:
        stage[0] = "__init__()"
        m = metric_cls(**options)
        stage[0] = "supports()"
        supported = m.supports(dataset)
        if supported is not True:
            problems.append(f"supports() returned {supported!r} for the dataset given: pass one it supports")
            _fail(where, problems)
        stage[0] = "check()"
        try:
            m.check(int(fake.shape[0]), int(real.shape[0]))
        except DynganError as e:
            problems.append(f"check({fake.shape[0]}, {real.shape[0]}) refused: {e}")
            _fail(where, problems)
        f0, r0 = fake.clone(), real.clone()
        stage[0] = "compute()"
        with torch.no_grad():
            out = m.compute(fake, real, dataset)
        if not (torch.equal(fake, f0) and torch.equal(real, r0)):
            problems.append("compute() changed fake or real in place")
        try:
            vals = _metric_values(m, out, {})
        except ComponentFailure as e:
            problems.append(str(e.error))
            _fail(where, problems)
        problems.extend(f"{k} is {v}, not finite" for k, v in vals.items() if not math.isfinite(v))
        return vals

    return _run_twice(_guarded(run, stage, where, problems), where, problems, "values")
