"""The library behind the CLI: ``train``, ``sample``, ``evaluate``.

Each takes plain values and returns plain values; errors are ``core.errors``
exceptions. ``train`` settings use the config keys (``dataset``, ``loss``,
``steps``, ``options={"detector": {"delta": 0.1}}`` ...) plus ``out`` (the run
directory) and ``config`` (a TOML file read beneath the other settings).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import operator
import os
import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from . import __version__, rundir
from .console import stop_handler
from . import checkpoint as ckpt_io
from .config import DEFAULTS, MAX_SEED, SLOTS, _none, flat_metric_options, read_toml, resolve
from .errors import (CheckpointError, ComponentFailure, DataError, DynganError, OptionError,
                     UnknownComponentError, UsageError, is_out_of_memory, one_line, out_of_memory)
from .plugins import PluginHost, get_host

#: keys of a saved config that are records, not settings
_RECORD_KEYS = ("dyngan_version", "plugins", "created")
#: settings that may change when a run is resumed (its length, logging, what its evaluations measure,
#: and the machine it runs on); the metric options (options.metric) may change too
_RESUMABLE = (*rundir.SCHEDULE, *rundir.EVALUATION, "device", "threads", "compile", "adam_impl")


def _settings_only(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _RECORD_KEYS}


def run_path(run_dir: Any) -> Path:
    """``run_dir`` (a str or os.PathLike) as a Path; UsageError for anything else (None, a number)."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise UsageError(f"a run directory must be a path (str or pathlib.Path), got {type(run_dir).__name__}")
    return Path(run_dir)


def resolve_settings(settings: Mapping[str, Any], host: PluginHost | None = None) -> dict[str, Any]:
    """The fully resolved config for ``settings`` (no files written)."""
    if not isinstance(settings, Mapping):
        raise UsageError(f"settings must be a mapping (a dict of settings), got {type(settings).__name__}")
    host = host or get_host()
    settings = dict(settings)
    settings.pop("out", None)
    layers: list[Mapping[str, Any]] = []
    file = settings.pop("config", None)
    if file is not None:
        layers.append(read_toml(usable_path(file, "--config")))
    layers.append({k: v for k, v in settings.items() if v is not None})
    cfg = resolve(host.registry, layers)
    cfg["dyngan_version"] = __version__
    cfg["plugins"] = host.versions(_providers(host, cfg))
    return cfg


