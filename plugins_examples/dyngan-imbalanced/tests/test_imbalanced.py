"""Tests of the imbalanced-grid dataset, against the public contract only (core.testing)."""

from __future__ import annotations

import json

import pytest
import torch

import dyngan_imbalanced
from core.errors import OptionError
from core.testing import check_dataset, check_options_schema, check_state_roundtrip, plugin_host
from dyngan_imbalanced import ImbalancedGrid, mode_counts


def nearest_mode(x, centres):
    return torch.cdist(x.double(), torch.tensor(centres, dtype=torch.float64)).argmin(1)


def test_plugin_registers_the_dataset():
    with plugin_host(dyngan_imbalanced, builtins=False, strict=True) as host:
        assert host.registry.get("dataset", "imbalanced-grid") is ImbalancedGrid
        assert host.plugins["dyngan_imbalanced"].components == {"dataset": ["imbalanced-grid"]}


@pytest.mark.parametrize("options", [{"n": 2000}, {"n": 2000, "profile": "rare"}, {"n": 30, "side": 3}])
def test_conformance(options):
    check_options_schema(ImbalancedGrid)
    check_state_roundtrip(ImbalancedGrid(**options))
    x = check_dataset(ImbalancedGrid, options)  # finite float32 (N, 2), identical for one seed
    assert x.shape == (options["n"], 2)
    assert ImbalancedGrid.default_metrics == ("mixture",)


def test_points_per_mode_are_the_counts_and_follow_the_geometric_weights():
    ds = ImbalancedGrid(n=2000, ratio=0.85)
    x = ds.load(torch.Generator().manual_seed(0))
    counts = ds.counts()
    assert sum(counts) == 2000
    assert torch.bincount(nearest_mode(x, ds.centres()), minlength=25).tolist() == counts
    # n * 0.85**i / sum_j 0.85**j, rounded
    expected = [2000 * 0.85 ** i * (1 - 0.85) / (1 - 0.85 ** 25) for i in range(25)]
    assert all(abs(c - e) < 1 for c, e in zip(counts, expected))
    assert counts[0] > 40 * counts[-1]


def test_rare_profile():
    ds = ImbalancedGrid(n=10_000, profile="rare", rare_modes=3, rare_fraction=0.03)
    counts = ds.counts()
    assert counts[-3:] == [100, 100, 100]
    assert set(counts[:-3]) == {10_000 * 0.97 / 22 // 1, 10_000 * 0.97 / 22 // 1 + 1}
    info = ds.info()
    assert sum(info["weights"][-3:]) == pytest.approx(0.03)


@pytest.mark.parametrize("rare_modes", [25, 40])
def test_a_rare_profile_without_a_common_mode_is_refused(rare_modes):
    with pytest.raises(OptionError, match=f"rare_modes={rare_modes} leaves no common mode of the 25"):
        ImbalancedGrid(n=1000, profile="rare", rare_modes=rare_modes).counts()
    assert ImbalancedGrid(n=1000, profile="rare", rare_modes=24, rare_fraction=0.5).counts()[-1] < 30


def test_every_mode_gets_a_point_and_the_total_is_n():
    assert mode_counts(30, [0.9] + [0.1 / 24] * 24) == [6] + [1] * 24
    for n in (25, 26, 999, 1000):
        assert sum(ImbalancedGrid(n=n, ratio=0.5).counts()) == n
        assert min(ImbalancedGrid(n=n, ratio=0.5).counts()) >= 1
    with pytest.raises(OptionError, match="smaller than the number of modes"):
        ImbalancedGrid(n=10).load(torch.Generator().manual_seed(0))


def test_too_small_n_on_the_command_line_is_bad_input_and_leaves_no_run(tmp_path, monkeypatch):
    """An option value that does not fit is the user's to fix: one ``Error:`` line and exit 2 (not
    exit 1 naming load()'s ValueError), and the same --out trains once n is fixed."""
    from click.testing import CliRunner

    from core.cli import cli

    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    out = tmp_path / "run"
    args = ["train", "--dataset", "imbalanced-grid", "--steps", "4", "--log-every", "4", "--device", "cpu",
            "--threads", "1", "-q", "--out", str(out), "-o"]
    with plugin_host(dyngan_imbalanced, strict=True):
        res = CliRunner().invoke(cli, [*args, "dataset.n=3"])
        assert res.exit_code == 2, res.output
        err = res.stderr.strip()
        assert err.startswith("Error: ") and len(err.splitlines()) == 1, err
        assert "n=3 is smaller than the number of modes (25)" in err and "raised in load()" not in err
        assert not out.exists()
        res = CliRunner().invoke(cli, [*args, "dataset.n=50"])
        assert res.exit_code == 0, res.output
    assert (out / "checkpoints" / "step-00000004.json").exists()


def test_seed_changes_the_points_but_not_the_counts():
    ds = ImbalancedGrid(n=500)
    a, b = ds.load(torch.Generator().manual_seed(0)), ds.load(torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)
    assert torch.equal(torch.bincount(nearest_mode(a, ds.centres())), torch.bincount(nearest_mode(b, ds.centres())))


def test_the_builtin_mixture_metric_applies():
    ds = ImbalancedGrid(n=2000)
    info = ds.info()
    assert len(info["centres"]) == 25 and info["sigma"] == 0.05
    json.dumps(info)
    with plugin_host(dyngan_imbalanced, strict=True) as host:  # the installed plugins too: dyngan's metric
        metric = host.registry.get("metric", "mixture")()
        assert metric.supports(ds)
        real = ds.load(torch.Generator().manual_seed(0))
        values = metric.compute(real, real, ds)
    assert values["mixture/modes"] == 25  # the training set itself covers every mode
    assert values["mixture/hq"] > 0.98


def test_trains_end_to_end(tmp_path, monkeypatch):
    from core.api import train

    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    torch.set_num_threads(1)
    result = train({
        "dataset": "imbalanced-grid", "steps": 40, "batch_size": 64, "seed": 0, "device": "cpu",
        "out": str(tmp_path / "run"), "log_every": 20, "threads": 1,
        "options": {"dataset": {"n": 2000, "profile": "rare"}},
    }, quiet=True)
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [rec for rec in logged if rec.get("event") == "eval"]
    assert evals and 0 <= evals[-1]["mixture/modes"] <= 25  # the dataset's default metric ran
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["metrics"] == ["mixture"] and config["model"] == "mlp"
    assert config["plugins"]["imbalanced"]["distribution"] == "dyngan-imbalanced"
