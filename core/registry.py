"""Named components by kind. Unknown and duplicate names are loud errors."""

from __future__ import annotations

import difflib
from typing import Iterator

from .components import KINDS, Component
from .errors import DuplicateComponentError, PluginError, UnknownComponentError


class Registry:
    """``kind -> name -> class``, and which plugin registered each."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, type[Component]]] = {k: {} for k in KINDS}

    def add(self, kind: str, cls: type, plugin: str | None) -> None:
        base = KINDS[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(
                f"plugin {plugin!r} registered {cls!r} as a {kind}, but it is not a subclass of "
                f"core.components.{base.__name__}"
            )
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not name or name != name.strip() or name.lower() == "none":
            raise PluginError(f"plugin {plugin!r} registered {kind} class {cls.__name__} without a valid `name`")
        existing = self._by_kind[kind].get(name)
        if existing is not None and existing is not cls:
            raise DuplicateComponentError(
                f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} "
                f"({existing.__module__}.{existing.__qualname__}) and by plugin {plugin!r} "
                f"({cls.__module__}.{cls.__qualname__})"
            )
        cls.plugin = plugin
        self._by_kind[kind][name] = cls

    def get(self, kind: str, name: str) -> type[Component]:
        if kind not in self._by_kind:
            raise UnknownComponentError(f"unknown component kind {kind!r} (kinds: {', '.join(KINDS)})")
        found = self._by_kind[kind].get(name)
        if found is None:
            names = sorted(self._by_kind[kind])
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            avail = ", ".join(names) if names else "none registered"
            raise UnknownComponentError(f"unknown {kind} {name!r}{hint} (available: {avail})")
        return found

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def items(self, kind: str) -> Iterator[tuple[str, type[Component]]]:
        return iter(sorted(self._by_kind[kind].items()))

    def remove_plugin(self, plugin: str) -> None:
        """Forget every component a plugin registered (used when its hook fails midway)."""
        for table in self._by_kind.values():
            for name in [n for n, c in table.items() if c.plugin == plugin]:
                del table[name]
