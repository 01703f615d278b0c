"""How much memory the machine has free now: what size checks compare with (no torch import)."""

from __future__ import annotations

import os

#: Linux's memory report (a test points it at a file of its own)
MEMINFO = "/proc/meminfo"


def mem_available() -> int | None:
    """``MemAvailable`` of ``MEMINFO`` in bytes, or None (not Linux, an old kernel, unreadable)."""
    try:
        with open(MEMINFO, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "MemAvailable":
                    number, _, unit = value.strip().partition(" ")
                    return int(number) * (1024 if unit.strip() == "kB" else 1)
    except (OSError, ValueError):
        return None
    return None


def cpu_available() -> int | None:
    """Memory available to a new allocation on this machine: ``MemAvailable``, else the physical RAM,
    else None where neither can be told."""
    available = mem_available()
    if available is not None:
        return available
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None
