"""Plugin loading: guarded loading, check_pending, allow/deny lists, the test kit, `dyngan plugins`."""

from __future__ import annotations

import json
import sys
import textwrap
import types
import uuid
from importlib import metadata
from pathlib import Path

import click
import click.testing
import pytest
from click.testing import CliRunner

import core
from core import hookimpl
from core.cli import cli
from core.components import (
    KINDS,
    CollapseDetector,
    Conditioner,
    Dataset,
    Loss,
    Metric,
    Model,
    Partitioner,
    Preset,
)
from core.errors import PluginError, UsageError
from core.options import Option
from core.plugins import PluginHost, get_host, load_plugins, set_host
from core.testing import plugin_host

BUILTIN_EPS = sorted(ep.name for ep in metadata.entry_points(group="dyngan") if ep.dist and ep.dist.name == "dyngan")


def make_plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin module named ``name`` whose attributes are the given hook implementations."""
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(mod, hook_name, hookimpl(fn))
    return mod


def component(base: type, name: str) -> type:
    """A fresh component class of ``base``'s kind (a detector or partitioner with the `every` option it
    needs, a model with its `z_dim`)."""
    attrs: dict = {"name": name}
    if base in (CollapseDetector, Partitioner):
        attrs["options"] = {"every": Option(1, "every this many steps", min=1)}
    if base is Model:
        attrs["options"] = {"z_dim": Option(8, "size of z", min=1)}
    return type(f"{base.__name__}_{name.replace('-', '_')}", (base,), attrs)


def registering(kind_base: type, *names: str):
    """A hook implementation that registers one fresh class per name."""
    classes = [component(kind_base, n) for n in names]

    def impl(register):
        for cls in classes:
            register(cls)

    return impl


@pytest.fixture
def host() -> PluginHost:
    return PluginHost()


def peek_host():
    """The process-wide host as it is now, without loading one."""
    current = set_host(None)
    set_host(current)
    return current


# --------------------------------------------------------------------------- every hook, end to end


def test_every_registration_hook_fills_its_kind(host):
    """One plugin implementing every hook; each class lands under its kind, credited to the plugin."""
    seen_cli = []
    plugin = make_plugin(
        "everything",
        register_losses=registering(Loss, "t-loss"),
        register_collapse_detectors=registering(CollapseDetector, "t-detector"),
        register_partitioners=registering(Partitioner, "t-partitioner"),
        register_conditioners=registering(Conditioner, "t-conditioner"),
        register_datasets=registering(Dataset, "t-dataset", "t-dataset-2"),
        register_models=registering(Model, "t-model"),
        register_metrics=registering(Metric, "t-metric"),
        register_presets=registering(Preset, "t-preset"),
        register_commands=lambda cli: seen_cli.append(cli),
    )
    info = host.add_plugin("everything", lambda: plugin)
    assert info.error is None
    assert info.module == "everything"
    assert info.hooks == sorted([
        "register_losses", "register_collapse_detectors", "register_partitioners", "register_conditioners",
        "register_datasets", "register_models", "register_metrics", "register_presets", "register_commands",
    ])
    assert info.components == {
        "loss": ["t-loss"], "detector": ["t-detector"], "partitioner": ["t-partitioner"],
        "conditioner": ["t-conditioner"], "dataset": ["t-dataset", "t-dataset-2"], "model": ["t-model"],
        "metric": ["t-metric"], "preset": ["t-preset"],
    }
    for kind, names in info.components.items():
        for name in names:
            cls = host.registry.get(kind, name)
            assert issubclass(cls, KINDS[kind]) and cls.plugin == "everything"
    # register_commands runs once, at load time like the other hooks, on a stand-in of the dyngan group
    # (so that a plugin failing there fails as a whole); adding the commands to a group does not run it again
    assert len(seen_cli) == 1 and isinstance(seen_cli[0], click.Group)
    group = click.Group()
    host.add_commands(group)
    assert len(seen_cli) == 1 and seen_cli[0] is not group


def test_a_plugin_may_implement_a_hook_without_arguments(host):
    calls = []
    info = host.add_plugin("quiet", lambda: make_plugin("quiet", register_losses=lambda: calls.append(1)))
    assert info.error is None and calls == [1] and info.components == {}


# --------------------------------------------------------------------------- broken plugins


def test_plugin_failing_on_import_is_reported_and_skipped(host):
    def load():
        raise ImportError("No module named 'scipy_is_missing'")

    good = make_plugin("good", register_losses=registering(Loss, "good-loss"))
    bad = host.add_plugin("bad", load, module="bad_plugin", distribution="dyngan-bad", version="0.1")
    ok = host.add_plugin("good", lambda: good)
    assert bad.error == "failed to import: ImportError: No module named 'scipy_is_missing'"
    assert "raise ImportError" in bad.traceback
    assert bad.module == "bad_plugin" and bad.hooks == [] and bad.components == {}
    assert ok.error is None and host.registry.names("loss") == ["good-loss"]
    assert [p.name for p in host.failed] == ["bad"] and [p.name for p in host.loaded] == ["good"]
    assert host.pm.get_plugin("bad") is None


def test_plugin_exiting_on_import_is_caught_too(host):
    def load():
        raise SystemExit(3)

    info = host.add_plugin("exits", load)
    assert info.error == "failed to import: SystemExit: 3"


def test_ctrl_c_while_importing_a_plugin_is_not_swallowed(host):
    def load():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        host.add_plugin("interrupted", load)


def test_plugin_raising_in_its_hook_is_skipped_and_its_components_removed(host):
    early_loss, early_data = component(Loss, "half-loss"), component(Dataset, "half-data")

    def register_losses(register):
        register(early_loss)
        raise RuntimeError("kaboom")

    before = make_plugin("before", register_losses=registering(Loss, "before-loss"))
    half = make_plugin("half", register_losses=register_losses,
                       register_datasets=lambda register: register(early_data))
    after = make_plugin("after", register_losses=registering(Loss, "after-loss"))
    host.add_plugin("before", lambda: before)
    info = host.add_plugin("half", lambda: half)
    host.add_plugin("after", lambda: after)

    assert info.error == "failed while registering: RuntimeError: kaboom"
    assert info.components == {}
    # everything "half" registered before it raised is gone, from every kind
    assert host.registry.names("loss") == ["after-loss", "before-loss"]
    assert host.registry.names("dataset") == []
    assert host.pm.get_plugin("half") is None
    assert [p.name for p in host.loaded] == ["before", "after"]


def test_plugin_raising_a_dyngan_error_in_its_hook_keeps_the_message(host):
    def register_models(register):
        raise PluginError("needs CUDA 13")

    info = host.add_plugin("picky", lambda: make_plugin("picky", register_models=register_models))
    assert info.error == "failed while registering: needs CUDA 13"


def test_plugin_whose_duplicate_fails_does_not_remove_the_first_plugins_component(host):
    host.add_plugin("first", lambda: make_plugin("first", register_losses=registering(Loss, "same")))
    first_cls = host.registry.get("loss", "same")
    info = host.add_plugin("second", lambda: make_plugin(
        "second", register_losses=registering(Loss, "only-second", "same")))
    assert "plugin 'first'" in info.error and "plugin 'second'" in info.error
    assert host.registry.get("loss", "same") is first_cls
    assert host.registry.names("loss") == ["same"]


def test_misspelled_hook_is_reported_by_check_pending(host):
    typo = make_plugin("typo", register_loss=registering(Loss, "never"))
    info = host.add_plugin("typo", lambda: typo)
    assert info.error == "unknown hook 'register_loss'; did you mean 'register_losses'?"
    assert host.pm.get_plugin("typo") is None
    assert host.registry.names("loss") == []
    # the pending implementation left with its plugin: later plugins load and check cleanly
    ok = host.add_plugin("ok", lambda: make_plugin("ok", register_losses=registering(Loss, "fine")))
    assert ok.error is None
    host.pm.check_pending()


def test_hook_with_a_wrong_argument_name_is_an_invalid_plugin(host):
    bad = make_plugin("badargs", register_losses=lambda reg: None)
    info = host.add_plugin("badargs", lambda: bad)
    assert info.error is not None and info.error.startswith("invalid plugin:")
    assert "reg" in info.error
    assert host.pm.get_plugin("badargs") is None
    assert host.pm.hook.register_losses.get_hookimpls() == []


def test_two_plugins_with_one_name(host):
    host.add_plugin("twin", lambda: make_plugin("twin_a"), module="pkg_a")
    info = host.add_plugin("twin", lambda: make_plugin("twin_b"), module="pkg_b")
    assert info.error == "a plugin named 'twin' is already loaded (from pkg_a)"
    assert host.plugins["twin"].error is None and host.plugins["twin (pkg_b)"] is info


def test_failing_register_commands_marks_the_plugin(host):
    def register_commands(cli):
        raise ValueError("bad command")

    host.add_plugin("cmds", lambda: make_plugin("cmds", register_commands=register_commands))
    host.add_commands(click.Group())
    assert host.plugins["cmds"].error == "failed in register_commands: ValueError: bad command"


def _adds_command(name, text):
    def register_commands(cli):
        @cli.command(name)
        def _cmd():
            click.echo(text)
    return register_commands


def test_commands_a_plugin_adds_are_recorded_and_cannot_replace_others(host):
    group = click.Group()

    @group.command("train")
    def train():
        click.echo("core train")

    host.add_plugin("hello", lambda: make_plugin("hello", register_commands=_adds_command("hello", "hi")))
    host.add_plugin("thief", lambda: make_plugin("thief", register_commands=_adds_command("train", "stolen")))
    host.add_plugin("twin", lambda: make_plugin("twin", register_commands=_adds_command("hello", "other")))
    host.add_commands(group, protected={"train"})
    assert host.plugins["hello"].commands == ["hello"] and host.plugins["hello"].error is None
    assert host.plugins["thief"].error == ("failed in register_commands: command 'train' already exists; "
                                           "the existing one is kept")
    assert host.plugins["twin"].error is not None and "'hello' already exists" in host.plugins["twin"].error
    runner = click.testing.CliRunner()
    assert runner.invoke(group, ["train"]).output == "core train\n"
    assert runner.invoke(group, ["hello"]).output == "hi\n"
    assert host.report()[0]["commands"] == ["hello"]


def _adds_command_then_raises(name):
    def register_commands(cli):
        @cli.command(name)
        def _cmd():
            click.echo("from a failed plugin")
        raise RuntimeError("fail after adding a command")
    return register_commands


def test_a_plugin_failing_in_register_commands_keeps_no_component_and_no_command(host):
    """docs/plugins.md section 3: a FAILED plugin registers none of its components. register_commands runs
    when the plugin loads, so the failure is known (and its loss gone) before any command or library call
    uses the registry, whether or not the CLI ever asks for plugin commands."""
    info = host.add_plugin("cmdfail", lambda: make_plugin(
        "cmdfail", register_losses=registering(Loss, "cmdfail-loss"),
        register_commands=_adds_command_then_raises("cmdfail-hello")))
    assert info.error == "failed in register_commands: RuntimeError: fail after adding a command"
    assert "RuntimeError" in info.traceback
    assert info.components == {} and info.options == {} and info.commands == []
    assert "cmdfail-loss" not in host.registry.names("loss") and host.failed == [info]
    with pytest.raises(UsageError, match=r"unknown loss 'cmdfail-loss'.*note: plugin 'cmdfail' failed to load "
                                         r"\(failed in register_commands: RuntimeError: fail after adding a command\)"):
        host.registry.get("loss", "cmdfail-loss")
    assert host.pm.get_plugin("cmdfail") is None  # its hooks are not called again
    group = click.Group()
    host.add_commands(group)
    assert "cmdfail-hello" not in group.commands


@pytest.mark.parametrize("command", ["train", "plugins", "install"])
def test_a_plugin_whose_command_takes_a_core_commands_name_keeps_no_component(host, command):
    info = host.add_plugin("usurper", lambda: make_plugin(
        "usurper", register_losses=registering(Loss, "usurper-loss"),
        register_commands=_adds_command(command, "not the core command")))
    assert info.error == (f"failed in register_commands: command {command!r} already exists; "
                          "the existing one is kept")
    assert info.components == {} and "usurper-loss" not in host.registry.names("loss")
    assert info.commands == []


def test_a_plugin_whose_command_takes_another_plugins_keeps_no_component(host):
    first = host.add_plugin("first", lambda: make_plugin("first", register_commands=_adds_command("hello", "hi")))
    second = host.add_plugin("second", lambda: make_plugin(
        "second", register_losses=registering(Loss, "second-loss"), register_commands=_adds_command("hello", "other")))
    assert first.error is None and first.commands == ["hello"]
    assert second.error is not None and "'hello' already exists" in second.error
    assert "second-loss" not in host.registry.names("loss")
    group = click.Group()
    host.add_commands(group)
    assert click.testing.CliRunner().invoke(group, ["hello"]).output == "hi\n"


def test_a_command_clash_found_when_the_commands_are_added_fails_the_plugin_then(host):
    """A name protected only by the group the commands go to (not known when the plugin loaded) fails the
    plugin as well: its components go, and none of its commands is added."""
    host.reserved_commands = {}
    info = host.add_plugin("late", lambda: make_plugin(
        "late", register_losses=registering(Loss, "late-loss"),
        register_commands=lambda cli: [_adds_command(n, n)(cli) for n in ("late-one", "special")]))
    assert info.error is None and info.commands == ["late-one", "special"]
    assert "late-loss" in host.registry.names("loss")
    group = click.Group()
    host.add_commands(group, protected={"special"})
    assert info.error == "failed in register_commands: command 'special' already exists; the existing one is kept"
    assert "late-loss" not in host.registry.names("loss") and info.components == {}
    assert group.commands == {}


def test_a_loss_of_a_plugin_failing_in_register_commands_cannot_train():
    """The QA case end to end: `dyngan train --loss THAT_LOSS` is the usual exit-2 message for a component
    of a failed plugin, `dyngan plugins` lists the plugin as FAILED with no components, and the command it
    added before raising does not exist."""
    plugin = make_plugin("cmdfail", register_losses=registering(Loss, "cmdfail-loss"),
                         register_commands=_adds_command_then_raises("cmdfail-hello"))
    with plugin_host(plugin):
        res = CliRunner().invoke(cli, ["train", "--dry-run", "--loss", "cmdfail-loss", "--dataset", "ring8"])
        listing = CliRunner().invoke(cli, ["plugins", "--json"])
        hello = CliRunner().invoke(cli, ["cmdfail-hello"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.startswith("Error: unknown loss 'cmdfail-loss' (available: hinge, ls, mm, ")
    assert res.stderr.endswith("; note: plugin 'cmdfail' failed to load (failed in register_commands: RuntimeError: "
                               "fail after adding a command); see `dyngan plugins`\n")
    assert len(res.stderr.splitlines()) == 1 and "did you mean" not in res.stderr
    entry = next(p for p in json.loads(listing.stdout) if p["name"] == "cmdfail")
    assert entry["components"] == {} and entry["commands"] == [] and entry["error"].startswith("failed in")
    assert hello.exit_code == 2 and "No such command 'cmdfail-hello'" in hello.output


def test_a_loss_of_a_plugin_whose_command_is_named_train_cannot_train():
    plugin = make_plugin("usurper", register_losses=registering(Loss, "usurper-loss"),
                         register_commands=_adds_command("train", "HIJACKED train"))
    with plugin_host(plugin):
        res = CliRunner().invoke(cli, ["train", "--dry-run", "--loss", "usurper-loss", "--dataset", "ring8"])
    assert res.exit_code == 2 and "HIJACKED" not in res.output
    assert ("note: plugin 'usurper' failed to load (failed in register_commands: command 'train' already exists; "
            "the existing one is kept)") in res.stderr


def test_report_and_versions(host):
    host.add_plugin("v", lambda: make_plugin("v", register_losses=registering(Loss, "v-loss")),
                    module="v_mod", distribution="dyngan-v", version="1.2.3")
    host.add_plugin("broken", lambda: 1 / 0)
    assert host.versions() == {"v": {"distribution": "dyngan-v", "version": "1.2.3"}}
    assert host.versions(used=["other"]) == {}
    report = host.report()
    json.dumps(report)
    assert [r["name"] for r in report] == ["v", "broken"]
    assert report[0] == {"name": "v", "module": "v_mod", "distribution": "dyngan-v", "version": "1.2.3",
                         "hooks": ["register_losses"], "components": {"loss": ["v-loss"]},
                         "options": {"loss": {"v-loss": {}}}, "commands": [], "error": None}
    assert report[1]["error"] == "failed to import: ZeroDivisionError: division by zero"
    assert "traceback" not in report[1]


# --------------------------------------------------------------------------- installed plugins, allow/deny lists


def write_dist(site: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A fake installed distribution: a ``*.dist-info`` directory and its modules on ``site``."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[dyngan]\n{eps}")
    for mod, src in modules.items():
        (site / f"{mod}.py").write_text(textwrap.dedent(src))


GOOD_PLUGIN = """
    from core import hookimpl
    from core.components import Loss

    class HelloLoss(Loss):
        name = "hello-loss"

    @hookimpl
    def register_losses(register):
        register(HelloLoss)
