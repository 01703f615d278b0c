"""The contract third parties rely on: hookspecs, built-in components, layering, the CLI frame, the kit."""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
import typing
from importlib import metadata
from pathlib import Path

import click
import pluggy
import pytest
from click.testing import CliRunner

import core
import core.components
from core import hookspecs
from core.cli import cli
from core.components import KINDS, Component, Loss, Partitioner
from core.options import Option
from core.plugins import load_plugins
from core.testing import check_options_schema, check_state_roundtrip

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNGAN_")}
    env.update(extra)
    return env


# --------------------------------------------------------------------------- hookspecs


def hookspec_functions() -> dict[str, typing.Callable]:
    pm = pluggy.PluginManager("dyngan")
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if callable(fn) and pm.parse_hookspec_opts(hookspecs, name) is not None
    }


HOOKS = hookspec_functions()


def test_the_hooks_are_the_documented_interface():
    documented = {  # /work/shared/reference/interface.md, "Hooks"
        "register_losses", "register_collapse_detectors", "register_partitioners", "register_conditioners",
        "register_datasets", "register_models", "register_metrics", "register_commands",
    }
    assert documented <= set(HOOKS)
    assert set(HOOKS) == set(hookspecs.REGISTRATION_HOOKS) | {"register_commands"}
    # one registration hook per component kind, and back
    assert sorted(hookspecs.REGISTRATION_HOOKS.values()) == sorted(KINDS)
    # the host registers exactly these specs
    from core.plugins import PluginHost

    pm = PluginHost().pm
    for name in HOOKS:
        assert getattr(pm.hook, name).has_spec()


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hookspec_has_a_docstring_and_a_typed_signature(name):
    fn = HOOKS[name]
    doc = inspect.getdoc(fn)
    assert doc and len(doc.split()) >= 8, f"{name} needs a docstring that says what to provide"
    sig = inspect.signature(fn)
    assert sig.return_annotation in ("None", None), f"{name} must be annotated -> None"
    for p in sig.parameters.values():
        assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name}) has no type annotation"
    # the annotations name real types
    namespace = {**vars(typing), **vars(core.components), "click": click, "Callable": typing.Callable}
    hints = typing.get_type_hints(fn, globalns=namespace)
    if name == "register_commands":
        assert list(sig.parameters) == ["cli"] and hints["cli"] is click.Group
        return
    base = KINDS[hookspecs.REGISTRATION_HOOKS[name]]
    assert list(sig.parameters) == ["register"]
    assert hints["register"] == typing.Callable[[type[base]], None]
    assert f"core.components.{base.__name__}" in doc, f"{name}'s docstring should name its base class"


