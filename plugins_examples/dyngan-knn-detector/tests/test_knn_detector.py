"""Tests of the knn-coverage detector, against the public contract only (core.testing)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import dyngan_knn_detector
from core.components import Comm
from core.errors import OptionError
from core.testing import (
    single_thread,
    check_detector,
    check_options_schema,
    check_state_roundtrip,
    plugin_host,
    tiny_mixture,
    tiny_train_context,
)
from dyngan_knn_detector import KNNCoverageDetector, kth_neighbour_distance, nearest_distance

CENTRES = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


class MixtureGenerator(nn.Module):
    """G(z, cond) that samples tiny_mixture's modes ``modes`` exactly (z_dim 4)."""

    def __init__(self, modes: list[int], sigma: float = 0.05) -> None:
        super().__init__()
        self.register_buffer("centres", CENTRES[modes])
        self.sigma = sigma

    def forward(self, z, cond):
        pick = (z[:, 2] > 0).long() + 2 * (z[:, 3] > 0).long()  # 4 equally likely codes
        return self.centres[pick % self.centres.shape[0]] + self.sigma * z[:, :2]


class NullDiscriminator(nn.Module):
    def forward(self, x, cond, features=False):
        logits = torch.zeros(x.shape[0])
        return (logits, x.flatten(1)) if features else logits


def context(modes, n=2000, **kw):
    return tiny_train_context(tiny_mixture(n, seed=3), z_dim=4, capacity=1,
                              networks=(MixtureGenerator(modes), NullDiscriminator()), **kw)


def test_plugin_registers_the_detector():
    with plugin_host(dyngan_knn_detector, builtins=False, strict=True) as host:
        assert host.registry.get("detector", "knn-coverage") is KNNCoverageDetector
        assert host.plugins["dyngan_knn_detector"].components == {"detector": ["knn-coverage"]}


def test_options_schema_and_state_roundtrip():
    check_options_schema(KNNCoverageDetector)
    det = KNNCoverageDetector(samples=64, subset=100)
    check_state_roundtrip(det)  # before setup
    det.setup(tiny_train_context())
    state = det.state_dict()
    assert state["reference"].shape == (64,) and state["subset"].shape == (100,)
    check_state_roundtrip(det)  # after setup: the drawn sets survive a checkpoint


@pytest.mark.parametrize("options", [
    {"every": 1, "samples": 128},
    {"every": 3, "samples": 100, "subset": 60, "k": 2},
    {"every": 1, "samples": 64, "features": "data", "block": 7},
])
def test_conformance(options):
    det = check_detector(KNNCoverageDetector, options)
    # a fresh tiny G covers nothing: every scored sample is collapsed, and the score says so
    scored = det.score > 0
    assert bool((det.collapsed == (det.score > 0.5)).all())
    assert int(scored.sum()) == options.get("subset", 256)
    assert (det.features is not None) == (options.get("features") == "data")


def test_distances_match_brute_force_in_float64():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 3, generator=g), torch.randn(70, 3, generator=g)
    exact = torch.cdist(x.double(), y.double())
    # block=5 forces one row per chunk: the chunking must not change the answer
    assert torch.allclose(nearest_distance(x, y, block=5).double(), exact.min(1).values, atol=1e-6)
    # rows 0..49 of the training set are x; the reference set holds rows 20..89 (x[20:] and y[:40])
    ref = torch.cat([x[20:], y[:40]])
    ref_index, x_index = torch.arange(20, 90), torch.arange(50)
    d = torch.cdist(x.double(), ref.double())
    d[x_index[:, None] == ref_index[None, :]] = float("inf")  # a sample is not its own neighbour
    for k in (1, 3):
        got = kth_neighbour_distance(x, x_index, ref, ref_index, k, block=11)
        assert torch.allclose(got.double(), d.sort(1).values[:, k - 1], atol=1e-6)


@pytest.mark.parametrize("k, low, high", [(5, 0.015, 0.05), (10, 0.0, 0.006)])
def test_a_generator_that_matches_the_data_covers_all_but_about_two_to_the_minus_k(k, low, high):
    det = KNNCoverageDetector(samples=2000, k=k)
    ctx = context([0, 1, 2, 3])
    det.setup(ctx)
    with torch.no_grad():
        res = det.detect(ctx)
    # the k-th neighbour ball holds a Gamma(k)/M share of the mass: P(no fake in it) = 2^-k
    assert low <= float(res.fraction) <= high
    assert float(res.fraction) == pytest.approx(res.collapsed.float().mean().item())


def test_the_samples_of_dropped_modes_are_flagged_and_the_others_are_not():
    det = KNNCoverageDetector(samples=2000, k=5)
    ctx = context([0, 1])  # modes 2 and 3 are never generated
    det.setup(ctx)
    with torch.no_grad():
        res = det.detect(ctx)
    dropped = (torch.arange(2000) % 4) >= 2  # tiny_mixture: sample i is in mode i % 4
    assert bool(res.collapsed[dropped].all())
    assert float(res.collapsed[~dropped].float().mean()) < 0.03
    assert float(res.fraction) == pytest.approx(0.5, abs=0.02)
    assert bool((res.score[dropped] > 0.9).all())  # far from every generated sample
    assert bool((res.collapsed == (res.score > 0.5)).all())