"""

BROKEN_PLUGIN = """
    import dyngan_test_dependency_that_is_not_installed
"""


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Two fake installed distributions on sys.path: dyngan-hello (good) and dyngan-broken."""
    suffix = uuid.uuid4().hex[:8]
    good_mod, bad_mod = f"dyngan_hello_{suffix}", f"dyngan_broken_{suffix}"
    site = tmp_path / "site"
    write_dist(site, "dyngan-hello", "0.3.0", {"hello": good_mod}, {good_mod: GOOD_PLUGIN})
    write_dist(site, "dyngan-broken", "0.0.1", {"broken": bad_mod}, {bad_mod: BROKEN_PLUGIN})
    monkeypatch.syspath_prepend(str(site))
    yield good_mod
    for mod in (good_mod, bad_mod):
        sys.modules.pop(mod, None)


def test_installed_third_party_plugins_load_beside_the_builtins(third_party):
    host = load_plugins(env={})
    hello = host.plugins["hello"]
    assert hello.error is None
    assert (hello.module, hello.distribution, hello.version) == (third_party, "dyngan-hello", "0.3.0")
    assert hello.components == {"loss": ["hello-loss"]}
    broken = host.plugins["broken"]
    assert broken.distribution == "dyngan-broken"
    assert "ModuleNotFoundError" in broken.error and "dyngan_test_dependency_that_is_not_installed" in broken.error
    assert {"losses", "mixtures", "mlp"} <= {p.name for p in host.loaded}
    # built-ins come first, then third-party plugins, each by name
    names = list(host.plugins)
    assert names.index("broken") > max(names.index(n) for n in BUILTIN_EPS)
    assert names.index("broken") < names.index("hello")


