"""docs/plugins.md cannot drift from the code.

Fenced blocks tagged ``contract`` are Python stubs whose first line names the module
(``# core.components``); every ``def`` and class attribute in them must match the code's
own definition: parameter names, kinds, annotations and defaults, return annotation,
property/classmethod decorators, base classes (compared as ASTs, so a quoted annotation in
the code equals the same annotation unquoted in the doc). Every hook, every contract class
and every member of those classes, and every function of ``core.testing`` must be
documented. The worked example (blocks tagged ``example-plugin`` and ``example-test``) is
run: the plugin is imported and its tests executed.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: dyngan depends on tomli there
    import tomli as tomllib

import core.components
import core.testing
from core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
MODULE_LINE = re.compile(r"#\s*(core(?:\.\w+)*)\s*$")
#: decorators that change a contract (hookspec / dataclass markers do not)
SIGNIFICANT_DECORATORS = {"property", "classmethod", "staticmethod", "contextmanager"}


def fenced_blocks(text: str, tag: str) -> list[str]:
    return [body for info, body in FENCE.findall(text) if tag in info.split()]


def contract_blocks(text: str) -> list[tuple[str, ast.Module]]:
    out = []
    for body in fenced_blocks(text, "contract"):
        first = body.splitlines()[0] if body.strip() else ""
        m = MODULE_LINE.match(first)
        assert m, f"a contract block must start with '# core.<module>', got {first!r}"
        out.append((m.group(1), ast.parse(body)))
    return out


# ---------------------------------------------------------------------- normalised signatures


class _Unquote(ast.NodeTransformer):
    """String constants in an annotation are annotations too: parse them."""

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str):
            try:
                return self.visit(ast.parse(node.value, mode="eval").body)
            except SyntaxError:
                return node
        return node


def annotation(node: ast.AST | None) -> str | None:
    if node is None:
        return None
    return ast.unparse(_Unquote().visit(ast.parse(ast.unparse(node), mode="eval").body))


def signature(fn: ast.FunctionDef) -> dict:
    a = fn.args

    def params(args):
        return [(p.arg, annotation(p.annotation)) for p in args]

    return {
        "positional-only": params(a.posonlyargs),
        "parameters": params(a.args),
        "defaults": [ast.unparse(d) for d in a.defaults],
        "*args": params([a.vararg]) if a.vararg else None,
        "keyword-only": params(a.kwonlyargs),
        "keyword defaults": [ast.unparse(d) if d is not None else None for d in a.kw_defaults],
        "**kwargs": params([a.kwarg]) if a.kwarg else None,
        "returns": annotation(fn.returns),
        "decorators": sorted(ast.unparse(d) for d in fn.decorator_list
                             if ast.unparse(d) in SIGNIFICANT_DECORATORS),
    }


def attribute(node: ast.AnnAssign) -> tuple[str | None, str | None]:
    return annotation(node.annotation), ast.unparse(node.value) if node.value is not None else None


def members(cls: ast.ClassDef) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def public(name: str) -> bool:
    return not name.startswith("_") or name == "__init__"


_SOURCES: dict[str, dict[str, ast.AST]] = {}


def code_definitions(module: str) -> dict[str, ast.AST]:
    """Top-level functions and classes of a module, from its source."""
    if module not in _SOURCES:
        mod = importlib.import_module(module)
        tree = ast.parse(inspect.getsource(mod))
        _SOURCES[module] = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return _SOURCES[module]


def compare(text: str) -> tuple[list[str], set[tuple[str, str]], dict[tuple[str, str], set[str]]]:
    """Problems between the doc's contract blocks and the code; what the doc documents."""
    problems: list[str] = []
    documented: set[tuple[str, str]] = set()
    class_members: dict[tuple[str, str], set[str]] = {}
    for module, tree in contract_blocks(text):
        code = code_definitions(module)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            where = f"{module}.{node.name}"
            documented.add((module, node.name))
            real = code.get(node.name)
            if real is None or type(real) is not type(node):
                problems.append(f"{where}: documented as a {type(node).__name__}, not found as one in the code")
                continue
            if isinstance(node, ast.FunctionDef):
                if signature(node) != signature(real):
                    problems.append(f"{where}: doc {signature(node)} != code {signature(real)}")
                continue
            doc_bases = [ast.unparse(b) for b in node.bases]
            code_bases = [ast.unparse(b) for b in real.bases]
            if doc_bases != code_bases:
                problems.append(f"{where}: bases {doc_bases} in the doc, {code_bases} in the code")
            doc_members, code_members = members(node), members(real)
            class_members[(module, node.name)] = set(doc_members)
            for name, dm in doc_members.items():
                cm = code_members.get(name)
                if cm is None or type(cm) is not type(dm):
                    problems.append(f"{where}.{name}: documented, not found in the class's own body")
                elif isinstance(dm, ast.FunctionDef) and signature(dm) != signature(cm):
                    problems.append(f"{where}.{name}: doc {signature(dm)} != code {signature(cm)}")
                elif isinstance(dm, ast.AnnAssign) and attribute(dm) != attribute(cm):
                    problems.append(f"{where}.{name}: doc {attribute(dm)} != code {attribute(cm)}")
            # the dataclass fields (positional construction) must be listed in order
            doc_fields = [n for n, v in doc_members.items() if isinstance(v, ast.AnnAssign)]
            code_fields = [n for n, v in code_members.items() if isinstance(v, ast.AnnAssign)]
            if [f for f in code_fields if f in doc_fields] != doc_fields:
                problems.append(f"{where}: attributes in the order {doc_fields}, the code has {code_fields}")
            missing = sorted(n for n in code_members if public(n) and n not in doc_members)
            if missing:
                problems.append(f"{where}: the code has {missing}, the doc does not list them")
    return problems, documented, class_members


