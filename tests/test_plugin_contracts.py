"""Per-kind class contracts checked when a plugin registers, their test-kit checks, the training loop's
wrong-shape messages, and `dyngan install` of a distribution that is no dyngan plugin."""

from __future__ import annotations

import json
import sys
import uuid
from importlib import metadata

import pytest

from core import api, hookimpl
from core import install as inst
from core.components import CollapseDetector, Detection, Option, Partitioner, PartitionUpdate
from core.errors import PluginError, RunFailure, UnknownComponentError
from core.plugins import PluginHost, load_plugins
from core.registry import Registry
from core.testing import check_detector, check_options_schema, plugin_host
from cli_helpers import invoke
from test_plugin_messages import error_of
from test_plugins import write_dist


def usage_error(res) -> str:
    """The one-line error of a CLI run that must fail as bad input (exit 2, no traceback)."""
    msg = error_of(res)
    assert len(msg.strip().splitlines()) == 1, msg
    return msg


# --------------------------------------------------------------------------- detectors and partitioners need `every`


class QuietDetector(CollapseDetector):
    """Detects nothing; subclasses vary only how ``every`` is declared."""

    name = "quiet"
    options = {"every": Option(2, "detect every this many steps", min=1)}

    def detect(self, ctx):
        import torch

        collapsed = torch.zeros(ctx.data.shape[0], dtype=torch.bool)
        return Detection(collapsed=collapsed, fraction=collapsed.float().mean())


class FarNoEvery(QuietDetector):
    name = "far-noevery"
    options = {}


class KeepPartitioner(Partitioner):
    name = "keep"
    options = {"every": Option(2, "check every this many steps", min=1)}

    def partition(self, ctx, detection):
        return None


def variant(base: type, name: str, **attrs) -> type:
    return type(name.replace("-", "_"), (base,), {"name": name, **attrs})


class EveryProperty(QuietDetector):
    name = "every-property"
    options = {}

    @property
    def every(self) -> int:
        return 3


BAD_EVERY = [
    pytest.param({}, "no `every` option", id="no-option"),
    pytest.param({"every": Option(2.0, "steps", min=1)}, "is a float", id="float"),
    pytest.param({"every": Option(True, "steps")}, "is a bool", id="bool"),
    pytest.param({"every": Option(2, "steps")}, "no minimum", id="no-min"),
    pytest.param({"every": Option(2, "steps", min=0)}, "minimum 0", id="min-0"),
    pytest.param({"every": Option(None, "steps", type=int, min=1, nullable=True)}, "nullable", id="nullable"),
    pytest.param({"every": 500}, "not an Option", id="not-an-option"),
]


@pytest.mark.parametrize("base, kind", [(QuietDetector, "detector"), (KeepPartitioner, "partitioner")])
@pytest.mark.parametrize("options, why", BAD_EVERY)
def test_registering_a_schedule_component_without_every_is_refused_saying_what_to_add(base, kind, options, why):
    cls = variant(base, f"bad-{kind}", options=options)
    with pytest.raises(PluginError) as exc:
        Registry().add(kind, cls, "far")
    msg = str(exc.value)
    assert f"plugin 'far' registered {kind} class {cls.__name__} ('bad-{kind}')" in msg
    assert why in msg
    assert '"every": Option(' in msg and "min=1)" in msg and "override the `every` property" in msg
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("cls", [QuietDetector, EveryProperty,
                                 variant(QuietDetector, "every-attr", options={}, every=4),
                                 variant(QuietDetector, "every-min-2", options={"every": Option(4, "s", min=2)}),
                                 variant(QuietDetector, "subclass")])
def test_an_every_option_or_an_overridden_every_registers(cls):
    reg = Registry()
    reg.add("detector", cls, "p")
    assert reg.get("detector", cls.name) is cls


def test_other_kinds_need_no_every():
    from core.components import Loss

    reg = Registry()
    reg.add("loss", type("NoEveryLoss", (Loss,), {"name": "no-every"}), "p")
    assert reg.names("loss") == ["no-every"]


class FarPlugin:
    @staticmethod
    @hookimpl
    def register_collapse_detectors(register):
        register(FarNoEvery)


