"""End to end: the ``dyngan`` preset on a small 5x5 grid, through ``core.api.train``.

NS-GAN on the grid leaves modes under-produced; the detector must flag their
samples and the partitioner must open new conditions. The intervals are much
shorter than the reference's (detect every 50 steps instead of 500, partition
every 500 instead of 3000) and the detector is set to fire sooner
(lam 0.3, delta 0.5) so that the run takes a few thousand steps.
"""

from __future__ import annotations

import pytest

from core import api

pytestmark = pytest.mark.slow


def test_dyngan_preset_detects_collapse_and_grows_partitions(tmp_path):
    result = api.train(
        {
            "dataset": "grid25",
            "preset": "dyngan",
            "steps": 3000,
            "eval_every": 500,
            "seed": 0,
            "device": "cpu",
            "out": str(tmp_path / "run"),
            "options": {
                "detector": {"every": 50, "lam": 0.3, "delta": 0.5},
                "partitioner": {"every": 500},
                "dataset": {"points_per_mode": 50, "sigma": 0.1},
            },
        },
        quiet=True,
    )
    assert result.run_dir.is_dir()
    metrics = result.metrics
    detections = [m for m in metrics if m.get("event") == "detection"]
    partitions = [m for m in metrics if m.get("event") == "partition"]
    assert len(detections) == 3000 // 50
    fractions = [m["collapse/fraction"] for m in detections]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert max(fractions) >= 0.01  # the detector fired (at least tau)
    assert partitions, "no partition was made"
    counts = [m["partition/count"] for m in partitions]
    assert max(counts) >= 2 and all(c <= 30 for c in counts)
    for m in partitions:
        sizes = m["partition/sizes"]
        assert sum(sizes) == 1250 and sum(1 for s in sizes if s > 0) == m["partition/count"]
        assert m["partition/moved"] > 0
    # a check that made no partition logs the count in use, an int like a partition's (it was a float)
    count, checks = 1, 0
    for m in metrics:
        if m.get("event") == "partition":
            count = m["partition/count"]
        elif m.get("event") == "partition-check":
            assert type(m["partition/count"]) is int and m["partition/count"] == count, m
            checks += 1
    assert checks > 0
    # a step that evaluates and partitions scores the model first: after the split it would
    # draw conditions that no training has followed yet
    position = {(m.get("event"), m["step"]): i for i, m in enumerate(metrics)}
    for m in partitions:
        assert position[("eval", m["step"])] < position[("partition", m["step"])]
