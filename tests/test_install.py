"""`dyngan install` / `dyngan uninstall` (core/install.py).

The real installs run in a throwaway virtual environment layered over this one (a .pth
file adds this environment's site-packages), so pip installs and uninstalls there and the
shared environment is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from core import install as inst
from core.cli import cli
from test_plugins import write_dist


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


# ---------------------------------------------------------------------- refusals and errors


@pytest.mark.parametrize("name", ["dyngan", "DynGAN", "DYNGAN"])
def test_uninstall_refuses_dyngan_itself(name, monkeypatch):
    called = []
    monkeypatch.setattr(inst, "run_pip", lambda *a, **k: called.append(a))
    res = run_cli("uninstall", "dyngan-ragan", name)
    assert res.exit_code == 2
    assert "refusing to uninstall dyngan itself" in res.output
    assert called == []  # nothing was uninstalled, not even the other name


@pytest.mark.parametrize("name", ["click", "torch", "numpy", "pluggy", "safetensors", "filelock"])
def test_uninstall_refuses_dyngans_own_dependencies(name, monkeypatch):
    """`dyngan uninstall click` removed click (and with it dyngan's CLI); a dependency of dyngan's (torch's
    filelock too) is no dyngan plugin: refused, one line, exit 2, and pip never runs."""
    monkeypatch.setattr(inst, "run_pip", lambda *a, **k: pytest.fail("pip must not run"))
    res = run_cli("uninstall", name)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.stderr.splitlines()) == 1
    assert res.stderr.startswith(f"Error: refusing to uninstall {name}: it is not a dyngan plugin (its distribution "
                                 "declares no entry point in the group 'dyngan'); `dyngan uninstall` removes plugin "
                                 "distributions only")
    assert f"{name} is needed by dyngan itself (removing it would break dyngan)" in res.stderr
    assert "pip uninstall" not in res.stderr  # no advice to break dyngan with pip instead


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    """Two fake installed distributions: dyngan-tiny-plugin 0.1.0 (plugin tiny) and requests-like 0.2.0
    (no dyngan entry point); pip is faked and records what it is asked (``calls``)."""
    site = tmp_path / "site"
    mod = f"tiny_{uuid.uuid4().hex[:8]}"
    write_dist(site, "dyngan-tiny-plugin", "0.1.0", {"tiny": mod}, {mod: ""})
    write_dist(site, "requests-like", "0.2.0", {}, {})
    monkeypatch.syspath_prepend(str(site))
    calls = []
    monkeypatch.setattr(inst, "run_pip", lambda args, echo=None: calls.append(list(args)) or [])
    return calls


def test_uninstall_refuses_a_distribution_without_a_dyngan_plugin_and_removes_nothing(fake_dists):
    res = run_cli("uninstall", "dyngan-tiny-plugin", "requests-like")
    assert res.exit_code == 2, res.output
    assert fake_dists == []  # refused before pip: not even the plugin is removed
    assert res.stderr == ("Error: refusing to uninstall requests-like: it is not a dyngan plugin (its distribution "
                          "declares no entry point in the group 'dyngan'); `dyngan uninstall` removes plugin "
                          "distributions only; to remove it anyway, use pip: "
                          f"`{sys.executable} -m pip uninstall requests-like`\n")
    res = run_cli("uninstall", "dyngan-tiny-plugin")
    assert res.exit_code == 0, res.output
    assert fake_dists == [["uninstall", "-y", "dyngan-tiny-plugin"]]
    assert res.stdout == "uninstalled dyngan-tiny-plugin 0.1.0 (plugins: tiny)\n"


def test_uninstall_names_an_optional_dependency_of_dyngan(monkeypatch):
    needed, optional = inst.dyngan_dependencies()
    assert {"torch", "click", "numpy", "pluggy", "safetensors"} <= needed and "filelock" in needed
    assert "plots" in optional["matplotlib"] and "matplotlib" not in needed
    monkeypatch.setattr(inst, "run_pip", lambda *a, **k: pytest.fail("pip must not run"))
    res = run_cli("uninstall", "matplotlib", "click")
    assert res.exit_code == 2, res.output
    assert "refusing to uninstall matplotlib, click: they are not dyngan plugins" in res.stderr
    assert "click is needed by dyngan itself" in res.stderr
    assert "matplotlib (dyngan[" in res.stderr and "is an optional dependency of dyngan" in res.stderr


def test_uninstall_help_says_what_it_refuses():
    res = run_cli("uninstall", "--help")
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "Only a distribution that declares a dyngan plugin (an entry point in the group 'dyngan') is removed" in text
    assert "dyngan itself, its dependencies (torch, click, ...) and any other package are refused" in text


def test_uninstall_of_a_distribution_that_is_not_installed_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(inst, "run_pip", lambda *a, **k: pytest.fail("pip must not run"))
    res = run_cli("uninstall", "dyngan-no-such-plugin-xyz")
    assert res.exit_code == 2
    assert "'dyngan-no-such-plugin-xyz' is not installed" in res.output


@pytest.mark.parametrize("name", ["", "  "])
def test_uninstall_of_an_empty_name_is_a_usage_error(name, monkeypatch):
    monkeypatch.setattr(inst, "run_pip", lambda *a, **k: pytest.fail("pip must not run"))
    res = run_cli("uninstall", "dyngan-ragan", name)
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert res.stderr.startswith("Error: an empty distribution name: name the plugin distribution to uninstall")
    assert len(res.stderr.splitlines()) == 1


@pytest.mark.parametrize("name", ["", " "])
def test_install_of_an_empty_name_is_a_usage_error_before_pip(name, monkeypatch):
    monkeypatch.setattr(inst, "run_pip", lambda *a, **k: pytest.fail("pip must not run"))
    res = run_cli("install", name)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("Error: an empty package name or path: name a plugin package")


@pytest.mark.parametrize("editable", [False, True])
def test_install_of_a_directory_that_is_no_python_project_is_a_usage_error_before_pip(tmp_path, monkeypatch, editable):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a project")
    monkeypatch.setattr(inst, "run_pip", lambda *a, **k: pytest.fail("pip must not run"))
    res = run_cli("install", *(["-e"] if editable else []), "./notes")
    assert res.exit_code == 2, res.output
    assert res.stderr == ("Error: './notes' is a directory but not a Python project: it has no pyproject.toml or "
                          "setup.py (a plugin project declares its entry point in pyproject.toml's "
                          "[project.entry-points.dyngan])\n")
    (tmp_path / "notes" / "setup.py").write_text("")  # a project after all: pip's to install
    assert inst.install_args(["./notes"]) == ["install", str(tmp_path / "notes")]


def test_a_failing_pip_exits_1_with_pips_last_lines(tmp_path):
    not_a_project = tmp_path / "broken-project"  # a project pip refuses: build-system.requires is no list
    not_a_project.mkdir()
    (not_a_project / "pyproject.toml").write_text('[build-system]\nrequires = "setuptools"\n')
    res = run_cli("install", str(not_a_project))
    assert res.exit_code == 1
    assert "pip install failed" in res.output
    assert str(not_a_project) in res.output  # pip's own error line, quoted
    assert "Traceback" not in res.output


@pytest.mark.parametrize("target", ["/nonexistent/path", "./no-such-dir", "no-such-dir/", "plugin-0.1-py3-none-any.whl",
                                    "plugin.tar.gz"])
def test_install_of_a_missing_path_is_a_usage_error_before_pip(tmp_path, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inst, "run_pip", lambda *a, **k: pytest.fail("pip must not run"))
    for args in (["install", target], ["install", "-e", target], ["install", "dyngan-ragan", target]):
        res = run_cli(*args)
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output
        assert f"{target!r}: no such file or directory" in res.output


def test_requirements_and_urls_are_not_taken_for_missing_paths():
    assert inst.install_args(["dyngan-ragan>=0.1", "git+https://example.org/x/y.git",
                              "thing @ https://example.org/thing-1.0.tar.gz"]) == \
        ["install", "dyngan-ragan>=0.1", "git+https://example.org/x/y.git", "thing @ https://example.org/thing-1.0.tar.gz"]


def test_pip_error_tail_keeps_the_last_non_blank_lines():
    lines = [f"line {i}" for i in range(40)] + ["", "ERROR: it broke", "   "]
    tail = inst.pip_error_tail(lines, n=3).splitlines()
    assert tail == ["  line 38", "  line 39", "  ERROR: it broke"]


def test_install_needs_a_target_and_editable_needs_a_directory(tmp_path):
    assert run_cli("install").exit_code == 2  # click: missing argument
    with pytest.raises(inst.UsageError, match="--editable needs a project directory"):
        inst.install_args(["dyngan-ragan"], editable=True)


# ---------------------------------------------------------------------- pip's command line


def test_install_args(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pyproject.toml").write_text('[project]\nname = "proj"\n')
    monkeypatch.chdir(tmp_path)
    args = inst.install_args(["./proj", "dyngan-ragan==0.1"], no_deps=True, no_build_isolation=True, upgrade=True,
                             report="/r.json")
    assert args == ["install", "--no-deps", "--no-build-isolation", "--upgrade", "--report", "/r.json",
                    str(proj), "dyngan-ragan==0.1"]
    assert inst.install_args(["./proj", "proj"], editable=True) == ["install", "-e", str(proj), "-e", str(proj)]
    assert inst.pip_command(["install", "x"]) == [sys.executable, "-m", "pip", "install", "x"]


def test_guess_name(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pyproject.toml").write_text('[project]\nname = "dyngan-thing"\nversion = "1"\n')
    wheel = tmp_path / "dyngan_other-0.2-py3-none-any.whl"
    wheel.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert inst.guess_name("./proj") == "dyngan-thing"
    assert inst.guess_name(str(wheel)) == "dyngan_other"
    assert inst.guess_name("dyngan-ragan>=0.1") == "dyngan-ragan"
    assert inst.guess_name("dyngan-ragan[extra] @ https://x/y.whl") == "dyngan-ragan"
    assert inst.guess_name("git+https://example.org/x.git") is None
    assert inst.canonical("Dyngan_KNN.detector") == "dyngan-knn-detector"


def test_install_module_imports_no_torch():
    code = "import sys, core.install, core.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------- a real install, isolated


PLUGIN = '''
from core import hookimpl
from core.components import Loss


class ThrowawayLoss(Loss):
    name = "{name}-loss"

    def d_loss(self, ctx):
        return ctx.fake_logits.mean() - ctx.real_logits.mean()

    def g_loss(self, ctx):
        return -ctx.fake_logits.mean()


@hookimpl
def register_losses(register):
    register(ThrowawayLoss)
'''


def make_project(root: Path, dist: str, module: str, source: str) -> Path:
    proj = root / dist
    (proj / module).mkdir(parents=True)
    (proj / module / "__init__.py").write_text(source)
    (proj / "pyproject.toml").write_text(textwrap.dedent(f'''\
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.0.1"
        dependencies = ["dyngan"]

        [project.entry-points.dyngan]
        {module} = "{module}"

        [tool.setuptools]
        packages = ["{module}"]
        '''))
    return proj


@pytest.fixture
def layered_python(tmp_path) -> Path:
    """A venv without pip whose interpreter also sees this environment's packages (pip included)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    parents = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # addsitedir (not a plain path line) so that the editable-install .pth files there are processed too
    (Path(purelib) / "_dyngan_test_parent.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in sorted(parents)))
    return python


def dyngan_in(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    env.pop("DYNGAN_LOAD_PLUGINS", None)
    env.pop("DYNGAN_BLOCK_PLUGINS", None)
    return subprocess.run([str(python), "-m", "core", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def test_install_shows_the_components_and_uninstall_removes_them(tmp_path, layered_python):
    good = make_project(tmp_path, "dyngan-kit-throwaway", "dyngan_kit_throwaway", PLUGIN.format(name="throwaway"))
    broken = make_project(tmp_path, "dyngan-kit-broken", "dyngan_kit_broken",
                          "raise RuntimeError('this plugin is broken on purpose')\n")
    work = tmp_path / "work"
    work.mkdir()  # not the repository root: `python -m core` must come from the installed dyngan

    res = dyngan_in(layered_python, "install", "--no-deps", "--no-build-isolation", str(good), cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "installed dyngan-kit-throwaway 0.0.1" in res.stdout
    assert "plugin dyngan_kit_throwaway (dyngan_kit_throwaway)" in res.stdout
    assert "loss: throwaway-loss" in res.stdout
    assert "losses" not in res.stdout  # only the new distribution is shown, not the built-ins

    res = dyngan_in(layered_python, "install", "--no-deps", "--no-build-isolation", str(broken), cwd=work)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "plugin dyngan_kit_broken  FAILED: failed to import: RuntimeError: this plugin is broken on purpose" \
        in res.stdout
    assert "a plugin failed to load" in res.stderr

    listed = json.loads(dyngan_in(layered_python, "plugins", "--json", cwd=work).stdout)
    by_name = {p["name"]: p for p in listed}
    assert by_name["dyngan_kit_throwaway"]["components"] == {"loss": ["throwaway-loss"]}
    assert by_name["dyngan_kit_throwaway"]["distribution"] == "dyngan-kit-throwaway"
    assert by_name["dyngan_kit_broken"]["error"]
    assert by_name["losses"]["error"] is None  # the built-ins are there and unharmed

    res = dyngan_in(layered_python, "uninstall", "dyngan-kit-throwaway", "dyngan-kit-broken", cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "uninstalled dyngan-kit-throwaway 0.0.1 (plugins: dyngan_kit_throwaway)" in res.stdout
    listed = json.loads(dyngan_in(layered_python, "plugins", "--json", cwd=work).stdout)
    names = {p["name"] for p in listed}
    assert "dyngan_kit_throwaway" not in names and "dyngan_kit_broken" not in names and "losses" in names

    res = dyngan_in(layered_python, "uninstall", "dyngan", cwd=work)
    assert res.returncode == 2 and "refusing to uninstall dyngan itself" in res.stderr