def test_no_switches_load_every_builtin():
    host = load_plugins(env={})
    assert set(BUILTIN_EPS) <= set(host.plugins)
    assert {"losses", "mixtures", "mlp"} <= set(BUILTIN_EPS)


def test_empty_allow_list_loads_none():
    for value in ("", " ", ","):
        host = load_plugins(env={"DYNGAN_LOAD_PLUGINS": value})
        assert host.plugins == {}
        assert all(host.registry.names(kind) == [] for kind in KINDS)


def test_allow_list_by_entry_point_name():
    host = load_plugins(env={"DYNGAN_LOAD_PLUGINS": " losses,, mlp ,"})
    assert set(host.plugins) == {"losses", "mlp"}
    assert "ns" in host.registry.names("loss") and host.registry.names("model") == ["mlp"]
    assert host.registry.names("dataset") == []


def test_allow_list_by_distribution_name(third_party):
    # "dyngan" is both a built-in plugin and the distribution: the plugin name wins
    host = load_plugins(env={"DYNGAN_LOAD_PLUGINS": "dyngan"})
    assert set(host.plugins) == {"dyngan"}
    host = load_plugins(env={"DYNGAN_LOAD_PLUGINS": "dyngan-hello,mlp"})
    assert set(host.plugins) == {"hello", "mlp"}


