"""The exceptions of dyngan, in layers.

The library raises these; only the CLI turns them into messages and exit codes
(``UsageError`` -> 2, ``RunFailure`` -> 1). A user never sees a traceback for a
mistake of theirs, unless they ask for it with ``DYNGAN_TRACEBACK=1``.
"""

from __future__ import annotations

import os

#: set to 1 to see the Python traceback behind an error message (a plugin author's debugging aid)
TRACEBACK_ENV = "DYNGAN_TRACEBACK"


def traceback_wanted() -> bool:
    """Whether ``DYNGAN_TRACEBACK`` asks for tracebacks (any value but empty, 0, false, no, off)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def format_traceback(error: BaseException) -> str:
    """``error``'s traceback with the exceptions it was raised from, as Python prints them."""
    import traceback

    return "".join(traceback.format_exception(error)).rstrip("\n")


class DynganError(Exception):
    """Base class of every error dyngan raises on purpose."""

    exit_code = 1


class UsageError(DynganError):
    """Bad input: an unknown name, a bad option, a bad file. Exit code 2."""

    exit_code = 2


class UnknownComponentError(UsageError):
    """A component name that no plugin registered."""

    def __init__(self, message: str, kind: str | None = None, name: str | None = None) -> None:
        super().__init__(message)
        #: the kind and name looked up (None when the kind itself is unknown)
        self.kind, self.name = kind, name


class OptionError(UsageError):
    """An option of a component that is unknown, of the wrong type or out of range."""


class DuplicateComponentError(UsageError):
    """Two plugins registered the same name for one kind."""


class PluginError(UsageError):
    """A plugin could not be loaded or misbehaved while registering."""


class DataError(UsageError):
    """Training data that cannot be used (NaN, wrong shape, unreadable, empty)."""


class CheckpointError(UsageError):
    """A checkpoint or run directory that is corrupt, foreign or missing."""


class OutOfMemory(UsageError):
    """The settings ask for more memory than the machine or GPU has (batch size, sample count)."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """``error``'s message on one line (torch and others spread theirs over several, the first often
    ending in a colon), at most ``limit`` characters; its type's name when it has no message."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: Python's MemoryError, CUDA's OutOfMemoryError or
    the CPU allocator's RuntimeError (torch raises no dedicated class for the latter)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    # the CPU allocator's failure, and a size past what the allocator can even express
    return isinstance(error, RuntimeError) and ("can't allocate memory" in str(error)
                                                or "Storage size calculation overflowed" in str(error))


def out_of_memory(error: BaseException, doing: str, hint: str) -> OutOfMemory:
    """An ``OutOfMemory`` for ``error``: what was being done, the allocator's first line, what to change."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if len(first) > 200:
        first = first[:200] + "..."
    return OutOfMemory(f"out of memory {doing} ({first}); {hint}")


class RunFailure(DynganError):
    """A failure while running (divergence, a component raising). Exit code 1."""


def component_label(kind: str, name: str, plugin: str | None) -> str:
    """How a message names a component: ``kind 'name'``, and ``(plugin 'p')`` when a plugin
    registered it."""
    return f"{kind} {name!r}" + (f" (plugin {plugin!r})" if plugin else "")


class ComponentFailure(RunFailure):
    """A component method raised; names the plugin and the component."""

    def __init__(self, kind: str, name: str, plugin: str | None, method: str, error: BaseException):
        self.kind, self.name, self.plugin, self.method, self.error = kind, name, plugin, method, error
        super().__init__(f"{component_label(kind, name, plugin)} raised in {method}(): {type(error).__name__}: {error}")


class DivergenceError(RunFailure):
    """NaN or inf in a loss or in the weights. ``cause``: what diverged, without what follows (a
    rollback says its own); ``record``: the metrics.jsonl fields that name it (a loss's name and value)."""

    def __init__(self, message: str, cause: str | None = None, record: dict | None = None) -> None:
        super().__init__(message)
        self.cause = cause or message
        self.record = dict(record or {})
