"""A small test kit for plugin authors (and for dyngan's own tests).

Load your plugin into a throwaway host and check your components against the
contracts of ``core.components``::

    from core.testing import plugin_host, check_options_schema, check_state_roundtrip
    import my_plugin

    def test_my_loss():
        with plugin_host(my_plugin, strict=True) as host:
            cls = host.registry.get("loss", "my-loss")
            check_options_schema(cls)
            check_state_roundtrip(cls())

Inside the ``with`` block the host is the process-wide one (``core.plugins.get_host``),
so the library and the CLI (``click.testing.CliRunner``) see your plugin; on exit the
previous host and the CLI's command list are put back.

The checks raise ``AssertionError`` listing every problem they found, so pytest shows
them all at once. torch is imported only inside the checks that need it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator, Mapping

from .errors import OptionError, PluginError
from .options import Option, check_value
from .plugins import PluginHost, load_plugins, set_host

__all__ = ["plugin_host", "check_options_schema", "check_state_roundtrip"]


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
    strict: raise ``PluginError`` if one of ``plugins`` fails to load. By
      default a failure is recorded as ``host.plugins[name].error``, exactly as
      ``load_plugins`` records a broken installed plugin.

    The plugins' ``register_commands`` hooks are run on the ``dyngan`` click
    group. On exit the previous host and the group's commands are restored.
    """
    from .cli import cli  # click only; no torch

    host = load_plugins(env) if builtins else PluginHost()
    infos = []
    for plugin in plugins:
        name, obj = _name_and_object(plugin)
        infos.append(host.add_plugin(name, lambda obj=obj: obj, module=getattr(obj, "__name__", "")))
    commands_before = dict(cli.commands)
    # the group loads plugin commands lazily, once; put that flag back too, so that a
    # lookup made inside the block does not stop the real host's commands loading later
    lazy_loaded_before = cli._plugin_commands_loaded
    previous = set_host(host)
    try:
        host.add_commands(cli)
        broken = [f"{i.name}: {i.error}" for i in infos if i.error is not None]
        if strict and broken:
            raise PluginError("plugin failed to load: " + "; ".join(broken))
        yield host
    finally:
        set_host(previous)
        cli.commands.clear()
        cli.commands.update(commands_before)
        cli._plugin_commands_loaded = lazy_loaded_before


# --------------------------------------------------------------------------- conformance checks


def check_options_schema(cls: type) -> None:
    """Check a component class's ``options`` schema.

    Every option is an ``Option`` under a string key that is a Python
    identifier (``self.opts.key``), has a help text, a resolvable type and a
    default that its own schema accepts; ``cls.resolve_options({})`` returns
    exactly the defaults.
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
        try:
            check_value(where, key, opt.default, opt)
        except OptionError as e:
            problems.append(f"option {key!r}: its default is invalid under its own schema ({e})")
        if opt.choices is not None and not opt.choices:
            problems.append(f"option {key!r} has an empty tuple of choices")
        if opt.min is not None and opt.max is not None and opt.min > opt.max:
            problems.append(f"option {key!r} has min {opt.min} > max {opt.max}")
    if not problems:
        try:
            resolved = cls.resolve_options({})
        except Exception as e:  # noqa: BLE001 - report whatever it raised
            problems.append(f"resolve_options({{}}) raised {type(e).__name__}: {e}")
        else:
            defaults = {k: o.default for k, o in options.items()}
            if resolved != defaults:
                problems.append(f"resolve_options({{}}) returned {resolved!r}, not the defaults {defaults!r}")
    if problems:
        raise AssertionError(f"{where}: " + "; ".join(problems))


def check_state_roundtrip(component: Any) -> None:
    """Check ``state_dict()`` / ``load_state_dict()`` through a checkpoint-like round trip.

    ``state_dict()`` must map str keys to tensors or JSON-serialisable values.
    The state then goes the way a checkpoint takes it (tensors through
    safetensors to the CPU, the rest through JSON) into ``load_state_dict``,
    and a second ``state_dict()`` must hold equal keys, dtypes, shapes and values.
    """
    import torch
    from safetensors.torch import load as st_load, save as st_save

    where = type(component).__name__
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
    component.load_state_dict(restored)

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
