"""The registry: lookup by kind and name, loud unknown and duplicate names."""

from __future__ import annotations

import pytest

from core.components import KINDS, Dataset, Loss, Metric, Model, Option, Preset
from core.errors import DuplicateComponentError, PluginError, UnknownComponentError, UsageError
from core.registry import Registry
from core.testing import plugin_host


def loss_class(name: str, qualname: str | None = None) -> type[Loss]:
    """A fresh Loss subclass (a new class each call, so no test shares one)."""
    return type(qualname or f"Loss_{name.replace('-', '_')}", (Loss,), {"name": name})


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    for name in ("ns", "mm", "hinge", "wgan-gp"):
        r.add("loss", loss_class(name), "losses")
    return r


# --------------------------------------------------------------------------- unknown names and kinds


def test_unknown_name_suggests_closest_and_lists_available(reg):
    with pytest.raises(UnknownComponentError) as exc:
        reg.get("loss", "nss")
    msg = str(exc.value)
    assert "unknown loss 'nss'" in msg
    assert "did you mean 'ns'?" in msg
    assert "(available: hinge, mm, ns, wgan-gp)" in msg


def test_unknown_name_without_close_match_has_no_suggestion(reg):
    with pytest.raises(UnknownComponentError) as exc:
        reg.get("loss", "zzzzzz")
    assert "did you mean" not in str(exc.value)
    assert "available: hinge, mm, ns, wgan-gp" in str(exc.value)


def test_unknown_name_of_an_empty_kind_says_none_registered(reg):
    with pytest.raises(UnknownComponentError, match=r"unknown detector 'dyngan'.*none registered"):
        reg.get("detector", "dyngan")


def test_unknown_name_against_the_builtin_plugins():
    with plugin_host() as host:
        with pytest.raises(UnknownComponentError) as exc:
            host.registry.get("loss", "nss")
    msg = str(exc.value)
    assert "did you mean 'ns'?" in msg
    for builtin in ("mm", "ns", "hinge", "wgan-gp"):
        assert builtin in msg


@pytest.mark.parametrize("call", [
    lambda r: r.get("losses", "ns"),
    lambda r: r.names("losses"),
    lambda r: r.items("losses"),
    lambda r: r.add("losses", loss_class("x"), "p"),
])
def test_unknown_kind_is_an_error_listing_the_kinds(reg, call):
    with pytest.raises(UnknownComponentError) as exc:
        call(reg)
    msg = str(exc.value)
    assert "unknown component kind 'losses'" in msg
    for kind in KINDS:
        assert kind in msg


def test_lookup_errors_are_usage_errors_with_exit_code_2(reg):
    with pytest.raises(UsageError) as exc:
        reg.get("loss", "nope")
    assert exc.value.exit_code == 2


# --------------------------------------------------------------------------- duplicates


def test_duplicate_name_from_two_plugins_names_both(reg):
    first = reg.get("loss", "ns")
    impostor = loss_class("ns", "ImpostorNS")
    with pytest.raises(DuplicateComponentError) as exc:
        reg.add("loss", impostor, "third_party")
    msg = str(exc.value)
    assert "loss 'ns' is registered twice" in msg
    assert "plugin 'losses'" in msg and "plugin 'third_party'" in msg
    assert "ImpostorNS" in msg and first.__qualname__ in msg
    assert exc.value.exit_code == 2
    # the first registration stands, still credited to its plugin
    assert reg.get("loss", "ns") is first
    assert first.plugin == "losses"


def test_same_class_from_a_second_plugin_is_a_duplicate_too(reg):
    cls = reg.get("loss", "mm")
    with pytest.raises(DuplicateComponentError, match=r"plugin 'losses'.*plugin 'copycat'"):
        reg.add("loss", cls, "copycat")
    assert cls.plugin == "losses"


def test_same_class_from_the_same_plugin_again_is_harmless(reg):
    cls = reg.get("loss", "mm")
    reg.add("loss", cls, "losses")
    assert reg.names("loss") == ["hinge", "mm", "ns", "wgan-gp"]


def test_same_name_in_two_kinds_is_allowed(reg):
    ds = type("NsDataset", (Dataset,), {"name": "ns"})
    reg.add("dataset", ds, "data")
    assert reg.get("dataset", "ns") is ds
    assert reg.get("loss", "ns") is not ds


