"""Resolving a run's settings: defaults < preset < config file < flags.

The optimiser settings (lr_g, lr_d, betas) not given by the user come from the
chosen loss's recommendation, else the preset, else 1e-3 and (0.5, 0.999).

The result is a plain JSON-able dict (``config.json`` of the run) in which every
component is named and every option of every component has its validated value.
Nothing here imports torch.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import ComponentFailure, DynganError, OptionError, UsageError, component_label
from .options import Option, _exact_int, toml_type_problem
from .registry import Registry

#: the component slots of a run and the kind each one takes
SLOTS: dict[str, str] = {
    "dataset": "dataset",
    "model": "model",
    "loss": "loss",
    "detector": "detector",
    "partitioner": "partitioner",
    "conditioner": "conditioner",
}
#: kinds whose options ``-o KIND.KEY=VALUE`` and ``[options.KIND]`` set: the slots, and the
#: metrics (``metric.KEY`` goes to every chosen metric that has KEY, ``metric.NAME.KEY`` to one)
OPTION_KINDS: tuple[str, ...] = (*SLOTS, "metric")
#: slots that may be "none"
OPTIONAL_SLOTS = ("detector", "partitioner", "conditioner")

DEFAULTS: dict[str, Any] = {
    "dataset": "grid25",
    "model": None,  # the dataset's default_model
    "loss": "ns",
    "detector": None,
    "partitioner": None,
    "conditioner": None,
    "preset": None,
    "metrics": None,  # the dataset's default_metrics
    "steps": 30_000,
    "batch_size": 128,
    "lr_g": None,  # the loss's recommendation, else 1e-3
    "lr_d": None,
    "betas": None,  # the loss's recommendation, else (0.5, 0.999)
    "seed": 0,
    "device": "auto",
    "log_every": 100,
    "eval_every": 5000,
    "eval_samples": None,  # the dataset's eval_samples
    "checkpoint_every": 5000,
    "keep_checkpoints": 3,
    "amp": "none",
    "compile": False,
    "on_divergence": "stop",
    "threads": None,  # torch CPU threads; None keeps torch's default
    "g_ema": 0.0,  # decay of an exponential moving average of G's weights; 0 = none
    "adam_impl": "fused",  # torch's Adam kernels: fused (one kernel), foreach, or loop (per tensor)
    "sampling": "replacement",  # real batches: drawn with replacement, or shuffled epochs (the DynGAN 2D code)
    "options": {},
}
FALLBACK_OPTIMIZER = {"lr_g": 1e-3, "lr_d": 1e-3, "betas": [0.5, 0.999]}
_OPTIMIZER_KEYS = ("lr_g", "lr_d", "betas")

_INT_KEYS = {"steps": 1, "batch_size": 1, "seed": 0, "log_every": 1, "eval_every": 0,
             "checkpoint_every": 0, "keep_checkpoints": 1, "eval_samples": 1,
             "threads": 1}
# upper bounds: more torch threads than this fail inside the OpenMP runtime (a crash, not an error)
# seeds past 2**63 overflow torch's generators once the run's stream offsets are added
MAX_SEED = 2**63 - 1
_INT_MAX = {"threads": 1024, "seed": MAX_SEED}
_INT64_MAX = 2**63 - 1
_FLOAT_KEYS = ("lr_g", "lr_d")
_FLOAT_MAX = 10.0  # an Adam learning rate above this is a typo (and past ~1e38 crashes the optimiser)
#: torch.optim.Adam's keyword for each ``adam_impl``: one fused kernel, a few multi-tensor kernels,
#: or one small step per parameter tensor (torch's own choice on the CPU before fused existed)
ADAM_IMPL = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
#: how real batches are drawn: independently with replacement, or as the batches of shuffled epochs
#: (each sample once per epoch, the last partial batch dropped, as the DynGAN 2D code trains)
SAMPLING = ("replacement", "epoch")
_CHOICES = {"amp": ("none", "bf16"), "on_divergence": ("stop", "rollback"), "adam_impl": tuple(ADAM_IMPL),
            "sampling": SAMPLING}


MAX_CONFIG_BYTES = 2**20


def _read_bounded(p: Path) -> bytes:
    """Up to MAX_CONFIG_BYTES + 1 bytes of ``p``. A pipe (``--config <(...)``) is read as long as
    a process writes to it; a named FIFO that no process has open for writing is refused instead of
    waiting forever for one."""
    import fcntl
    import stat

    if not stat.S_ISFIFO(os.stat(p).st_mode):
        with open(p, "rb") as f:
            return f.read(MAX_CONFIG_BYTES + 1)
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)  # does not wait for a writer
    try:
        try:
            first = os.read(fd, MAX_CONFIG_BYTES + 1)
        except BlockingIOError:  # a writer holds it open and has not written yet
            first = None
        if first == b"" and not str(p).startswith(("/dev/fd/", "/proc/")):
            # a named FIFO with no writer (an anonymous pipe, --config <(...), had one: it is just empty)
            raise UsageError(f"config file {str(p)!r} is a FIFO that no process writes to: give a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        chunks = [first] if first else []
        size = len(first or b"")
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class ConfigFile(dict):
    """A config file's settings (``read_toml``) and its ``path``: ``resolve`` checks the TOML types of its
    component options once the components, and so the options' types, are known."""

    def __init__(self, data: Mapping[str, Any], path: Path) -> None:
        super().__init__(data)
        self.path = path


