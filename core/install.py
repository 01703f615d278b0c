"""Installing and uninstalling plugins: ``dyngan install`` / ``dyngan uninstall``.

Both run pip with the interpreter that runs dyngan (``sys.executable -m pip``), so
a plugin always lands in dyngan's own environment. After an install the plugins
are listed again in a fresh interpreter (``python -m core plugins --json``): the
running process has its entry points and modules cached, a new one sees the
environment as it now is. What the installed distributions registered (or why
their plugin failed to load) is returned for the CLI to show.

Nothing here imports torch.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import RunFailure, UsageError
from .registry import parse_duplicate

#: the distribution that must never be uninstalled through itself (nor its dependencies: ``dyngan
#: uninstall`` removes plugin distributions only)
SELF = "dyngan"
#: how many of pip's last output lines a failure message quotes
TAIL_LINES = 15


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name: ``Dyngan_KNN.detector`` -> ``dyngan-knn-detector``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class InstalledDistribution:
    """One distribution an install put in place, and what its plugins registered."""

    name: str
    version: str | None
    requested: bool
    plugins: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [p for p in self.plugins if p.get("error")]


@dataclass
class Clash:
    """Two plugins registering one name, one of them just installed: the later one fails to load."""

    kind: str
    name: str
    kept: str  # the plugin whose component stands
    kept_distribution: str | None
    failed: str  # the plugin that fails to load because of it
    failed_distribution: str | None
    installed: str  # the installed distribution that brought the clash


@dataclass
class InstallResult:
    distributions: list[InstalledDistribution]
    #: a plugin listing that could not be made (the fresh interpreter failed), else None
    listing_error: str | None = None
    #: the installed plugins' names that clash with another plugin's (theirs or an older one's)
    clashes: list[Clash] = field(default_factory=list)

    @property
    def without_plugin(self) -> list[InstalledDistribution]:
        """The requested distributions that declare no dyngan plugin (no entry point in the group ``dyngan``):
        not what ``dyngan install`` is for. A dependency without one is normal and not listed. Empty when the
        plugins could not be listed (then nothing is known)."""
        if self.listing_error is not None:
            return []
        return [d for d in self.distributions if d.requested and not d.plugins]


@dataclass
class UninstallResult:
    #: (distribution, version, its dyngan plugin names) for each one removed
    removed: list[tuple[str, str, list[str]]]


# ---------------------------------------------------------------------- pip


def pip_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def run_pip(args: Sequence[str], *, echo: Callable[[str], None] | None = None) -> list[str]:
    """Run pip; returns its output lines. ``echo`` sees each line as it comes.

    Raises ``RunFailure`` with pip's last lines when pip fails.
    """
    cmd = pip_command(args)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")
    lines: collections.deque[str] = collections.deque(maxlen=400)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=env)
    except OSError as e:
        raise RunFailure(f"cannot run pip ({' '.join(cmd[:3])}): {e}") from None
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if echo is not None:
                echo(line)
    if proc.returncode != 0:
        raise RunFailure(f"pip {args[0]} failed (exit code {proc.returncode}):\n" + pip_error_tail(lines))
    return list(lines)


def pip_error_tail(lines: Sequence[str], n: int = TAIL_LINES) -> str:
    """pip's last ``n`` non-blank lines, indented: where it says what went wrong."""
    kept = [ln for ln in lines if ln.strip()][-n:]
    return "\n".join("  " + ln for ln in kept) if kept else "  (pip printed nothing)"


# ---------------------------------------------------------------------- what a target names


def _is_local(target: str) -> bool:
    return os.path.exists(target) and (os.sep in target or target.startswith(".") or os.path.isdir(target)
                                       or target.endswith((".whl", ".tar.gz", ".zip")))


def _looks_like_path(target: str) -> bool:
    """Whether pip would take ``target`` for a local path (not a requirement or a URL)."""
    if "://" in target or "@" in target:
        return False
    return (os.sep in target or "/" in target or target.startswith((".", "~"))
            or target.endswith((".whl", ".tar.gz", ".zip")))


