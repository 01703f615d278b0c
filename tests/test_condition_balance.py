"""benchmarks/condition_balance.py: the per-condition diagnosis of a DynGAN run on a mixture."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from core import api
from core.report import condition_seed
from dyngan_plugins.mixture_metrics import mixture_stats

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "condition_balance.py"
_spec = importlib.util.spec_from_file_location("condition_balance", _PATH)
balance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(balance)


def _train(out: Path, **options) -> Path:
    settings = {"dataset": "grid25", "steps": 40, "seed": 3, "device": "cpu", "out": str(out),
                "options": {"dataset": {"n": 2000}, **options}}
    if options:
        settings["preset"] = "dyngan"
    return api.train(settings, quiet=True).run_dir


def _pairs(result: dict) -> int:
    return sum(result[label] for _, label in balance.BANDS)


def test_one_condition_matches_the_mixture_metric(tmp_path, capsys):
    run_dir = _train(tmp_path / "ns")
    n = 3000
    result = balance.analyse(run_dir, n, detail=False)
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == result
    # one condition holds every mode: nothing can land outside its modes, and every mode is a pair
    assert result["conditions"] == 1 and result["leak"] == 0.0
    assert _pairs(result) == 25
    # the same samples through the library metric give the same KL and HQ
    run = api.load_run(run_dir)
    ref = mixture_stats(run.generate(n, condition_seed(0, 0), condition=0), run.info["centres"], 0.05)
    assert result["reverse_kl"] == pytest.approx(ref["mixture/reverse_kl"], abs=1e-4)
    assert result["hq"] == pytest.approx(ref["mixture/hq"], abs=1e-4)
    assert result["hq_several"] == pytest.approx(result["hq"], abs=1e-3) and result["hq_one_mode"] is None


def test_a_partitioned_run_counts_its_conditions(tmp_path):
    # a detector that flags most samples (D's last score above 1/1.8) at every step, and a partition
    # check every 10 steps: conditions open within the 40 steps
    run_dir = _train(tmp_path / "dyn", detector={"every": 1, "lam": 1.0, "delta": 0.8},
                     partitioner={"every": 10})
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = [e["partition/count"] for e in events if e.get("event") == "partition"]
    assert counts and counts[-1] > 1
    result = balance.analyse(run_dir, 500, detail=True)
    assert result["conditions"] == counts[-1]
    assert result["last_partition"] == max(e["step"] for e in events if e.get("event") == "partition")
    assert 0.0 <= result["leak"] <= 1.0 and 0.0 <= result["hq"] <= 1.0
    assert result["prior_several"] <= 1.0 + 1e-9
    # every (condition, mode) pair falls in one band; each mode belongs to at least one condition
    assert _pairs(result) >= 25


def test_a_run_that_is_not_a_mixture_is_refused(tmp_path):
    run_dir = api.train({"dataset": "tensor-file", "steps": 2, "device": "cpu", "out": str(tmp_path / "t"),
                         "options": {"dataset": {"path": str(_array(tmp_path))}}}, quiet=True).run_dir
    with pytest.raises(SystemExit, match="not a mixture"):
        balance.analyse(run_dir, 10, detail=False)


def _array(tmp_path: Path) -> Path:
    import numpy as np

    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).normal(size=(64, 2)).astype("float32"))
    return path