def read_toml(path: str | Path) -> ConfigFile:
    """A config file: the same keys as the flags (``steps = 1000``, ``[options.detector]``)."""
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path)
    try:
        raw = _read_bounded(p)  # bounded: /dev/zero or a huge file is refused, not read forever
        if len(raw) > MAX_CONFIG_BYTES:
            raise UsageError(f"config file {str(p)!r} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: "
                             "not a dyngan config")
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file {str(p)!r}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise UsageError(f"config file {str(p)!r} nests arrays or tables too deeply to be a dyngan "
                         "config") from None
    _check_file_types(data, p)
    return ConfigFile(data, p)


#: train's flags that say how to run, not what to train: a config file cannot hold them
_FLAG_ONLY = {"out": "--out DIR", "resume": "--resume", "quiet": "--quiet", "dry_run": "--dry-run",
              "config": "--config: one file, not nested"}


def _toml_repr(v: Any) -> str:
    """A config file's value for a message, as TOML writes it (``true``, not ``True``)."""
    return str(v).lower() if isinstance(v, bool) else repr(v)


def _check_file_types(data: Mapping[str, Any], path: Path) -> None:
    """TOML types its values: a quoted number or a float where a count is expected is a mistake.

    (The library API and a run's config.json go through the looser ``_check_scalars``: JSON
    writes no int/float distinction a user could rely on, e.g. 1000.0.)
    """
    where = f"config file {str(path)!r}"
    for key in data:
        if key in _FLAG_ONLY:
            raise UsageError(f"{where}: {key!r} is a command-line flag only ({_FLAG_ONLY[key]}), "
                             "not a setting a config file holds")
        if key not in DEFAULTS:
            raise _unknown_setting(key, f"{where}: ", " (`dyngan train --dry-run` prints every setting)")
    count, number = Option(0), Option(0.0)  # the TOML types of the settings, as if they were options
    for key, opt in [*((k, count) for k in _INT_KEYS), *((k, number) for k in (*_FLOAT_KEYS, "g_ema"))]:
        v = data.get(key)
        problem = None if v is None else toml_type_problem(v, opt)
        if problem is not None:
            raise UsageError(f"{where}: setting {key!r} must be {problem}, got {_toml_repr(v)}")


def _check_file_option_types(files: list[ConfigFile], kind: str,
                             schemas: Mapping[str, Mapping[str, Option]]) -> None:
    """The config files' ``[options.KIND]`` values have their options' TOML types (``_check_file_types``
    for component options). ``schemas``: ``{"": options}`` for a slot's component, ``{name: options}``
    of the chosen metrics for ``metric`` (``KEY`` goes to each that has it, ``NAME.KEY`` to NAME).
    A key no schema has is left to ``resolve_options`` to name."""
    for f in files:
        opts = f.get("options")
        table = opts.get(kind) if isinstance(opts, Mapping) else None
        if not isinstance(table, Mapping):
            continue
        for key, value in (flat_metric_options(table) if kind == "metric" else table).items():
            name, _, opt_key = str(key).rpartition(".") if kind == "metric" else ("", "", key)
            for owner, schema in schemas.items():
                problem = (toml_type_problem(value, schema[opt_key])
                           if name in ("", owner) and opt_key in schema else None)
                if problem is not None:
                    raise OptionError(f"config file {str(f.path)!r}: option {f'{kind}.{key}'!r} must be "
                                      f"{problem}, got {_toml_repr(value)}")


