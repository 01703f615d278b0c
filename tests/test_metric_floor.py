"""benchmarks/metric_floor.py: the metrics scored on draws of the training data itself."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "metric_floor.py"
_spec = importlib.util.spec_from_file_location("metric_floor", _PATH)
metric_floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(metric_floor)


def test_the_data_scores_a_2d_gaussians_mass_within_each_radius():
    # the DynGAN-code ring: 400 points, drawn 10,000 times with replacement
    settings, n = metric_floor.PROTOCOLS["ring8 (DynGAN code)"]
    out = metric_floor.floor(settings, n, draws=2)
    assert out["training_points"] == 400 and out["samples"] == n == 10000 and out["draws"] == 2
    m = {k: v["mean"] for k, v in out["metrics"].items()}
    assert m["mixture/dyngan/modes"] == 8.0
    # a 2D Gaussian holds 1 - exp(-r^2 / 2) of its mass within r sigma; 400 points leave some spread
    for key, r in (("mixture/dyngan/hq1", 1), ("mixture/dyngan/hq2", 2), ("mixture/dyngan/hq3", 3)):
        assert abs(m[key] - (1 - math.exp(-r * r / 2))) < 0.04, key
    assert m["mixture/hq"] == m["mixture/dyngan/hq3"]
    # 10,000 draws over 8 near-equal modes: about (8 - 1) / (2 * 10,000) nats of KL, never 0
    assert 0 < m["mixture/dyngan/reverse_kl"] < 0.005
    for stats in out["metrics"].values():
        assert stats["min"] <= stats["mean"] <= stats["max"]


def test_main_appends_one_json_line_per_protocol(tmp_path, monkeypatch, capsys):
    out = tmp_path / "floor.jsonl"
    out.write_text('{"earlier": true}\n')
    monkeypatch.setattr(sys, "argv", ["metric_floor.py", "--draws", "1", "--out", str(out),
                                      "--only", "ring8 (PacGAN)", "grid25 (PacGAN)"])
    assert metric_floor.main() == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"earlier": True}
    assert [r["protocol"] for r in lines[1:]] == ["grid25 (PacGAN)", "ring8 (PacGAN)"]
    assert all(r["samples"] == 2500 and r["training_points"] == 100000 for r in lines[1:])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("grid25 (PacGAN): 100,000 training points")