def implemented_in_tests(hook: str) -> list[str]:
    """Test files (this one excepted) that implement ``hook``: ``def hook(`` or ``hook=``."""
    pattern = re.compile(rf"(\bdef\s+{hook}\s*\(|\b{hook}\s*=)")
    return [p.name for p in sorted(TESTS.glob("test_*.py"))
            if p.name != Path(__file__).name and pattern.search(p.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hookspec_is_exercised_by_a_test(name):
    """The datasette check: adding a hook without a test that implements it fails here."""
    assert implemented_in_tests(name), f"no test implements {name}"


def test_hook_scan_is_not_vacuous():
    assert implemented_in_tests("register_no_such_hook") == []


# --------------------------------------------------------------------------- built-in plugins


# the built-in entry points by name ("dyngan" alone would name only the plugin called dyngan)
_BUILTIN_EPS = sorted(ep.name for ep in metadata.entry_points(group="dyngan") if ep.dist and ep.dist.name == "dyngan")
BUILTIN = load_plugins(env={"DYNGAN_LOAD_PLUGINS": ",".join(_BUILTIN_EPS)})
BUILTIN_COMPONENTS = [
    (kind, name, cls)
    for kind in KINDS
    for name, cls in BUILTIN.registry.items(kind)
    if BUILTIN.plugins[cls.plugin].distribution == "dyngan"
]


def test_every_builtin_plugin_loads_cleanly():
    declared = {ep.name: ep.value for ep in metadata.entry_points(group="dyngan") if ep.dist and ep.dist.name == "dyngan"}
    assert {"losses", "mixtures", "mlp"} <= set(declared)
    assert set(BUILTIN.plugins) == set(declared)
    problems = {p.name: p.error for p in BUILTIN.failed}
    assert problems == {}
    for name, module in declared.items():
        assert module.startswith("dyngan_plugins."), f"built-in {name} lives outside dyngan_plugins"
        assert BUILTIN.plugins[name].hooks, f"built-in plugin {name} implements no hook"


def test_builtins_cover_the_documented_component_names():
    names = {(kind, name) for kind, name, _ in BUILTIN_COMPONENTS}
    for loss in ("mm", "ns", "mm-nsat", "ls", "hinge", "wgan-gp"):
        assert ("loss", loss) in names
    for dataset in ("ring8", "grid25"):
        assert ("dataset", dataset) in names
    assert ("model", "mlp") in names


@pytest.mark.parametrize("kind, name, cls", BUILTIN_COMPONENTS, ids=[f"{k}/{n}" for k, n, _ in BUILTIN_COMPONENTS])
def test_builtin_component_options_schema(kind, name, cls):
    assert cls.kind == kind and cls.name == name
    check_options_schema(cls)


@pytest.mark.parametrize("kind, name, cls", BUILTIN_COMPONENTS, ids=[f"{k}/{n}" for k, n, _ in BUILTIN_COMPONENTS])
def test_builtin_component_builds_with_defaults_and_round_trips_its_state(kind, name, cls):
    check_state_roundtrip(cls())


# --------------------------------------------------------------------------- layering


def plugin_imports(source: str) -> list[str]:
    """Imports of ``dyngan_plugins`` in ``source`` (statements and import_module/__import__ calls)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "dyngan_plugins"]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0 and mod.split(".")[0] == "dyngan_plugins":
                found.append(mod)
            elif node.level >= 2:  # `from ..dyngan_plugins import x` climbs out of core
                found.append("." * node.level + mod)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0].value
            if fname in ("import_module", "__import__") and isinstance(arg, str) and arg.startswith("dyngan_plugins"):
                found.append(arg)
    return found


def test_import_scan_catches_every_form():
    src = """
import dyngan_plugins
import os, dyngan_plugins.losses as L
from dyngan_plugins import mlp
from dyngan_plugins.mixtures import Ring8
from ..dyngan_plugins import x
importlib.import_module("dyngan_plugins.prdc")
__import__("dyngan_plugins")
from . import registry
import dyngan_pluginsfoo
"""
    assert plugin_imports(src) == [
        "dyngan_plugins", "dyngan_plugins.losses", "dyngan_plugins", "dyngan_plugins.mixtures",
        "..dyngan_plugins", "dyngan_plugins.prdc", "dyngan_plugins",
    ]


def test_core_imports_nothing_from_dyngan_plugins():
    files = sorted((ROOT / "core").rglob("*.py"))
    assert len(files) >= 8
    offenders = {str(f.relative_to(ROOT)): found for f in files if (found := plugin_imports(f.read_text("utf-8")))}
    assert offenders == {}


def test_importing_all_of_core_loads_no_plugin():
    modules = sorted(f"core.{p.stem}" for p in (ROOT / "core").glob("*.py") if p.stem not in ("__init__", "__main__"))
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('dyngan_plugins')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the CLI frame


def test_help_does_not_import_torch():
    """`dyngan --help` and every core command's --help answer without torch (or numpy)."""
    code = """
import json, sys
from click.testing import CliRunner
from core.cli import cli
runner = CliRunner()
codes = {}
for args in [["--help"], ["-h"], ["--version"]] + [[c, "--help"] for c in sorted(cli.commands)]:
    codes[" ".join(args)] = runner.invoke(cli, args).exit_code
print(json.dumps({"codes": codes, "heavy": sorted(m for m in ("torch", "numpy", "safetensors") if m in sys.modules)}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert {"--help", "train --help", "plugins --help"} <= set(res["codes"])
    assert set(res["codes"].values()) == {0}, res["codes"]
    assert res["heavy"] == []


def test_python_m_core_help_works_and_imports_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "core", "--help"], capture_output=True, text=True,
                         env=clean_env(), cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage: dyngan [OPTIONS] COMMAND [ARGS]...")
    for cmd in ("plugins", "train", "sample", "evaluate"):
        assert re.search(rf"^\s+{cmd}\s", out.stdout, re.M), f"{cmd} missing from --help"
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "click" in imported  # the importtime listing is really there
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"dyngan, version {metadata.version('dyngan')}\n"
    assert core.__version__ == metadata.version("dyngan")


def test_console_script_version():
    script = Path(sys.executable).parent / ("dyngan.exe" if os.name == "nt" else "dyngan")
    assert script.exists(), f"console script not installed beside {sys.executable}"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert out.returncode == 0 and out.stdout == f"dyngan, version {core.__version__}\n"


# --------------------------------------------------------------------------- the kit's checks


class GoodPartitioner(Partitioner):
    name = "good"
    options = {
        "every": Option(100, "partition every N steps", min=1),
        "k": Option(None, "number of parts, or none to choose", type=int, nullable=True),
    }

    def __init__(self, **options):
        super().__init__(**options)
        import torch

        self.centres = torch.zeros(3, 2)
        self.history = [0.5, 0.25]
        self.rounds = 0

    def state_dict(self):
        return {"centres": self.centres, "history": list(self.history), "rounds": self.rounds, "last": None}

    def load_state_dict(self, state):
        self.centres = state["centres"].clone()
        self.history = list(state["history"])
        self.rounds = int(state["rounds"])


def test_check_options_schema_accepts_a_good_schema():
    check_options_schema(GoodPartitioner)
    check_options_schema(type("NoOptions", (Loss,), {"name": "no-options"}))


@pytest.mark.parametrize("opts, problem", [
    ({"delta": Option(-1.0, "a threshold", min=0.0)}, "option 'delta': its default is invalid"),
    ({"mode": Option("slow", "a mode", choices=("fast",))}, "option 'mode': its default is invalid"),
    ({"cap": Option(None, "a cap", type=int)}, "option 'cap': its default is invalid"),
    ({"cap": Option(None, "a cap", nullable=True)}, "option 'cap': an Option whose default is None needs type="),
    ({"delta": Option(0.1)}, "option 'delta' has no help text"),
    ({"delta": Option(0.1, "  ")}, "option 'delta' has no help text"),
    ({"two-words": Option(1, "a count")}, "option key 'two-words' is not a Python identifier"),
    ({"delta": 0.1}, "option 'delta' is float, not core.options.Option"),
    ({"d": Option(0.5, "x", min=1.0, max=0.0)}, "option 'd' has min 1.0 > max 0.0"),
    # bounds on an option that is not a number: registering the class refuses them
    ({"mode": Option("fast", "a mode", min=0)}, "option 'mode' has a min or max, but its type is str"),
    ({"flag": Option(True, "a flag", max=5)}, "option 'flag' has a min or max, but its type is bool"),
    ({"n": Option(3, "a count", min="1")}, "option 'n': its default cannot be checked against its own schema"),
])
def test_check_options_schema_finds_problems(opts, problem):
    cls = type("Bad", (Loss,), {"name": "bad", "options": opts})
    with pytest.raises(AssertionError) as exc:
        check_options_schema(cls)
    assert str(exc.value).startswith("loss 'bad': ")
    assert problem in str(exc.value)


@pytest.mark.parametrize("opt", [Option("fast", "a mode", min=0), Option(True, "a flag", max=5)])
def test_check_options_schema_fails_what_registering_refuses(opt):
    # the kit and the registry agree: a class the kit passes is one a plugin can register
    from core.components import schema_problem

    cls = type("Bounded", (Loss,), {"name": "bounded", "options": {"x": opt}})
    assert schema_problem(cls) is not None
    with pytest.raises(AssertionError, match="has a min or max"):
        check_options_schema(cls)


def test_check_options_schema_fails_a_tuple_option_and_a_model_without_z_dim():
    # both passed the kit; the registry now refuses them (a tuple option broke the saved config,
    # a model without z_dim crashed the run with a KeyError)
    cls = type("Pair", (Loss,), {"name": "pair", "options": {"betas": Option((0.5, 0.9), "two betas")}})
    with pytest.raises(AssertionError, match="registering the class would be refused: it has option 'betas' of type tuple"):
        check_options_schema(cls)
    from core.components import Model

    cls = type("NoZ", (Model,), {"name": "no-z", "options": {"width": Option(8, "a width", min=1)}})
    with pytest.raises(AssertionError, match=r"model 'no-z': the class has no `z_dim` option"):
        check_options_schema(cls)


def test_check_options_schema_catches_a_broken_resolve_options():
    class Overridden(Loss):
        name = "overridden"
        options = {"x": Option(1, "an x")}

        @classmethod
        def resolve_options(cls, values):
            return {"x": 2}

    with pytest.raises(AssertionError, match=r"returned \{'x': 2\}, not the defaults \{'x': 1\}"):
        check_options_schema(Overridden)


@pytest.mark.parametrize("method, stage", [("state_dict", "state_dict()"), ("load_state_dict", "load_state_dict()")])
def test_check_state_roundtrip_names_the_method_that_raised(method, stage):
    def broken(self, *args):
        raise ValueError("no state here")

    cls = type("Broken", (Component,), {method: broken})
    with pytest.raises(AssertionError, match=re.escape(f"Broken: {stage} raised ValueError: no state here")):
        check_state_roundtrip(cls())


def test_check_state_roundtrip_accepts_a_good_component():
    check_state_roundtrip(GoodPartitioner())
    check_state_roundtrip(Component())  # the default empty state


class StatePartitioner(GoodPartitioner):
    name = "state"

    def __init__(self, state, load=None):
        super().__init__()
        self._state, self._load = state, load

    def state_dict(self):
        return self._state

    def load_state_dict(self, state):
        if self._load:
            self._load(self, state)


def test_check_state_roundtrip_rejects_unserialisable_values_and_bad_keys():
    with pytest.raises(AssertionError, match=r"value of 'seen' is neither a tensor nor JSON-serialisable \(set"):
        check_state_roundtrip(StatePartitioner({"seen": {1, 2}}))
    with pytest.raises(AssertionError, match=r"key 3 is not a str"):
        check_state_roundtrip(StatePartitioner({3: 1}))
    with pytest.raises(AssertionError, match=r"not a mapping"):
        check_state_roundtrip(StatePartitioner([("a", 1)]))


class ForgetfulPartitioner(GoodPartitioner):
    """A typical bug: load_state_dict reads a misspelled key and re-initialises a tensor."""

    name = "forgetful"

    def load_state_dict(self, state):
        import torch

        self.rounds = int(state.get("round", 0))
        self.centres = torch.zeros_like(state["centres"])
        self.history = list(state["history"])


def test_check_state_roundtrip_catches_a_load_that_forgets():
    comp = ForgetfulPartitioner()
    comp.rounds = 7
    comp.centres = comp.centres + 1
    with pytest.raises(AssertionError) as exc:
        check_state_roundtrip(comp)
    msg = str(exc.value)
    assert msg.startswith("ForgetfulPartitioner state round trip: ")
    assert "'rounds' was 7 and came back as 0" in msg
    assert "'centres' has different values after the round trip" in msg
    assert "history" not in msg


def test_check_state_roundtrip_catches_changed_keys_dtypes_and_types():
    import torch

    def drops(self, state):
        self._state = {k: v for k, v in state.items() if k != "b"}

    with pytest.raises(AssertionError, match=r"keys after load_state_dict are \['a'\], before \['a', 'b'\]"):
        check_state_roundtrip(StatePartitioner({"a": 1, "b": 2}, drops))

    def to_float16(self, state):
        self._state = {"t": state["t"].half()}

    with pytest.raises(AssertionError, match=r"'t' changed from torch.float32\(2,\) to torch.float16\(2,\)"):
        check_state_roundtrip(StatePartitioner({"t": torch.ones(2)}, to_float16))

    def to_list(self, state):
        self._state = {"t": state["t"].tolist()}

    with pytest.raises(AssertionError, match=r"'t' was a tensor and came back as list"):
        check_state_roundtrip(StatePartitioner({"t": torch.ones(2)}, to_list))

    def int_to_float(self, state):
        self._state = {"n": float(state["n"])}

    with pytest.raises(AssertionError, match=r"'n' was 3 and came back as 3.0"):
        check_state_roundtrip(StatePartitioner({"n": 3}, int_to_float))


def test_check_state_roundtrip_hands_load_state_dict_what_a_checkpoint_would():
    """Tensors arrive on the CPU as independent copies, JSON values as JSON gives them back."""
    import torch

    base = torch.arange(6.0)
    got = {}

    def capture(self, state):
        got.update(state)
        self._state = {"view": state["view"], "pair": tuple(state["pair"]), "nan": state["nan"]}

    comp = StatePartitioner({"view": base[::2], "pair": (1, 2), "nan": float("nan")}, capture)
    check_state_roundtrip(comp)  # NaN equals NaN, a tuple comes back as a list and that is fine
    assert got["pair"] == [1, 2]
    assert got["view"].is_contiguous() and got["view"].device.type == "cpu"
    assert torch.equal(got["view"], torch.tensor([0.0, 2.0, 4.0]))
    assert got["view"].data_ptr() != base.data_ptr()
