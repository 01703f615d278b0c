"""Named components by kind. Unknown and duplicate names are loud errors."""

from __future__ import annotations

import difflib
import re
from typing import Callable, Iterator

from .components import KINDS, Component, every_problem, schema_problem, z_dim_problem
from .errors import DuplicateComponentError, PluginError, UnknownComponentError


#: characters no component name may hold (list, key and metric-key separators)
NAME_FORBIDS = ",.=/"


class Registry:
    """``kind -> name -> class``, and which plugin registered each."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, type[Component]]] = {k: {} for k in KINDS}
        #: said after every unknown-name error (e.g. that DYNGAN_LOAD_PLUGINS matched nothing)
        self.note: str | None = None
        #: asked after an unknown name ``(kind, name)`` for what may explain it (the host: a plugin that
        #: failed to load); returns ``(note, offered)``, ``offered`` when a failed plugin has that very name
        self.explain: Callable[[str, str], tuple[str, bool] | None] | None = None
        # who registered each entry, per registry: ``cls.plugin`` is a class attribute
        # shared by every host in the process, so removal must not rely on it
        self._plugin_of: dict[tuple[str, str], str | None] = {}

    def _table(self, kind: str) -> dict[str, type[Component]]:
        table = self._by_kind.get(kind)
        if table is None:
            raise UnknownComponentError(f"unknown component kind {kind!r} (kinds: {', '.join(KINDS)})")
        return table

    def add(self, kind: str, cls: type, plugin: str | None) -> None:
        self._table(kind)
        base = KINDS[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(
                f"plugin {plugin!r} registered {cls!r} as a {kind}, but it is not a subclass of "
                f"core.components.{base.__name__}"
            )
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not name or name != name.strip() or name.lower() == "none":
            raise PluginError(f"plugin {plugin!r} registered {kind} class {cls.__name__} without a valid `name`")
        bad = sorted({c for c in name if c in NAME_FORBIDS or c.isspace()})
        if bad:  # `--metrics A,B`, `-o metric.NAME.KEY=V` and metric keys `NAME/...` could never select it
            raise PluginError(f"plugin {plugin!r} registered {kind} class {cls.__name__} ({name!r}), whose name "
                              f"holds {' '.join(map(repr, bad))}: a component name is used in --metrics lists, "
                              "-o keys and metric keys, so it may not contain , . = / or spaces")
        # a broken schema (a bad `options` or a preset's `settings`) else dies with a traceback when the
        # component is used; a missing `every` on its first detection or partition, mid-run, on a KeyError
        problem = every_problem(cls) or z_dim_problem(cls) or schema_problem(cls)
        if problem is not None:
            raise PluginError(f"plugin {plugin!r} registered {kind} class {cls.__name__} ({name!r}), which {problem}")
        existing = self._by_kind[kind].get(name)
        # the same class from a second plugin is a duplicate too (a plugin re-registering
        # another's class); only the same plugin registering it again is harmless
        if existing is not None and (existing is not cls or self._plugin_of[(kind, name)] != plugin):
            raise DuplicateComponentError(
                f"{kind} {name!r} is registered twice: by plugin {self._plugin_of[(kind, name)]!r} "
                f"({existing.__module__}.{existing.__qualname__}) and by plugin {plugin!r} "
                f"({cls.__module__}.{cls.__qualname__})"
            )  # parse_duplicate reads this message back
        cls.plugin = plugin
        self._by_kind[kind][name] = cls
        self._plugin_of[(kind, name)] = plugin

    def get(self, kind: str, name: str) -> type[Component]:
        table = self._table(kind)
        found = table.get(name)
        if found is None:
            names = sorted(table)
            explained = self.explain(kind, name) if self.explain is not None else None
            # a failed plugin offers this very name: the name is right, no near one is suggested
            close = [] if explained and explained[1] else difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            avail = ", ".join(names) if names else "none registered"
            note = "".join(f"; {n}" for n in (explained and explained[0], self.note) if n)
            raise UnknownComponentError(f"unknown {kind} {name!r}{hint} (available: {avail}){note}", kind, name)
        return found

    def plugin_of(self, kind: str, name: str) -> str | None:
        """The plugin that registered ``kind`` ``name`` in this registry (None: none did, or no plugin).

        Read from this registry, not from ``cls.plugin``: that class attribute is shared by every host
        in the process and says which one registered the class last."""
        self._table(kind)
        return self._plugin_of.get((kind, name))

    def names(self, kind: str) -> list[str]:
        return sorted(self._table(kind))

    def items(self, kind: str) -> Iterator[tuple[str, type[Component]]]:
        return iter(sorted(self._table(kind).items()))

    def remove_plugin(self, plugin: str) -> None:
        """Forget every component a plugin registered (used when its hook fails midway)."""
        for kind, table in self._by_kind.items():
            for name in [n for n in table if self._plugin_of[(kind, n)] == plugin]:
                del table[name]
                del self._plugin_of[(kind, name)]


_DUPLICATE = re.compile(r"(\w+) '([^']+)' is registered twice: by plugin '([^']+)' \(.*?\) and by plugin '([^']+)' \(")


def parse_duplicate(error: str) -> tuple[str, str, str, str] | None:
    """``(kind, name, first plugin, second plugin)`` of a duplicate-registration message in ``error``, else None.

    ``dyngan install`` reads clashes from a fresh process's plugin listing, where only the text travels.
    """
    m = _DUPLICATE.search(error)
    return (m.group(1), m.group(2), m.group(3), m.group(4)) if m else None