def test_deny_list_by_entry_point_and_distribution_name(third_party):
    host = load_plugins(env={"DYNGAN_BLOCK_PLUGINS": "losses,dyngan-broken"})
    assert "losses" not in host.plugins and "broken" not in host.plugins
    assert {"mmnsat", "mlp", "hello"} <= set(host.plugins)
    assert "ns" not in host.registry.names("loss") and "mm-nsat" in host.registry.names("loss")
    host = load_plugins(env={"DYNGAN_BLOCK_PLUGINS": "dyngan"})
    assert "dyngan" not in host.plugins and {"losses", "mlp", "hello", "broken"} <= set(host.plugins)


def test_allow_and_deny_lists_together():
    host = load_plugins(env={"DYNGAN_LOAD_PLUGINS": "losses,mmnsat", "DYNGAN_BLOCK_PLUGINS": "mmnsat"})
    assert set(host.plugins) == {"losses"}


def test_switches_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("DYNGAN_LOAD_PLUGINS", "mlp,mixtures")
    monkeypatch.setenv("DYNGAN_BLOCK_PLUGINS", "mixtures")
    assert set(load_plugins().plugins) == {"mlp"}


def test_get_host_loads_once_and_set_host_swaps(monkeypatch):
    monkeypatch.setenv("DYNGAN_LOAD_PLUGINS", "mlp")
    previous = set_host(None)
    try:
        first = get_host()
        assert set(first.plugins) == {"mlp"}
        assert get_host() is first
        mine = PluginHost()
        assert set_host(mine) is first
        assert get_host() is mine
    finally:
        set_host(previous)