DOC_TEXT = DOC.read_text("utf-8")


def test_doc_has_contract_blocks_for_each_module():
    modules = {m for m, _ in contract_blocks(DOC_TEXT)}
    assert modules == {"core.hookspecs", "core.components", "core.options", "core.testing"}


def test_every_documented_signature_matches_the_code():
    problems, _, _ = compare(DOC_TEXT)
    assert not problems, "\n".join(problems)


def test_every_hook_is_documented():
    _, documented, _ = compare(DOC_TEXT)
    hooks = {n for n, f in vars(hookspecs).items() if callable(f) and n.startswith("register_")}
    assert hooks == set(hookspecs.REGISTRATION_HOOKS) | {"register_commands"}
    assert {("core.hookspecs", h) for h in hooks} <= documented
    assert {n for m, n in documented if m == "core.hookspecs"} == hooks


def test_every_contract_class_and_kit_function_is_documented():
    _, documented, _ = compare(DOC_TEXT)
    classes = {n for n in core.components.__all__
               if inspect.isclass(getattr(core.components, n))
               and getattr(core.components, n).__module__ == "core.components"}
    assert len(classes) >= 15
    missing = sorted(c for c in classes if ("core.components", c) not in documented)
    assert not missing, f"core.components classes not in docs/plugins.md: {missing}"
    assert ("core.options", "Option") in documented
    kit = set(core.testing.__all__)
    assert {"plugin_host", "check_loss", "check_detector", "check_dataset"} <= kit
    missing = sorted(f for f in kit if ("core.testing", f) not in documented)
    assert not missing, f"core.testing functions not in docs/plugins.md: {missing}"


