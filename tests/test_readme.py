"""The README's "Set up" commands are exactly what CI runs, and they cover every example plugin."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text("utf-8")
CI = (ROOT / ".ci" / "run").read_text("utf-8")


def setup_commands(readme: str) -> list[str]:
    """The command lines of the first bash block in the README's "Set up" section."""
    m = re.search(r"^## Set up\n(.*?)^## ", readme, re.M | re.S)
    assert m, 'README has no "## Set up" section'
    block = re.search(r"^```bash\n(.*?)^```", m.group(1), re.M | re.S)
    assert block, 'the "Set up" section has no ```bash block'
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_each_setup_command_is_a_line_of_ci_run():
    commands = setup_commands(README)
    assert len(commands) >= 2
    ci_lines = {ln.strip() for ln in CI.splitlines()}
    missing = [c for c in commands if c not in ci_lines]
    assert not missing, f".ci/run does not run these README commands verbatim: {missing}"


def test_the_check_notices_a_command_ci_does_not_run():
    changed = README.replace("python -m pytest -q", "python -m pytest -x -q", 1)
    assert changed != README
    ci_lines = {ln.strip() for ln in CI.splitlines()}
    assert any(c not in ci_lines for c in setup_commands(changed))


def test_the_test_command_installs_and_tests_every_example_plugin():
    examples = sorted(p.parent.name for p in (ROOT / "plugins_examples").glob("*/pyproject.toml"))
    assert {"dyngan-knn-detector", "dyngan-ragan", "dyngan-imbalanced"} <= set(examples)
    (test_cmd,) = [c for c in setup_commands(README) if "pytest" in c]
    words = shlex.split(test_cmd)
    for name in examples:
        assert f"./plugins_examples/{name}" in words, f"the README's test command does not install {name}"
    pytest_args = words[words.index("pytest") + 1:]
    assert "tests" in pytest_args and "plugins_examples" in pytest_args
    # installing the examples needs no download: no build isolation, dyngan already installed
    assert "--no-build-isolation" in words


def plugin_snippets(readme: str) -> tuple[str, str]:
    """The python and toml blocks of the README's minimal plugin ("## Plugins")."""
    m = re.search(r"^## Plugins\n(.*?)^## ", readme, re.M | re.S)
    assert m, 'README has no "## Plugins" section'
    py = re.search(r"^```python\n(.*?)^```", m.group(1), re.M | re.S)
    toml = re.search(r"^```toml\n(.*?)^```", m.group(1), re.M | re.S)
    assert py and toml, 'the "Plugins" section lacks its ```python or ```toml block'
    return py.group(1), toml.group(1)


def test_the_readme_plugin_works_as_written(tmp_path, monkeypatch):
    """The minimal plugin of the README: a complete pyproject (name, version, entry point to the
    module), a module that does not import torch when loaded, and a loss that passes check_loss."""
    import subprocess
    import sys
    import tomllib

    from core.testing import check_loss, plugin_host

    source, toml = plugin_snippets(README)
    project = tomllib.loads(toml)
    meta = project["project"]
    assert meta["name"].startswith("dyngan-") and meta["version"] and "dyngan" in meta["dependencies"]
    ((plugin, module),) = project["project"]["entry-points"]["dyngan"].items()
    assert project["tool"]["setuptools"]["py-modules"] == [module]
    (tmp_path / f"{module}.py").write_text(source)
    probe = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                            f"import {module}; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=ROOT)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "False"  # loading the plugin does not import torch
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__(module)
    with plugin_host((plugin, mod)) as host:
        loss = host.registry.get("loss", "soft-hinge")
        check_loss(loss, {"margin": 2.0})