def _components(cfg: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """``(kind, name, fixed)`` of each component a config names: its slots (fixed for the run's life)
    and its metrics (which a resume may change). What is not a name (a damaged saved config) is left
    out, for resolving to refuse."""
    out = [(kind, cfg[slot], True) for slot, kind in SLOTS.items()
           if isinstance(cfg.get(slot), str) and not _none(cfg[slot])]
    metrics = cfg.get("metrics")
    return out + [("metric", m, False) for m in (metrics if isinstance(metrics, list) else ()) if isinstance(m, str)]


def _providers(host: PluginHost, cfg: Mapping[str, Any]) -> set[str]:
    """The plugins that provide the components of a resolved config (what a run records)."""
    used = {host.registry.plugin_of(kind, name) for kind, name, _ in _components(cfg)}
    return {p for p in used if p}


def _check_providers(host: PluginHost, cfg: Mapping[str, Any], record: Any) -> str | None:
    """Why some component a saved run's config names is registered now by another plugin than the
    run's (``PluginHost.substituted``, for each); None when none is."""
    problems = [host.substituted(kind, name, record, strict=fixed) for kind, name, fixed in _components(cfg)]
    return "; ".join(p for p in problems if p) or None


def _saved_config(run_dir: Path, host: PluginHost, verb: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's config.json as saved, and re-resolved against the installed plugins."""
    saved = rundir.read_config(run_dir)
    # a run from before adam_impl existed stepped Adam tensor by tensor: it goes on that way, so that
    # its resumed steps round as the uninterrupted run's would have
    saved.setdefault("adam_impl", "loop")
    # a name whose plugin is missing may be registered by another plugin now: never use that one in its
    # place (a resume would train on with another component, and record it). Checked before resolving,
    # whose errors (an option the other component lacks) would not say why.
    substituted = _check_providers(host, saved, saved.get("plugins"))
    if substituted is not None:
        raise CheckpointError(f"the run in {str(run_dir)!r} cannot be {verb} with the installed plugins: "
                              f"{substituted}")
    try:
        cfg = _resolve_saved(host, saved)
    except UnknownComponentError as e:  # a plugin that is not installed (or no longer has the component)
        # name the plugin the run used and why it is missing, not a near name ("did you mean 'hinge'?")
        why = host.missing_plugins(e.kind, e.name, saved.get("plugins")) if e.name is not None else None
        raise CheckpointError(f"the run in {str(run_dir)!r} cannot be {verb} with the installed plugins: "
                              f"{why or e}") from None
    except OptionError as e:  # a bad value, or an option a plugin's other version lacks
        raise CheckpointError(f"the run in {str(run_dir)!r} cannot be {verb}: its {rundir.CONFIG} is invalid "
                              f"(damaged, or written for another version of its plugins): {e}") from None
    except UsageError as e:
        raise CheckpointError(f"the run in {str(run_dir)!r} cannot be {verb}: its {rundir.CONFIG} is invalid "
                              f"(damaged or edited): {e}") from None
    return saved, cfg


def _resolve_saved(host: PluginHost, saved: Mapping[str, Any], *more: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config re-resolved, with ``more`` layers over it, WITHOUT its preset: the saved
    settings already hold everything the preset set, and an option the run's version did not have
    must take the component's default (the behaviour it trained with), not what a newer preset sets
    it to (nor fail when the preset's plugin is gone). The preset's name is kept in the result."""
    layer = _settings_only(saved)
    preset = layer.pop("preset", None)
    cfg = resolve(host.registry, [layer, *({k: v for k, v in m.items() if k != "preset"} for m in more)])
    cfg["preset"] = None if _none(preset) else preset
    return cfg


def _flat_options(options: Any, prefix: str = "") -> dict[str, Any]:
    """``{"detector": {"delta": 0.2}}`` -> ``{"detector.delta": 0.2}`` (metrics nest one level more)."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            out.update(_flat_options(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _shown(name: Any) -> str:
    """A component name as a user writes it: ``'dyngan'``, or ``none`` for no component."""
    return "none" if name is None else repr(name)


def _component_name(value: Any) -> Any:
    return None if _none(value) else str(value).strip()


def _resume_config(run_dir: Path, settings: Mapping[str, Any], host: PluginHost) -> dict[str, Any]:
    saved, cfg = _saved_config(run_dir, host, "resumed")
    given = {k: v for k, v in settings.items() if v is not None and k not in ("out", "config")}
    if settings.get("config") is not None:
        raise UsageError("--config cannot be combined with --resume: the run's own config.json is used")
    for k in given:
        if k not in DEFAULTS:
            raise UsageError(f"unknown setting {k!r}")
    changed = {k: v for k, v in given.items() if k in _RESUMABLE}
    fixed = {k: v for k, v in given.items() if k not in _RESUMABLE}
    metric_opts = None  # -o metric.*: what evaluations measure, so it may change as well
    if isinstance(fixed.get("options"), Mapping) and "metric" in fixed["options"]:
        rest = {kind: v for kind, v in fixed["options"].items() if kind != "metric"}
        metric_opts = fixed["options"]["metric"]
        if not isinstance(metric_opts, Mapping):  # as a new run's settings say it
            raise UsageError(f"`options.metric` must be a table of option values, got {type(metric_opts).__name__}")
        fixed = {k: v for k, v in fixed.items() if k != "options"}
        if rest:
            fixed["options"] = rest
    only = f"only {', '.join(_RESUMABLE)} and metric options may change"
    # a component named again must be the run's: compared before any option is resolved, since the
    # run's options for one component mean nothing to another ("dataset 'ring8': unknown option 'side'")
    for k in (*SLOTS, "preset"):
        if k in fixed and _component_name(fixed[k]) != cfg.get(k):
            raise UsageError(f"--resume continues the run as it was configured: the {k} cannot change; "
                             f"it was {_shown(cfg.get(k))}, not {_shown(_component_name(fixed[k]))} ({only})")
    if fixed:
        # settings given again must resolve to what the run already has
        trial = _resolve_saved(host, saved, fixed)  # (a preset given again was checked above)
        for k in sorted(fixed):
            if k == "options":  # name the differing options only, not the whole table
                was, now = _flat_options(cfg.get("options")), _flat_options(trial.get("options"))
                diff = [f"{o} was {was.get(o)!r}, not {now.get(o)!r}" for o in sorted(set(was) | set(now))
                        if was.get(o) != now.get(o)]
                if diff:
                    raise UsageError(f"--resume continues the run as it was configured; {'; '.join(diff)} "
                                     f"(component options cannot change; {only})")
            elif trial.get(k) != cfg.get(k):
                raise UsageError(
                    f"--resume continues the run as it was configured; {k} was {cfg.get(k)!r}, "
                    f"not {trial.get(k)!r} ({only})")
    if "metrics" in changed or metric_opts is not None:
        cfg = _resolve_new_evaluation(host, saved, cfg, changed, metric_opts)
    elif changed:
        cfg = _resolve_saved(host, saved, changed)
    plugins = saved.get("plugins", {})
    if not isinstance(plugins, dict):
        raise CheckpointError(f"{str(run_dir)!r}: config.json has a malformed plugins record")
    cfg["dyngan_version"] = __version__
    # the run's plugins, and the plugin of a metric the resume adds
    cfg["plugins"] = host.versions(set(plugins) | _providers(host, cfg))
    cfg["created"] = saved.get("created")
    return cfg


def _resolve_new_evaluation(host: PluginHost, saved: Mapping[str, Any], cfg: Mapping[str, Any],
                            changed: Mapping[str, Any], metric_opts: Mapping[str, Any] | None) -> dict[str, Any]:
    """A resumed run's config with other metrics or metric options: the saved options of the
    metrics still chosen are kept, a given ``metric.KEY`` overrides them on every chosen metric that
    has KEY, and a given ``metric.NAME.KEY`` on NAME (scoped over unscoped, as for a new run)."""
    base = _settings_only(saved)
    base_opts = dict(base.get("options") or {})
    base_opts["metric"] = {}
    chosen = _resolve_saved(host, {**base, "options": base_opts}, changed)["metrics"]
    saved_opts = cfg["options"].get("metric") or {}
    opts = {f"{m}.{k}": v for m in chosen for k, v in (saved_opts.get(m) or {}).items()}
    given = flat_metric_options(metric_opts or {})
    for key in sorted(given, key=lambda k: "." in k):  # unscoped first, so scoped values win
        takers = [] if "." in key else [m for m in chosen if key in host.registry.get("metric", m).options]
        opts.update({f"{m}.{key}": given[key] for m in takers} if takers else {key: given[key]})
    base_opts["metric"] = opts  # a key no chosen metric has is left for resolve to name
    return _resolve_saved(host, {**base, "options": base_opts}, changed)


#: a run directory whose training stopped before its first checkpoint: neither resumable nor new
def _no_checkpoint(run_dir: Path) -> str:
    see = f" (see its {rundir.METRICS})" if (run_dir / rundir.METRICS).is_file() else ""
    return (f"{str(run_dir)!r} holds a run that stopped before its first checkpoint{see}, so there is nothing "
            "to resume; delete that directory or choose another --out to train again")


def _not_in_use(run_dir: Path) -> None:
    """Raise RunLock's "another dyngan process is training in ..." when one is."""
    with rundir.RunLock(run_dir):
        pass


def _never_checkpointed(run_dir: Path) -> bool:
    """No checkpoint file was ever written in ``run_dir`` (its checkpoints/ is missing or empty).
    A checkpoints entry that is not a folder is a CheckpointError: the run's checkpoints are not
    where they belong, which is no reason to delete the run."""
    ck = run_dir / rundir.CHECKPOINTS
    try:
        if os.path.lexists(ck) and not ck.is_dir():
            raise ckpt_io.not_a_folder(ck)
        return not ck.is_dir() or not any(ck.iterdir())
    except OSError:
        return False


def _refuse_unstarted(out: Any) -> None:
    """UsageError when ``out`` holds a run before its first checkpoint: one still starting is in
    use, one that stopped there has nothing to resume and blocks a new run."""
    if out is not None and rundir.is_run(Path(out)) and _never_checkpointed(Path(out)):
        _not_in_use(Path(out))
        raise UsageError(_no_checkpoint(Path(out)))


def _out(settings: Mapping[str, Any]) -> Any:
    """``settings["out"]``, refused when empty: Path("") is the current directory, so an empty --out
    (an unset shell variable) would train there."""
    if not isinstance(settings, Mapping):
        raise UsageError(f"settings must be a mapping (a dict of settings), got {type(settings).__name__}")
    out = settings.get("out")
    if out is not None:
        out = usable_path(out, "--out (the run directory)")
        if not str(out).strip():
            raise UsageError("--out is empty: name the run directory (or leave --out out for a new one under runs/)")
    return out


def usable_path(value: Any, what: str) -> Any:
    """``value`` if it can name a file here: a str or os.PathLike of text with no NUL character that
    the file system's encoding can write; UsageError naming ``what`` otherwise."""
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{what} must be a path (str or pathlib.Path), got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise UsageError(f"{what} must be a path as text (str or pathlib.Path), got {type(text).__name__}")
    if "\0" in text:
        raise UsageError(f"{what} {text[:60]!r} contains a NUL character, which no file name may hold")
    try:
        os.fsencode(text)
    except UnicodeEncodeError as e:
        raise UsageError(f"{what} {text[:60]!r} cannot be written as a file name here ({e.reason})") from None
    return value


def dry_run(settings: Mapping[str, Any], *, resume: bool = False, host: PluginHost | None = None) -> dict[str, Any]:
    """The config ``train`` would use, checked as ``train`` checks it before reading data: settings
    and options, the device (and --amp) on this machine, and --out (free for a new run, or a run
    to resume); nothing is created or changed."""
    from .training import check_amp, resolve_device

    if resume:
        cfg, run_dir = prepare(settings, resume=True, host=host)
        _not_in_use(run_dir)  # as `train --resume` refuses a run another process trains in
    else:
        out = _out(settings)
        cfg = resolve_settings(settings, host)
        _refuse_unstarted(out)  # as train says it
        if out is not None:
            rundir.check_new(Path(out))
    check_amp(cfg, resolve_device(cfg["device"]))
    return cfg


def prepare(settings: Mapping[str, Any], *, resume: bool = False, host: PluginHost | None = None,
            runs_root: Path = Path("runs")) -> tuple[dict[str, Any], Path]:
    """Resolve the config and create (or find, with ``resume``) the run directory."""
    host = host or get_host()
    out = _out(settings)
    if resume:
        if out is None:
            raise UsageError("--resume needs --out RUN_DIR: the run to continue")
        run_dir = Path(out)
        cfg = _resume_config(run_dir, settings, host)
        if _never_checkpointed(run_dir):
            _not_in_use(run_dir)  # a run still before its first checkpoint is not a stopped one
            raise CheckpointError(_no_checkpoint(run_dir))
        return cfg, run_dir
    _refuse_unstarted(out)
    cfg = resolve_settings(settings, host)
    cfg["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    run_dir = rundir.create(Path(out) if out is not None else None, runs_root)
    return cfg, run_dir


class _Terminated(KeyboardInterrupt):
    """SIGTERM while a new run is set up: unwinds as Ctrl-C does there (``signum`` says which)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


class _SigtermBeforeStart:
    """From ``start()`` to ``end()``, in the main thread, SIGTERM (and SIGHUP, a closed terminal,
    unless the process ignores it: ``nohup``) raises ``_Terminated`` instead of killing the process,
    so that a new run being set up is removed, as after Ctrl-C: under torchrun a rank whose set-up
    fails makes torchrun SIGTERM rank 0, whose config.json-only run directory then blocked the same
    --out. In the training loop training's own handler has these signals."""

    def __init__(self, active: bool) -> None:
        import threading

        self.active = active and threading.current_thread() is threading.main_thread()
        self._old: dict[int, Any] = {}

    def start(self) -> None:
        import signal

        from .console import stop_signals

        if not self.active:
            return
        for s in stop_signals():  # Ctrl-C raises KeyboardInterrupt here already
            if s != signal.SIGINT:
                self._old[s] = signal.signal(s, self._handle)

    @staticmethod
    @stop_handler
    def _handle(signum: int, frame: Any) -> None:
        raise _Terminated(signum)

    def end(self) -> None:
        import signal

        while self._old:
            s, old = self._old.popitem()
            signal.signal(s, old)


def train(settings: Mapping[str, Any], *, resume: bool = False, quiet: bool = True,
          host: PluginHost | None = None, stream: Any = None, comm: Any = None):
    """Train a run; returns ``core.training.TrainResult`` (run_dir, step, metrics, config)."""
    host = host or get_host()
    # torchrun (core.distributed): rank 0 tells the others where the run directory is, or why it failed
    share = getattr(comm, "broadcast_object", None)
    main = comm is None or comm.rank == 0  # only rank 0 creates and writes the run directory
    run_dir = None
    sigterm = _SigtermBeforeStart(main and not resume)
    try:
        sigterm.start()
        if not main:
            out, error = share(None) if share is not None else (settings.get("out"), None)
            if error is not None:  # rank 0 shows it: one short line here, not the same error again
                raise UsageError("rank 0 could not prepare the run (it shows why)")
            run_dir = Path(out)
            cfg = (_resume_config(run_dir, settings, host) if resume
                   else resolve_settings(settings, host))
        else:
            try:
                cfg, run_dir = prepare(settings, resume=resume, host=host)
                if not resume:
                    try:
                        rundir.write_config(run_dir, cfg)
                    except OSError as e:
                        raise UsageError(f"cannot write to run directory {str(run_dir)!r}: "
                                         f"{e.strerror or e}") from None
            except BaseException as e:
                if share is not None:
                    share((None, str(e) or type(e).__name__))
                raise
            if share is not None:
                share((str(run_dir), None))
        # one process trains in a run directory at a time (rank 0 writes for all ranks)
        with rundir.RunLock(run_dir) if main else contextlib.nullcontext():
            return _train_locked(cfg, run_dir, host, resume, quiet, stream, comm, sigterm.end)
    except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM) before training began: a new run leaves nothing behind
        discarded = main and not resume and run_dir is not None and rundir.discard_unstarted(run_dir)
        if not isinstance(e, _Terminated):
            raise
        from .training import Aborted

        raise Aborted(e.signum, 0, run_dir if run_dir is not None else Path(str(settings.get("out") or ".")),
                      before_start=True, discarded=discarded or run_dir is None, torchrun=comm is not None) from None
    except Exception as e:
        from .distributed import collective_failure, peer_stopped

        if comm is None or not collective_failure(e):
            raise
        # torchrun: another process stopped or timed out; one line, not Gloo's traceback. Before the
        # first step (a rank whose set-up failed), a new run leaves nothing behind. Decided once, under
        # the run lock: once it is released, another run may already be starting in that folder
        discarded = getattr(e, _DISCARDED, None)
        if discarded is None:
            discarded = main and not resume and run_dir is not None and rundir.discard_unstarted(run_dir)
        raise peer_stopped(e, run_dir, discarded) from e
    finally:
        sigterm.end()


def _saved_data_error(error: DataError, run_dir: Path | str, cfg: Mapping[str, Any]) -> DataError:
    """A saved run's training data that cannot be read, with where the run looks for it."""
    path = (cfg.get("options", {}).get("dataset") or {}).get("path")
    where = f", path {path!r}" if path else ""
    return DataError(f"the run in {str(run_dir)!r} cannot read its training data (dataset {cfg.get('dataset')!r}"
                     f"{where}): {error}; if the data moved, put it back there, or change options.dataset in "
                     f"{str(Path(run_dir) / rundir.CONFIG)!r} to where it is now")


def _load_saved_data(comps: Any, cfg: Mapping[str, Any], run_dir: Path | str,
                     data_shape: tuple[int, ...] | None = None) -> Any:
    """The training data of a saved run (CPU), its read errors saying which run and path they concern.
    With ``data_shape`` (the checkpoint's), data whose samples are shaped otherwise are refused: the
    run's data file was replaced, and nothing the run's G draws could be compared with them."""
    from .training import load_dataset

    try:
        x = load_dataset(comps, cfg["seed"])
        if data_shape is not None and tuple(x.shape[1:]) != tuple(data_shape):
            raise DataError(f"its samples are now shaped {list(x.shape[1:])}, but the run was trained on "
                            f"samples shaped {list(data_shape)}")
        return x
    except DataError as e:
        raise _saved_data_error(e, run_dir, cfg) from None


def _train_locked(cfg: dict[str, Any], run_dir: Path, host: PluginHost, resume: bool, quiet: bool,
                  stream: Any, comm: Any, trained: Callable[[], None] = lambda: None):
    """``trained`` is called once training is over (``_SigtermBeforeStart.end``)."""
    try:
        from .training import Aborted, Trainer  # imports torch: seconds, in which a Ctrl-C may come

        trainer = Trainer(cfg, host.registry, run_dir, resume=resume, quiet=quiet, comm=comm, stream=stream)
    except BaseException as e:
        # bad data or a broken component, before the first step: do not leave a run that
        # blocks the same --out ("already holds a run") with nothing in it to resume
        if not resume and (comm is None or comm.rank == 0):
            _mark_discarded(e, rundir.discard_unstarted(run_dir))
        if is_out_of_memory(e):
            raise out_of_memory(e, "while setting up the run",
                                "the dataset or the networks do not fit; try a smaller dataset or model") from None
        if resume and isinstance(e, DataError):
            raise _saved_data_error(e, run_dir, cfg) from None
        raise
    if not quiet and (comm is None or comm.rank == 0):
        trainer.progress.message(
            f"run directory: {run_dir}  ({cfg['dataset']}, loss {cfg['loss']}, device {trainer.device}, "
            f"{cfg['steps']} steps" + (f", {trainer.world_size} processes: effective batch "
                                        f"{trainer.world_size * cfg['batch_size']}" if trainer.world_size > 1 else "")
            + ")")
    try:
        try:
            result = trainer.run()
        finally:
            trained()
    except Aborted as e:
        # stopped before its first step: a new run leaves nothing behind, as one whose setup failed
        # (rank 0 removes it; the other ranks say so too, rather than advise deleting it)
        if e.before_start and not resume and (comm is not None and comm.rank != 0 or rundir.discard_unstarted(run_dir)):
            raise Aborted(e.signum, e.step, run_dir, before_start=True, discarded=True, torchrun=e.torchrun) from None
        raise
    except Exception as e:
        # a failure before the first training step finished (a component's setup(), the first
        # step's loss): a new run leaves nothing behind, as one whose data failed to load, so
        # that the same --out trains once the cause is fixed
        discarded = (not resume and (comm is None or comm.rank == 0) and trainer.step == 0
                     and rundir.discard_unstarted(run_dir, start_records=True))
        if not resume and (comm is None or comm.rank == 0):
            _mark_discarded(e, discarded)
        if not is_out_of_memory(e):
            raise
        saved = rundir.list_checkpoints(run_dir / rundir.CHECKPOINTS)
        where = (f"the checkpoints already in {str(run_dir)!r} are intact" if saved else
                 "nothing was saved and the new run was removed" if discarded else
                 f"nothing was saved: start again with another --out or after deleting {str(run_dir)!r}")
        raise out_of_memory(e, f"at step {trainer.step} on {trainer.device} with batch size {cfg['batch_size']}",
                            f"use a smaller --batch-size; {where}") from None
    if os.environ.get("DYNGAN_DEBUG_DUMP_DIR"):  # test hook, see core.distributed.debug_dump
        from .distributed import debug_dump

        debug_dump(trainer)
    if not pictures_disabled() and (comm is None or comm.rank == 0):
        _pictures(run_dir, trainer)
    return result


#: the attribute on a failure of a new run that says whether ``_train_locked`` removed the run already
_DISCARDED = "_dyngan_run_discarded"


def _mark_discarded(error: BaseException, discarded: bool) -> None:
    try:
        setattr(error, _DISCARDED, bool(discarded))
    except (AttributeError, TypeError):  # an exception type that takes no attributes: decided again later
        pass


def pictures_disabled() -> bool:
    import os

    return os.environ.get("DYNGAN_NO_PICTURES", "") not in ("", "0")


def _pictures(run_dir: Path, trainer: Any) -> None:
    """Pictures at the end of training, when matplotlib is installed; never fails the run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        trainer.progress.message('no pictures: matplotlib is not installed (pip install "dyngan[plots]")')
        return
    try:
        from .report import write_report

        write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - pictures are a convenience; the run itself succeeded
        trainer.progress.message(f"could not draw pictures: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------- using a finished run


GENERATORS = ("auto", "ema", "raw")


class LoadedRun(NamedTuple):
    """A finished run's generator, ready to sample, and what it came from."""

    cfg: dict[str, Any]
    comps: Any
    G: Any
    prior: Any
    device: Any
    step: int
    weights: str  # which weights G holds: "ema" (the average) or "raw"
    #: the checkpoint's partition labels as saved (checked against the data when first used), and
    #: its file name for messages; None: it holds none
    saved_labels: Any = None
    checkpoint: str = ""
    data_shape: tuple[int, ...] | None = None  # what G's samples must be shaped (per sample)


def warn_stderr(text: str) -> None:
    """The default ``warn`` of ``load_run`` / ``sample`` / ``evaluate``: one line on stderr."""
    import sys

    print(f"warning: {text}", file=sys.stderr, flush=True)


def _load_run(run_dir: Path, host: PluginHost, device: str = "cpu", generator: str = "auto",
              warn: Callable[[str], None] | None = warn_stderr) -> LoadedRun:
    """A run's config, components and generator, from its latest good checkpoint.

    ``generator``: ``ema`` the weight average kept with ``--g-ema``, ``raw`` the trained
    weights, ``auto`` the average when the run keeps one, else the trained weights.
    ``warn`` is told when newer checkpoints were skipped as corrupt (None: silently)."""
    import torch

    from .networks import build_networks
    from .training import EMA_PREFIX, instantiate, resolve_device, valid_prior

    if not isinstance(generator, str) or generator not in GENERATORS:
        raise UsageError(f"generator must be one of {', '.join(GENERATORS)}, got {generator!r}")

    dev = resolve_device(device)  # as train checks --device: a malformed or missing one is exit 2
    _, cfg = _saved_config(run_dir, host, "loaded")
    comps = instantiate(cfg, host.registry)
    holder: dict[str, Any] = {}

    def apply(ck: ckpt_io.Checkpoint) -> None:
        shape = ck.meta.get("data_shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise CheckpointError(f"{ck.path.name}: bad data_shape {shape!r}")
        has_ema = any(k.startswith(EMA_PREFIX) for k in ck.tensors)
        if not has_ema and float(cfg.get("g_ema") or 0) > 0:  # every checkpoint of such a run has them
            raise CheckpointError(f"{ck.path.name}: no weights of the generator's average (G_ema), which "
                                  f"this run keeps (g_ema {cfg['g_ema']})")
        if generator == "ema" and not has_ema:
            raise UsageError(f"the run in {str(run_dir)!r} keeps no weight average of its generator "
                             "(it was trained without --g-ema); use --generator raw")
        prefix = EMA_PREFIX if has_ema and generator != "raw" else "G/"
        saved_g = {k[len(prefix):]: v for k, v in ck.tensors.items() if k.startswith(prefix)}
        try:  # shapes first, on the meta device: a forged data_shape allocates nothing
            with torch.device("meta"):
                G_meta, _, _ = build_networks(comps.model, comps.conditioner, tuple(shape))
            want = {k: tuple(v.shape) for k, v in G_meta.state_dict().items()}
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta: check after building
            want = None
        if want is not None and want != {k: tuple(v.shape) for k, v in saved_g.items()}:
            raise CheckpointError(f"{ck.path.name} does not fit this run's networks "
                                  f"(data shape {shape}, model {comps.model.name!r})")
        try:
            G, _, spec = build_networks(comps.model, comps.conditioner, tuple(shape))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{ck.path.name}: cannot build the networks for data shape {shape} "
                                  f"({type(e).__name__}: {str(e)[:200]})") from None
        try:
            G.load_state_dict(saved_g)
            prior = ck.tensors["train/prior"].float()
        except (RuntimeError, KeyError) as e:
            # torch lists the keys after its first line
            raise CheckpointError(f"{ck.path.name} does not fit this run's networks: {one_line(e, 300)}") from None
        if not valid_prior(prior, spec.capacity):
            raise CheckpointError(f"{ck.path.name}: bad condition prior")
        holder.update(G=G.to(dev), prior=(prior / prior.sum()).to(dev), shape=tuple(shape),
                      weights="ema" if prefix == EMA_PREFIX else "raw", labels=ck.tensors.get("train/labels"))

    ck = ckpt_io.load_latest(run_dir / rundir.CHECKPOINTS, apply, warn)
    return LoadedRun(cfg, comps, holder["G"], holder["prior"], dev, ck.step, holder["weights"], holder["labels"],
                     ck.path.name, holder["shape"])


class Run:
    """A finished run, loaded to be used (``load_run``): its resolved config (``cfg``), components
    (``comps``), generator ``G`` (``weights`` says which: "ema" or "raw"), condition ``prior``,
    checkpoint ``step`` and ``device``; its training data (``real``), the partition labels of the
    loaded checkpoint (``labels``, None when it has none that fit the data), the dataset's
    ``info()`` and the records of metrics.jsonl (``metrics``), each read when first asked for.
    ``warn`` is told why labels the checkpoint holds cannot be used (None: silently)."""

    def __init__(self, run_dir: Path, loaded: LoadedRun, warn: Callable[[str], None] | None = None) -> None:
        self.dir = run_dir
        self.cfg, self.comps, self.G, self.prior = loaded.cfg, loaded.comps, loaded.G, loaded.prior
        self.device, self.step, self.weights = loaded.device, loaded.step, loaded.weights
        self._saved_labels, self._checkpoint = loaded.saved_labels, loaded.checkpoint
        self._data_shape = loaded.data_shape
        self.z_dim = int(self.comps.model.z_dim)
        self._warn = warn

    @property
    def name(self) -> str:
        return self.dir.resolve().name

    @property
    def conditions(self) -> list[int]:
        """The conditions in use (prior > 0), in order."""
        return [int(c) for c in (self.prior > 0).nonzero().flatten().tolist()]

    @cached_property
    def real(self) -> Any:
        return _load_saved_data(self.comps, self.cfg, self.dir, self._data_shape)

    @cached_property
    def labels(self) -> Any:
        """The partition labels of the loaded checkpoint (read with it: a checkpoint pruned since is
        no matter), or None, with a warning, when it holds none or none that fit the data."""
        import torch

        from .training import labels_problem

        lab = self._saved_labels
        if not isinstance(lab, torch.Tensor):
            problem = "holds no partition labels (no partitions shown)"
        else:
            # (a partitioner may set its own prior: labels in a condition of prior 0 are not wrong)
            problem = labels_problem(lab, self.real.shape[0], int(self.prior.shape[0]))
            if problem is None:
                return lab.long()
            problem = f"partition labels {problem}; they are ignored (no partitions shown)"
        if self._warn is not None:
            self._warn(f"{self._checkpoint}: {problem}")
        return None

    @cached_property
    def info(self) -> dict[str, Any]:
        try:
            return dict(self.comps.dataset.info() or {})
        except Exception:  # noqa: BLE001 - a plugin's info() is only description
            return {}

    @cached_property
    def metrics(self) -> list[dict[str, Any]]:
        return rundir.read_metrics(self.dir)

    def generate(self, n: int, seed: int = 0, condition: int | None = None, *,
                 progress: Callable[[int], None] | None = None) -> Any:
        """``n`` float32 samples on the CPU: conditions drawn from the prior (what ``dyngan sample
        --seed`` writes), or all of one ``condition`` in use. The noise comes from a generator seeded
        with ``seed`` (0 to 2**63 - 1), so one seed gives every condition the same noise. ``n``,
        ``seed`` and ``condition`` are integers (a NumPy integer or a 0-d integer tensor will do).
        ``progress`` (e.g. a ``SamplingProgress``) is told the count drawn after each batch."""
        import torch

        from .training import generate

        n, seed = _check_n(n, "n"), _check_seed(seed)
        if condition is not None:
            condition = _integer(condition, "condition")
            used = self.conditions
            if condition not in used:
                raise UsageError(f"condition {condition} is not in use in this run; it uses "
                                 + _ranges(used) + " (conditions with a prior above 0)")
        g = torch.Generator(device=self.device).manual_seed(seed)
        with _out_of_memory_as_usage(f"drawing {n:,} samples on {self.device}"):
            # filled batch by batch into one CPU tensor: a GPU holds a batch, not the draw
            return generate(self.G, n, self.z_dim, self.prior, self.device, g, condition=condition,
                            out_device=torch.device("cpu"), progress=progress, model=self.comps.model,
                            data_shape=self._data_shape)


@contextlib.contextmanager
def _out_of_memory_as_usage(doing: str, hint: str = "draw fewer (--n)"):
    """An allocation failure inside the block, also one inside a component (ComponentFailure),
    becomes ``OutOfMemory`` (exit 2) saying what was being done; other exceptions pass unchanged."""
    try:
        yield
    except Exception as e:
        inner = e.error if isinstance(e, ComponentFailure) else e
        if isinstance(inner, DynganError) or not is_out_of_memory(inner):
            raise
        raise out_of_memory(inner, doing, hint) from None


def _check_n(n: Any, name: str = "--n") -> int:
    """A number of samples to draw: a positive integer (``name`` says what set it: the CLI's flag
    by default, ``"n"`` for the Python API)."""
    n = _integer(n, name)
    if n < 1:
        raise UsageError(f"{name} must be at least 1, got {n}")
    return n


def _check_seed(seed: Any) -> int:
    """A sampling seed: an integer in [0, MAX_SEED], the range of the CLI's ``--seed``."""
    seed = _integer(seed, "seed")
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"seed must be between 0 and {MAX_SEED} (2**63 - 1), got {seed}")
    return seed


def _integer(value: Any, name: str) -> int:
    """``value`` as an int: a Python, NumPy or 0-d tensor integer (not a bool), else a one-line
    UsageError naming ``name`` and what it got."""
    ndim = getattr(value, "ndim", None)
    if isinstance(ndim, int) and ndim > 0:
        raise UsageError(f"{name} must be an integer, not {type(value).__name__} of shape {tuple(value.shape)}")
    if ndim == 0 and callable(getattr(value, "item", None)):  # a NumPy scalar, a 0-d array or tensor
        value = value.item()
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    shown = repr(value).splitlines()[0] if repr(value) else ""
    shown = shown if len(shown) <= 60 else shown[:60] + "..."
    raise UsageError(f"{name} must be an integer, not {type(value).__name__} {shown}")


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts: list[str] = []
    for v in values:
        if parts and parts[-1][1] == v - 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "none"


def load_run(run_dir: str | Path, *, device: str = "cpu", generator: str = "auto",
             host: PluginHost | None = None, warn: Callable[[str], None] | None = warn_stderr) -> Run:
    """A finished run from its latest good checkpoint (``generator``: see ``_load_run``).
    Raises UsageError / CheckpointError for a bad run directory. ``warn`` is told (by default on
    stderr) when newer checkpoints were skipped as corrupt, and when the checkpoint's partition
    labels cannot be used (``labels`` is then None)."""
    run_dir = run_path(run_dir)
    host = host or get_host()
    return Run(run_dir, _load_run(run_dir, host, device, generator, warn), warn)


class SamplingProgress:
    """``sampling: 4,000,000 / 20,000,000`` on stderr while a long draw runs, as ``generate``'s
    ``progress``: on a terminal one line updated at most every second, elsewhere a line at most every
    ten seconds, counted from the first batch drawn (not from loading the run); nothing for a draw
    that ends within the first interval. It reads only the clock (no synchronisation with the device)."""

    clock = staticmethod(time.monotonic)
    #: seconds between lines, on a terminal and elsewhere
    EVERY = {True: 1.0, False: 10.0}

    def __init__(self, total: int, stream: Any = None, clock: Callable[[], float] | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        if clock is not None:
            self.clock = clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last: float | None = None  # when the last line was shown (at first: the first batch)
        self._shown = False
        self._closed = False  # a write failed: no more lines

    def __call__(self, done: int) -> None:
        now = self.clock()
        if self._last is None:
            self._last = now
        final = done >= self.total
        if now - self._last < self.EVERY[self.tty] and not (final and self._shown):
            return
        if self._closed:
            return
        from .console import safe_write

        line = f"sampling: {done:,} / {self.total:,}"
        # a closed pipe or hung-up terminal ends the progress lines, not the draw
        self._closed = not safe_write(self.stream, ("\r" + line + ("\n" if final else "")) if self.tty
                                      else line + "\n")
        self._last, self._shown = now, True


def sample(run_dir: str | Path, n: int, seed: int = 0, *, device: str = "cpu",
           host: PluginHost | None = None, generator: str = "auto", condition: int | None = None,
           warn: Callable[[str], None] | None = warn_stderr, progress: Callable[[int], None] | None = None):
    """``n`` samples from the run's latest checkpoint as a float32 NumPy array ``(n, *data_shape)``:
    conditions drawn from the run's prior, or all of one ``condition`` in use. The array is the
    memory the samples were drawn into (no copy); a ``n`` whose samples would not fit in the memory
    available is refused (``OutOfMemory``) before they are drawn.
    ``generator``: see ``_load_run`` (auto = the weight average when the run keeps one); ``warn``:
    see ``load_run``; ``progress``: see ``Run.generate``."""
    n, seed = _check_n(n, "n"), _check_seed(seed)
    if condition is not None:
        condition = _integer(condition, "condition")  # its type before loading; whether it is in use after
    run = load_run(run_dir, device=device, generator=generator, host=host, warn=warn)
    return run.generate(n, seed, condition, progress=progress).numpy()


def evaluate(run_dir: str | Path, n: int | None = None, seed: int = 0, *, device: str = "cpu",
             host: PluginHost | None = None, generator: str = "auto",
             warn: Callable[[str], None] | None = warn_stderr) -> dict[str, Any]:
    """The dataset's metrics on ``n`` samples from the run's latest checkpoint
    (``generator``: see ``_load_run``; ``warn``: see ``load_run``)."""
    import torch

    from .training import check_metrics, generate, score

    if n is not None:
        n = _check_n(n)  # the CLI's --n, whose message the tests pin
    seed = _check_seed(seed)
    host = host or get_host()
    loaded = _load_run(run_path(run_dir), host, device, generator, warn)
    cfg, comps, dev = loaded.cfg, loaded.comps, loaded.device
    n = cfg["eval_samples"] if n is None else n
    with _out_of_memory_as_usage("loading the training data", "the dataset does not fit in memory"):
        real = _load_saved_data(comps, cfg, run_dir, loaded.data_shape).to(dev)
    if not comps.metrics:  # an empty success would look like a score (after the data check: a run
        # whose data changed says so first)
        raise UsageError(f"nothing to evaluate: the run in {str(run_dir)!r} has no metrics (it was trained with "
                         "--metrics none); `dyngan sample` draws its samples")
    for warning in check_metrics(comps, n, real.shape[0]):  # refuses a --n a metric cannot score
        if warn is not None:
            warn(warning)
    with _out_of_memory_as_usage(f"drawing {n:,} samples on {dev}"):
        fake = generate(loaded.G, n, comps.model.z_dim, loaded.prior, dev,
                        torch.Generator(device=dev).manual_seed(seed), model=comps.model, data_shape=loaded.data_shape)
    with _out_of_memory_as_usage(f"scoring {n:,} samples on {dev}"):
        values, protocols = score(comps, fake, real)
    return {"run": str(run_dir), "step": loaded.step, "samples": n, "dataset": cfg["dataset"],
            "generator": loaded.weights,
            "metrics": values, "protocols": protocols}