def test_duplicate_between_two_plugin_modules_through_the_host():
    """Through the host the second plugin fails with an error naming both, the first keeps its name."""
    from core.hookspecs import hookimpl
    import types

    a_cls, b_cls = loss_class("shared", "SharedA"), loss_class("shared", "SharedB")
    plug_a, plug_b = types.ModuleType("plug_a"), types.ModuleType("plug_b")
    plug_a.register_losses = hookimpl(lambda register: register(a_cls))
    plug_b.register_losses = hookimpl(lambda register: register(b_cls))
    with plugin_host(plug_a, plug_b, builtins=False) as host:
        assert host.plugins["plug_a"].error is None
        err = host.plugins["plug_b"].error
        assert err is not None and "plugin 'plug_a'" in err and "plugin 'plug_b'" in err
        assert host.registry.get("loss", "shared") is a_cls


# --------------------------------------------------------------------------- invalid classes


@pytest.mark.parametrize("bad", [
    type("NotAComponent", (), {"name": "x"}),
    type("ADataset", (Dataset,), {"name": "x"}),  # right base class family, wrong kind
    Loss,  # the base class is a subclass of itself, but has no name
])
def test_registering_a_non_subclass_or_nameless_base_is_an_error(reg, bad):
    with pytest.raises(PluginError) as exc:
        reg.add("loss", bad, "sloppy")
    assert "plugin 'sloppy'" in str(exc.value)
    assert bad not in dict(reg.items("loss")).values()


def test_non_subclass_error_names_the_expected_base(reg):
    with pytest.raises(PluginError, match=r"not a subclass of core\.components\.Loss"):
        reg.add("loss", type("Plain", (), {"name": "plain"}), "sloppy")


def test_registering_an_instance_instead_of_a_class_is_an_error(reg):
    with pytest.raises(PluginError, match="not a subclass"):
        reg.add("loss", loss_class("inst")(), "sloppy")


@pytest.mark.parametrize("name", ["", " ns", "ns ", "none", "None", 3, None])
def test_class_without_a_valid_name_is_an_error(reg, name):
    cls = type("Nameless", (Loss,), {"name": name})
    with pytest.raises(PluginError, match=r"plugin 'sloppy' registered loss class Nameless without a valid `name`"):
        reg.add("loss", cls, "sloppy")


def _assert_refused(reg, kind, base, cls_name, name, attrs, says):
    """A ``base`` subclass with ``attrs`` is refused by ``reg`` with a message naming plugin, kind,
    class and name and holding ``says``, and nothing is registered under ``name``."""
    cls = type(cls_name, (base,), {"name": name, **attrs})
    with pytest.raises(PluginError) as exc:
        reg.add(kind, cls, "sloppy")
    assert str(exc.value).startswith(f"plugin 'sloppy' registered {kind} class {cls_name} ('{name}'), which ")
    assert says in str(exc.value)
    assert name not in reg.names(kind)


@pytest.mark.parametrize("options, says", [
    (5, "has `options` = 5, not a mapping of option names to Options"),
    ({"margin": 5}, "has option 'margin' = 5, which is not an Option"),
    ({"margin": Option("abc", "m", min=0.0)}, "has option 'margin' with a min or max, but its type is str, not a number"),
    ({"margin": Option(None, "m")}, "has option 'margin' whose default is None and no type"),
    ({"margin": Option(5, "m", min=10)}, "has option 'margin' whose default 5 fails its own schema (option 'margin' "
                                         "must be an integer >= 10, got 5)"),
    ({"margin": Option("b", "m", choices=("a",))}, "has option 'margin' whose default 'b' fails its own schema"),
    ({"margin": Option("a", "m", choices=5)}, "has option 'margin' whose default 'a' cannot be checked against its "
                                              "own schema (TypeError: "),
    ({"margin": Option(1.0, "m", type="float")}, "has option 'margin' with type='float', which is not a type"),
    ({3: Option(1, "m")}, "has an option key 3, which is not a string"),
    # these registered, then broke: -o split a str into its characters, and a tuple default left a
    # config.json that no resume, sample or evaluate accepted; a dotted key failed the test kit
    ({"betas": Option((0.5, 0.9), "b")}, "has option 'betas' of type tuple (default (0.5, 0.9)); an option "
                                         "holds an int, float, bool or str"),
    ({"weights": Option(None, "w", type=list, nullable=True)}, "has option 'weights' of type list"),
    ({"a.b": Option(1, "m")}, "has an option key 'a.b', which is not a Python identifier"),
])
def test_a_class_with_a_malformed_options_schema_is_refused_when_it_registers(reg, options, says):
    _assert_refused(reg, "loss", Loss, "BadOpts", "bad-opts", {"options": options}, says)