# --------------------------------------------------------------------------- the test kit's plugin_host


def test_plugin_host_installs_and_restores_the_process_wide_host():
    outer = PluginHost()
    previous = set_host(outer)
    try:
        mine = make_plugin("mine", register_losses=registering(Loss, "mine-loss"))
        with plugin_host(mine, builtins=False) as host:
            assert get_host() is host and host is not outer
            assert list(host.plugins) == ["mine"]
            assert host.registry.get("loss", "mine-loss").plugin == "mine"
        assert peek_host() is outer
        with pytest.raises(RuntimeError):
            with plugin_host(builtins=False):
                raise RuntimeError("test failed inside the block")
        assert peek_host() is outer
    finally:
        set_host(previous)


def test_plugin_host_with_builtins_and_env():
    mine = make_plugin("mine", register_datasets=registering(Dataset, "mine-data"))
    with plugin_host(mine) as host:
        assert set(BUILTIN_EPS) <= set(host.plugins) and "mine" in host.plugins
    with plugin_host(mine, env={"DYNGAN_LOAD_PLUGINS": "mlp"}) as host:
        assert list(host.plugins) == ["mlp", "mine"]


def test_plugin_host_names_and_objects():
    class Plugin:  # an object with hookimpl-decorated functions, not a module
        @staticmethod
        @hookimpl
        def register_models(register):
            register(component(Model, "obj-model"))

    with plugin_host(("custom-name", Plugin), builtins=False) as host:
        assert host.plugins["custom-name"].error is None
        assert host.registry.names("model") == ["obj-model"]
    with pytest.raises(TypeError, match=r"\(name, object\) tuple"):
        with plugin_host(object(), builtins=False):
            pass