@pytest.mark.parametrize("old, new, expect", [
    # a renamed parameter, a changed default, a changed annotation, a lost decorator,
    # a missing member, fields out of order, a wrong base class
    ("def detect(self, ctx: TrainContext) -> Detection: ...", "def detect(self, context: TrainContext) -> Detection: ...",
     "CollapseDetector.detect"),
    ("batch_size: int = 1024", "batch_size: int = 512", "TrainContext.batch_size"),
    ("def register_losses(register: Callable[[type[Loss]], None])",
     "def register_losses(register: Callable[[type[Metric]], None])", "register_losses"),
    ("    @property\n    def every(self) -> int: ...\n    def setup(self, ctx: TrainContext) -> None: ...\n"
     "    def detect", "    def every(self) -> int: ...\n    def setup(self, ctx: TrainContext) -> None: ...\n"
     "    def detect", "CollapseDetector.every"),
    ("    def info(self) -> dict[str, Any]: ...\n", "", "['info']"),
    ("    real: Tensor\n    fake: Tensor\n", "    fake: Tensor\n    real: Tensor\n", "attributes in the order"),
    ("class Loss(Component):", "class Loss(Dataset):", "core.components.Loss: bases"),
    ("def check_dataset(dataset_cls: type, options: Mapping[str, Any] | None = None, *, seed: int = 0)",
     "def check_dataset(dataset_cls: type, options: Mapping[str, Any] | None = None, seed: int = 0)",
     "check_dataset"),
])
def test_the_comparison_catches_drift(old, new, expect):
    assert DOC_TEXT.count(old) == 1, f"the doc no longer contains {old!r}"
    problems, _, _ = compare(DOC_TEXT.replace(old, new))
    assert any(expect in p for p in problems), problems


def test_annotations_compare_quoted_and_unquoted_alike():
    quoted = ast.parse('def f(x: "torch.Generator") -> tuple["nn.Module", "nn.Module"]: ...').body[0]
    plain = ast.parse("def f(x: torch.Generator) -> tuple[nn.Module, nn.Module]: ...").body[0]
    other = ast.parse("def f(x: torch.Generator) -> tuple[nn.Module, nn.Linear]: ...").body[0]
    assert signature(quoted) == signature(plain) != signature(other)


# ---------------------------------------------------------------------- the worked example runs


EXAMPLE_PLUGIN = fenced_blocks(DOC_TEXT, "example-plugin")
EXAMPLE_TEST = fenced_blocks(DOC_TEXT, "example-test")
EXAMPLE_TOML = [b for b in fenced_blocks(DOC_TEXT, "toml") if "[project.entry-points.dyngan]" in b]


def test_the_example_is_in_the_doc():
    assert len(EXAMPLE_PLUGIN) == 1 and len(EXAMPLE_TEST) == 1 and len(EXAMPLE_TOML) == 1
    project = tomllib.loads(EXAMPLE_TOML[0])
    assert project["project"]["name"].startswith("dyngan-")
    assert "dyngan" in project["project"]["dependencies"]
    # the entry point names the module the example test imports
    (module,) = project["project"]["entry-points"]["dyngan"].values()
    assert f"import {module}\n" in EXAMPLE_TEST[0]
    assert "@hookimpl" in EXAMPLE_PLUGIN[0]


def _example_tests() -> list[str]:
    return [n.name for n in ast.parse(EXAMPLE_TEST[0]).body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")] if EXAMPLE_TEST else []


def test_the_example_has_tests():
    assert {"test_conformance", "test_trains_end_to_end"} <= set(_example_tests())


@pytest.mark.parametrize("name", _example_tests())
def test_the_examples_own_tests_pass(name, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    module = tomllib.loads(EXAMPLE_TOML[0])["project"]["entry-points"]["dyngan"]
    (modname,) = module.values()
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{modname}.py").write_text(EXAMPLE_PLUGIN[0], "utf-8")
    monkeypatch.syspath_prepend(str(src))
    try:
        namespace: dict = {"__name__": f"docs_example_{name}"}
        exec(compile(EXAMPLE_TEST[0], f"{DOC}:example-test", "exec"), namespace)
        fn = namespace[name]
        kwargs = {"tmp_path": tmp_path} if "tmp_path" in inspect.signature(fn).parameters else {}
        fn(**kwargs)
    finally:
        sys.modules.pop(modname, None)
        torch.set_num_threads(threads)