def test_factor_widens_the_radius():
    ctx = context([0, 1, 2, 3])
    fractions = []
    for factor in (0.2, 1.0, 5.0):
        det = KNNCoverageDetector(samples=2000, factor=factor)
        det.setup(ctx)
        with torch.no_grad():
            fractions.append(float(det.detect(ctx).fraction))
    assert fractions[0] > fractions[1] >= fractions[2]
    assert fractions[2] == 0.0


def test_subset_samples_outside_it_are_never_flagged():
    det = KNNCoverageDetector(samples=2000, subset=300)
    ctx = context([0])
    det.setup(ctx)
    with torch.no_grad():
        res = det.detect(ctx)
    inside = torch.zeros(2000, dtype=torch.bool)
    inside[det.subset] = True
    assert int(inside.sum()) == 300
    assert not bool(res.collapsed[~inside].any()) and bool((res.score[~inside] == 0).all())
    assert float(res.fraction) == pytest.approx(res.collapsed[inside].float().mean().item())


class RecordingComm(Comm):
    """The single-process Comm, recording what the detector asks of it."""

    def __init__(self):
        self.calls = []

    def shard(self, n):
        self.calls.append(("shard", n))
        return super().shard(n)

    def all_gather(self, t):
        self.calls.append(("all_gather", tuple(t.shape)))
        return super().all_gather(t)

    def broadcast(self, t, src=0):
        self.calls.append(("broadcast", tuple(t.shape)))
        return super().broadcast(t, src)


def test_work_is_sharded_and_gathered_through_ctx_comm():
    comm = RecordingComm()
    ctx = context([0, 1, 2, 3], n=400)
    ctx.comm = comm
    det = KNNCoverageDetector(samples=200, subset=150)
    det.setup(ctx)
    with torch.no_grad():
        det.detect(ctx)
    assert ("shard", 150) in comm.calls and ("all_gather", (150,)) in comm.calls
    assert ("broadcast", (200,)) in comm.calls  # the reference set
    assert ("broadcast", (200, 2)) in comm.calls  # the generated samples


def test_too_few_samples_is_a_clear_error():
    det = KNNCoverageDetector(samples=5, k=5)
    with pytest.raises(OptionError, match="more than k=5"):
        det.setup(tiny_train_context())


def test_k_too_large_on_the_command_line_is_bad_input_and_leaves_no_run(tmp_path, monkeypatch):
    """k and samples that do not fit are the user's to fix: one ``Error:`` line and exit 2, and the
    run directory that setup() failed in is gone, so the same --out trains with fixed options."""
    from click.testing import CliRunner

    from core.cli import cli

    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    out = tmp_path / "run"
    args = ["train", "--detector", "knn-coverage", "-o", "dataset.n=500", "-o", "detector.samples=20",
            "-o", "detector.every=10", "--steps", "10", "--log-every", "10", "--eval-every", "0",
            "--device", "cpu", "--threads", "1", "-q", "--out", str(out), "-o"]
    with plugin_host(dyngan_knn_detector, strict=True):
        res = CliRunner().invoke(cli, [*args, "detector.k=50"])
        assert res.exit_code == 2, res.output
        err = res.stderr.strip()
        assert err.startswith("Error: ") and len(err.splitlines()) == 1, err
        assert "needs more than k=50 reference samples" in err and "-o detector.k below 20" in err
        assert not out.exists()
        res = CliRunner().invoke(cli, [*args, "detector.k=5"])
        assert res.exit_code == 0, res.output
    assert (out / "checkpoints" / "step-00000010.json").exists()


def test_trains_end_to_end_with_the_dyngan_partitioner(tmp_path, monkeypatch):
    """Any loss (here the built-in ns), the dyngan partitioner weighting by our score and
    recomputing D's features (the detector gives none)."""
    from core.api import train

    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    result = train({
        "dataset": "grid25", "loss": "ns", "detector": "knn-coverage", "partitioner": "dyngan",
        "conditioner": "onehot", "steps": 40, "batch_size": 64, "seed": 0, "device": "cpu",
        "out": str(tmp_path / "run"), "log_every": 20, "threads": 1,
        "options": {"dataset": {"n": 2000}, "detector": {"every": 20, "samples": 2000},
                    "partitioner": {"every": 20}, "conditioner": {"capacity": 8}},
    }, quiet=True)
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    detections = [e for e in events if e.get("event") == "detection"]
    assert [e["step"] for e in detections] == [20, 40]
    assert all(0.0 <= e["collapse/fraction"] <= 1.0 and "collapse/score_mean" in e for e in detections)
    # a 20-step generator covers the centre of the grid at best: the partitioner opens conditions
    partitions = [e for e in events if e.get("event") == "partition"]
    assert partitions and partitions[-1]["partition/count"] > 1
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["plugins"]["knn_detector"]["distribution"] == "dyngan-knn-detector"
