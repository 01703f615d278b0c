"""A saved run records the plugins its components came from (config.json ``plugins``); loading it again
(resume, evaluate, sample, report, ``load_run``) refuses a component of the same name that another
plugin registers now, and leaves the run as it was."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import shutil
import sys
import uuid

import pytest

from core import api, hookimpl
from core.components import Loss, Metric
from core.errors import CheckpointError
from core.plugins import PluginHost, load_plugins
from core.testing import plugin_host
from cli_helpers import assert_clean_error, invoke
from test_plugins import make_plugin, registering, write_dist

SUFFIX = uuid.uuid4().hex[:8]

#: a loss plugin module; every distribution below registers loss 'soft-hinge' from its own copy
LOSS = """
    from core import hookimpl
    from core.components import Loss


    class SoftHinge(Loss):
        name = "soft-hinge"

        def d_loss(self, ctx):
            import torch.nn.functional as F
            return F.softplus(-ctx.real_logits).mean() + F.softplus(ctx.fake_logits).mean()

        def g_loss(self, ctx):
            import torch.nn.functional as F
            return F.softplus(-ctx.fake_logits).mean()


    @hookimpl
    def register_losses(register):
        register(SoftHinge)
"""

ORIGINAL = ("dyngan-softhinge", "softhinge")


def put_dist(root, monkeypatch, dist: str, plugin: str) -> str:
    """A fake installed distribution ``dist`` 0.1.0 whose plugin ``plugin`` registers loss soft-hinge,
    put on sys.path with ``monkeypatch``; returns its module's name."""
    module = f"prov_{plugin}_{uuid.uuid4().hex[:6]}_{SUFFIX}"
    site = root / f"site-{module}"
    write_dist(site, dist, "0.1.0", {plugin: module}, {module: LOSS})
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run with loss soft-hinge of plugin softhinge (distribution dyngan-softhinge 0.1.0),
    which stays installed for the module's tests."""
    root = tmp_path_factory.mktemp("provenance")
    mp = pytest.MonkeyPatch()
    module = put_dist(root, mp, *ORIGINAL)
    try:
        with plugin_host(env={}) as host:
            out = root / "run"
            api.train({"dataset": "ring8", "loss": "soft-hinge", "steps": 4, "batch_size": 16, "seed": 1,
                       "device": "cpu", "checkpoint_every": 2, "log_every": 2, "eval_every": 0,
                       "eval_samples": 50, "out": str(out), "options": {"dataset": {"n": 400}}},
                      quiet=True, host=host)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["plugins"]["softhinge"] == {"distribution": "dyngan-softhinge", "version": "0.1.0"}
        yield out
    finally:
        mp.undo()
        sys.modules.pop(module, None)


@pytest.fixture
def run(trained, tmp_path, monkeypatch):
    """A copy of the trained run (the tests may try to change it); the original plugin is on sys.path."""
    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


@pytest.fixture
def impostor(tmp_path, monkeypatch):
    """``put(plugin, dist="dyngan-impostor")`` installs another plugin that registers loss soft-hinge too."""
    modules = []

    def put(plugin: str, dist: str = "dyngan-impostor") -> None:
        modules.append(put_dist(tmp_path, monkeypatch, dist, plugin))

    yield put
    for m in modules:
        sys.modules.pop(m, None)


def snapshot(run_dir) -> dict[str, str]:
    """Every file of a run directory -> the sha256 of its bytes."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def commands(run_dir, tmp_path):
    cmds = [(["evaluate", str(run_dir), "--n", "20"], "loaded"),
            (["sample", str(run_dir), "--n", "5", "--out", str(tmp_path / "s.npy")], "loaded"),
            (["train", "--out", str(run_dir), "--resume", "--steps", "8", "-q"], "resumed"),
            (["train", "--out", str(run_dir), "--resume", "--dry-run"], "resumed")]
    if importlib.util.find_spec("matplotlib") is not None:  # `report` needs it before it loads the run
        cmds.append((["report", str(run_dir), "--n", "20"], "loaded"))
    return cmds


# --------------------------------------------------------------------------- another plugin's component is refused


def test_a_blocked_plugins_name_taken_by_another_plugin_is_refused_everywhere(run, impostor, tmp_path):
    """The QA case: the run's plugin is blocked, another one registers its loss's name. Every command
    that loads the run exits 2 naming the component, the run's plugin and the one there now, and the
    run directory is not touched (no checkpoint of the other loss, no record without softhinge)."""
    impostor("zz_impostor")
    before = snapshot(run)
    with plugin_host(env={"DYNGAN_BLOCK_PLUGINS": "softhinge"}) as host:
        assert host.registry.plugin_of("loss", "soft-hinge") == "zz_impostor"
        for args, verb in commands(run, tmp_path):
            err = assert_clean_error(
                invoke(args), 2,
                f"the run in {str(run)!r} cannot be {verb} with the installed plugins",
                "its loss 'soft-hinge' came from plugin 'softhinge' (distribution dyngan-softhinge 0.1.0), which is "
                "installed but not loaded: DYNGAN_BLOCK_PLUGINS blocks it (take 'softhinge' out of it)",
                "loss 'soft-hinge' is registered now by plugin 'zz_impostor' (distribution dyngan-impostor 0.1.0), "
                "which the run did not use")
            assert "did you mean" not in err
        with pytest.raises(CheckpointError, match="registered now by plugin 'zz_impostor'"):
            api.load_run(run, host=host)
    assert snapshot(run) == before
    assert not (tmp_path / "s.npy").exists()


def test_another_plugin_that_breaks_the_runs_plugin_is_refused(run, impostor, tmp_path):
    """Loaded first, the other plugin keeps the name and the run's own plugin fails on the clash."""
    impostor("aa_impostor")
    before = snapshot(run)
    with plugin_host(env={}) as host:
        assert host.plugins["softhinge"].error is not None
        err = assert_clean_error(invoke(["evaluate", str(run), "--n", "20"]), 2,
                                 "its loss 'soft-hinge' came from plugin 'softhinge' (distribution dyngan-softhinge "
                                 "0.1.0), which is installed but failed to load (failed while registering: loss "
                                 "'soft-hinge' is registered twice: by plugin 'aa_impostor'",
                                 "registered now by plugin 'aa_impostor' (distribution dyngan-impostor 0.1.0)")
        assert "cannot be loaded" in err
    assert snapshot(run) == before