def _name_from_pyproject(path: Path) -> str | None:
    file = path / "pyproject.toml"
    if not file.is_file():
        return None
    try:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        with open(file, "rb") as f:
            name = tomllib.load(f).get("project", {}).get("name")
    except (OSError, ValueError):
        return None
    return name if isinstance(name, str) else None


def guess_name(target: str) -> str | None:
    """The distribution a pip target names, when it can be told without pip (else None)."""
    if _is_local(target):
        p = Path(target)
        if p.is_dir():
            return _name_from_pyproject(p)
        if p.name.endswith(".whl"):  # name-version-...whl, with the name's "-" written "_"
            return p.name.split("-", 1)[0]
        return None
    if re.match(r"\s*[A-Za-z][A-Za-z0-9+.-]*://", target):  # a bare URL: only pip can tell
        return None
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", target)
    return m.group(1) if m else None


# ---------------------------------------------------------------------- listing plugins


def list_plugins_fresh(timeout: float = 300) -> list[dict[str, Any]]:
    """``dyngan plugins --json`` in a new interpreter of this environment.

    DYNGAN_LOAD_PLUGINS / DYNGAN_BLOCK_PLUGINS are dropped for it: the point is to see
    what is installed. Raises ``RunFailure`` if that interpreter fails.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("DYNGAN_LOAD_PLUGINS", "DYNGAN_BLOCK_PLUGINS")}
    cmd = [sys.executable, "-m", "core", "plugins", "--json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RunFailure(f"could not list the plugins ({' '.join(cmd[1:])}): {e}") from None
    if out.returncode != 0:
        tail = pip_error_tail((out.stderr or out.stdout).splitlines(), 8)
        raise RunFailure(f"listing the plugins failed (exit code {out.returncode}):\n{tail}")
    try:
        data = json.loads(out.stdout)
    except ValueError:
        raise RunFailure(f"`{' '.join(cmd[1:])}` printed no JSON:\n{pip_error_tail(out.stdout.splitlines(), 8)}") \
            from None
    return data if isinstance(data, list) else []


# ---------------------------------------------------------------------- install


def install_args(targets: Sequence[str], *, editable: bool = False, no_deps: bool = False,
                 no_build_isolation: bool = False, upgrade: bool = False, report: str | None = None) -> list[str]:
    """pip's arguments for ``dyngan install``: local paths absolute, ``-e`` before each one."""
    if not targets:
        raise UsageError("name at least one package or path to install")
    args = ["install"]
    if no_deps:
        args.append("--no-deps")
    if no_build_isolation:
        args.append("--no-build-isolation")
    if upgrade:
        args.append("--upgrade")
    if report is not None:
        args += ["--report", report]
    for t in targets:
        if not t.strip():
            raise UsageError("an empty package name or path: name a plugin package (e.g. dyngan-ragan) or a "
                             "project directory, wheel or archive to install")
        local = _is_local(t)
        if local and os.path.isdir(t) and not any(os.path.isfile(os.path.join(t, f))
                                                  for f in ("pyproject.toml", "setup.py")):
            raise UsageError(f"{t!r} is a directory but not a Python project: it has no pyproject.toml or "
                             "setup.py (a plugin project declares its entry point in pyproject.toml's "
                             "[project.entry-points.dyngan])")
        if not local and _looks_like_path(t):
            raise UsageError(f"{t!r}: no such file or directory (a plugin project directory, wheel or "
                             "archive to install must exist)")
        if editable:
            if not (local and os.path.isdir(t)):
                raise UsageError(f"--editable needs a project directory, got {t!r}")
            args += ["-e", os.path.abspath(t)]
        else:
            args.append(os.path.abspath(t) if local else t)
    return args