@pytest.mark.parametrize("settings, says", [
    (5, "has `settings` = 5, not a mapping of config keys to values"),
    (None, "has `settings` = None, not a mapping"),
    ({"options": 5}, "has `settings['options']` = 5, not a mapping of component kinds to options"),
    ({"options": {"loss": [1]}}, "has `settings['options']['loss']` = [1], not a mapping of option names to values"),
])
def test_a_preset_whose_settings_are_not_a_mapping_is_refused_when_it_registers(reg, settings, says):
    _assert_refused(reg, "preset", Preset, "BadPreset", "bad-preset", {"settings": settings}, says)
    assert reg.names("preset") == []


@pytest.mark.parametrize("options, says", [
    ({}, "has no `z_dim` option (the size of G's latent input)"),
    ({"z_dim": Option(8.0, "z")}, "has a `z_dim` option that is not a non-nullable integer with a minimum >= 1"),
    ({"z_dim": Option(8, "z")}, "has a `z_dim` option that is not a non-nullable integer with a minimum >= 1"),
    ({"z_dim": Option(8, "z", min=1, nullable=True)}, "is not a non-nullable integer"),
    ({"z_dim": Option(8, "z", min="1")}, "is not a non-nullable integer"),  # a bare TypeError before
])
def test_a_model_without_a_valid_z_dim_is_refused_when_it_registers(reg, options, says):
    # it registered, and the run then failed with a KeyError traceback when it built the networks
    _assert_refused(reg, "model", Model, "NoZ", "no-z", {"options": options}, says)


def test_a_model_that_overrides_z_dim_registers_without_the_option(reg):
    reg.add("model", type("OwnZ", (Model,), {"name": "own-z", "options": {}, "z_dim": 16}), "tidy")
    assert "own-z" in reg.names("model")


@pytest.mark.parametrize("name", ["qa,comma", "a.b", "k=v", "a/b", "two words"])
def test_a_name_no_command_line_could_select_is_refused(reg, name):
    cls = type("Odd", (Metric,), {"name": name})
    with pytest.raises(PluginError, match=r"whose name holds .*: a component name is used in --metrics lists"):
        reg.add("metric", cls, "sloppy")
    assert name not in reg.names("metric")


def test_well_formed_schemas_still_register(reg):
    reg.add("loss", type("Fine", (Loss,), {"name": "fine", "options": {
        "a": Option(None, "a", type=int, nullable=True), "b": Option(1.0, "b", min=0.0, max=2.0),
        "c": Option("x", "c", choices=("x", "y")), "d": Option(True, "d")}}), "tidy")
    reg.add("preset", type("FinePreset", (Preset,), {"name": "fine", "settings": {
        "loss": "fine", "options": {"loss": {"b": 0.5}}}}), "tidy")
    assert "fine" in reg.names("loss") and reg.names("preset") == ["fine"]


# --------------------------------------------------------------------------- queries and removal


def test_names_and_items_are_sorted_and_per_kind(reg):
    reg.add("metric", type("M", (Metric,), {"name": "fid"}), "metrics")
    assert reg.names("loss") == ["hinge", "mm", "ns", "wgan-gp"]
    assert reg.names("metric") == ["fid"]
    assert reg.names("detector") == []
    items = list(reg.items("loss"))
    assert [n for n, _ in items] == ["hinge", "mm", "ns", "wgan-gp"]
    for name, cls in items:
        assert cls.name == name and issubclass(cls, Loss) and cls.plugin == "losses"


def test_remove_plugin_forgets_only_that_plugins_components(reg):
    reg.add("loss", loss_class("extra"), "extras")
    reg.add("dataset", type("D", (Dataset,), {"name": "extra-data"}), "extras")
    reg.remove_plugin("extras")
    assert reg.names("loss") == ["hinge", "mm", "ns", "wgan-gp"]
    assert reg.names("dataset") == []
    # a removed name can be registered again
    reg.add("loss", loss_class("extra"), "extras2")
    assert "extra" in reg.names("loss")


def test_remove_plugin_uses_this_registrys_record_not_the_shared_class_attribute():
    """``cls.plugin`` is shared by every registry in the process; removal must not follow it."""
    cls = loss_class("shared-cls")
    r1, r2 = Registry(), Registry()
    r1.add("loss", cls, "p1")
    r2.add("loss", cls, "p2")  # rewrites cls.plugin to "p2"
    r1.remove_plugin("p2")
    assert r1.names("loss") == ["shared-cls"]
    r1.remove_plugin("p1")
    assert r1.names("loss") == []
    assert r2.names("loss") == ["shared-cls"]