def test_plugin_host_records_failures_unless_strict():
    def register_losses(register):
        raise RuntimeError("oops")

    broken = make_plugin("broken_kit", register_losses=register_losses)
    with plugin_host(broken, builtins=False) as host:
        assert host.plugins["broken_kit"].error == "failed while registering: RuntimeError: oops"
    before = peek_host()
    with pytest.raises(PluginError, match=r"broken_kit: failed while registering: RuntimeError: oops"):
        with plugin_host(broken, builtins=False, strict=True):
            pass
    assert peek_host() is before


def test_plugin_host_adds_plugin_commands_and_removes_them_after():
    def register_commands(cli):
        @cli.command(name="kit-hello")
        @click.argument("who")
        def hello(who):
            """Say hello."""
            click.echo(f"hello {who}")

    plugin = make_plugin("kit_cmds", register_commands=register_commands)
    runner = CliRunner()
    with plugin_host(plugin, builtins=False):
        result = runner.invoke(cli, ["kit-hello", "world"])
        assert result.exit_code == 0 and result.stdout == "hello world\n"
        assert "kit-hello" in runner.invoke(cli, ["--help"]).stdout
    assert "kit-hello" not in cli.commands
    with plugin_host(builtins=False):
        assert runner.invoke(cli, ["kit-hello", "world"]).exit_code == 2


# --------------------------------------------------------------------------- `dyngan plugins`


def plugins_json(*plugins) -> tuple[int, list[dict], str]:
    with plugin_host(*plugins):
        result = CliRunner().invoke(cli, ["plugins", "--json"])
    return result.exit_code, json.loads(result.stdout), result.stdout


def test_plugins_json_lists_the_builtins_with_their_components():
    code, data, _ = plugins_json()
    assert code == 0
    by_name = {p["name"]: p for p in data}
    assert set(BUILTIN_EPS) <= set(by_name)
    for p in data:
        assert set(p) == {"name", "module", "distribution", "version", "hooks", "components", "options", "commands",
                          "error"}
        # every listed component has an entry in the option schemas, and nothing else does
        assert {k: sorted(v) for k, v in p["options"].items()} == {k: sorted(v) for k, v in p["components"].items()}
    losses, mixtures, mlp = by_name["losses"], by_name["mixtures"], by_name["mlp"]
    for p in (losses, mixtures, mlp):
        assert p["error"] is None
        assert p["distribution"] == "dyngan" and p["version"] == core.__version__
    assert losses["module"] == "dyngan_plugins.losses" and losses["hooks"] == ["register_losses"]
    assert {"mm", "ns", "ls", "hinge", "wgan-gp"} <= set(losses["components"]["loss"])
    assert set(losses["components"]) == {"loss"}
    assert {"ring8", "grid25"} <= set(mixtures["components"]["dataset"])
    assert mlp["components"] == {"model": ["mlp"]} and mlp["hooks"] == ["register_models"]


def test_plugins_json_carries_each_components_option_schema_and_each_presets_settings():
    from dyngan_plugins.dyngan import DynGANDetector, DynGANPreset

    code, data, _ = plugins_json()
    assert code == 0
    dyn = {p["name"]: p for p in data}["dyngan"]["options"]
    assert dyn["detector"]["dyngan"] == {k: o.to_json() for k, o in DynGANDetector.options.items()}
    assert dyn["detector"]["dyngan"]["delta"]["default"] == DynGANDetector.options["delta"].default
    assert dyn["preset"]["dyngan"] == json.loads(json.dumps(DynGANPreset.settings))


