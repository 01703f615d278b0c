"""What a user is told when plugins get in each other's way: component-name clashes (at lookup and at
`dyngan install`), a saved run whose plugin is missing, switches naming nothing, misspelt hooks."""

from __future__ import annotations

import json
import sys
import uuid

import pytest

from core import api, hookimpl
from core import install as inst
from core import rundir
from core.components import KINDS, CollapseDetector, Dataset, Loss
from core.errors import UnknownComponentError
from core.hookspecs import REGISTRATION_HOOKS
from core.plugins import PluginHost, load_plugins
from core.testing import plugin_host
from cli_helpers import invoke
from test_plugins import make_plugin, registering, write_dist


def error_of(res) -> str:
    """The one-line error of a CLI run that must fail as bad input (exit 2, no traceback)."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return res.stderr


# --------------------------------------------------------------------------- 1. component-name clashes


def clashing_plugins():
    """``topq_a`` has detector topq; ``topq_b`` has detector topq too (it fails) and, in a later hook,
    dataset bq-data."""
    a = make_plugin("topq_a", register_collapse_detectors=registering(CollapseDetector, "topq"))
    b = make_plugin("topq_b", register_collapse_detectors=registering(CollapseDetector, "topq"),
                    register_datasets=registering(Dataset, "bq-data"))
    return a, b


def test_an_unknown_name_that_a_failed_plugin_offers_names_that_plugin():
    a, b = clashing_plugins()
    with plugin_host(a, b):
        res = invoke(["train", "--dry-run", "--dataset", "bq-data"])
        listing = invoke(["plugins"])
    msg = error_of(res)
    assert "unknown dataset 'bq-data'" in msg
    assert "note: plugin 'topq_b' failed to load (failed while registering: detector 'topq' is registered " \
           "twice: by plugin 'topq_a'" in msg
    assert "see `dyngan plugins`" in msg
    assert "did you mean" not in msg  # the name is right; its plugin is broken
    assert len(msg.strip().splitlines()) == 1
    assert "topq_b  FAILED: failed while registering: detector 'topq' is registered twice" in listing.stdout


def test_a_plugin_failing_on_a_duplicate_still_offers_its_later_names_and_registers_none():
    a, b = clashing_plugins()
    host = PluginHost()
    host.add_plugin("topq_a", lambda: a)
    info = host.add_plugin("topq_b", lambda: b)
    assert info.error.startswith("failed while registering: detector 'topq' is registered twice")
    assert info.offered == {"detector": ["topq"], "dataset": ["bq-data"]}
    assert info.components == {} and host.registry.names("dataset") == []
    assert host.registry.get("detector", "topq").plugin == "topq_a"
    assert "offered" not in info.to_json()


def test_an_unknown_name_with_an_unrelated_failed_plugin_lists_it_briefly():
    def register_losses(register):
        raise RuntimeError("kaboom")

    broken = make_plugin("exploder", register_losses=register_losses)
    with plugin_host(broken, builtins=False) as host:
        host.add_plugin("fine", lambda: make_plugin("fine", register_losses=registering(Loss, "hinge")))
        with pytest.raises(UnknownComponentError) as exc:
            host.registry.get("loss", "hinj")
    msg = str(exc.value)
    assert "did you mean 'hinge'?" in msg
    assert msg.endswith("; note: plugin 'exploder' failed to load; see `dyngan plugins`")
    assert (exc.value.kind, exc.value.name) == ("loss", "hinj")


def plugin_source(kind: str, name: str) -> str:
    """The source of a plugin module that registers one ``kind`` named ``name``."""
    hook = next(h for h, k in REGISTRATION_HOOKS.items() if k == kind)
    every = ('    options = {"every": Option(1, "every this many steps", min=1)}\n'
             if kind in ("detector", "partitioner") else "")  # registering one needs it
    return (f"from core import hookimpl\nfrom core.components import Option, {KINDS[kind].__name__} as Base\n\n"
            f"class Component(Base):\n    name = {name!r}\n{every}\n"
            f"@hookimpl\ndef {hook}(register):\n    register(Component)\n")


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """``put(dist, plugin, source)`` writes a fake installed distribution ``dist`` 0.1.0 with one plugin
    (its module named anew) in a new folder, puts it on sys.path and returns that folder; the modules
    are forgotten afterwards."""
    suffix = uuid.uuid4().hex[:8]
    mods: list[str] = []

    def put(dist: str, plugin: str, source: str, path=monkeypatch):
        mods.append(f"{plugin}_{len(mods)}_{suffix}")
        site = tmp_path / f"site-{len(mods)}"
        write_dist(site, dist, "0.1.0", {plugin: mods[-1]}, {mods[-1]: source})
        path.syspath_prepend(str(site))
        return site

    yield put
    for mod in mods:
        sys.modules.pop(mod, None)


@pytest.fixture
def topq_dists(fake_dist, monkeypatch):
    """Two fake installed distributions whose plugins both register detector topq: dyngan-topq-a
    (plugin topq_a, loaded first) and dyngan-topq-b (plugin topq_b); pip and the fresh listing are
    faked (the listing is made in this process), so nothing is installed."""
    for plugin in ("topq_a", "topq_b"):
        fake_dist(f"dyngan-{plugin.replace('_', '-')}", plugin, plugin_source("detector", "topq"))
    monkeypatch.setattr(inst, "run_pip", lambda args, echo=None: [])
    monkeypatch.setattr(inst, "_pip_supports_report", lambda: False)
    monkeypatch.setattr(inst, "list_plugins_fresh", lambda timeout=300: load_plugins(env={}).report())


def test_install_of_a_plugin_whose_name_clashes_says_so_and_exits_2(topq_dists):
    res = invoke(["install", "dyngan-topq-b"])
    err = error_of(res)
    assert "plugin topq_b  FAILED: failed while registering: detector 'topq' is registered twice" in res.stdout
    assert ("Warning: plugins 'topq_a' (dyngan-topq-a) and 'topq_b' (dyngan-topq-b) both register detector "
            "'topq', so plugin 'topq_b' fails to load") in err
    assert "`dyngan uninstall dyngan-topq-b`" in err and "DYNGAN_BLOCK_PLUGINS=topq_b" in err


def test_install_of_a_plugin_that_breaks_an_installed_one_says_so_and_exits_2(topq_dists):
    """The new plugin loads first and keeps the name: the older one is the one that breaks."""
    res = invoke(["install", "dyngan-topq-a"])
    err = error_of(res)
    assert "plugin topq_a (" in res.stdout and "detector: topq" in res.stdout  # the new one works
    assert "both register detector 'topq', so plugin 'topq_b' fails to load" in err
    assert "`dyngan uninstall dyngan-topq-a`" in err


def test_install_result_carries_the_clash(topq_dists):
    res = inst.install_plugins(["dyngan-topq-b"])
    assert [(c.kind, c.name, c.kept, c.failed, c.installed) for c in res.clashes] == [
        ("detector", "topq", "topq_a", "topq_b", "dyngan-topq-b")]
    assert (res.clashes[0].kept_distribution, res.clashes[0].failed_distribution) == ("dyngan-topq-a",
                                                                                       "dyngan-topq-b")


# --------------------------------------------------------------------------- 2. a saved run whose plugin is missing


SOFT_HINGE = plugin_source("loss", "soft-hinge")


@pytest.fixture
def soft_hinge_run(tmp_path, monkeypatch, fake_dist):
    """A run directory whose config.json used loss soft-hinge of plugin softhinge (dyngan-softhinge
    0.1.0); afterwards that distribution is gone from sys.path. Returns (run dir, a function putting a
    dyngan-softhinge with the given module source on sys.path again)."""
    with monkeypatch.context() as m:
        fake_dist("dyngan-softhinge", "softhinge", SOFT_HINGE, path=m)
        cfg = api.resolve_settings({"dataset": "ring8", "loss": "soft-hinge"}, load_plugins(env={}))
    assert cfg["plugins"]["softhinge"] == {"distribution": "dyngan-softhinge", "version": "0.1.0"}
    run = tmp_path / "run"
    run.mkdir()
    rundir.write_config(run, cfg)
    return run, lambda source: fake_dist("dyngan-softhinge", "softhinge", source)


def run_commands(run, tmp_path):
    return [["evaluate", str(run), "--n", "5"],
            ["sample", str(run), "--n", "5", "--out", str(tmp_path / "s.npy")],
            ["train", "--out", str(run), "--resume", "-q"]]


def test_a_run_whose_plugin_is_not_installed_names_it_and_its_distribution(soft_hinge_run, tmp_path):
    run, _ = soft_hinge_run
    with plugin_host(env={}):
        for args in run_commands(run, tmp_path):
            msg = error_of(invoke(args))
            assert "with the installed plugins: its loss 'soft-hinge' came from plugin 'softhinge' (distribution " \
                   "dyngan-softhinge 0.1.0), which is not installed: install it (`dyngan install " \
                   "dyngan-softhinge`)" in msg, (args, msg)
            assert "did you mean" not in msg


def test_a_run_whose_plugin_is_blocked_says_which_switch(soft_hinge_run, tmp_path):
    run, put_back = soft_hinge_run
    put_back(SOFT_HINGE)
    with plugin_host(env={"DYNGAN_BLOCK_PLUGINS": "dyngan-softhinge"}):
        msg = error_of(invoke(["evaluate", str(run), "--n", "5"]))
    assert "plugin 'softhinge' (distribution dyngan-softhinge 0.1.0), which is installed but not loaded: " \
           "DYNGAN_BLOCK_PLUGINS blocks it (take 'dyngan-softhinge' out of it)" in msg
    with plugin_host(env={"DYNGAN_LOAD_PLUGINS": "losses,mixtures,mlp,mixture_metrics"}):
        msg = error_of(invoke(["evaluate", str(run), "--n", "5"]))
    assert "which is installed but not loaded: DYNGAN_LOAD_PLUGINS does not name it (add 'softhinge' to it)" in msg


def test_a_run_whose_plugin_fails_to_load_says_why(soft_hinge_run, tmp_path):
    run, put_back = soft_hinge_run
    put_back("raise RuntimeError('needs a newer torch')\n")
    with plugin_host(env={}):
        msg = error_of(invoke(["evaluate", str(run), "--n", "5"]))
    assert "its loss 'soft-hinge' came from plugin 'softhinge' (distribution dyngan-softhinge 0.1.0), which is " \
           "installed but failed to load (failed to import: RuntimeError: needs a newer torch; see `dyngan plugins`)" \
           in msg


def test_a_run_with_several_missing_plugins_lists_them(soft_hinge_run, tmp_path):
    run, _ = soft_hinge_run
    cfg = json.loads((run / "config.json").read_text())
    cfg["plugins"]["other"] = {"distribution": None, "version": None}
    rundir.write_config(run, cfg)
    with plugin_host(env={}):
        msg = error_of(invoke(["evaluate", str(run), "--n", "5"]))
    assert "its loss 'soft-hinge' came from one of its plugins that are not loaded: plugin 'other', which is " \
           "not installed; plugin 'softhinge' (distribution dyngan-softhinge 0.1.0), which is not installed" in msg


# --------------------------------------------------------------------------- 3. the switches


def test_a_block_list_name_matching_nothing_is_warned_about():
    host = load_plugins(env={"DYNGAN_BLOCK_PLUGINS": "knn,mlp"})
    assert host.unmatched_blocked == ["knn"] and "mlp" not in host.plugins
    assert load_plugins(env={"DYNGAN_BLOCK_PLUGINS": "mlp"}).registry.note is None
    with plugin_host(env={"DYNGAN_BLOCK_PLUGINS": "knn"}):
        listing = invoke(["plugins"])
        as_json = invoke(["plugins", "--json"])
        res = invoke(["train", "--dry-run", "--loss", "nope"])
    want = "DYNGAN_BLOCK_PLUGINS names 'knn', which matches no installed plugin or distribution"
    assert listing.exit_code == 0 and f"Warning: {want}" in listing.stderr
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) and want in as_json.stderr
    msg = error_of(res)
    assert "unknown loss 'nope'" in msg and want in msg and len(msg.strip().splitlines()) == 1


def test_an_unknown_name_says_which_plugins_are_blocked_without_importing_them(fake_dist):
    """DYNGAN_BLOCK_PLUGINS=dyngan-softhinge --loss soft-hinge must not read as a misspelt name: the error
    names the blocked plugin, which may provide it (which names it registers needs an import to know)."""
    site = fake_dist("dyngan-softhinge", "softhinge", SOFT_HINGE)
    with plugin_host(env={"DYNGAN_BLOCK_PLUGINS": "dyngan-softhinge"}):
        msg = error_of(invoke(["train", "--dry-run", "--loss", "soft-hinge"]))
    assert msg.startswith("Error: unknown loss 'soft-hinge'")
    assert msg.strip().endswith("; note: plugin 'softhinge' (distribution dyngan-softhinge) is installed but "
                                "blocked by DYNGAN_BLOCK_PLUGINS and may provide loss 'soft-hinge'")
    assert len(msg.strip().splitlines()) == 1
    assert not set(sys.modules) & {p.stem for p in site.glob("*.py")}  # a blocked plugin is never imported
    with plugin_host(env={"DYNGAN_BLOCK_PLUGINS": "dyngan-softhinge,mmnsat"}):
        msg = error_of(invoke(["train", "--dry-run", "--loss", "soft-hinge"]))
    assert "note: plugins 'mmnsat' (distribution dyngan), 'softhinge' (distribution dyngan-softhinge) are installed " \
           "but blocked by DYNGAN_BLOCK_PLUGINS and may provide loss 'soft-hinge'" in msg
    with plugin_host(env={}):  # nothing blocked: no note, and the plugin's loss is there
        assert "DYNGAN_BLOCK_PLUGINS" not in error_of(invoke(["train", "--dry-run", "--loss", "soft-hinj"]))
        assert invoke(["train", "--dry-run", "--loss", "soft-hinge"]).exit_code == 0



def test_an_unknown_name_says_which_plugins_the_allow_list_leaves_out(fake_dist):
    fake_dist("dyngan-softhinge", "softhinge", SOFT_HINGE)
    with plugin_host(env={"DYNGAN_LOAD_PLUGINS": "losses,mixtures,mlp"}):
        msg = error_of(invoke(["train", "--dry-run", "--loss", "soft-hinge"]))
    assert msg.startswith("Error: unknown loss 'soft-hinge'") and len(msg.strip().splitlines()) == 1
    assert "note: DYNGAN_LOAD_PLUGINS leaves out the installed plugins 'conditioners', " in msg, msg
    assert "which may provide loss 'soft-hinge' (`dyngan plugins` lists them)" in msg
    with plugin_host(env={"DYNGAN_LOAD_PLUGINS": "losses,mixtures,mixture_metrics,mlp,softhinge"}):
        assert invoke(["train", "--dry-run", "--loss", "soft-hinge"]).exit_code == 0
        msg = error_of(invoke(["train", "--dry-run", "--loss", "soft-hinj"]))
    assert "DYNGAN_LOAD_PLUGINS leaves out" in msg  # other plugins are still left out
    with plugin_host(env={}):
        assert "DYNGAN_LOAD_PLUGINS" not in error_of(invoke(["train", "--dry-run", "--loss", "soft-hinj"]))

def test_an_empty_allow_list_is_visible():
    with plugin_host(env={"DYNGAN_LOAD_PLUGINS": ""}):
        listing = invoke(["plugins"])
        as_json = invoke(["plugins", "--json"])
        res = invoke(["train", "--dry-run"])
    assert listing.exit_code == 0 and listing.stdout == "no plugins loaded (DYNGAN_LOAD_PLUGINS is set and empty)\n"
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == []
    assert "no plugins loaded (DYNGAN_LOAD_PLUGINS is set and empty)" in as_json.stderr
    assert "DYNGAN_LOAD_PLUGINS is set and empty, so no plugin is loaded" in error_of(res)


def test_no_plugins_loaded_is_said_whatever_the_reason():
    with plugin_host(builtins=False):
        assert invoke(["plugins"]).stdout == "no plugins loaded\n"

    def register_losses(register):
        raise RuntimeError("kaboom")

    with plugin_host(make_plugin("only_broken", register_losses=register_losses), builtins=False):
        lines = invoke(["plugins"]).stdout.splitlines()
    assert lines[-1] == "no plugins loaded: every plugin failed"
    with plugin_host(env={"DYNGAN_LOAD_PLUGINS": "nonexistent"}):
        assert invoke(["plugins"]).stdout.startswith("no plugins loaded")


# --------------------------------------------------------------------------- 4. misspelt hooks



def test_a_hook_without_hookimpl_fails_the_plugin_instead_of_registering_nothing():
    """pluggy ignores a function without the marker: the plugin used to load "fine" with nothing in it."""
    import types

    mod = make_plugin("half_marked", register_presets=lambda register: None)
    mod.register_losses = registering(Loss, "never-registered")  # the forgotten @hookimpl
    mod.helper = lambda: None  # other functions are none of our business
    host = PluginHost()
    info = host.add_plugin("half_marked", lambda: mod)
    assert info.error == ("register_losses is not marked with @hookimpl (`from core import hookimpl`), "
                          "so pluggy would never call it")
    assert host.pm.get_plugin("half_marked") is None and "never-registered" not in host.registry.names("loss")
    bare = types.ModuleType("bare")
    bare.register_losses = registering(Loss, "x")
    bare.register_collapse_detectors = lambda register: None
    info = PluginHost().add_plugin("bare", lambda: bare)
    assert info.error.startswith("register_collapse_detectors, register_losses are not marked with @hookimpl")
    with plugin_host(mod):
        lines = invoke(["plugins"]).stdout.splitlines()
    assert any(ln.startswith("half_marked  FAILED: register_losses is not marked with @hookimpl") for ln in lines), lines

def test_a_misspelt_hook_suggests_the_right_one():
    host = PluginHost()
    info = host.add_plugin("typo", lambda: make_plugin("typo", register_loss=registering(Loss, "never")))
    assert info.error == "unknown hook 'register_loss'; did you mean 'register_losses'?"
    assert host.pm.get_plugin("typo") is None
    with plugin_host(make_plugin("typo_cli", register_loss=registering(Loss, "never"))):
        lines = invoke(["plugins"]).stdout.splitlines()
    assert "typo_cli  FAILED: unknown hook 'register_loss'; did you mean 'register_losses'?" in lines


def test_hooks_with_no_near_name_list_the_hooks():
    host = PluginHost()
    info = host.add_plugin("odd", lambda: make_plugin("odd", setup_everything=lambda: None,
                                                      register_modle=lambda register: None))
    assert info.error.startswith("unknown hooks 'register_modle' (did you mean 'register_models'?), "
                                 "'setup_everything'; the hooks are register_collapse_detectors, ")
    assert "<module" not in info.error and "in plugin" not in info.error


def test_an_optional_hook_without_a_spec_is_not_an_error():
    def later_hook():
        pass

    mod = make_plugin("optional", register_losses=registering(Loss, "opt-loss"))
    mod.later_hook = hookimpl(optionalhook=True)(later_hook)
    info = PluginHost().add_plugin("optional", lambda: mod)
    assert info.error is None and info.components == {"loss": ["opt-loss"]}


# --------------------------------------------------------------------------- 5. malformed schemas, entry points, commands


BAD_SCHEMAS = '''
from core import hookimpl
from core.components import Loss, Option, Preset

class L(Loss):
    name = "bad-default"
    options = {"margin": Option("abc", "m", min=0.0)}

    def d_loss(self, ctx):
        return ctx.fake_logits.mean()

    def g_loss(self, ctx):
        return ctx.fake_logits.mean()

class NotOptions(Loss):
    name = "not-options"
    options = {"margin": 5}

class P(Preset):
    name = "bad-preset"
    settings = 5

@hookimpl
def register_losses(register):
    register(L)
    register(NotOptions)

@hookimpl
def register_presets(register):
    register(P)
'''

BAD_DEFAULT = ("plugin 'bp' registered loss class L ('bad-default'), which has option 'margin' with a min or max, "
               "but its type is str, not a number (default 'abc')")
NOT_OPTIONS = "plugin 'bp' registered loss class NotOptions ('not-options'), which has option 'margin' = 5, which is " \
              "not an Option"
BAD_PRESET = "plugin 'bp' registered preset class P ('bad-preset'), which has `settings` = 5, not a mapping"


def test_a_plugin_with_malformed_schemas_fails_to_load_naming_each_problem(fake_dist):
    fake_dist("bp", "bp", BAD_SCHEMAS)
    with plugin_host(env={}) as host:
        listing = invoke(["plugins"])
        data = {p["name"]: p for p in json.loads(invoke(["plugins", "--json"]).stdout)}
        info = host.plugins["bp"]
    line = next(ln for ln in listing.stdout.splitlines() if ln.startswith("bp "))
    assert line.startswith("bp [bp 0.1.0]  FAILED: failed while registering: ")
    for problem in (BAD_DEFAULT, NOT_OPTIONS, BAD_PRESET):
        assert problem in line
    assert data["bp"]["error"] == line.split("FAILED: ", 1)[1] and data["bp"]["components"] == {}
    assert info.offered == {"loss": ["bad-default", "not-options"], "preset": ["bad-preset"]}
    assert data["losses"]["error"] is None  # the others keep working


@pytest.mark.parametrize("args, problem", [
    (["--loss", "bad-default"], BAD_DEFAULT),
    (["--loss", "not-options"], NOT_OPTIONS),
    (["--preset", "bad-preset"], BAD_PRESET),
])
def test_using_a_component_with_a_malformed_schema_is_a_one_line_error_naming_the_plugin(fake_dist, args, problem):
    fake_dist("bp", "bp", BAD_SCHEMAS)
    with plugin_host(env={}):
        msg = error_of(invoke(["train", "--dry-run", "--device", "cpu", *args]))
    assert len(msg.strip().splitlines()) == 1
    assert "note: plugin 'bp' failed to load (failed while registering: " in msg
    assert problem in msg
    assert "did you mean" not in msg


def test_a_malformed_entry_point_value_says_what_form_is_expected(tmp_path, monkeypatch):
    write_dist(tmp_path / "site", "dyngan-mep", "0.1.0", {"mep": "a b c"}, {})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with plugin_host(env={}) as host:
        lines = invoke(["plugins"]).stdout.splitlines()
        info = host.plugins["mep"]
    expected = ("malformed entry point mep = 'a b c' in the group 'dyngan' of distribution dyngan-mep: its value "
                "must be a module (`package.module`) or a module and an attribute (`package.module:attr`)")
    assert info.error == expected
    assert f"mep [dyngan-mep 0.1.0]  FAILED: {expected}" in lines
    assert "NoneType" not in "\n".join(lines)


def test_a_plugin_command_raising_is_a_one_line_error_naming_it_with_exit_1():
    def register_commands(cli):
        @cli.command(name="explode")
        def explode():
            raise ValueError("the plugin's own bug\nsecond line")

    with plugin_host(make_plugin("exploder", register_commands=register_commands), builtins=False):
        res = invoke(["explode"])
    assert res.exit_code == 1, res.output
    assert res.stderr == "Error: command 'explode' of plugin 'exploder' failed: ValueError: the plugin's own bug ...\n"
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------- DYNGAN_TRACEBACK


@pytest.mark.parametrize("value, wanted", [("", False), ("0", False), ("false", False), (" Off ", False),
                                           ("no", False), ("1", True), ("yes", True), ("TRUE", True)])
def test_dyngan_traceback_is_read_at_call_time(monkeypatch, value, wanted):
    from core.errors import traceback_wanted

    monkeypatch.setenv("DYNGAN_TRACEBACK", value)
    assert traceback_wanted() is wanted
    monkeypatch.delenv("DYNGAN_TRACEBACK")
    assert traceback_wanted() is False


def test_dyngan_traceback_shows_where_a_plugin_command_raised(monkeypatch):
    def register_commands(cli):
        @cli.command(name="explode")
        def explode():
            raise ValueError("the plugin's own bug")

    monkeypatch.setenv("DYNGAN_TRACEBACK", "1")
    with plugin_host(make_plugin("exploder", register_commands=register_commands), builtins=False):
        res = invoke(["explode"])
    assert res.exit_code == 1, res.output
    lines = res.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert 'raise ValueError("the plugin\'s own bug")' in res.stderr  # the plugin's source line
    assert lines[-2] == "ValueError: the plugin's own bug"
    assert lines[-1] == "Error: command 'explode' of plugin 'exploder' failed: ValueError: the plugin's own bug"


def test_dyngan_traceback_shows_the_plugin_code_behind_a_component_failure(tmp_path, monkeypatch):
    class Broken(Loss):
        name = "broken-loss"

        def d_loss(self, ctx):
            return ctx.real_logits.mean() / undefined_name  # noqa: F821 - the plugin's bug

        def g_loss(self, ctx):
            return ctx.fake_logits.mean()

    args = ["train", "--dataset", "grid25", "--loss", "broken-loss", "--steps", "3", "--device", "cpu", "-q"]
    with plugin_host(make_plugin("brk", register_losses=lambda register: register(Broken))):
        plain = invoke([*args, "--out", str(tmp_path / "plain")])
        assert plain.exit_code == 1 and "Traceback" not in plain.output
        monkeypatch.setenv("DYNGAN_TRACEBACK", "1")
        traced = invoke([*args, "--out", str(tmp_path / "traced")])
    assert traced.exit_code == 1
    message = "Error: loss 'broken-loss' (plugin 'brk') raised in d_loss(): NameError: name 'undefined_name' is not defined"
    assert plain.stderr.strip() == message
    assert traced.stderr.startswith("Traceback (most recent call last):")
    assert "in d_loss\n" in traced.stderr and "undefined_name" in traced.stderr
    assert "The above exception was the direct cause of the following exception" in traced.stderr
    assert traced.stderr.rstrip().endswith(message)


def test_dyngan_traceback_shows_why_a_plugin_failed_to_load(monkeypatch):
    def register_losses(register):
        raise RuntimeError("broken registration")

    with plugin_host(make_plugin("brokenreg", register_losses=register_losses), builtins=False):
        plain = invoke(["plugins"]).stdout
        monkeypatch.setenv("DYNGAN_TRACEBACK", "1")
        traced = invoke(["plugins"]).stdout
        as_json = invoke(["plugins", "--json"]).stdout
    failed = "brokenreg  FAILED: failed while registering: RuntimeError: broken registration"
    assert failed in plain and "Traceback" not in plain
    after = traced.split(failed + "\n", 1)[1].splitlines()
    assert after[0] == "  Traceback (most recent call last):"
    assert '  RuntimeError: broken registration' in after
    assert 'raise RuntimeError("broken registration")' in traced
    assert "Traceback" not in as_json  # the JSON stays what tools parse


def test_dyngan_traceback_keeps_bad_input_exit_2(monkeypatch):
    monkeypatch.setenv("DYNGAN_TRACEBACK", "1")
    res = invoke(["train", "--dry-run", "--loss", "no-such-loss"])
    assert res.exit_code == 2
    assert "Traceback (most recent call last):" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1].startswith("Error: unknown loss 'no-such-loss'")