def test_a_detector_without_every_fails_its_plugin_and_asking_for_it_names_why(tmp_path):
    out = tmp_path / "run"
    with plugin_host(("far", FarPlugin)) as host:
        info = host.plugins["far"]
        listing = invoke(["plugins"])
        res = invoke(["train", "--detector", "far-noevery", "--dataset", "ring8", "-o", "dataset.n=200",
                      "--steps", "3", "--device", "cpu", "--out", str(out), "-q"])
    assert info.error.startswith("failed while registering: plugin 'far' registered detector class FarNoEvery")
    assert info.components == {}
    assert "far  FAILED: failed while registering: plugin 'far' registered detector class FarNoEvery" in listing.stdout
    msg = usage_error(res)
    assert "unknown detector 'far-noevery'" in msg and "did you mean" not in msg
    assert "note: plugin 'far' failed to load (failed while registering:" in msg
    assert '"every": Option(' in msg
    assert not out.exists()  # refused before a run directory is made


def test_every_builtin_and_example_plugin_still_registers():
    host = load_plugins(env={})
    dists = {p.distribution for p in host.plugins.values()}
    assert {"dyngan", "dyngan-knn-detector", "dyngan-ragan", "dyngan-imbalanced"} <= dists
    assert {p.name: p.error for p in host.failed} == {}
    assert host.registry.names("detector") and host.registry.names("partitioner")


# --------------------------------------------------------------------------- the test kit says so too


def test_check_options_schema_reports_a_missing_every():
    with pytest.raises(AssertionError) as exc:
        check_options_schema(FarNoEvery)
    msg = str(exc.value)
    assert msg.startswith("detector 'far-noevery': ") and "no `every` option" in msg and '"every": Option(' in msg
    bad = variant(KeepPartitioner, "bad-partitioner", options={"every": Option(2, "steps", min=0)})
    with pytest.raises(AssertionError, match=r"partitioner 'bad-partitioner': .*minimum 0"):
        check_options_schema(bad)
    check_options_schema(QuietDetector)
    check_options_schema(EveryProperty)
    check_options_schema(KeepPartitioner)


def test_check_detector_reports_a_missing_every_as_an_assertion_error():
    with pytest.raises(AssertionError) as exc:
        check_detector(FarNoEvery)
    assert str(exc.value).startswith("detector 'far-noevery': ") and "no `every` option" in str(exc.value)


def test_check_detector_reports_an_every_property_that_raises():
    class Raising(EveryProperty):
        name = "raising-every"

        @property
        def every(self) -> int:
            raise KeyError("every")

    with pytest.raises(AssertionError, match=r"detector 'raising-every': reading `every` raised KeyError"):
        check_detector(Raising)


def test_check_detector_accepts_an_overridden_every():
    det = check_detector(EveryProperty)
    assert not det.collapsed.any()


# --------------------------------------------------------------------------- wrong shapes: N and what came


class WrongDetection(QuietDetector):
    """Returns what ``what`` says instead of a proper Detection."""

    name = "wrong-detection"
    options = {**QuietDetector.options,
               "what": Option("column", "what to return", choices=(
                   "column", "none", "list", "float-mask", "fraction-vector", "fraction-range", "short-score",
                   "wrong-features"))}

    def detect(self, ctx):
        import torch

        n = ctx.data.shape[0]
        what = self.opts.what
        if what == "none":
            return None
        if what == "list":
            return Detection(collapsed=[False] * n, fraction=torch.tensor(0.0))
        if what == "column":
            collapsed = torch.zeros(n, 1, dtype=torch.bool)
            return Detection(collapsed=collapsed, fraction=collapsed.float().mean())
        collapsed = torch.arange(n) % 2 == 0
        det = Detection(collapsed=collapsed, fraction=collapsed.float().mean())
        if what == "float-mask":  # used to be read as a mask of indices 0 and 1
            det.collapsed = collapsed.float()
        elif what == "fraction-vector":  # used to fail in float() with a traceback
            det.fraction = collapsed.float()
        elif what == "fraction-range":  # used to be logged as is
            det.fraction = torch.tensor(5.0)
        elif what == "short-score":  # used to fail in the partitioner, which was blamed
            det.score = torch.rand(n - 1)
        elif what == "wrong-features":  # used to be ignored silently (the partitioner recomputed them)
            det.features = torch.rand(7, 3)
        return det


class UnsavableState(QuietDetector):
    """Keeps a list of tensors in its state: not something a checkpoint can hold."""

    name = "unsavable-state"

    def state_dict(self):
        import torch

        return {"count": 3, "hist": [torch.zeros(2)]}


class WrongLabels(KeepPartitioner):
    name = "wrong-labels"
    options = {**KeepPartitioner.options,
               "what": Option("short", "what to return", choices=("short", "none", "big", "list"))}

    def partition(self, ctx, detection):
        import torch

        n = ctx.data.shape[0]
        if self.opts.what == "none":
            return PartitionUpdate(labels=None)
        if self.opts.what == "list":
            return PartitionUpdate(labels=[0] * n)
        if self.opts.what == "big":
            return PartitionUpdate(labels=torch.full((n,), ctx.capacity + 3))
        return PartitionUpdate(labels=torch.zeros(n - 1, dtype=torch.long))


