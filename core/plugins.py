"""The plugin manager: entry-point discovery, allow/deny lists, guarded loading.

Every plugin, built-in or third-party, is a module declared in the entry-point
group ``dyngan``. ``load_plugins`` imports each one on its own, registers it
with pluggy, checks its hook implementations against the specs and runs its
registration hooks, then its ``register_commands`` (on a stand-in of the CLI
group; ``add_commands`` adds what it made to the real one). A plugin that fails
at any of these steps is recorded with its error and skipped, keeping none of its
components or commands; the others load as if it were not there.

Environment switches:
  DYNGAN_LOAD_PLUGINS   comma-separated allow-list of plugin (entry-point) or
                        distribution names; set but empty loads none.
  DYNGAN_BLOCK_PLUGINS  comma-separated deny-list, same names.
A name in either that matches nothing installed is a warning (``host.warnings``),
said by ``dyngan plugins`` and with every unknown-component error.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

import pluggy

from . import hookspecs
from .errors import DuplicateComponentError, DynganError, PluginError
from .registry import Registry

GROUP = "dyngan"


class MalformedEntryPoint(PluginError):
    """An entry point in the group ``dyngan`` whose value is not ``module`` or ``module:attr``."""


#: what importlib.metadata accepts as an entry point's value (it fails on anything else with an
#: AttributeError about ``NoneType`` and ``group``)
_ENTRY_POINT_VALUE = metadata.EntryPoint.pattern


def _entry_point_loader(ep: metadata.EntryPoint, dist: str | None) -> Callable[[], Any]:
    """``ep.load``, checking first that the value is one it can load."""

    def load() -> Any:
        if not isinstance(ep.value, str) or _ENTRY_POINT_VALUE.match(ep.value) is None:
            where = f" of distribution {dist}" if dist else ""
            raise MalformedEntryPoint(
                f"malformed entry point {ep.name} = {ep.value!r} in the group {GROUP!r}{where}: its value must be "
                "a module (`package.module`) or a module and an attribute (`package.module:attr`)")
        return ep.load()

    return load


@dataclass
class PluginInfo:
    """What ``dyngan plugins`` shows for one plugin."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    #: kind -> component name -> option key -> ``Option.to_json()`` (presets: their settings)
    options: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: commands its ``register_commands`` added to the CLI (known once the CLI has asked)
    commands: list[str] = field(default_factory=list)
    error: str | None = None
    #: the Python traceback of the failure, when an exception caused it (``DYNGAN_TRACEBACK=1`` shows it)
    traceback: str | None = None
    #: kind -> every name it tried to register, kept when it fails (an unknown name it offers names it)
    offered: dict[str, list[str]] = field(default_factory=dict)
    #: command name -> the click command its ``register_commands`` made at load time (added to the CLI
    #: by ``PluginHost.add_commands``)
    command_objects: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "hooks": self.hooks,
            "components": self.components,
            "options": self.options,
            "commands": self.commands,
            "error": self.error,
        }


def _describe(cls: type) -> dict[str, Any]:
    """A registered component's option schema as JSON (a preset: its settings).

    For display only: the registry refuses a malformed schema (``components.schema_problem``) before
    this runs; should one get through anyway, it is shown as malformed rather than failing here.
    """
    try:
        if getattr(cls, "kind", None) == "preset":
            return json.loads(json.dumps(dict(cls.settings), default=repr))
        out: dict[str, Any] = {}
        for key, opt in dict(cls.options).items():
            try:
                out[str(key)] = opt.to_json()
            except Exception:  # noqa: BLE001
                out[str(key)] = {"malformed": repr(opt)}
        return json.loads(json.dumps(out, default=repr))
    except Exception as e:  # noqa: BLE001
        return {"malformed": f"{type(e).__name__}: {e}"}


def _split_env(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}


