"""The bare loop that benchmarks/overhead.py and loop_profile.py measure dyngan against."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from core import api
from core.plugins import get_host
from core.training import Trainer

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bare_loop.py"
_spec = importlib.util.spec_from_file_location("bare_loop", _PATH)
bare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bare)


def test_bare_loop_has_the_mlp_models_networks_and_trains(tmp_path):
    host = get_host()
    cfg, run_dir = api.prepare({"dataset": "grid25", "out": str(tmp_path / "r"), "device": "cpu"}, host=host)
    tr = Trainer(cfg, host.registry, run_dir, quiet=True)
    G, D, run = bare.build(torch.device("cpu"), 16)
    for ours, theirs in ((G, tr.G), (D, tr.D)):
        assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    before = [p.detach().clone() for p in (*G.parameters(), *D.parameters())]
    run(2)
    after = list((*G.parameters(), *D.parameters()))
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