class WrongPlugin:
    @staticmethod
    @hookimpl
    def register_collapse_detectors(register):
        register(WrongDetection)
        register(UnsavableState)

    @staticmethod
    @hookimpl
    def register_partitioners(register):
        register(WrongLabels)


def train_with(tmp_path, **settings):
    base = {"dataset": "ring8", "steps": 3, "device": "cpu", "threads": 1, "seed": 0, "eval_every": 0,
            "out": str(tmp_path / uuid.uuid4().hex[:8]), "options": {"dataset": {"n": 100}}}
    options = settings.pop("options", {})
    base.update(settings)
    base["options"].update(options)
    with plugin_host(("wrong", WrongPlugin), strict=True):
        with pytest.raises(RunFailure) as exc:
            api.train(base, quiet=True)
    return str(exc.value)


@pytest.mark.parametrize("what, got", [
    ("column", "collapsed is torch.bool(100, 1), expected torch.bool (100,)"),
    ("none", "detect() returned NoneType, not a core.components.Detection"),
    ("list", "collapsed is list, expected torch.bool (100,)"),
    ("float-mask", "collapsed is torch.float32(100,), expected torch.bool (100,)"),
    ("fraction-vector", "fraction is torch.float32(100,), expected a 0-d float tensor"),
    ("fraction-range", "fraction is 5.0, not in [0, 1]"),
    ("short-score", "score is torch.float32(99,), expected None or a float tensor (100)"),
    ("wrong-features", "features is torch.float32(7, 3), expected None or a float tensor (100, F)"),
])
def test_a_wrong_detection_says_n_and_what_it_got(tmp_path, what, got, monkeypatch):
    """Every detection is checked where it comes from, so the detector is named (not the partitioner
    that would trip over it, or nobody when it would be misread)."""
    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    msg = train_with(tmp_path, detector="wrong-detection", partitioner="dyngan", conditioner="onehot",
                     options={"detector": {"every": 1, "what": what}, "partitioner": {"every": 1}})
    assert "detector 'wrong-detection' (plugin 'wrong') raised in detect()" in msg
    assert "N = 100 training samples" in msg and got in msg, msg


def test_a_state_a_checkpoint_cannot_hold_names_the_detector_and_the_key(tmp_path, monkeypatch):
    """It used to read "state component/detector/hist is neither a tensor nor JSON-serialisable: list",
    naming neither the plugin nor the component, and blaming the list rather than the tensor in it."""
    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    msg = train_with(tmp_path, detector="unsavable-state")
    assert "detector 'unsavable-state' (plugin 'wrong') raised in state_dict()" in msg, msg
    assert "value 'hist' (list) is neither a tensor nor JSON (Object of type Tensor is not JSON" in msg, msg
    assert "each tensor under its own key" in msg


@pytest.mark.parametrize("what, got", [("short", "got labels of shape (99,)"),
                                       ("none", "got labels of type NoneType"),
                                       ("list", "got labels of type list"),
                                       ("big", "got values in [")])
def test_wrong_labels_say_n_and_what_they_got(tmp_path, what, got, monkeypatch):
    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    msg = train_with(tmp_path, partitioner="wrong-labels", conditioner="onehot",
                     options={"partitioner": {"every": 1, "what": what}})
    assert "partitioner 'wrong-labels' (plugin 'wrong') raised in partition()" in msg
    assert "labels must have shape (100,)" in msg and got in msg, msg


# --------------------------------------------------------------------------- install of a distribution without a plugin