def parse_option_flags(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``["detector.delta=0.1"]`` -> ``{"detector": {"delta": "0.1"}}`` (values typed later)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        kind, dot, opt = key.strip().partition(".")
        if not sep or not dot or not kind or not opt:
            raise UsageError(f"option {item!r} must look like KIND.KEY=VALUE, e.g. detector.delta=0.1")
        if kind not in OPTION_KINDS:
            raise UsageError(f"option {item!r}: unknown kind {kind!r} (kinds: {', '.join(OPTION_KINDS)})")
        out.setdefault(kind, {})[opt.strip()] = value.strip()
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if k == "options":
            opts = {kind: dict(vals) for kind, vals in out.get("options", {}).items()}
            if not isinstance(v, Mapping):
                raise UsageError("`options` must be a table of component kinds")
            for kind, vals in v.items():
                if not isinstance(vals, Mapping):
                    raise UsageError(f"`options.{kind}` must be a table of option values")
                opts.setdefault(kind, {}).update(vals)
            out["options"] = opts
        else:
            out[k] = v
    return out


def _unknown_setting(key: Any, where: str = "", after: str = "") -> UsageError:
    """``unknown setting 'step'; did you mean 'steps'?`` (``where`` before it, ``after`` after it)."""
    import difflib

    close = difflib.get_close_matches(str(key), list(DEFAULTS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UsageError(f"{where}unknown setting {key!r}{hint}{after}")


def _check_scalars(cfg: dict[str, Any]) -> None:
    unknown = [k for k in cfg if k not in DEFAULTS]
    if unknown:
        raise _unknown_setting(unknown[0])
    for key, lo in _INT_KEYS.items():
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool):
            raise UsageError(f"setting {key!r} must be an integer, got {v!r}")
        if not isinstance(v, int):
            try:
                v = int(v) if isinstance(v, str) and v.strip().lstrip("+-").isdigit() else _exact_int(float(v))
            except (TypeError, ValueError, OverflowError):
                raise UsageError(f"setting {key!r} must be an integer, got {cfg[key]!r}") from None
        if v < lo:
            raise UsageError(f"setting {key!r} must be >= {lo}, got {v}")
        hi = _INT_MAX.get(key, _INT64_MAX)  # torch takes sizes and counts as 64-bit integers
        if v > hi:
            raise UsageError(f"setting {key!r} must be between {lo} and {hi}, got {v}")
        cfg[key] = v
    for key in _FLOAT_KEYS:
        v = cfg.get(key)
        if v is None:
            continue
        try:
            if isinstance(v, bool):
                raise TypeError
            f = float(v)
        except (TypeError, ValueError, OverflowError):  # (an int past float's range)
            raise UsageError(f"setting {key!r} must be a number, got {v!r}") from None
        if not math.isfinite(f) or f <= 0:
            raise UsageError(f"setting {key!r} must be a positive number, got {v!r}")
        if f > _FLOAT_MAX:
            raise UsageError(f"setting {key!r} must be a positive number at most {_FLOAT_MAX:g}, got {v!r}")
        cfg[key] = f
    v = cfg.get("g_ema")
    if v is not None:
        try:
            if isinstance(v, bool):
                raise TypeError
            f = float(v)
        except (TypeError, ValueError, OverflowError):  # (an int past float's range)
            raise UsageError(f"setting 'g_ema' must be a number in [0, 1), got {v!r}") from None
        if isinstance(v, bool) or not 0.0 <= f < 1.0:
            raise UsageError(f"setting 'g_ema' must be a number in [0, 1) (0 = no average), got {v!r}")
        cfg["g_ema"] = f
    b = cfg.get("betas")
    if b is not None:
        if isinstance(b, str):
            b = [p for p in b.replace(" ", "").split(",") if p]
        try:
            if isinstance(b, Mapping) or any(isinstance(x, bool) for x in b):
                raise TypeError
            b = [float(x) for x in b]
        except (TypeError, ValueError, OverflowError):  # (an int past float's range)
            raise UsageError(f"setting 'betas' must be two numbers like 0.5,0.999, got {cfg['betas']!r}") from None
        if len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
            raise UsageError(f"setting 'betas' must be two numbers in [0, 1), got {cfg['betas']!r}")
        cfg["betas"] = b
    for key, choices in _CHOICES.items():
        if not isinstance(cfg.get(key), str) or cfg.get(key) not in choices:  # (str: an array has no `in`)
            raise UsageError(f"setting {key!r} must be one of {', '.join(choices)}, got {cfg.get(key)!r}")
    if not isinstance(cfg.get("compile"), bool):
        raise UsageError(f"setting 'compile' must be true or false, got {cfg.get('compile')!r}")
    check_device(cfg.get("device"))


def optimizer_defaults_problem(rec: Any) -> str | None:
    """What dyngan refuses in what a loss's ``optimizer_defaults()`` returned, None when nothing: it
    must be a dict whose keys are among lr_g, lr_d and betas (an unknown key such as ``lr`` was
    silently ignored) with values the settings of those names accept. Said by ``resolve`` and by
    the test kit's ``check_loss``, so that the two agree."""
    if not isinstance(rec, Mapping):
        return (f"returned {type(rec).__name__}; it must return a dict of lr_g, lr_d and/or betas (an empty "
                "one for the defaults)")
    unknown = [k for k in rec if k not in _OPTIMIZER_KEYS]
    if unknown:
        return (f"returned the key {unknown[0]!r}, which dyngan does not know; it may recommend "
                f"{', '.join(_OPTIMIZER_KEYS)}")
    for key in _OPTIMIZER_KEYS:
        if key not in rec:
            continue
        cfg = copy.deepcopy(DEFAULTS)
        cfg[key] = rec[key]
        try:
            _check_scalars(cfg)
        except UsageError as e:
            return f"recommended {key} = {rec[key]!r}, which dyngan refuses ({e})"
    return None


def check_device(dev: Any) -> str:
    """``dev`` if it is a device dyngan accepts (auto, cpu, cuda, cuda:N), else UsageError; whether
    the machine has it is ``core.training.resolve_device``'s question."""
    if not isinstance(dev, str) or not (dev in ("auto", "cpu", "cuda") or (
            dev.startswith("cuda:") and dev[5:].isascii() and dev[5:].isdigit()
            and (dev[5:] == "0" or not dev[5:].startswith("0")) and len(dev) <= 12)):
        raise UsageError(f"setting 'device' must be auto, cpu, cuda or cuda:N, got {dev!r}")
    return dev


def _metric_names(value: Any) -> list[str] | None:
    """``metrics`` as a list of names (None: the dataset's); ``none`` means no metrics."""
    if value is None:
        return None
    bad = (f"setting 'metrics' must be metric names, as a list of strings or comma-separated "
           f"(or none for no metrics), got {value!r}")
    if isinstance(value, str):
        if value.strip().lower() in ("none", "null"):
            return []
        names = [m for m in value.replace(" ", "").split(",") if m]
        if not names:
            raise UsageError(f"setting 'metrics' names no metric (got {value!r}); give metric names "
                             "separated by commas, or none for no metrics")
        if any(m.lower() in ("none", "null") for m in names):
            raise UsageError(f"setting 'metrics': none means no metrics and cannot be combined with metric "
                             f"names (got {value!r})")
        return names
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) and m.strip() for m in value):
        raise UsageError(bad)
    return [m.strip() for m in value]