def test_plugins_options_text_shows_ready_to_use_o_flags_per_component():
    from dyngan_plugins.dyngan import DynGANDetector, DynGANPreset

    with plugin_host():
        plain = CliRunner().invoke(cli, ["plugins"])
        result = CliRunner().invoke(cli, ["plugins", "--options"])
    assert result.exit_code == 0 and plain.exit_code == 0
    assert "-o detector." not in plain.stdout
    lines = result.stdout.splitlines()
    i = lines.index("  detector: dyngan")
    assert lines[i + 1] == "    dyngan"
    delta = DynGANDetector.options["delta"]
    assert lines[i + 2 + list(DynGANDetector.options).index("delta")] == (
        f"      -o detector.delta={delta.default}  [{delta.describe()}]  {delta.help}")
    subset = next(ln for ln in lines if ln.startswith("      -o detector.subset="))
    assert subset.startswith("      -o detector.subset=none  [an integer >= 1 or none]")
    # a kind with several components names each one above its own options
    j = lines.index("  loss: mm, ns, ls, hinge, wgan-gp")
    assert "    wgan-gp" in lines[j:] and "      -o loss.gp_lambda=10.0  [a number >= 0.0]" in "\n".join(lines[j:])
    # a preset's settings, its component options written as -o flags
    k = lines.index("  preset: dyngan, dyngan-image")
    assert lines[k + 1] == "    dyngan"
    block = lines[k + 2:k + 2 + 30]
    assert '      loss = "ns"' in block
    for kind, opts in DynGANPreset.settings["options"].items():
        for key, value in opts.items():
            assert f"      -o {kind}.{key}={value}" in block


def test_plugins_lists_a_plugin_with_a_malformed_schema_as_failed_and_still_exits_0():
    bad = type("Loss_badopts", (Loss,), {"name": "badopts", "options": {"x": 5, "y": Option(None)}})

    def register_losses(register):
        register(bad)

    plugin = make_plugin("badopts_plugin", register_losses=register_losses)
    code, data, _ = plugins_json(plugin)
    entry = {p["name"]: p for p in data}["badopts_plugin"]
    assert code == 0 and entry["error"] is not None and "'x'" in entry["error"], entry
    with plugin_host(plugin):
        result = CliRunner().invoke(cli, ["plugins", "--options"])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert "badopts_plugin" in result.stdout and "FAILED" in result.stdout


def test_plugins_json_shows_a_broken_plugin_and_still_exits_0():
    def register_losses(register):
        register(component(Loss, "doomed"))
        raise RuntimeError("hook exploded")

    code, data, _ = plugins_json(make_plugin("exploding", register_losses=register_losses))
    assert code == 0
    by_name = {p["name"]: p for p in data}
    assert by_name["exploding"]["error"] == "failed while registering: RuntimeError: hook exploded"
    assert by_name["exploding"]["components"] == {}
    assert by_name["losses"]["error"] is None and "ns" in by_name["losses"]["components"]["loss"]


def test_plugins_text_output():
    broken = make_plugin("typo_plugin", register_modles=registering(Model, "never"))
    with plugin_host(broken):
        result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    i = lines.index(f"losses [dyngan {core.__version__}]  (dyngan_plugins.losses)")
    assert lines[i + 1] == "  hooks: register_losses"
    assert lines[i + 2].startswith("  loss: ") and "ns" in lines[i + 2]
    assert f"mlp [dyngan {core.__version__}]  (dyngan_plugins.mlp)" in lines
    assert "  model: mlp" in lines
    assert "typo_plugin  FAILED: unknown hook 'register_modles'; did you mean 'register_models'?" in lines


def test_plugins_lists_a_failing_register_commands():
    def register_commands(cli):
        raise RuntimeError("no commands today")

    code, data, _ = plugins_json(make_plugin("cmd_fail", register_commands=register_commands))
    assert code == 0
    entry = next(p for p in data if p["name"] == "cmd_fail")
    assert entry["error"] == "failed in register_commands: RuntimeError: no commands today"


