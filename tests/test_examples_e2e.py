"""The example plugins of plugins_examples/, installed, through the real command line.

The README's test command (and so CI) installs them before running the tests. Without them
these tests FAIL, saying how to install them: a skip would let CI pass without ever
exercising third-party plugins.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    # distribution: (plugin name, {kind: [components]})
    "dyngan-knn-detector": ("knn_detector", {"detector": ["knn-coverage"]}),
    "dyngan-ragan": ("ragan", {"loss": ["ragan"]}),
    "dyngan-imbalanced": ("imbalanced", {"dataset": ["imbalanced-grid"]}),
}
INSTALL_HINT = (
    "the example plugins are not installed; install them with\n"
    "  python -m pip install --no-build-isolation "
    + " ".join(f"-e ./plugins_examples/{d}" for d in EXAMPLES)
    + "\n(the README's test command does this)"
)


def dyngan(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed `dyngan` command (the console script next to this interpreter)."""
    script = Path(sys.executable).parent / ("dyngan.exe" if os.name == "nt" else "dyngan")
    cmd = [str(script)] if script.exists() else [shutil.which("dyngan") or "dyngan"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DYNGAN_NO_PICTURES="1")
    env.pop("DYNGAN_LOAD_PLUGINS", None)
    env.pop("DYNGAN_BLOCK_PLUGINS", None)
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def listed(tmp_path_factory) -> dict[str, dict]:
    res = dyngan("plugins", "--json", cwd=tmp_path_factory.mktemp("plugins"))
    assert res.returncode == 0, res.stderr
    return {p["name"]: p for p in json.loads(res.stdout)}


def test_every_example_directory_is_covered_here():
    dirs = {p.parent.name for p in (ROOT / "plugins_examples").glob("*/pyproject.toml")}
    assert dirs == set(EXAMPLES)


@pytest.mark.parametrize("dist", sorted(EXAMPLES))
def test_dyngan_plugins_lists_the_installed_example(dist, listed):
    plugin, components = EXAMPLES[dist]
    if plugin not in listed:
        pytest.fail(f"{dist}: no plugin {plugin!r} in `dyngan plugins --json`; {INSTALL_HINT}")
    info = listed[plugin]
    assert info["error"] is None, f"{dist} failed to load: {info['error']}"
    assert info["distribution"] == dist
    assert info["version"] == "0.1.0"
    assert info["components"] == components


def test_dyngan_train_uses_the_custom_detector_loss_and_dataset_together(tmp_path, listed):
    missing = [d for d, (p, _) in EXAMPLES.items() if p not in listed]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed; {INSTALL_HINT}")
    run = tmp_path / "run"
    res = dyngan(
        "train", "--dataset", "imbalanced-grid", "--loss", "ragan", "--detector", "knn-coverage",
        "--partitioner", "dyngan", "--conditioner", "onehot",
        "-o", "dataset.n=2000", "-o", "dataset.profile=rare",
        "-o", "detector.every=20", "-o", "detector.samples=2000",
        "-o", "partitioner.every=20", "-o", "conditioner.capacity=8",
        "--steps", "60", "--batch-size", "64", "--log-every", "20", "--device", "cpu", "--threads", "1",
        "--seed", "0", "--out", str(run), "--quiet",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(run)

    config = json.loads((run / "config.json").read_text())
    assert (config["dataset"], config["loss"], config["detector"], config["partitioner"]) == \
        ("imbalanced-grid", "ragan", "knn-coverage", "dyngan")
    for dist, (plugin, _) in EXAMPLES.items():  # the run records the third-party plugins it used
        assert config["plugins"][plugin] == {"distribution": dist, "version": "0.1.0"}

    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    detections = [e for e in events if e.get("event") == "detection"]
    assert [e["step"] for e in detections] == [20, 40, 60]
    assert all(0.0 < e["collapse/fraction"] <= 1.0 for e in detections)  # an early G misses modes
    partitions = [e for e in events if e.get("event") == "partition"]
    assert partitions and max(e["partition/count"] for e in partitions) > 1  # conditions were opened
    losses = [e for e in events if "loss/g" in e]
    assert len(losses) == 3 and all(abs(e["loss/g"]) < 1e6 for e in losses)
    evals = [e for e in events if e.get("event") == "eval"]
    assert evals and "mixture/modes" in evals[-1]  # the dataset's default metric

    res = dyngan("evaluate", str(run), "--json", "--n", "500", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    scored = json.loads(res.stdout)
    assert scored["dataset"] == "imbalanced-grid" and scored["step"] == 60
    assert 0 <= scored["metrics"]["mixture/modes"] <= 25