def _none(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null"))


def flat_metric_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """Metric options as ``KEY`` (unscoped) and ``NAME.KEY`` (scoped) keys: a table
    (``[options.metric.prdc]`` in a config file, or a saved config's resolved options) becomes scoped keys."""
    flat: dict[str, Any] = {}
    for key, value in given.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def _metric_options(classes: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{metric: resolved options}`` for the chosen metrics from ``metric.KEY`` / ``metric.NAME.KEY``.

    An unscoped KEY goes to every chosen metric that declares it (it must be declared by one);
    a scoped one, which wins over the unscoped, to its metric, which must be chosen.
    """
    flat = flat_metric_options(given)
    per: dict[str, dict[str, Any]] = {m: {} for m in classes}
    chosen = ", ".join(classes) or "none"
    for key in sorted(flat, key=lambda k: "." in k):  # unscoped first, so scoped values win
        name, dot, opt = key.rpartition(".")
        if dot:
            if name not in classes:
                raise UsageError(f"option 'metric.{key}': metric {name!r} is not chosen (metrics: {chosen})")
            per[name][opt] = flat[key]
            continue
        takers = [m for m, cls in classes.items() if key in cls.options]
        if not takers:
            offered = "; ".join(f"{m}: {', '.join(sorted(cls.options)) or 'none'}" for m, cls in classes.items())
            raise UsageError(f"option 'metric.{key}': no chosen metric has it (metrics: {chosen}"
                             f"{'; ' + offered if offered else ''})")
        for m in takers:
            per[m][key] = flat[key]
    return {m: cls.resolve_options(per[m]) for m, cls in classes.items()}


def resolve(registry: Registry, layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge ``layers`` (config file, then flags) over the defaults and a preset; validate all.

    Raises UsageError (unknown names, bad values) before anything is built. An error that the
    preset's settings give on their own too (a misspelt setting, component or option: names the
    user never typed) names the preset. A preset that is valid only with the user's settings on
    top (it leaves the conditioner or the model to them) is not refused for that.
    """
    try:
        return _resolve(registry, layers)
    except UsageError as e:
        name = _merged(layers).get("preset")
        if not _none(name) and isinstance(name, str) and name in registry.names("preset"):
            try:
                _resolve(registry, [{"preset": name}])
            except UsageError as alone:
                if str(alone) == str(e):  # the preset's own mistake, whatever the user added
                    preset = registry.get("preset", name)
                    raise UsageError(f"{component_label('preset', preset.name, getattr(preset, 'plugin', None))} "
                                     f"has settings dyngan refuses: {e}") from e
        _attribute_to_file(registry, layers, e)  # else a mistake the config file gives on its own
        raise


def _attribute_to_file(registry: Registry, layers: list[Mapping[str, Any]], error: UsageError) -> None:
    """Name the config file in ``error`` when the file gives that error on its own (a bad value or
    an unknown option written there, not one typed as a flag): the message then starts with
    ``config file '...':``, as the file's type errors do. The error keeps its class."""
    text = str(error)
    if text.startswith("config file "):
        return
    for layer in layers:
        if not isinstance(layer, ConfigFile):
            continue
        try:
            _resolve(registry, [layer])
        except UsageError as alone:
            if str(alone) == text:
                error.args = (f"config file {str(layer.path)!r}: {text}", *error.args[1:])
                return


def _merged(layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The user's layers (config file, then flags) merged, later ones winning."""
    user: dict[str, Any] = {}
    for layer in layers:
        user = _merge(user, layer)
    return user


def _resolve(registry: Registry, layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``resolve`` without the preset's attribution."""
    files = [layer for layer in layers if isinstance(layer, ConfigFile)]
    user = _merged(layers)
    cfg = copy.deepcopy(DEFAULTS)
    preset_name = user.get("preset")
    preset_settings: dict[str, Any] = {}
    if not _none(preset_name):
        preset = registry.get("preset", str(preset_name))
        preset_settings = copy.deepcopy(dict(preset.settings))
        # the preset's optimiser settings rank below the chosen loss's recommendation (below)
        cfg = _merge(cfg, {k: v for k, v in preset_settings.items() if k not in _OPTIMIZER_KEYS})
        cfg["preset"] = preset.name
    cfg = _merge(cfg, user)
    if _none(cfg.get("preset")):
        cfg["preset"] = None
    _check_scalars(cfg)

    opts_in: dict[str, Any] = cfg.get("options") or {}
    user_opts: Mapping[str, Any] = user.get("options") or {}
    for kind in opts_in:
        if kind not in OPTION_KINDS:
            raise UsageError(f"options for unknown kind {kind!r} (kinds: {', '.join(OPTION_KINDS)})")

    # names: required slots must name a registered component; optional ones may be none
    for slot in SLOTS:
        if slot in OPTIONAL_SLOTS and _none(cfg.get(slot)):
            cfg[slot] = None
    if _none(cfg.get("dataset")) or _none(cfg.get("loss")):
        raise UsageError("a run needs a dataset and a loss")
    dataset_cls = registry.get("dataset", str(cfg["dataset"]))
    if _none(cfg.get("model")):
        cfg["model"] = dataset_cls.default_model
        try:  # a name the user did not type: say where it came from
            registry.get("model", str(cfg["model"]))
        except UsageError as e:
            where = component_label("dataset", dataset_cls.name, getattr(dataset_cls, "plugin", None))
            raise UsageError(f"{where} gives default_model {cfg['model']!r}, which dyngan cannot use ({e}); "
                             "choose a model with --model") from e
    resolved_opts: dict[str, dict[str, Any]] = {}
    classes = {}
    for slot, kind in SLOTS.items():
        name = cfg.get(slot)
        if name is None:
            if user_opts.get(slot):  # a preset's options for a slot the user switched off are dropped
                raise UsageError(f"options given for {slot}, but no {slot} is chosen")
            continue
        cls = registry.get(kind, str(name))
        cfg[slot] = cls.name
        classes[slot] = cls
        slot_opts = dict(opts_in.get(slot, {}))
        if cls.name != preset_settings.get(slot, cls.name):
            # the user replaced the preset's component: the preset's options for it that the
            # replacement does not have are dropped (--preset dyngan-image --partitioner kmeans:
            # no tau); the user's own options are still checked
            mine = (user_opts.get(slot) or {})
            for key in (preset_settings.get("options") or {}).get(slot, {}):
                if key not in cls.options and key not in mine:
                    slot_opts.pop(key, None)
        _check_file_option_types(files, slot, {"": cls.options})
        resolved_opts[slot] = cls.resolve_options(slot_opts)
    cfg["options"] = resolved_opts

    # a detector without a partitioner is allowed: it reports the collapse fraction only
    if cfg["partitioner"] is not None and cfg["conditioner"] is None:
        raise UsageError(
            f"partitioner {cfg['partitioner']!r} needs a conditioner to tell the networks the partition "
            "(e.g. --conditioner onehot)"
        )

    # optimiser: the user's values, else the loss's recommendation, else the preset's, else the fallback
    loss_cls = classes["loss"]

    def loss_failure(error: BaseException, method: str = "optimizer_defaults") -> ComponentFailure:
        return ComponentFailure(loss_cls.kind, loss_cls.name, getattr(loss_cls, "plugin", None), method, error)

    method = "__init__"
    try:
        loss = loss_cls(**resolved_opts["loss"])
        method = "optimizer_defaults"
        rec = loss.optimizer_defaults() or {}
    except DynganError:
        raise
    except Exception as e:  # noqa: BLE001 - the plugin's own error
        raise loss_failure(e, method) from e
    problem = optimizer_defaults_problem(rec)
    if problem is not None:  # a value the loss recommended, not the user's: the loss's failure
        raise loss_failure((TypeError if not isinstance(rec, Mapping) else ValueError)(problem))
    for key in _OPTIMIZER_KEYS:
        if user.get(key) is None:
            cfg[key] = rec.get(key, preset_settings.get(key, FALLBACK_OPTIMIZER[key]))
    _check_scalars(cfg)

    metrics = _metric_names(cfg.get("metrics"))
    if metrics is None:
        metrics = list(dataset_cls.default_metrics)
    metric_classes = {m: registry.get("metric", m) for m in metrics}
    cfg["metrics"] = [cls.name for cls in metric_classes.values()]
    _check_file_option_types(files, "metric", {m: cls.options for m, cls in metric_classes.items()})
    resolved_opts["metric"] = _metric_options(metric_classes, opts_in.get("metric") or {})
    if cfg.get("eval_samples") is None:
        cfg["eval_samples"] = int(getattr(dataset_cls, "eval_samples", 2500))
    return cfg