class PluginHost:
    """The loaded plugins and the registry they filled."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("dyngan")
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: dict[str, PluginInfo] = {}
        #: names in DYNGAN_LOAD_PLUGINS / DYNGAN_BLOCK_PLUGINS that match no installed plugin or distribution
        self.unmatched_allowed: list[str] = []
        self.unmatched_blocked: list[str] = []
        #: what is wrong with those switches, one line each (`dyngan plugins` shows them)
        self.warnings: list[str] = []
        #: DYNGAN_LOAD_PLUGINS is set and empty: no installed plugin is loaded, on purpose
        self.load_nothing = False
        #: installed plugins the switches skipped -> why
        self.skipped: dict[str, str] = {}
        #: the same plugins -> (the switch that skipped it, its distribution)
        self.skipped_by: dict[str, tuple[str, str | None]] = {}
        #: name -> click command of the commands no plugin may add a command under; None: the ``dyngan``
        #: group's own (core) commands
        self.reserved_commands: Mapping[str, Any] | None = None
        self.registry.explain = self._explain_unknown

    # ------------------------------------------------------------------ loading

    @property
    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.error is not None]

    @property
    def loaded(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.error is None]

    def add_plugin(
        self,
        name: str,
        load: Callable[[], ModuleType | object],
        *,
        module: str = "",
        distribution: str | None = None,
        version: str | None = None,
    ) -> PluginInfo:
        """Import, register and run the registration hooks of one plugin, guarded."""
        info = PluginInfo(name=name, module=module, distribution=distribution, version=version)
        if name in self.plugins:
            info.error = f"a plugin named {name!r} is already loaded (from {self.plugins[name].module})"
            self.plugins[f"{name} ({module})"] = info
            return info
        self.plugins[name] = info
        try:
            obj = load()
        except MalformedEntryPoint as e:
            info.error = str(e)
            return info
        except BaseException as e:  # noqa: BLE001 - a plugin may raise anything on import
            if isinstance(e, KeyboardInterrupt):
                raise
            info.error = f"failed to import: {type(e).__name__}: {e}"
            info.traceback = traceback.format_exc()
            return info
        if not info.module:
            info.module = getattr(obj, "__name__", repr(obj))
        try:
            self.pm.register(obj, name=name)
        except Exception as e:
            # pluggy up to 1.6 (1.7 rolls back) leaves a plugin that failed validation half-registered
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            info.error = f"invalid plugin: {type(e).__name__}: {e}"
            info.traceback = traceback.format_exc()
            return info
        try:
            unknown = self._unknown_hooks(name)
            if unknown:
                raise PluginError(self._unknown_hooks_message(unknown))
            self.pm.check_pending()  # what the scan above missed (it should miss nothing)
        except (PluginError, pluggy.PluginValidationError) as e:
            self.pm.unregister(name=name)
            info.error = str(e)
            return info
        info.hooks = sorted(hc.name for hc in (self.pm.get_hookcallers(obj) or []))
        unmarked = self._unmarked_hooks(obj, info.hooks)
        if unmarked:
            self.pm.unregister(name=name)
            info.error = (f"{', '.join(unmarked)} {'is' if len(unmarked) == 1 else 'are'} not marked with "
                          "@hookimpl (`from core import hookimpl`), so pluggy would never call "
                          f"{'it' if len(unmarked) == 1 else 'them'}")
            info.hooks = []
            return info
        try:
            self._run_registration(name, info)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            msg = str(e) if isinstance(e, DynganError) else f"{type(e).__name__}: {e}"
            self._discard(info, f"failed while registering: {msg}", traceback.format_exc())
            return info
        # register_commands runs now too, on a stand-in group: a plugin that fails there fails as a whole
        # (none of its components either), whether or not the CLI asks for plugin commands later
        try:
            self._run_register_commands(name, info)
        except _CommandClash as e:
            self._discard(info, f"failed in register_commands: {e}")
        except BaseException as e:  # noqa: BLE001 - a plugin's hook may raise anything
            if isinstance(e, KeyboardInterrupt):
                raise
            self._discard(info, f"failed in register_commands: {type(e).__name__}: {e}", traceback.format_exc())
        return info

    def _discard(self, info: PluginInfo, error: str, tb: str | None = None) -> None:
        """Fail a loaded plugin: it keeps none of its components and commands, and pluggy forgets it."""
        self.registry.remove_plugin(info.name)
        if self.pm.get_plugin(info.name) is not None:
            self.pm.unregister(name=info.name)
        info.error = error
        info.traceback = tb
        info.components = {}
        info.options = {}
        info.commands = []
        info.command_objects = {}

    def _core_commands(self) -> dict[str, Any]:
        """The commands no plugin may replace (``reserved_commands``, by default the ``dyngan`` group's own)."""
        if self.reserved_commands is not None:
            return dict(self.reserved_commands)
        from .cli import cli  # click only; no torch

        own = getattr(cli, "_core_commands", None)  # set once plugin commands were added to the group
        return {n: c for n, c in cli.commands.items() if own is None or n in own}

    def _run_register_commands(self, plugin_name: str, info: PluginInfo) -> None:
        """Run a plugin's ``register_commands`` on a stand-in of the ``dyngan`` group (holding the core
        commands) and keep the commands it adds for ``add_commands``. A command named like a core command
        or one another loaded plugin adds is a ``_CommandClash``."""
        impls = self._impls("register_commands", plugin_name)
        if not impls:
            return
        import click

        core = self._core_commands()
        probe = click.Group(name="dyngan", commands=dict(core))
        for impl in impls:
            impl.function(**{a: probe for a in impl.argnames})
        added = {n: c for n, c in probe.commands.items() if n not in core or c is not core[n]}
        others = {n for p in self.plugins.values() if p is not info and p.error is None for n in p.command_objects}
        taken = sorted(n for n in added if n in core or n in others)
        if taken:
            raise _CommandClash(_already_exists(taken))
        info.command_objects = added
        info.commands = sorted(added)

    def _unmarked_hooks(self, obj: object, marked: list[str]) -> list[str]:
        """Functions of a plugin named like a hook but without the hookimpl marker: silently ignored
        by pluggy, i.e. a forgotten ``@hookimpl``."""
        specs = {h for h, c in vars(self.pm.hook).items() if not h.startswith("_") and c.has_spec()}
        return sorted(h for h in specs - set(marked) if callable(getattr(obj, h, None)))

    def _unknown_hooks(self, plugin_name: str) -> list[str]:
        """The hooks a plugin implements that no spec declares (misspelt), as ``check_pending`` finds them."""
        return sorted(
            hook for hook, caller in vars(self.pm.hook).items()
            if not hook.startswith("_") and not caller.has_spec()
            and any(i.plugin_name == plugin_name and not i.optionalhook for i in caller.get_hookimpls()))

    def _unknown_hooks_message(self, unknown: list[str]) -> str:
        """``unknown hook 'register_loss'; did you mean 'register_losses'?``, or the hooks there are."""
        specs = sorted(h for h, c in vars(self.pm.hook).items() if not h.startswith("_") and c.has_spec())
        close = {h: difflib.get_close_matches(h, specs, n=1) for h in unknown}
        if len(unknown) == 1 and close[unknown[0]]:
            return f"unknown hook {unknown[0]!r}; did you mean {close[unknown[0]][0]!r}?"
        shown = ", ".join(repr(h) + (f" (did you mean {close[h][0]!r}?)" if close[h] else "") for h in unknown)
        return f"unknown hook{'s' if len(unknown) > 1 else ''} {shown}; the hooks are {', '.join(specs)}"

    def _impls(self, hook_name: str, plugin_name: str) -> list[pluggy.HookImpl]:
        caller = getattr(self.pm.hook, hook_name)
        return [impl for impl in caller.get_hookimpls() if impl.plugin_name == plugin_name]

    def _run_registration(self, plugin_name: str, info: PluginInfo) -> None:
        refused: list[DynganError] = []
        for hook_name, kind in hookspecs.REGISTRATION_HOOKS.items():
            for impl in self._impls(hook_name, plugin_name):

                def register(cls: type, _kind: str = kind) -> None:
                    name = getattr(cls, "name", None)
                    if isinstance(name, str):
                        info.offered.setdefault(_kind, []).append(name)
                    try:
                        self.registry.add(_kind, cls, plugin_name)
                    except (DuplicateComponentError, PluginError) as e:
                        # a clash, or a class the registry refuses (a malformed `options` schema, no
                        # `every`...): the plugin fails, but only after it offered every name: asking
                        # for any of them then names it ("plugin 'x' failed to load"), not just this one
                        refused.append(e)
                        return
                    info.components.setdefault(_kind, []).append(cls.name)
                    info.options.setdefault(_kind, {})[cls.name] = _describe(cls)

                impl.function(**{a: register for a in impl.argnames})
        if len(refused) == 1:
            raise refused[0]
        if refused:  # each refused class's problem, so that asking for any of them says what is wrong with it
            raise PluginError("; ".join(dict.fromkeys(str(e) for e in refused)))

    def add_commands(self, cli: Any, protected: Iterable[str] = ()) -> None:
        """Add to the click group ``cli`` the commands every loaded plugin's ``register_commands`` made
        when the plugin loaded (the hook ran then, once, on a stand-in group).

        A plugin whose command would replace one in ``protected`` (the core commands) fails as one
        whose hook failed: none of its commands is added and none of its components stays registered.
        (A clash with the core group's commands or another plugin's already failed it at load time.)
        """
        protected = set(protected)
        for info in list(self.plugins.values()):
            if info.error is not None or not info.command_objects:
                continue
            taken = sorted(n for n in info.command_objects if n in protected)
            if taken:
                self._discard(info, f"failed in register_commands: {_already_exists(taken)}")
                continue
            for name, command in info.command_objects.items():
                cli.add_command(command, name)

    # ------------------------------------------------------------------ queries

    def versions(self, used: Iterable[str] | None = None) -> dict[str, dict[str, str | None]]:
        """``{plugin: {"distribution", "version"}}`` for the loaded plugins (or those in ``used``)."""
        names = set(used) if used is not None else None
        return {
            p.name: {"distribution": p.distribution, "version": p.version}
            for p in self.loaded
            if names is None or p.name in names
        }

    def report(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.plugins.values()]

    @property
    def blocked(self) -> dict[str, str | None]:
        """The plugins DYNGAN_BLOCK_PLUGINS skipped -> their distribution (an unknown name may be theirs)."""
        return {p: dist for p, (switch, dist) in self.skipped_by.items() if switch == BLOCK_SWITCH}

    def _explain_unknown(self, kind: str, name: str) -> tuple[str, bool] | None:
        """The registry's note for an unknown name while some plugin failed to load or is blocked: the
        failed plugin that offers that name (then ``offered`` is True), else every failed plugin, briefly;
        and the plugins DYNGAN_BLOCK_PLUGINS skips, which may offer it (what a plugin registers is only
        known by importing it, which a blocked one must not be)."""
        notes, offered = [], False
        failed = self.failed
        offering = [p for p in failed if name in p.offered.get(kind, ()) or f"{kind} {name!r}" in (p.error or "")]
        if offering:
            why = "; ".join(f"plugin {p.name!r} failed to load ({p.error})" for p in offering)
            notes.append(f"note: {why}; see `dyngan plugins`")
            offered = True
        elif failed:
            names = ", ".join(repr(p.name) for p in failed)
            notes.append(f"note: plugin{'s' if len(failed) > 1 else ''} {names} failed to load; see `dyngan plugins`")
        blocked = self.blocked
        if blocked:
            several = len(blocked) > 1
            names = ", ".join(f"{p!r}" + (f" (distribution {d})" if d else "") for p, d in blocked.items())
            notes.append(f"note: plugin{'s' if several else ''} {names} {'are' if several else 'is'} installed but "
                         f"blocked by DYNGAN_BLOCK_PLUGINS and may provide {kind} {name!r}")
        left_out = sorted(p for p, (switch, _) in self.skipped_by.items() if switch == LOAD_SWITCH)
        if left_out:
            shown = ", ".join(map(repr, left_out[:5])) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
            notes.append(f"note: DYNGAN_LOAD_PLUGINS leaves out the installed plugin{'s' if len(left_out) > 1 else ''} "
                         f"{shown}, which may provide {kind} {name!r} (`dyngan plugins` lists them)")
        return ("; ".join(notes), offered) if notes else None

    def missing_plugins(self, kind: str, name: str, record: Any) -> str | None:
        """Why a saved run's ``kind`` ``name`` is unknown, from its config.json ``plugins`` record
        (``{plugin: {"distribution", "version"}}``): the run's plugins that are not loaded, each with
        its distribution and why (not installed, skipped by a switch, failed). None when all are loaded."""
        if not isinstance(record, Mapping):
            return None
        missing = []
        for plugin, used in record.items():
            info = self.plugins.get(plugin)
            if info is not None and info.error is None:
                continue
            used = used if isinstance(used, Mapping) else {}
            dist, version = used.get("distribution"), used.get("version")
            what = f"plugin {plugin!r}" + (f" (distribution {dist}{f' {version}' if version else ''})" if dist else "")
            if info is not None:
                why = f"which is installed but failed to load ({info.error}; see `dyngan plugins`)"
            elif plugin in self.skipped:
                why = f"which is installed but not loaded: {self.skipped[plugin]}"
            else:
                why = "which is not installed" + (f": install it (`dyngan install {dist}`)" if dist else "")
            missing.append(f"{what}, {why}")
        if not missing:
            return None  # a loaded plugin no longer has the name (another version of it)
        if len(missing) == 1:
            return f"its {kind} {name!r} came from {missing[0]}"
        return f"its {kind} {name!r} came from one of its plugins that are not loaded: {'; '.join(missing)}"

    def substituted(self, kind: str, name: str, record: Any, *, strict: bool = True) -> str | None:
        """Why the ``kind`` ``name`` registered now is not the one a saved run used, from the run's
        config.json ``plugins`` record (``{plugin: {"distribution", "version"}}``, the plugins that
        provided its components); None when it may be the same.

        It is another one when the plugin providing it now is in the record under a different
        distribution (another plugin of the same name), or when that plugin is not in the record
        while one of the record's installed plugins is not loaded (blocked, failed or uninstalled:
        another plugin took the name it provided). Not refused: a plugin of the same distribution as
        one in the record (an entry point renamed, a component moved between the modules of one
        package, built-ins included), plugins that are not installed distributions on both sides
        (``core.testing.plugin_host`` in a notebook, under another name), and with ``strict=False``
        (a metric: it changes what is measured, not the saved state, and a resume may add one from a
        plugin the record does not list) anything but the same-name case. A run with no record
        (older runs) and a component registered outside any plugin are not checked.
        """
        if not isinstance(record, Mapping) or not record:
            return None
        current = self.registry.plugin_of(kind, name)
        if current is None:
            return None
        info = self.plugins.get(current)
        dist_now = info.distribution if info is not None else None
        version_now = info.version if info is not None else None
        now = f"plugin {current!r}" + (f" (distribution {dist_now}{f' {version_now}' if version_now else ''})"
                                       if dist_now else "")

        def dist_of(plugin: str) -> str | None:
            used = record.get(plugin)
            dist = used.get("distribution") if isinstance(used, Mapping) else None
            return dist if isinstance(dist, str) and dist else None

        if current in record:
            dist, version = dist_of(current), (record[current] or {}).get("version") \
                if isinstance(record[current], Mapping) else None
            if dist is not None and isinstance(dist_now, str) and _dist_key(dist) != _dist_key(dist_now):
                return (f"its {kind} {name!r} came from plugin {current!r} of distribution "
                        f"{dist}{f' {version}' if version else ''}, but the plugin {current!r} loaded now is "
                        f"another one, from distribution {dist_now}{f' {version_now}' if version_now else ''}, "
                        f"whose {kind} {name!r} the run was not trained with")
            return None
        if not strict:
            return None
        if isinstance(dist_now, str) and any(
                dist_of(p) is not None and _dist_key(dist_of(p)) == _dist_key(dist_now) for p in record):
            return None  # the same package, another entry point or module
        unloaded = [p for p in record if self.plugins.get(p) is None or self.plugins[p].error is not None]
        if not unloaded or (dist_now is None and all(dist_of(p) is None for p in unloaded)):
            return None
        missing = self.missing_plugins(kind, name, record)
        then = missing or (f"its {kind} {name!r} came from one of its plugins "
                           f"({', '.join(map(repr, record))}), none of which registers it now")
        return (f"{then}; {kind} {name!r} is registered now by {now}, which the run did not use: another "
                f"plugin's {kind} is never put in its place")


class _CommandClash(PluginError):
    """A plugin's ``register_commands`` added a command named like a core one or another plugin's."""


def _already_exists(names: list[str]) -> str:
    return f"command {', '.join(map(repr, names))} already exists; the existing one is kept"


def _dist_key(name: str) -> str:
    """A distribution name normalised (PEP 503), for comparing: ``Dyngan_Ragan`` -> ``dyngan-ragan``."""
    return re.sub(r"[-_.]+", "-", name).lower()


LOAD_SWITCH, BLOCK_SWITCH = "DYNGAN_LOAD_PLUGINS", "DYNGAN_BLOCK_PLUGINS"


def _skipped(name: str, dist: str | None, allow: set[str] | None, block: set[str] | None,
             plugin_names: set[str]) -> tuple[str, str] | None:
    """The switch that skips a plugin and why (None: they do not).

    A listed name means the plugin of that name; otherwise it means every plugin of that distribution.
    (``dyngan`` is both a built-in plugin and the distribution: it names the plugin.)
    """

    def listed(names: set[str]) -> bool:
        if name in names:
            return True
        return dist is not None and dist in names and dist not in plugin_names

    if allow is not None and not listed(allow):
        return LOAD_SWITCH, f"{LOAD_SWITCH} does not name it (add {name!r} to it)"
    if block and listed(block):
        return BLOCK_SWITCH, f"{BLOCK_SWITCH} blocks it (take {(name if name in block else dist)!r} out of it)"
    return None


def _matches_nothing(switch: str, names: list[str], plugin_names: set[str]) -> str:
    """The warning for names in a switch that match no installed plugin or distribution."""
    return (f"{switch} names {', '.join(map(repr, names))}, which {'matches' if len(names) == 1 else 'match'} "
            f"no installed plugin or distribution (installed plugins: {', '.join(sorted(plugin_names)) or 'none'})")


def entry_points() -> list[metadata.EntryPoint]:
    eps = list(metadata.entry_points(group=GROUP))
    # built-ins first, then third-party, each by name: a stable order for messages
    def dist_name(ep: metadata.EntryPoint) -> str:
        return ep.dist.name if ep.dist is not None else ""

    return sorted(eps, key=lambda ep: (dist_name(ep) != "dyngan", ep.name))


def load_plugins(env: Mapping[str, str] | None = None) -> PluginHost:
    """Discover and load every plugin of the entry-point group ``dyngan``."""
    env = os.environ if env is None else env
    allow = _split_env(env.get("DYNGAN_LOAD_PLUGINS"))
    block = _split_env(env.get("DYNGAN_BLOCK_PLUGINS"))
    host = PluginHost()
    seen: set[tuple[str, str]] = set()
    eps = entry_points()
    plugin_names = {ep.name for ep in eps}
    known = plugin_names | {ep.dist.name for ep in eps if ep.dist is not None}
    host.unmatched_allowed = sorted((allow or set()) - known)
    host.unmatched_blocked = sorted((block or set()) - known)
    host.warnings = [_matches_nothing(switch, names, plugin_names) for switch, names in
                     (("DYNGAN_LOAD_PLUGINS", host.unmatched_allowed), ("DYNGAN_BLOCK_PLUGINS", host.unmatched_blocked))
                     if names]
    host.load_nothing = allow == set()
    # said with every unknown-component error: otherwise "unknown dataset 'grid25' (available:
    # none registered)" does not tell that a switch names nothing installed, or loads nothing
    notes = host.warnings + (["DYNGAN_LOAD_PLUGINS is set and empty, so no plugin is loaded"]
                             if host.load_nothing else [])
    host.registry.note = "; ".join(notes) or None
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else None
        if (ep.name, ep.value) in seen:  # the same distribution seen twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        skipped = _skipped(ep.name, dist, allow, block, plugin_names)
        if skipped is not None:
            switch, host.skipped[ep.name] = skipped
            host.skipped_by[ep.name] = (switch, dist)
            continue
        version = ep.dist.version if ep.dist is not None else None
        host.add_plugin(ep.name, _entry_point_loader(ep, dist), module=ep.value, distribution=dist, version=version)
    return host


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    global _HOST
    if _HOST is None:
        _HOST = load_plugins()
    return _HOST


def set_host(host: PluginHost | None) -> PluginHost | None:
    """Replace the process-wide host (tests; ``None`` reloads on next use).

    Returns the host it replaced (``None`` if none was loaded yet), so that a
    caller can put it back without loading one.
    """
    global _HOST
    previous, _HOST = _HOST, host
    return previous


def require_plugin(host: PluginHost, name: str) -> PluginInfo:
    info = host.plugins.get(name)
    if info is None:
        raise PluginError(f"no plugin named {name!r} is loaded")
    return info
