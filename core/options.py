"""Option schemas for components.

A component declares ``options = {"delta": Option(0.2, "threshold ...", min=0.0)}``.
``resolve_options`` turns user values (Python values from TOML/JSON, or strings
from ``-o kind.key=value``) into a validated dict, or raises ``OptionError``
naming the component, the option and what was expected.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import OptionError

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Option:
    """One option of a component.

    default: the value used when the user gives none; its type is the option's
      type unless ``type`` is given (``None`` as default needs ``type``).
    help: one line for ``dyngan plugins`` and the docs.
    min, max: inclusive bounds for numbers.
    choices: the allowed values, for strings.
    nullable: whether ``None`` (``none`` on the command line) is allowed.
    """

    default: Any
    help: str = ""
    type: type | None = None
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False

    @property
    def value_type(self) -> type:
        if self.type is not None:
            return self.type
        if self.default is None:
            raise TypeError("an Option whose default is None needs type=")
        return type(self.default)

    def describe(self) -> str:
        """What a valid value looks like, for error messages and docs."""
        t = self.value_type
        text = _TYPE_NAMES.get(t, t.__name__)
        if self.choices is not None:
            text = "one of " + ", ".join(map(str, self.choices))
        if self.min is not None and self.max is not None:
            text += f" in [{self.min}, {self.max}]"
        elif self.min is not None:
            text += f" >= {self.min}"
        elif self.max is not None:
            text += f" <= {self.max}"
        if self.nullable:
            text += " or none"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "default": self.default,
            "type": self.value_type.__name__,
            "help": self.help,
            "min": self.min,
            "max": self.max,
            "choices": list(self.choices) if self.choices is not None else None,
            "nullable": self.nullable,
        }


#: an int option written in float notation (1e5, or a JSON 100000.0) must be an integer a float holds
#: exactly; 1e30 is no count (it would become 1000000000000000019884624838656)
MAX_EXACT_INT = 2**53
#: no int option takes more than a 64-bit integer (torch sizes and seeds): larger is refused, not crashed on
MAX_INT64 = 2**63 - 1


class _Reason(ValueError):
    """A ValueError whose text says why, appended to the option's message."""


def _exact_int(f: float) -> int:
    """``f`` as an int when it is one exactly (1e3, 1000.0); ValueError for 1.5, nan or 1e30
    (shared by option values and the core settings of core.config)."""
    if not math.isfinite(f) or not f.is_integer():
        raise ValueError(f)
    if abs(f) > MAX_EXACT_INT:
        raise _Reason("in float notation an integer must be at most 2**53, so that it is exact")
    return int(f)


def _int_in_range(v: int) -> int:
    if abs(v) > MAX_INT64:
        raise _Reason("it does not fit in a 64-bit integer")
    return v


def _coerce(value: Any, opt: Option) -> Any:
    """Convert ``value`` to the option's type or raise ValueError."""
    t = opt.value_type
    # a NumPy integer or float (from a script's arithmetic): the plain Python number it holds, as the
    # top-level settings take it (np.float64 is a float already; a bool of any kind is no number)
    if not isinstance(value, (bool, int, float, str)) and type(value).__module__ == "numpy":
        if isinstance(value, numbers.Integral):
            value = int(value)
        elif isinstance(value, numbers.Real):
            value = float(value)
    # "none" from the command line means None, except for a string option that is
    # not nullable: there it is the literal word (e.g. choices=("none", "spectral"))
    is_none_word = isinstance(value, str) and value.strip().lower() in ("none", "null")
    if value is None or (is_none_word and (opt.nullable or t is not str)):
        if opt.nullable:
            return None
        raise ValueError
    if isinstance(value, str) and t is not str:
        s = value.strip()
        if t is bool:
            low = s.lower()
            if low in ("true", "yes", "1", "on"):
                return True
            if low in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if t is int:
            try:
                v = int(s)
            except ValueError:  # float notation: 1e5, 1000.0
                return _exact_int(float(s))
            return _int_in_range(v)
        if t is float:
            return float(s)
        return t(s)
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if t is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return _int_in_range(value)
        if isinstance(value, float):
            return _exact_int(value)
        raise ValueError
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        try:
            return float(value)
        except OverflowError:  # an int past float's range
            raise ValueError from None
    if t is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    if not isinstance(value, t):
        raise ValueError
    return value


#: the types an option's value may have (what ``-o``, TOML and config.json carry alike)
OPTION_TYPES = (int, float, bool, str)

#: the TOML types a config file's value of an option of each type may have, and how to say so
_TOML_TYPES: dict[type, tuple[tuple[type, ...], str]] = {
    int: ((int,), "an integer (no quotes, no decimal point)"),
    float: ((int, float), "a number (no quotes)"),
    bool: ((bool,), "true or false (no quotes)"),
    str: ((str,), "a string (in quotes)"),
}


def toml_type_problem(value: Any, opt: Option) -> str | None:
    """What a config file's ``value`` for ``opt`` must be, when TOML typed it otherwise (None: fine).

    TOML types its values, so a quoted number, a float for a count or a string for a boolean is a
    mistake there, whereas ``-o`` gives strings and JSON has one number type (``_coerce`` takes
    those). ``"none"`` stays the spelling of None for a nullable option: TOML has no null.
    """
    t = opt.value_type
    if t not in _TOML_TYPES:
        return None
    if opt.nullable and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    types, want = _TOML_TYPES[t]
    if isinstance(value, types) and (t is bool or not isinstance(value, bool)):
        return None
    return want + (' or "none"' if opt.nullable else "")


def check_value(where: str, key: str, value: Any, opt: Option) -> Any:
    """Validate one option value; ``where`` names the component (e.g. ``detector 'dyngan'``)."""
    try:
        v = _coerce(value, opt)
    except (ValueError, TypeError) as e:
        why = f" ({e})" if isinstance(e, _Reason) else ""
        raise OptionError(
            f"{where}: option {key!r} must be {opt.describe()}, got {value!r}{why}"
        ) from None
    if v is None:
        return v
    if isinstance(v, float) and not math.isfinite(v):
        raise OptionError(f"{where}: option {key!r} must be a finite number, got {value!r}")
    if opt.choices is not None and v not in opt.choices:
        raise OptionError(f"{where}: option {key!r} must be {opt.describe()}, got {value!r}")
    if opt.min is not None and v < opt.min:
        raise OptionError(f"{where}: option {key!r} must be {opt.describe()}, got {value!r}")
    if opt.max is not None and v > opt.max:
        raise OptionError(f"{where}: option {key!r} must be {opt.describe()}, got {value!r}")
    return v


def resolve_options(where: str, schema: Mapping[str, Option], values: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with ``values``, every value checked against ``schema``."""
    unknown = [k for k in values if k not in schema]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(schema), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(schema)) or "none"
        raise OptionError(f"{where}: unknown option {key!r}{hint} (options: {known})")
    out = {k: opt.default for k, opt in schema.items()}
    for k, v in values.items():
        out[k] = check_value(where, k, v, schema[k])
    return out


class OptionValues(Mapping[str, Any]):
    """Read-only resolved options with attribute access: ``self.opts.delta``."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key == "_values":
            # dunder probes (copy, pickle) and the unset slot during unpickling must not
            # recurse into self._values
            raise AttributeError(key)
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __reduce__(self) -> tuple[Any, ...]:
        # copy/deepcopy/pickle rebuild through __init__, since __setattr__ refuses writes
        return (OptionValues, (self._values,))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("options are read-only")

    def __delattr__(self, key: str) -> None:
        raise AttributeError("options are read-only")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"OptionValues({self._values!r})"