def _read_report(path: Path) -> list[tuple[str, str | None, bool]] | None:
    """``(name, version, requested)`` of what pip installed, from its ``--report`` JSON (None if absent)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    out = []
    for item in data.get("install", []):
        meta = item.get("metadata", {})
        if isinstance(meta.get("name"), str):
            out.append((meta["name"], meta.get("version"), bool(item.get("requested"))))
    return out


def _pip_supports_report() -> bool:
    try:
        major, minor = (int(x) for x in metadata.version("pip").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (22, 2)


def install_plugins(
    targets: Sequence[str],
    *,
    editable: bool = False,
    no_deps: bool = False,
    no_build_isolation: bool = False,
    upgrade: bool = False,
    echo: Callable[[str], None] | None = None,
) -> InstallResult:
    """``pip install`` the targets into dyngan's environment, then list what they registered.

    targets: requirement strings (``dyngan-ragan``, ``dyngan-ragan==0.1``) or paths
    (a project directory, a wheel). Returns the installed distributions that register
    dyngan plugins, and every requested one (with no plugins when it registers none).
    Raises ``UsageError`` for bad arguments, ``RunFailure`` when pip fails.
    """
    with tempfile.TemporaryDirectory(prefix="dyngan-install-") as tmp:
        report = str(Path(tmp) / "report.json") if _pip_supports_report() else None
        args = install_args(targets, editable=editable, no_deps=no_deps, no_build_isolation=no_build_isolation,
                            upgrade=upgrade, report=report)
        run_pip(args, echo=echo)
        installed = _read_report(Path(report)) if report is not None else None

    requested: dict[str, tuple[str, str | None]] = {}
    others: dict[str, tuple[str, str | None]] = {}
    for name, version, req in installed or []:
        (requested if req else others)[canonical(name)] = (name, version)
    for t in targets:  # already satisfied (pip installed nothing), or a pip without --report
        name = guess_name(t)
        if name is not None and canonical(name) not in requested:
            requested[canonical(name)] = (name, None)

    try:
        listing = list_plugins_fresh()
        listing_error = None
    except RunFailure as e:
        listing, listing_error = [], str(e)
    by_dist: dict[str, list[dict[str, Any]]] = {}
    versions: dict[str, str | None] = {}
    for p in listing:
        dist = p.get("distribution")
        if isinstance(dist, str):
            by_dist.setdefault(canonical(dist), []).append(p)
            versions.setdefault(canonical(dist), p.get("version"))

    result = []
    for key, (name, version) in requested.items():
        result.append(InstalledDistribution(name, version or versions.get(key) or _installed_version(name), True,
                                            by_dist.get(key, [])))
    for key, (name, version) in others.items():  # dependencies: shown only when they are plugins
        if key in by_dist:
            result.append(InstalledDistribution(name, version, False, by_dist[key]))
    return InstallResult(result, listing_error, _clashes(listing, result))


def _clashes(listing: list[dict[str, Any]], installed: list[InstalledDistribution]) -> list[Clash]:
    """The plugins that fail to load because they register a name an installed plugin has, or the reverse:
    the one loaded first keeps the name, so the new plugin may break an older one."""
    new = {p.get("name"): d.name for d in installed for p in d.plugins}
    dist_of = {p.get("name"): p.get("distribution") for p in listing}
    out = []
    for p in listing:
        found = parse_duplicate(p.get("error") or "")
        if found is None or found[3] != p.get("name") or not ({found[2], found[3]} & set(new)):
            continue
        kind, name, kept, failed = found
        out.append(Clash(kind, name, kept, dist_of.get(kept), failed, dist_of.get(failed),
                         new.get(failed) or new[kept]))
    return out


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------- uninstall


def pip_uninstall_hint(names: Sequence[str]) -> str:
    """The pip command that removes ``names`` from dyngan's environment (what ``dyngan uninstall``
    refuses to do for a distribution that is no dyngan plugin)."""
    return " ".join(shlex.quote(a) for a in pip_command(["uninstall", *names]))


_REQUIREMENT_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_MARKER = re.compile(r"""\bextra\s*==\s*['"]([^'"]+)['"]""")


def _requirements(dist: str) -> list[tuple[str, str | None]]:
    """``(canonical name, extra or None)`` of each requirement of the installed distribution ``dist``."""
    try:
        reqs = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return []
    out = []
    for req in reqs:
        m = _REQUIREMENT_NAME.match(req)
        if m is None:
            continue
        extra = _EXTRA_MARKER.search(req.partition(";")[2])
        out.append((canonical(m.group(1)), extra.group(1) if extra else None))
    return out


def dyngan_dependencies() -> tuple[set[str], dict[str, list[str]]]:
    """What dyngan needs, as canonical names: the distributions its runtime requirements pull in,
    transitively (torch, click, ... and theirs), and its optional ones -> the extras naming them."""
    needed: set[str] = set()
    todo = [SELF]
    while todo:
        for name, extra in _requirements(todo.pop()):
            if extra is None and name not in needed and name != SELF:
                needed.add(name)
                todo.append(name)
    optional: dict[str, list[str]] = {}
    for name, extra in _requirements(SELF):
        if extra is not None and name not in needed:
            optional.setdefault(name, []).append(extra)
    return needed, optional


def _no_plugin_refusal(names: list[str]) -> str:
    """Why ``dyngan uninstall`` refuses the installed distributions ``names``, which declare no dyngan
    plugin: dyngan's own dependencies (removing one breaks dyngan) are said to be."""
    needed, optional = dyngan_dependencies()
    one = len(names) == 1
    what = (f"{names[0]}: it is not a dyngan plugin (its distribution declares" if one else
            f"{', '.join(names)}: they are not dyngan plugins (their distributions declare")
    why = [f"refusing to uninstall {what} no entry point in the group 'dyngan'); `dyngan uninstall` removes "
           "plugin distributions only"]
    deps = [n for n in names if canonical(n) in needed]
    if deps:
        why.append(f"{', '.join(deps)} {'is' if len(deps) == 1 else 'are'} needed by dyngan itself (removing "
                   f"{'it' if len(deps) == 1 else 'them'} would break dyngan)")
    extras = [f"{n} (dyngan[{','.join(sorted(set(optional[canonical(n)])))}])" for n in names
              if canonical(n) in optional]
    if extras:
        why.append(f"{', '.join(extras)} {'is an optional dependency' if len(extras) == 1 else 'are optional dependencies'}"
                   " of dyngan")
    others = [n for n in names if canonical(n) not in needed and canonical(n) not in optional]
    if others:
        why.append(f"to remove {'it' if len(others) == 1 and one else ', '.join(others)} anyway, use pip: "
                   f"`{pip_uninstall_hint(others)}`")
    return "; ".join(why)


