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