@pytest.fixture
def dists(tmp_path, monkeypatch):
    """``put(dist, plugins)`` writes a fake installed distribution ``dist`` 0.1.0 on sys.path, whose entry points
    in the group dyngan are ``plugins`` (each a plugin module registering one loss; none: no group at all).
    pip is faked: ``pip_installs`` is what its report says it installed, as ``(name, requested)``; the
    fresh listing is made in this process."""
    suffix = uuid.uuid4().hex[:8]
    mods: list[str] = []
    pip_installs: list[tuple[str, bool]] = []

    def put(dist: str, plugins: list[str]) -> None:
        site = tmp_path / f"site-{dist}"
        modules = {}
        for plugin in plugins:
            mods.append(f"{plugin}_{suffix}")
            modules[mods[-1]] = (f"from core import hookimpl\nfrom core.components import Loss\n\n"
                                 f"class L(Loss):\n    name = {plugin.replace('_', '-') + '-loss'!r}\n\n"
                                 f"@hookimpl\ndef register_losses(register):\n    register(L)\n")
        write_dist(site, dist, "0.1.0", {p: f"{p}_{suffix}" for p in plugins}, modules)
        if not plugins:
            (site / f"{dist.replace('-', '_')}-0.1.0.dist-info" / "entry_points.txt").unlink()
        monkeypatch.syspath_prepend(str(site))

    def pip(args, echo=None):
        path = args[args.index("--report") + 1]
        items = [{"metadata": {"name": n, "version": "0.1.0"}, "requested": r} for n, r in pip_installs]
        with open(path, "w") as f:
            json.dump({"install": items}, f)
        return []

    monkeypatch.setattr(inst, "run_pip", pip)
    monkeypatch.setattr(inst, "_pip_supports_report", lambda: True)
    monkeypatch.setattr(inst, "list_plugins_fresh", lambda timeout=300: load_plugins(env={}).report())
    put.pip_installs = pip_installs
    yield put
    for mod in mods:
        sys.modules.pop(mod, None)


def test_install_of_a_distribution_without_a_dyngan_plugin_is_a_usage_error_and_stays_installed(dists, monkeypatch):
    dists("requests-like", [])
    dists.pip_installs.append(("requests-like", True))
    res = invoke(["install", "requests-like"])
    msg = usage_error(res)
    assert "installed requests-like 0.1.0" in res.stdout and "registers no dyngan plugin" in res.stdout
    assert "requests-like has no dyngan plugin" in msg and "[project.entry-points.dyngan]" in msg
    # it stays installed: say how to remove it, with pip, since `dyngan uninstall` refuses what is no plugin
    assert f"`{sys.executable} -m pip uninstall requests-like`" in msg and "`dyngan uninstall` removes plugins only" in msg
    assert metadata.version("requests-like") == "0.1.0"
    monkeypatch.setattr(inst, "run_pip", lambda *a, **k: pytest.fail("pip must not run"))
    refused = usage_error(invoke(["uninstall", "requests-like"]))
    assert "refusing to uninstall requests-like: it is not a dyngan plugin" in refused
    assert f"`{sys.executable} -m pip uninstall requests-like`" in refused


def test_install_result_lists_the_requested_distributions_without_a_plugin(dists):
    dists("requests-like", [])
    dists("dyngan-tiny", ["tiny"])
    dists.pip_installs.extend([("requests-like", True), ("dyngan-tiny", True)])
    res = inst.install_plugins(["requests-like", "dyngan-tiny"])
    assert [d.name for d in res.without_plugin] == ["requests-like"]


def test_a_dependency_without_a_plugin_is_no_error(dists):
    dists("dyngan-tiny", ["tiny"])
    dists("numpy-like", [])
    dists.pip_installs.extend([("dyngan-tiny", True), ("numpy-like", False)])
    res = invoke(["install", "dyngan-tiny"])
    assert res.exit_code == 0, res.output
    assert "installed dyngan-tiny 0.1.0" in res.stdout and "loss: tiny-loss" in res.stdout
    assert "numpy-like" not in res.output


def test_install_of_a_plugin_and_a_non_plugin_shows_the_plugin_and_exits_2(dists):
    dists("dyngan-tiny", ["tiny"])
    dists("requests-like", [])
    dists.pip_installs.extend([("dyngan-tiny", True), ("requests-like", True)])
    res = invoke(["install", "dyngan-tiny", "requests-like"])
    msg = usage_error(res)
    assert "loss: tiny-loss" in res.stdout
    assert "requests-like has no dyngan plugin" in msg and "dyngan-tiny" not in msg


# --------------------------------------------------------------------------- the docs say what the code says


def test_the_docs_quote_the_failed_plugin_notes():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    host = PluginHost()

    def register_collapse_detectors(register):
        register(FarNoEvery)

    mod = type(sys)("far")
    mod.register_collapse_detectors = hookimpl(register_collapse_detectors)
    host.add_plugin("far", lambda: mod)
    with pytest.raises(UnknownComponentError) as offered:
        host.registry.get("detector", "far-noevery")
    with pytest.raises(UnknownComponentError) as other:
        host.registry.get("detector", "far")
    assert "note: plugin 'far' failed to load (failed while registering: plugin 'far' registered detector" in \
        str(offered.value)
    assert str(other.value).endswith("; note: plugin 'far' failed to load; see `dyngan plugins`")
    assert "note: plugin 'far' failed to load (failed while registering: plugin 'far' registered detector" in doc
    assert "note: plugin 'far' failed to load; see `dyngan plugins`" in doc
    assert "an integer `every` option" in doc