def test_a_plugin_of_the_same_name_from_another_distribution_is_refused(run, impostor):
    """The record names the plugin and its distribution: a fork installed under the same plugin name
    (it loads first, the original fails as a second plugin of that name) is not the run's plugin."""
    impostor("softhinge", dist="dyngan-softhinge-fork")
    before = snapshot(run)
    with plugin_host(env={}) as host:
        assert host.plugins["softhinge"].distribution == "dyngan-softhinge-fork"
        assert_clean_error(invoke(["train", "--out", str(run), "--resume", "--steps", "8", "-q"]), 2,
                           "cannot be resumed with the installed plugins: its loss 'soft-hinge' came from plugin "
                           "'softhinge' of distribution dyngan-softhinge 0.1.0, but the plugin 'softhinge' loaded now "
                           "is another one, from distribution dyngan-softhinge-fork 0.1.0")
    assert snapshot(run) == before


# --------------------------------------------------------------------------- what must keep working


def test_the_runs_own_plugin_is_used_when_the_other_one_fails_on_the_clash(run, impostor, tmp_path):
    """Loaded second, the other plugin is the one that fails: the run evaluates and resumes with its own
    loss, and the resumed checkpoint still records softhinge."""
    impostor("zz_impostor")
    with plugin_host(env={}) as host:
        assert host.plugins["zz_impostor"].error is not None
        assert host.registry.plugin_of("loss", "soft-hinge") == "softhinge"
        res = invoke(["evaluate", str(run), "--n", "20", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["step"] == 4
        res = invoke(["train", "--out", str(run), "--resume", "--steps", "6", "-q"])
        assert res.exit_code == 0, res.output
    meta = json.loads((run / "checkpoints" / "step-00000006.json").read_text())
    assert meta["step"] == 6
    assert meta["plugins"]["softhinge"] == {"distribution": "dyngan-softhinge", "version": "0.1.0"}


def test_a_run_without_a_plugins_record_still_loads(run):
    """A config.json without the record (nothing to compare with) loads as before."""
    cfg = json.loads((run / "config.json").read_text())
    del cfg["plugins"]
    (run / "config.json").write_text(json.dumps(cfg))
    with plugin_host(env={}) as host:
        loaded = api.load_run(run, host=host)
    assert loaded.step == 4 and loaded.cfg["loss"] == "soft-hinge"


def test_builtin_components_match_their_record():
    host = load_plugins(env={})
    cfg = api.resolve_settings({"dataset": "ring8", "loss": "hinge", "preset": "dyngan"}, host)
    assert {"losses", "mixtures", "mlp", "dyngan"} <= set(cfg["plugins"])
    assert api._check_providers(host, cfg, cfg["plugins"]) is None
    # the same config whose record names the loss's built-in module otherwise (a component moved between
    # the modules of one package): the same distribution, so not another plugin's loss
    record = {("losses_old" if k == "losses" else k): v for k, v in cfg["plugins"].items()}
    assert api._check_providers(host, cfg, record) is None


# --------------------------------------------------------------------------- PluginHost.substituted


def _host(*plugins) -> PluginHost:
    host = PluginHost()
    host.reserved_commands = {}
    for name, dist, module in plugins:
        host.add_plugin(name, lambda m=module: m, distribution=dist, version="1.0")
    return host


def test_substituted_compares_plugin_names_and_normalised_distributions():
    host = _host(("x", "Dyngan_X", make_plugin("x", register_losses=registering(Loss, "x-loss"))))
    assert host.substituted("loss", "x-loss", {"x": {"distribution": "dyngan-x", "version": "0.9"}}) is None
    assert host.substituted("loss", "x-loss", {"x": {"distribution": None, "version": None}}) is None
    assert host.substituted("loss", "x-loss", None) is None and host.substituted("loss", "x-loss", {}) is None
    assert host.substituted("loss", "no-such-loss", {"y": {}}) is None  # unknown: resolving says so
    msg = host.substituted("loss", "x-loss", {"y": {"distribution": "dyngan-y", "version": "2"}})
    assert msg == ("its loss 'x-loss' came from plugin 'y' (distribution dyngan-y 2), which is not installed: install "
                   "it (`dyngan install dyngan-y`); loss 'x-loss' is registered now by plugin 'x' (distribution "
                   "Dyngan_X 1.0), which the run did not use: another plugin's loss is never put in its place")


def test_a_plugin_outside_the_record_is_refused_only_in_place_of_an_unloaded_plugin_of_another_package():
    host = _host(("a", "dyngan-a", make_plugin("a", register_losses=registering(Loss, "a-loss"))),
                 ("m", "dyngan-m", make_plugin("m", register_losses=registering(Loss, "m-loss"),
                                              register_metrics=registering(Metric, "m-metric"))))
    record = {"a": {"distribution": "dyngan-a", "version": "1.0"}}
    # every plugin the run recorded is loaded: nothing was put in the place of a missing one
    assert host.substituted("loss", "m-loss", record) is None
    # the run's plugin 'b' is gone and 'm', of another package, registers the name now: refused
    gone = {**record, "b": {"distribution": "dyngan-b", "version": "1.0"}}
    said = host.substituted("loss", "m-loss", gone)
    assert "came from plugin 'b' (distribution dyngan-b 1.0), which is not installed" in said
    assert "registered now by plugin 'm' (distribution dyngan-m 1.0)" in said
    # ... unless 'm' is of the same package as a recorded plugin (an entry point renamed)
    renamed = {**record, "b": {"distribution": "Dyngan_M", "version": "0.9"}}
    assert host.substituted("loss", "m-loss", renamed) is None
    # a metric changes what is measured, not the run: only the same-name case is refused for it
    assert host.substituted("metric", "m-metric", gone, strict=False) is None
    assert "from distribution dyngan-m" in host.substituted(
        "metric", "m-metric", {"m": {"distribution": "other-m", "version": "1.0"}}, strict=False)


def test_in_process_plugins_under_another_name_are_not_refused():
    """A run trained in a notebook with ``plugin_host(("dev", plug))``, reopened with ``("mine", plug)``:
    neither is an installed distribution, so no installed plugin took another's place."""
    host = PluginHost()
    host.reserved_commands = {}
    host.add_plugin("mine", lambda: make_plugin("mine", register_losses=registering(Loss, "dev-loss")))
    assert host.substituted("loss", "dev-loss", {"dev": {"distribution": None, "version": None}}) is None
    # but an installed plugin recorded and gone, with an in-process one in its place, is refused
    assert "registered now by plugin 'mine'" in host.substituted(
        "loss", "dev-loss", {"dev": {"distribution": "dyngan-dev", "version": "1.0"}})


def test_a_resume_records_the_plugin_of_a_metric_it_adds(trained, tmp_path):
    """The checkpoint's record of a resume that adds another plugin's metric names that plugin too."""

    class Tally(Metric):
        name = "prov-tally"

        def compute(self, fake, real, dataset):
            return {"n": float(fake.shape[0])}

    @hookimpl
    def register_metrics(register):
        register(Tally)

    import types

    extra = types.ModuleType("prov_tally")
    extra.register_metrics = register_metrics
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    with plugin_host(("prov_tally", extra), env={}) as host:
        cfg, _ = api.prepare({"out": str(run_dir), "metrics": ["mixture", "prov-tally"]}, resume=True, host=host)
    assert set(cfg["plugins"]) >= {"softhinge", "prov_tally"}
    assert cfg["metrics"] == ["mixture", "prov-tally"]


def test_a_resume_that_changes_the_metrics_records_their_plugin_and_the_old_ones_may_go(tmp_path, monkeypatch):
    """Trained with prdc, resumed with mixture: config.json then lists mixture's plugin too, and the
    run needs prdc no more (blocking it keeps evaluate, sample and resume working)."""
    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    out = tmp_path / "r"
    base = {"dataset": "grid25", "seed": 0, "device": "cpu", "threads": 1, "out": str(out), "eval_every": 0,
            "options": {"dataset": {"n": 300}}}
    api.train({**base, "steps": 4, "metrics": ["prdc"]}, quiet=True)
    assert "mixture_metrics" not in json.loads((out / "config.json").read_text())["plugins"]
    api.train({**base, "steps": 8, "metrics": ["mixture"]}, resume=True, quiet=True)
    saved = json.loads((out / "config.json").read_text())
    assert saved["metrics"] == ["mixture"] and {"prdc", "mixture_metrics"} <= set(saved["plugins"])
    monkeypatch.setenv("DYNGAN_BLOCK_PLUGINS", "prdc")
    host = load_plugins()
    assert "prdc" not in host.registry.names("metric")
    assert "mixture/modes" in api.evaluate(out, n=100, host=host)["metrics"]
    assert api.sample(out, 5, host=host).shape == (5, 2)
