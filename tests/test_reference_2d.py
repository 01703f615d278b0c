"""The single-file oracle of the authors' 2D procedure (benchmarks/reference_2d.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_2d.py"
_spec = importlib.util.spec_from_file_location("reference_2d", _PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def test_lloyd_keeps_a_well_fit_point_in_its_cluster():
    # two tight groups; point 4 sits in group 1 but carries label 0
    feats = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [4.0, 4.0]])
    labels = np.array([0, 0, 1, 1, 0])
    fit = ref._lloyd(feats, labels, scores=np.array([1.0, 1.0, 1.0, 1.0, 0.05]))
    assert fit.tolist() == [0, 0, 1, 1, 0]  # its own-centre distance is scaled by 0.05: it stays
    missed = ref._lloyd(feats, labels, scores=np.ones(5))
    assert missed.tolist() == [0, 0, 1, 1, 1]  # unweighted it joins the nearer group


def test_a_short_run_is_seeded_and_scored():
    a, b = ref.run(1.0, 3, steps=200), ref.run(1.0, 3, steps=200)
    c = ref.run(1.0, 4, steps=200)
    keys = ("modes", "hq3", "reverse_kl")
    assert [a[k] for k in keys] == [b[k] for k in keys]
    assert [a[k] for k in keys] != [c[k] for k in keys]
    assert 0 <= a["modes"] <= 25 and 0.0 <= a["hq3"] <= 1.0 and a["reverse_kl"] >= 0.0
    assert a["conditions"] == 1 and a["partitions"] == 0  # no partition before step 3,000
