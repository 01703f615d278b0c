"""Option schemas: coercion from strings and TOML values, bounds, choices, errors, read-only values."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from core.components import CollapseDetector, Loss
from core.errors import OptionError, UsageError
from core.options import Option, OptionValues, check_value, resolve_options

WHERE = "detector 'demo'"


class DemoDetector(CollapseDetector):
    name = "demo"
    options = {
        "delta": Option(0.2, "threshold on the detection score", min=0.0, max=1.0),
        "every": Option(500, "detect every N steps", min=1),
        "weighted": Option(True, "weight the score by density"),
        "mode": Option("fast", "search strategy", choices=("fast", "exact")),
        "cap": Option(None, "at most this many samples, or none for all", type=int, nullable=True, min=1),
        "norm": Option("none", "feature normalisation", choices=("none", "l2")),
    }


def value(key, raw):
    return check_value(WHERE, key, raw, DemoDetector.options[key])


# --------------------------------------------------------------------------- coercion


@pytest.mark.parametrize("raw, expected", [("0.1", 0.1), (" 0.5 ", 0.5), ("1e-1", 0.1), (1, 1.0), (0.25, 0.25)])
def test_float_from_strings_and_numbers(raw, expected):
    out = value("delta", raw)
    assert out == expected and type(out) is float


@pytest.mark.parametrize("raw, expected", [
    ("true", True), ("True", True), ("yes", True), ("1", True), ("on", True),
    ("false", False), ("FALSE", False), ("no", False), ("0", False), ("off", False),
    (True, True), (False, False),
])
def test_bool_from_strings_and_bools(raw, expected):
    assert value("weighted", raw) is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "", 1, 0, 1.0])
def test_bool_rejects_other_words_and_numbers(raw):
    with pytest.raises(OptionError, match=r"option 'weighted' must be a boolean"):
        value("weighted", raw)


@pytest.mark.parametrize("raw, expected", [("3", 3), (" 42 ", 42), ("3.0", 3), ("1e3", 1000), (7, 7), (8.0, 8)])
def test_int_from_strings_and_integral_numbers(raw, expected):
    out = value("every", raw)
    assert out == expected and type(out) is int


@pytest.mark.parametrize("raw", ["3.5", 3.5, "three", "", True, "inf", [3]])
def test_int_rejects_fractions_words_and_bools(raw):
    with pytest.raises(OptionError) as exc:
        value("every", raw)
    assert "option 'every' must be an integer" in str(exc.value)


@pytest.mark.parametrize("raw", ["abc", "", True, [0.1], {"x": 1}])
def test_float_rejects_non_numbers(raw):
    with pytest.raises(OptionError, match=r"option 'delta' must be a number"):
        value("delta", raw)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_float_rejects_non_finite(raw):
    with pytest.raises(OptionError, match=r"must be a finite number"):
        value("delta", raw)


@pytest.mark.parametrize("raw", ["none", "None", "NULL", " none ", None])
def test_none_for_a_nullable_option(raw):
    assert value("cap", raw) is None


def test_nullable_option_still_coerces_and_checks_real_values():
    assert value("cap", "16") == 16
    with pytest.raises(OptionError, match=r"option 'cap' must be an integer >= 1 or none, got '0'"):
        value("cap", "0")


@pytest.mark.parametrize("raw", ["none", None])
def test_none_is_rejected_for_a_non_nullable_option(raw):
    with pytest.raises(OptionError, match=r"option 'delta' must be a number in \[0\.0, 1\.0\]"):
        value("delta", raw)


def test_none_word_is_a_literal_for_a_non_nullable_string_option():
    """`-o detector.norm=none` picks the choice "none", it is not Python None."""
    assert value("norm", "none") == "none"
    assert value("norm", "l2") == "l2"
    with pytest.raises(OptionError):
        value("norm", None)


def test_string_option_rejects_non_strings():
    with pytest.raises(OptionError, match=r"option 'mode' must be one of fast, exact, got 3"):
        value("mode", 3)


# --------------------------------------------------------------------------- bounds and choices


@pytest.mark.parametrize("raw", ["0", "1", 0.0, 1.0, "0.999"])
def test_bounds_are_inclusive(raw):
    assert 0.0 <= value("delta", raw) <= 1.0


@pytest.mark.parametrize("raw", ["-0.01", "1.5", -1, 2])
def test_out_of_bounds_names_the_range(raw):
    with pytest.raises(OptionError) as exc:
        value("delta", raw)
    assert f"{WHERE}: option 'delta' must be a number in [0.0, 1.0], got {raw!r}" == str(exc.value)


def test_min_only_bound():
    with pytest.raises(OptionError, match=r"must be an integer >= 1, got '0'"):
        value("every", "0")


def test_max_only_bound():
    opt = Option(3, "at most five", max=5)
    assert check_value(WHERE, "k", "5", opt) == 5
    with pytest.raises(OptionError, match=r"must be an integer <= 5, got 6"):
        check_value(WHERE, "k", 6, opt)


def test_choices():
    assert value("mode", "exact") == "exact"
    with pytest.raises(OptionError) as exc:
        value("mode", "slow")
    assert str(exc.value) == f"{WHERE}: option 'mode' must be one of fast, exact, got 'slow'"


# --------------------------------------------------------------------------- resolve_options and messages


def test_resolve_overlays_defaults():
    out = DemoDetector.resolve_options({"delta": "0.1", "every": "3", "weighted": "false"})
    assert out == {"delta": 0.1, "every": 3, "weighted": False, "mode": "fast", "cap": None, "norm": "none"}


def test_resolve_with_nothing_gives_the_defaults():
    assert DemoDetector.resolve_options({}) == {k: o.default for k, o in DemoDetector.options.items()}


def test_unknown_key_suggests_the_closest_and_lists_the_options():
    with pytest.raises(OptionError) as exc:
        DemoDetector.resolve_options({"detla": 0.1})
    msg = str(exc.value)
    assert msg.startswith("detector 'demo': unknown option 'detla'")
    assert "did you mean 'delta'?" in msg
    assert "(options: cap, delta, every, mode, norm, weighted)" in msg


def test_unknown_key_without_close_match():
    with pytest.raises(OptionError) as exc:
        DemoDetector.resolve_options({"zzzzzz": 1})
    assert "did you mean" not in str(exc.value)


def test_unknown_key_for_a_component_without_options():
    cls = type("Bare", (Loss,), {"name": "bare"})
    with pytest.raises(OptionError, match=r"loss 'bare': unknown option 'x' \(options: none\)"):
        cls.resolve_options({"x": 1})


def test_error_names_component_option_expectation_and_value():
    with pytest.raises(OptionError) as exc:
        DemoDetector(delta="abc")
    msg = str(exc.value)
    assert "detector 'demo'" in msg  # the component
    assert "option 'delta'" in msg  # the option
    assert "a number in [0.0, 1.0]" in msg  # the expectation
    assert "'abc'" in msg  # what it got
    assert exc.value.exit_code == 2 and isinstance(exc.value, UsageError)


def test_error_has_no_chained_traceback_noise():
    with pytest.raises(OptionError) as exc:
        DemoDetector(every="3.5")
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_resolve_options_function_with_plain_schema():
    schema = {"lr": Option(1e-3, "learning rate", min=0.0)}
    assert resolve_options("model 'x'", schema, {"lr": "2e-4"}) == {"lr": 2e-4}


# --------------------------------------------------------------------------- Option itself


def test_option_with_none_default_needs_a_type():
    with pytest.raises(TypeError, match="needs type="):
        Option(None, "no type").value_type


def test_option_describe_and_json():
    opt = DemoDetector.options["cap"]
    assert opt.describe() == "an integer >= 1 or none"
    js = opt.to_json()
    assert json.loads(json.dumps(js)) == {
        "default": None, "type": "int", "help": "at most this many samples, or none for all",
        "min": 1, "max": None, "choices": None, "nullable": True,
    }
    assert DemoDetector.options["mode"].to_json()["choices"] == ["fast", "exact"]


def test_option_is_frozen():
    with pytest.raises(AttributeError):
        DemoDetector.options["delta"].min = -1.0


# --------------------------------------------------------------------------- OptionValues


def test_component_gets_read_only_option_values():
    det = DemoDetector(delta="0.3")
    assert isinstance(det.opts, OptionValues)
    assert det.opts.delta == 0.3 and det.opts["every"] == 500 and det.every == 500
    with pytest.raises(AttributeError, match="read-only"):
        det.opts.delta = 0.9
    with pytest.raises(AttributeError, match="read-only"):
        del det.opts.delta
    with pytest.raises(TypeError):
        det.opts["delta"] = 0.9  # type: ignore[index]
    assert det.opts.delta == 0.3


def test_option_values_mapping_behaviour():
    src = {"a": 1, "b": [1, 2]}
    ov = OptionValues(src)
    src["a"] = 99  # a copy was taken
    assert ov.a == 1 and len(ov) == 2 and set(ov) == {"a", "b"} and dict(ov) == {"a": 1, "b": [1, 2]}
    assert ov == {"a": 1, "b": [1, 2]}
    assert ov.get("missing", "dflt") == "dflt"
    with pytest.raises(AttributeError):
        ov.missing
    with pytest.raises(KeyError):
        ov["missing"]
    assert repr(ov) == "OptionValues({'a': 1, 'b': [1, 2]})"


@pytest.mark.parametrize("clone", [copy.copy, copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_option_values_copy_and_pickle(clone):
    ov = OptionValues({"a": 1, "b": [1, 2]})
    other = clone(ov)
    assert isinstance(other, OptionValues) and other == ov and other.a == 1
    with pytest.raises(AttributeError, match="read-only"):
        other.a = 2


def test_a_component_can_be_deep_copied():
    det = DemoDetector(delta=0.4)
    twin = copy.deepcopy(det)
    assert twin is not det and twin.opts == det.opts and twin.opts.delta == 0.4


# ------------------------------------------------------------------ float notation and sizes


@pytest.mark.parametrize("raw, expected", [("1e5", 100_000), ("100000.0", 100_000), (1e5, 100_000),
                                           ("1_000", 1000), (" 7 ", 7), (2.0**53, 2**53)])
def test_int_options_accept_exact_integers_in_float_notation(raw, expected):
    opt = Option(5, "n", min=1)
    v = check_value(WHERE, "n", raw, opt)
    assert v == expected and type(v) is int


@pytest.mark.parametrize("raw, needle", [
    ("1e30", "at most 2**53"), (1e30, "at most 2**53"), ("9007199254740994.0", "at most 2**53"),
    ("1.5", "must be an integer"), (2.5, "must be an integer"), ("inf", "must be an integer"),
    ("nan", "must be an integer"), ("99999999999999999999999", "64-bit"), (2**64, "64-bit"),
])
def test_int_options_refuse_inexact_or_oversized_values(raw, needle):
    with pytest.raises(OptionError) as ei:
        check_value(WHERE, "n", raw, Option(5, "n", min=1))
    assert needle in str(ei.value) and "option 'n'" in str(ei.value)


@pytest.mark.parametrize("flag, needle", [
    ("dataset.n=1e30", "option 'n' must be an integer in [1, 10000000]"),
    ("dataset.n=2000000000", "option 'n' must be an integer in [1, 10000000]"),
    ("dataset.points_per_mode=100000000", "option 'points_per_mode' must be an integer in [1, 10000000]"),
    ("dataset.points_per_mode=500000", "makes 12500000 points, more than 10000000"),
    ("dataset.side=1000", "option 'side' must be an integer in [1, 100]"),
    ("model.z_dim=100000000", "option 'z_dim' must be an integer in [1, 4096]"),
    ("model.hidden=1e9", "option 'hidden' must be an integer in [1, 8192]"),
    ("model.layers=100000", "option 'layers' must be an integer in [1, 64]"),
    ("conditioner.capacity=1e7", "option 'capacity' must be an integer in [1, 10000]"),
    ("detector.batch_size=1e20", "at most 2**53"),
])
def test_oversized_component_options_exit_2_before_anything_is_built(flag, needle):
    from click.testing import CliRunner

    from core.cli import cli

    res = CliRunner().invoke(cli, ["train", "--dry-run", "--preset", "dyngan", "-o", flag])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert needle in res.stderr, res.stderr


def test_documented_and_default_sizes_stay_valid():
    from click.testing import CliRunner

    from core.cli import cli

    for flags in (["--dataset", "grid25", "-o", "dataset.points_per_mode=50", "-o", "dataset.sigma=0.1"],
                  ["--dataset", "ring8", "-o", "dataset.points_per_mode=50", "-o", "dataset.radius=2"],
                  ["--dataset", "grid25", "-o", "dataset.n=1e7", "-o", "model.z_dim=4096"],
                  ["--preset", "dyngan-image"], ["--dataset", "stacked-digits", "-o", "dataset.n=5e7"]):
        res = CliRunner().invoke(cli, ["train", "--dry-run", *flags])
        assert res.exit_code == 0, (flags, res.output)


@pytest.mark.parametrize("dataset", ["grid25", "ring8"])
def test_n_and_points_per_mode_together_are_refused_not_one_ignored(dataset):
    """points_per_mode replaces n: both given would train on one and record the other in config.json."""
    from click.testing import CliRunner

    from core.api import resolve_settings
    from core.cli import cli

    res = CliRunner().invoke(cli, ["train", "--dry-run", "--dataset", dataset, "-o", "dataset.n=1000",
                                   "-o", "dataset.points_per_mode=50"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"dataset '{dataset}': give n=1000 or points_per_mode=50, not both" in res.stderr
    # a saved config holds both (n at its default, unused): it still resolves
    cfg = resolve_settings({"dataset": dataset, "options": {"dataset": {"points_per_mode": 50}}})
    assert cfg["options"]["dataset"]["n"] == 100_000
    again = resolve_settings({"dataset": dataset, "options": {"dataset": dict(cfg["options"]["dataset"])}})
    assert again["options"]["dataset"] == cfg["options"]["dataset"]