def uninstall_plugins(names: Sequence[str], *, echo: Callable[[str], None] | None = None) -> UninstallResult:
    """``pip uninstall -y`` the named plugin distributions.

    Raises ``UsageError`` (before anything is removed) for ``dyngan`` itself, a name that is not
    installed, and a distribution that declares no dyngan plugin (no entry point in the group
    ``dyngan``: dyngan's own dependencies among them), as ``install`` refuses those;
    ``RunFailure`` when pip fails.
    """
    if not names:
        raise UsageError("name at least one distribution to uninstall")
    if not all(n.strip() for n in names):
        raise UsageError("an empty distribution name: name the plugin distribution to uninstall "
                         "(`dyngan plugins` shows each plugin's distribution in brackets)")
    if any(canonical(n) == SELF for n in names):
        raise UsageError(
            "refusing to uninstall dyngan itself: it would remove this command and every built-in plugin "
            "(if you mean it: python -m pip uninstall dyngan)")
    removed = []
    no_plugin = []
    for n in names:
        try:
            dist = metadata.distribution(n)
        except metadata.PackageNotFoundError:
            raise UsageError(f"{n!r} is not installed in this environment ({sys.executable})") from None
        except ValueError as e:  # importlib.metadata refuses the name itself
            raise UsageError(f"{n!r} is not a distribution name ({e})") from None
        plugins = sorted(ep.name for ep in dist.entry_points if ep.group == "dyngan")
        if not plugins:
            no_plugin.append(dist.metadata["Name"] or n)
        removed.append((dist.metadata["Name"] or n, dist.version, plugins))
    if no_plugin:
        raise UsageError(_no_plugin_refusal(no_plugin))
    run_pip(["uninstall", "-y", *names], echo=echo)
    return UninstallResult(removed)