def test_plugins_lists_the_commands_a_plugin_adds():
    """`dyngan plugins` shows plugin commands (the root help does not: it loads no plugins), and a
    plugin cannot take over a core command."""
    with plugin_host(make_plugin("greeter", register_commands=_adds_command("greet", "hello")),
                     make_plugin("usurper", register_commands=_adds_command("train", "not training")),
                     builtins=False):
        text = CliRunner().invoke(cli, ["plugins"])
        data = json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).stdout)
        greeted = CliRunner().invoke(cli, ["greet"])
        train_help = CliRunner().invoke(cli, ["train", "--help"])
    assert text.exit_code == 0
    assert "greeter  (greeter)\n  hooks: register_commands\n  commands: greet\n" in text.output
    assert "usurper  FAILED: failed in register_commands: command 'train' already exists" in text.output
    assert {p["name"]: p["commands"] for p in data} == {"greeter": ["greet"], "usurper": []}
    assert greeted.output == "hello\n"
    assert "--preset" in train_help.output  # still the core train


def test_usage_errors_reach_the_cli_as_exit_2():
    """A library UsageError from a plugin command becomes a one-line message and exit code 2."""
    def register_commands(cli):
        @cli.command(name="kit-fail")
        def fail():
            raise UsageError("bad input from the user")

    with plugin_host(make_plugin("kit_fail", register_commands=register_commands), builtins=False):
        result = CliRunner().invoke(cli, ["kit-fail"])
    assert result.exit_code == 2
    assert result.stderr == "Error: bad input from the user\n"
    assert "Traceback" not in result.output


def test_installed_plugins_appear_in_the_dyngan_command(tmp_path):
    """End to end: `dyngan plugins --json` in a fresh process finds two distributions beside dyngan."""
    import os
    import subprocess

    site = tmp_path / "site"
    write_dist(site, "dyngan-hello", "0.3.0", {"hello": "dyngan_hello_e2e"}, {"dyngan_hello_e2e": GOOD_PLUGIN})
    write_dist(site, "dyngan-broken", "0.0.1", {"broken": "dyngan_broken_e2e"}, {"dyngan_broken_e2e": BROKEN_PLUGIN})
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNGAN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    script = Path(sys.executable).parent / ("dyngan.exe" if os.name == "nt" else "dyngan")
    assert script.exists(), f"console script not installed beside {sys.executable}"

    out = subprocess.run([str(script), "plugins", "--json"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    by_name = {p["name"]: p for p in json.loads(out.stdout)}
    assert by_name["hello"] == {
        "name": "hello", "module": "dyngan_hello_e2e", "distribution": "dyngan-hello", "version": "0.3.0",
        "hooks": ["register_losses"], "components": {"loss": ["hello-loss"]},
        "options": {"loss": {"hello-loss": {}}}, "commands": [], "error": None,
    }
    broken = by_name["broken"]
    assert (broken["distribution"], broken["version"], broken["components"]) == ("dyngan-broken", "0.0.1", {})
    assert broken["error"] == (
        "failed to import: ModuleNotFoundError: No module named 'dyngan_test_dependency_that_is_not_installed'"
    )
    assert set(BUILTIN_EPS) <= set(by_name)
    assert all(by_name[n]["error"] is None for n in ("losses", "mixtures", "mlp"))

    # the same in text form, and the allow-list reaches the command through the environment
    out = subprocess.run([str(script), "plugins"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**env, "DYNGAN_LOAD_PLUGINS": "dyngan-hello,dyngan-broken"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "broken [dyngan-broken 0.0.1]  FAILED: failed to import: ModuleNotFoundError: "
        "No module named 'dyngan_test_dependency_that_is_not_installed'",
        "hello [dyngan-hello 0.3.0]  (dyngan_hello_e2e)",
        "  hooks: register_losses",
        "  loss: hello-loss",
    ]


def test_an_allow_list_naming_no_installed_plugin_says_so():
    """DYNGAN_LOAD_PLUGINS=nonexistent loads nothing: the error must say the name matched nothing,
    not only "unknown dataset 'grid25' (available: none registered)"."""
    host = load_plugins(env={"DYNGAN_LOAD_PLUGINS": "nonexistent,mixtures"})
    assert host.unmatched_allowed == ["nonexistent"]
    assert load_plugins(env={"DYNGAN_LOAD_PLUGINS": "mixtures"}).registry.note is None
    with plugin_host(env={"DYNGAN_LOAD_PLUGINS": "nonexistent"}):
        res = CliRunner().invoke(cli, ["train", "--dry-run"])
        listing = CliRunner().invoke(cli, ["plugins"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert "unknown dataset 'grid25'" in res.stderr
    assert "DYNGAN_LOAD_PLUGINS names 'nonexistent', which matches no installed plugin" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert listing.exit_code == 0 and "'nonexistent'" in listing.stderr
