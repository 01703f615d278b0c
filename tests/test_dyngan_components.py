"""DynGAN's detector, partitioner and preset, on hand-built training contexts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.components import Comm, Detection, TrainContext
from dyngan_plugins.conditioners import OneHotConditioner
from dyngan_plugins.dyngan import DynGANDetection, DynGANDetector, DynGANPartitioner, DynGANPreset
from dyngan_plugins.mlp import MLP


class FakeD:
    """A discriminator whose logits and features per training sample are set by hand.

    Row i of the context's data is ``[i]``, so D knows which sample it sees.
    It records every (sample, condition) pair it was asked about.
    """

    def __init__(self, logits, features=None):
        self.logits = torch.as_tensor(logits, dtype=torch.float32)
        n = self.logits.shape[0]
        self.features = features if features is not None else torch.arange(n, dtype=torch.float32)[:, None]
        self.seen = []

    def __call__(self, x, cond, features=False):
        i = x[:, 0].long()
        self.seen.append((i.clone(), cond.clone()))
        out = self.logits[i]
        return (out, self.features[i]) if features else out


def make_ctx(D, labels, capacity=30, seed=0, comm=None):
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.shape[0]
    reports = {}
    ctx = TrainContext(
        step=0, device=torch.device("cpu"), data=torch.arange(n, dtype=torch.float32)[:, None], labels=labels,
        prior=torch.bincount(labels, minlength=capacity).float() / n, capacity=capacity, z_dim=2,
        generator=lambda z, c: z, discriminator=D, rng=torch.Generator().manual_seed(seed),
        report=lambda k, v: reports.__setitem__(k, v), comm=comm or Comm(),
    )
    return ctx, reports


def detection(collapsed, score=None, features=None):
    c = torch.as_tensor(collapsed, dtype=torch.bool)
    return Detection(collapsed=c, fraction=c.float().mean(), score=score, features=features)


# ---------------------------------------------------------------- detector


def test_threshold_rule_against_a_hand_computed_case():
    # delta 0.2: threshold 1/1.2 = 0.8333; lam 0.5: after n updates score = p * (1 - 0.5**n)
    # logit 4 (p 0.9820): 0.491, 0.737, 0.859 -> collapsed from the 3rd detection
    # logit 2 (p 0.8808): 0.440, 0.661, 0.771, 0.826, 0.853 -> collapsed from the 5th
    # logit 1 (p 0.7311) and -3 never cross
    D = FakeD([4.0, 2.0, 1.0, -3.0])
    ctx, rep = make_ctx(D, [0, 0, 0, 0])
    det = DynGANDetector(delta=0.2, lam=0.5)
    det.setup(ctx)
    expected = [[], [], [0], [0], [0, 1]]
    p = torch.sigmoid(D.logits)
    for n, want in enumerate(expected, start=1):
        out = det.detect(ctx)
        assert torch.nonzero(out.collapsed).flatten().tolist() == want
        assert torch.allclose(out.score, p * (1 - 0.5 ** n), atol=1e-6)
        assert float(out.fraction) == pytest.approx(len(want) / 4)
        assert float(rep["collapse/fraction"]) == pytest.approx(len(want) / 4)
    assert det.threshold == pytest.approx(1 / 1.2)


@pytest.mark.parametrize("delta", [0.05, 0.2, 0.5, 2.0])
def test_threshold_equals_logit_above_minus_log_delta(delta):
    # with lam = 1 the score is D's probability itself: score > 1/(1+delta) <=> logit > -log(delta)
    g = torch.Generator().manual_seed(1)
    offsets = torch.rand(200, generator=g) * 6 - 3
    offsets = offsets[offsets.abs() > 1e-3]
    logits = -math.log(delta) + offsets
    ctx, _ = make_ctx(FakeD(logits), torch.zeros(logits.shape[0]))
    det = DynGANDetector(delta=delta, lam=1.0)
    det.setup(ctx)
    out = det.detect(ctx)
    assert torch.equal(out.collapsed, logits > -math.log(delta))
    assert 0 < int(out.collapsed.sum()) < logits.shape[0]
    assert det.logit_threshold == pytest.approx(-math.log(delta))


def test_each_sample_is_scored_once_under_its_own_label_in_batches():
    labels = torch.tensor([0, 3, 1, 1, 2, 0, 3, 2, 2, 1])
    feats = torch.randn(10, 4)
    D = FakeD(torch.linspace(-2, 2, 10), feats)
    ctx, _ = make_ctx(D, labels)
    det = DynGANDetector(batch_size=3)
    det.setup(ctx)
    out = det.detect(ctx)
    idx = torch.cat([i for i, _ in D.seen])
    cond = torch.cat([c for _, c in D.seen])
    assert len(D.seen) == 4  # ceil(10 / 3) batches
    assert torch.equal(torch.sort(idx).values, torch.arange(10))
    assert torch.equal(cond, labels[idx])
    # the same pass supplies the features and the score
    assert out.features is None  # scores only; the partitioner recomputes features when it splits
    assert torch.allclose(out.score, 0.1 * torch.sigmoid(D.logits))
    assert out.collapsed.dtype == torch.bool and out.collapsed.shape == (10,)


def test_reset_relabelled_scores():
    D = FakeD([3.0, 3.0, 3.0, 3.0])
    ctxs, dets = [], []
    for reset in (False, True):
        ctx, _ = make_ctx(D, [0, 0, 0, 0])
        det = DynGANDetector(lam=0.5, reset_relabelled=reset)
        det.setup(ctx)
        for _ in range(3):
            det.detect(ctx)
        ctx.labels = torch.tensor([0, 1, 0, 1])  # a partition relabelled samples 1 and 3
        ctxs.append(ctx)
        dets.append(det)
    keep, reset = (d.detect(c).score for d, c in zip(dets, ctxs))
    p = float(torch.sigmoid(torch.tensor(3.0)))
    assert torch.allclose(keep, torch.full((4,), p * (1 - 0.5 ** 4)))
    assert torch.allclose(reset[[0, 2]], keep[[0, 2]])
    assert torch.allclose(reset[[1, 3]], torch.full((2,), 0.5 * p))
    # the labels of the last detection are remembered: no second reset
    again = dets[1].detect(ctxs[1]).score
    assert torch.allclose(again[[1, 3]], torch.full((2,), p * (1 - 0.5 ** 2)))


@pytest.mark.parametrize("average", ["probability", "logit"])
def test_debias_divides_the_average_by_its_weight_so_far(average):
    # D's outputs change between detections: 2, then 4, then 0 (logits). lam 0.5: the weights of the
    # updates are 0.5, 0.75, 0.875; the debiased average is the weighted mean of the values seen
    outputs = [2.0, 4.0, 0.0]
    scale = (lambda v: v) if average == "logit" else (lambda v: float(torch.sigmoid(torch.tensor(v))))
    D = FakeD([0.0])
    ctx, _ = make_ctx(D, [0])
    det = DynGANDetector(lam=0.5, average=average, debias=True)
    plain = DynGANDetector(lam=0.5, average=average)
    raw, weight = 0.0, 0.0
    for v in outputs:
        D.logits = torch.tensor([v])
        out, ref = det.detect(ctx), plain.detect(ctx)
        raw, weight = 0.5 * raw + 0.5 * scale(v), 0.5 * weight + 0.5
        mean = raw / weight
        want = float(torch.sigmoid(torch.tensor(mean))) if average == "logit" else mean
        assert float(out.score[0]) == pytest.approx(want, abs=1e-6)
        # the stored average is the plain one (what a checkpoint holds); only the reading is divided
        assert float(det.score[0]) == pytest.approx(raw, abs=1e-6) == float(plain.score[0])
        assert float(ref.score[0]) == pytest.approx(float(torch.sigmoid(torch.tensor(raw))) if average == "logit"
                                                    else raw, abs=1e-6)
    assert det.weight.tolist() == pytest.approx([0.875])


def test_debias_flags_a_missed_sample_at_the_first_detection():
    # logit 3 (p 0.953) is above the delta-0.2 threshold (0.833, logit 1.609) from the start: debiased,
    # the first detection flags it; the plain average from 0 (0.095 after one lam-0.1 update) needs 20
    D = FakeD([3.0, 1.0])
    ctx, _ = make_ctx(D, [0, 0])
    det, plain = DynGANDetector(debias=True), DynGANDetector()
    assert det.detect(ctx).collapsed.tolist() == [True, False]
    flags = [plain.detect(ctx).collapsed.tolist() for _ in range(30)]
    assert all(not f[1] for f in flags)
    # p (1 - 0.9^n) > 1/1.2 from n = 20 on
    p = float(torch.sigmoid(torch.tensor(3.0)))
    first = next(n for n in range(1, 100) if p * (1 - 0.9 ** n) > 1 / 1.2)
    assert first == 20 and [f[0] for f in flags] == [False] * (first - 1) + [True] * (31 - first)
    for _ in range(5):
        assert det.detect(ctx).collapsed.tolist() == [True, False]


def test_debias_reset_restarts_the_weight_and_the_state_round_trips():
    D = FakeD([3.0, 3.0])
    ctx, _ = make_ctx(D, [0, 0])
    det = DynGANDetector(lam=0.5, debias=True, reset_relabelled=True)
    for _ in range(3):
        det.detect(ctx)
    ctx.labels = torch.tensor([0, 1])  # sample 1 relabelled: its average restarts from its next value alone
    D.logits = torch.tensor([-1.0, -1.0])
    out = det.detect(ctx)
    p3, pm1 = (float(torch.sigmoid(torch.tensor(v))) for v in (3.0, -1.0))
    assert det.weight.tolist() == pytest.approx([0.9375, 0.5])
    assert float(out.score[1]) == pytest.approx(pm1, abs=1e-6)
    assert float(out.score[0]) == pytest.approx((0.4375 * p3 + 0.5 * pm1) / 0.9375, abs=1e-6)
    state = det.state_dict()
    assert torch.equal(state["weight"], det.weight)
    back = DynGANDetector(lam=0.5, debias=True, reset_relabelled=True)
    back.load_state_dict({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()})
    back.setup(ctx)
    assert torch.equal(back.detect(ctx).score, det.detect(ctx).score)
    # a checkpoint saved without debias: every score has had `updates` updates, so that is its weight
    plain = DynGANDetector(lam=0.5)
    for _ in range(2):
        plain.detect(ctx)
    assert "weight" not in plain.state_dict()
    on = DynGANDetector(lam=0.5, debias=True)
    on.load_state_dict(plain.state_dict())
    on.setup(ctx)
    assert on.weight.tolist() == pytest.approx([0.75, 0.75])
    # and the other way: a debiased checkpoint read without debias drops the weight
    off = DynGANDetector(lam=0.5)
    off.load_state_dict(state)
    off.setup(ctx)
    assert off.weight is None and "weight" not in off.state_dict()
    # a saved weight of another size (a checkpoint of other data) is refused like a saved score
    short = DynGANDetector(lam=0.5, debias=True)
    short.load_state_dict({**state, "weight": state["weight"][:1]})
    with pytest.raises(ValueError, match=r"saved score weight has \(1,\) entries, expected 2"):
        short.setup(ctx)


def test_subset_is_fixed_seeded_and_kept_in_state():
    n = 50
    logits = torch.full((n,), 5.0)
    det = DynGANDetector(subset=10, lam=1.0)
    ctx, _ = make_ctx(FakeD(logits), torch.zeros(n), seed=7)
    det.setup(ctx)
    out = det.detect(ctx)
    sub = det.subset
    assert sub.shape == (10,) and torch.equal(sub, torch.unique(sub)) and int(sub.max()) < n
    assert det.score.shape == (10,)
    assert torch.equal(torch.nonzero(out.collapsed).flatten(), sub)  # only the subset is ever flagged
    assert float(out.fraction) == 1.0  # the fraction of the scored subset
    assert out.features is None and torch.equal(out.subset, sub)
    # the same seed picks the same subset; a resumed detector keeps it whatever its generator
    other = DynGANDetector(subset=10)
    other.setup(make_ctx(FakeD(logits), torch.zeros(n), seed=7)[0])
    assert torch.equal(other.subset, sub)
    resumed = DynGANDetector(subset=10)
    resumed.load_state_dict(det.state_dict())
    resumed.setup(make_ctx(FakeD(logits), torch.zeros(n), seed=99)[0])
    assert torch.equal(resumed.subset, sub)
    # a subset as large as the data is no subset
    full = DynGANDetector(subset=n)
    full.setup(ctx)
    assert full.subset is None and full.score.shape == (n,)


def test_detector_state_round_trip():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, generator=g) * 3
    labels = torch.randint(3, (30,), generator=g)
    a = DynGANDetector(lam=0.3, reset_relabelled=True)
    ctx, _ = make_ctx(FakeD(logits), labels)
    a.setup(ctx)
    for _ in range(4):
        a.detect(ctx)
    state = a.state_dict()
    # tensors or JSON values only
    json.dumps({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)})
    b = DynGANDetector(lam=0.3, reset_relabelled=True)
    b.load_state_dict({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()})
    b.setup(make_ctx(FakeD(logits), labels, seed=123)[0])
    assert torch.equal(a.score, b.score) and b.updates == 4
    ctx.labels = (labels + 1) % 3  # relabelled: both must reset alike
    oa, ob = a.detect(ctx), b.detect(ctx)
    assert torch.equal(oa.score, ob.score) and torch.equal(oa.collapsed, ob.collapsed)


def test_detector_shards_over_ranks():
    # rank 1 of 2: scores only rows [15, 30); all_gather puts rank 0's rows in front
    n, half = 30, 15
    logits = torch.linspace(-3, 5, n)
    feats = torch.randn(n, 3)

    class Rank1(Comm):
        rank, world_size = 1, 2

        def all_gather(self, t):
            other = logits[:half] if t.dim() == 1 else feats[:half]
            return torch.cat([other, t])

    D = FakeD(logits, feats)
    ctx, _ = make_ctx(D, torch.zeros(n), comm=Rank1())
    det = DynGANDetector(lam=1.0)
    det.setup(ctx)
    out = det.detect(ctx)
    assert torch.equal(torch.cat([i for i, _ in D.seen]), torch.arange(half, n))
    assert torch.equal(out.collapsed, logits > -math.log(0.2))
    assert out.features is None  # scores only; the partitioner recomputes features when it splits


def test_registered_with_the_2d_defaults():
    from core.plugins import load_plugins

    host = load_plugins(env={"DYNGAN_LOAD_PLUGINS": "dyngan"})
    assert not host.failed
    det = host.registry.get("detector", "dyngan")()
    part = host.registry.get("partitioner", "dyngan")()
    assert (det.every, det.opts.delta, det.opts.lam, det.opts.subset) == (500, 0.2, 0.1, None)
    assert det.opts.reset_relabelled is False and det.opts.debias is False  # both codes average from 0
    assert (part.every, part.opts.tau, part.opts.tol, part.opts.weighted, part.opts.refine) == (3000, 0.01, 1e-4, True, True)
    preset = host.registry.get("preset", "dyngan")
    assert preset is DynGANPreset
    s = preset.settings
    assert (s["detector"], s["partitioner"], s["conditioner"], s["loss"]) == ("dyngan", "dyngan", "onehot", "ns")
    assert (s["lr_g"], s["lr_d"], s["betas"], s["batch_size"], s["steps"]) == (1e-3, 1e-3, [0.5, 0.999], 128, 30000)
    # the authors' image-code rule (logit average, split on D's latest pass): a setting of ours for the 2D code
    assert s["options"]["detector"] == {"every": 500, "delta": 0.2, "lam": 0.1, "average": "logit"}
    assert s["options"]["partitioner"] == {"every": 3000, "tau": 0.01, "split_on": "fresh"}
    assert s["options"]["conditioner"] == {"capacity": 30}
    assert s["g_ema"] == 0.99  # ours, not the reference code's; --g-ema 0 turns it off
    json.dumps(s)


# ---------------------------------------------------------------- partitioner: split


def split(labels, collapsed, capacity=30, **opts):
    ctx, rep = make_ctx(FakeD(torch.zeros(len(labels))), labels, capacity=capacity)
    upd = DynGANPartitioner(refine=False, **opts).partition(ctx, detection(collapsed))
    return upd, rep


def mask(n, idx):
    m = torch.zeros(n, dtype=torch.bool)
    m[list(idx)] = True
    return m


def test_split_moves_exactly_the_collapsed_samples():
    upd, rep = split([0] * 12, mask(12, [2, 5, 7]))
    want = torch.zeros(12, dtype=torch.long)
    want[[2, 5, 7]] = 1
    assert torch.equal(upd.labels, want)
    assert upd.prior is None  # the loop sets prior = sizes / N
    assert float(rep["partition/count"]) == 2 and float(rep["partition/moved"]) == 3


def test_split_opens_one_condition_per_partition_most_collapsed_first():
    labels = [0] * 6 + [1] * 6
    upd, rep = split(labels, mask(12, [0, 1, 6, 7, 8]))
    # partition 1 holds more collapsed samples: it gets the first free slot (2), partition 0 the next (3)
    assert upd.labels.tolist() == [3, 3, 0, 0, 0, 0, 2, 2, 2, 1, 1, 1]
    assert float(rep["partition/opened"]) == 2 and float(rep["partition/count"]) == 4


def test_capacity_is_never_exceeded():
    labels = [0] * 6 + [1] * 6
    # one free slot: only the partition with the most collapsed samples is split
    upd, _ = split(labels, mask(12, [0, 1, 6, 7, 8]), capacity=3)
    assert upd.labels.tolist() == [0] * 6 + [2, 2, 2, 1, 1, 1]
    # equal counts: the lower id goes first
    upd, _ = split(labels, mask(12, [0, 1, 6, 7]), capacity=3)
    assert upd.labels.tolist() == [2, 2, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    # full: nothing to do
    upd, rep = split([0, 0, 1, 1, 2, 2], mask(6, [0, 2, 4]), capacity=3)
    assert upd is None and float(rep["partition/count"]) == 3
    # repeated partitions on a growing partition stop at capacity
    labels = torch.zeros(40, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        ctx, _ = make_ctx(FakeD(torch.zeros(40)), labels, capacity=5)
        c = torch.rand(40, generator=g) < 0.4
        upd = DynGANPartitioner(refine=False).partition(ctx, detection(c))
        if upd is None:
            break
        labels = upd.labels
        assert int(labels.max()) < 5
    assert torch.unique(labels).numel() == 5


def test_fully_collapsed_partition_is_not_split_and_empty_slots_are_reused():
    # partition 1 is collapsed as a whole: moving it would only rename it
    upd, _ = split([0, 0, 0, 0, 1, 1, 1, 1], mask(8, [0, 4, 5, 6, 7]))
    assert upd.labels.tolist() == [2, 0, 0, 0, 1, 1, 1, 1]
    assert split([0, 0, 0], mask(3, [0, 1, 2]))[0] is None
    # slot 1 is unused: the new condition takes it
    upd, _ = split([0, 0, 2, 2], mask(4, [1]))
    assert upd.labels.tolist() == [0, 1, 2, 2]


def test_fully_collapsed_partition_within_the_detector_subset_is_not_split():
    # the detector scores only samples 0, 1, 4 and 5; partition 1's scored samples (4, 5) are all
    # collapsed, so splitting it would only rename it (and the vote would carry 6 and 7 along)
    feats = torch.tensor([0.0, 0.1, 0.2, 0.3, 10.0, 10.1, 10.2, 10.3])[:, None]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    ctx, rep = make_ctx(FakeD(torch.zeros(8), feats), labels)
    c = mask(8, [0, 4, 5])
    det = DynGANDetection(collapsed=c, fraction=c.float().mean(), score=None, features=None,
                          subset=torch.tensor([0, 1, 4, 5]))
    upd = DynGANPartitioner(refine=False, knn=1).partition(ctx, det)
    assert upd.labels.tolist() == [2, 0, 0, 0, 1, 1, 1, 1]
    assert float(rep["partition/opened"]) == 1 and float(rep["partition/moved"]) == 1
    # every scored sample of every partition collapsed: nothing to split
    c = mask(8, [0, 1, 4, 5])
    det = DynGANDetection(collapsed=c, fraction=c.float().mean(), score=None, features=None,
                          subset=torch.tensor([0, 1, 4, 5]))
    ctx, _ = make_ctx(FakeD(torch.zeros(8), feats), labels)
    assert DynGANPartitioner(refine=False, knn=1).partition(ctx, det) is None


def test_tau_gate_and_missing_detection():
    c = mask(200, [3])  # fraction 0.005
    assert split([0] * 200, c, tau=0.01)[0] is None
    upd, _ = split([0] * 200, mask(200, [3, 4]), tau=0.01)  # fraction exactly tau
    assert upd is not None and upd.labels[[3, 4]].tolist() == [1, 1]
    ctx, _ = make_ctx(FakeD(torch.zeros(4)), [0] * 4)
    assert DynGANPartitioner().partition(ctx, None) is None


# ---------------------------------------------------------------- partitioner: refine


def weighted_scenario():
    """1-D features: L (20 samples at 0) and M (10 at 4) are fit well (score 0.05);
    C (10 at 5) is collapsed (score 0.9). After the split, centre 0 is at 1.33 and
    centre 1 at 5, so M is nearer the new centre."""
    g = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.zeros(20), torch.full((10,), 4.0), torch.full((10,), 5.0)])
    feats = (pos + 0.01 * torch.randn(40, generator=g))[:, None]
    score = torch.cat([torch.full((30,), 0.05), torch.full((10,), 0.9)])
    collapsed = score > 1 / 1.2
    return feats, score, collapsed


@pytest.mark.parametrize("weighted", [True, False])
def test_weighted_refinement_keeps_well_fit_samples(weighted):
    feats, score, collapsed = weighted_scenario()
    ctx, _ = make_ctx(FakeD(torch.zeros(40), feats), torch.zeros(40))
    det = Detection(collapsed=collapsed, fraction=collapsed.float().mean(), score=score, features=feats)
    labels = DynGANPartitioner(weighted=weighted).partition(ctx, det).labels
    assert labels[:20].tolist() == [0] * 20 and labels[30:].tolist() == [1] * 10
    if weighted:
        assert labels[20:30].tolist() == [0] * 10  # M stays with its own centre
    else:
        assert labels[20:30].tolist() == [1] * 10  # plain k-means moves M to the new condition


@pytest.mark.parametrize("weighting,m_stays", [("squared", False), ("reference", True)])
def test_weighting_rules_differ_on_a_moderately_fit_group(weighting, m_stays):
    # M's score 0.25: its distance to centre 0 is 2.67, to the new centre 1. The reference rule
    # compares 0.25 * 2.67 = 0.67 < 1 and keeps M; ours compares 0.25 * 7.1 = 1.8 > 1 and moves it
    feats, score, collapsed = weighted_scenario()
    score[20:30] = 0.25
    ctx, _ = make_ctx(FakeD(torch.zeros(40), feats), torch.zeros(40))
    det = Detection(collapsed=collapsed, fraction=collapsed.float().mean(), score=score, features=feats)
    labels = DynGANPartitioner(weighting=weighting).partition(ctx, det).labels
    assert labels[:20].tolist() == [0] * 20 and labels[30:].tolist() == [1] * 10
    assert labels[20:30].tolist() == ([0] * 10 if m_stays else [1] * 10)



@pytest.mark.parametrize("moves", ["any", "new"])
def test_refine_moves_new_keeps_the_old_conditions_from_trading_samples(moves):
    """Partition 0: A (10 at 0) and G (10 at 8); partition 1: B (10 at 10) and C (10 at 20, collapsed);
    A, B and G are fit (score 0.5). The split opens condition 2 for C. G is nearer B's centre (10)
    than half its squared distance to its own (4): k-means moves the whole group from one old
    condition to the other, where the generator has not learnt it (seen on the PacGAN grid);
    refine_moves=new lets samples go only into condition 2, so G stays and C still goes."""
    g = torch.Generator().manual_seed(0)
    pos = torch.cat([torch.zeros(10), torch.full((10,), 8.0), torch.full((10,), 10.0), torch.full((10,), 20.0)])
    feats = (pos + 0.01 * torch.randn(40, generator=g))[:, None]
    score = torch.cat([torch.full((30,), 0.5), torch.full((10,), 0.95)])
    collapsed = score > 1 / 1.2
    labels = [0] * 20 + [1] * 20
    ctx, _ = make_ctx(FakeD(torch.zeros(40), feats), labels)
    det = Detection(collapsed=collapsed, fraction=collapsed.float().mean(), score=score, features=feats)
    new = DynGANPartitioner(refine_moves=moves).partition(ctx, det).labels
    assert new[:10].tolist() == [0] * 10 and new[20:30].tolist() == [1] * 10 and new[30:].tolist() == [2] * 10
    assert new[10:20].tolist() == ([1] * 10 if moves == "any" else [0] * 10)


def test_refine_moves_new_still_lets_samples_join_the_new_condition():
    """With refine_moves=new a sample may still join a condition opened at this check: M (not
    collapsed, at 4.9 beside the collapsed C at 5) joins the new condition, as with any."""
    feats, score, collapsed = weighted_scenario()
    score[20:30] = 0.5  # M, not collapsed: 0.5 * 3.27**2 = 5.3 to its own centre (1.63), 0.01 to C's (5)
    feats[20:30] = 4.9
    assert not collapsed[20:30].any()
    ctx, _ = make_ctx(FakeD(torch.zeros(40), feats), torch.zeros(40))
    det = Detection(collapsed=collapsed, fraction=collapsed.float().mean(), score=score, features=feats)
    for moves in ("any", "new"):
        labels = DynGANPartitioner(refine_moves=moves).partition(ctx, det).labels
        assert labels[:20].tolist() == [0] * 20 and labels[20:].tolist() == [1] * 20, moves

def test_refine_recomputes_current_features_when_the_detection_has_none():
    feats, score, collapsed = weighted_scenario()
    D = FakeD(torch.zeros(40), feats)
    ctx, _ = make_ctx(D, torch.zeros(40))
    with_f = Detection(collapsed=collapsed, fraction=collapsed.float().mean(), score=score, features=feats)
    without = Detection(collapsed=collapsed, fraction=collapsed.float().mean(), score=score)
    a = DynGANPartitioner(weighted=False).partition(ctx, with_f).labels
    assert D.seen == []
    b = DynGANPartitioner(weighted=False).partition(ctx, without).labels
    assert len(D.seen) > 0 and torch.equal(a, b)


def test_subset_partition_labels_the_rest_by_nearest_neighbours():
    # 2 blobs in feature space; the detector scored a subset; blob B's subset samples are collapsed
    n = 60
    g = torch.Generator().manual_seed(2)
    blob = (torch.arange(n) >= 30).long()
    feats = torch.stack([blob * 10.0, torch.zeros(n)], 1) + 0.1 * torch.randn(n, 2, generator=g)
    D = FakeD(torch.where(blob == 1, 6.0, -6.0), feats)
    ctx, _ = make_ctx(D, torch.zeros(n), seed=3)
    det = DynGANDetector(subset=20, lam=1.0)
    det.setup(ctx)
    out = det.detect(ctx)
    assert out.subset is not None and int(out.collapsed.sum()) == int(blob[out.subset].sum()) > 0
    upd = DynGANPartitioner().partition(ctx, out)
    assert torch.equal(upd.labels, blob)  # the samples outside the subset follow their neighbours


@pytest.mark.parametrize("dim,projected", [(4, True), (64, False), (None, False)])
def test_knn_dim_votes_in_a_random_projection(dim, projected):
    # 64-d features, 2 blobs 5 apart along the diagonal; knn_dim=4 votes in 4 random directions
    n = 60
    g = torch.Generator().manual_seed(2)
    blob = (torch.arange(n) >= 30).long()
    feats = blob[:, None] * torch.full((1, 64), 5.0 / 8) + 0.1 * torch.randn(n, 64, generator=g)
    D = FakeD(torch.where(blob == 1, 6.0, -6.0), feats)
    ctx, _ = make_ctx(D, torch.zeros(n), seed=3)
    det = DynGANDetector(subset=20, lam=1.0)
    det.setup(ctx)
    out = det.detect(ctx)
    before = ctx.rng.get_state()
    upd = DynGANPartitioner(knn_dim=dim).partition(ctx, out)
    assert torch.equal(upd.labels, blob)
    # the projection is drawn from the run's generator only when it is narrower than the features
    assert torch.equal(ctx.rng.get_state(), before) is not projected


def test_partitioner_broadcasts_the_decision():
    class Recorder(Comm):
        def __init__(self):
            self.calls = []

        def broadcast(self, t, src=0):
            self.calls.append((t.clone(), src))
            return torch.full_like(t, 1)  # "rank 0's" labels

    comm = Recorder()
    ctx, _ = make_ctx(FakeD(torch.zeros(6)), [0] * 6, comm=comm)
    upd = DynGANPartitioner(refine=False).partition(ctx, detection(mask(6, [1])))
    assert len(comm.calls) == 1 and comm.calls[0][1] == 0
    assert comm.calls[0][0].tolist() == [0, 1, 0, 0, 0, 0]
    assert upd.labels.tolist() == [1] * 6


def test_partitioner_state_round_trip():
    feats, score, collapsed = weighted_scenario()
    det = Detection(collapsed=collapsed, fraction=collapsed.float().mean(), score=score, features=feats)
    a = DynGANPartitioner()
    ctx, _ = make_ctx(FakeD(torch.zeros(40), feats), torch.zeros(40))
    ctx.step = 3000
    first = a.partition(ctx, det).labels
    b = DynGANPartitioner()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict() == {"partitions": 1, "last_step": 3000}
    assert torch.equal(b.partition(ctx, det).labels, first)


# ---------------------------------------------------------------- with real networks


def test_conditions_grow_without_touching_the_networks():
    torch.manual_seed(0)
    cap = 5
    cond = OneHotConditioner(capacity=cap)
    G, Dn = MLP(hidden=32).build((2,), cond.spec())
    gcode, dcode = cond.generator_code(), cond.discriminator_code()

    def D(x, c, features=False):
        logits, f = Dn(x, dcode(c))
        return (logits.view(-1), f) if features else logits.view(-1)

    g = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(40, 2, generator=g) * 0.1 + torch.tensor(c) for c in ([0.0, 0.0], [3.0, 0.0], [0.0, 3.0])])
    n = data.shape[0]
    modules = {"G": G, "D": Dn, "gcode": gcode, "dcode": dcode}
    before = {k: {n_: t.clone() for n_, t in m.state_dict().items()} for k, m in modules.items()}
    modes = {k: m.training for k, m in modules.items()}
    with torch.no_grad():
        logits, _ = D(data, torch.zeros(n, dtype=torch.long), features=True)
    # choose delta so that about a third of the samples are collapsed after one update with lam = 1
    delta = math.exp(-float(torch.quantile(logits, 0.66)))
    labels = torch.zeros(n, dtype=torch.long)
    grown = [1]
    for step in range(3):
        reports = {}
        ctx = TrainContext(step=step, device=torch.device("cpu"), data=data, labels=labels,
                           prior=torch.bincount(labels, minlength=cap).float() / n, capacity=cap, z_dim=50,
                           generator=lambda z, c: G(z, gcode(c)), discriminator=D, rng=g,
                           report=lambda k, v: reports.__setitem__(k, v))
        det = DynGANDetector(delta=delta, lam=1.0)
        det.setup(ctx)
        out = det.detect(ctx)
        assert out.features is None and out.score.shape == (n,)
        upd = DynGANPartitioner().partition(ctx, out)
        if upd is None:
            break
        labels = upd.labels
        grown.append(int(torch.unique(labels).numel()))
        # the networks take every new condition as they are
        x = G(torch.randn(n, 50), gcode(labels))
        assert D(x, labels).shape == (n,)
    assert grown[1] > 1 and max(grown) <= cap and int(labels.max()) < cap
    for k, m in modules.items():
        after = m.state_dict()
        assert after.keys() == before[k].keys()
        assert all(torch.equal(after[n_], before[k][n_]) for n_ in after), k
        assert m.training == modes[k]


def test_schemas_and_checkpoint_round_trip_with_the_core_kit():
    from core.testing import check_options_schema, check_state_roundtrip
    from dyngan_plugins.conditioners import EmbeddingConditioner
    from dyngan_plugins.kmeans import KMeansPartitioner

    for cls in (DynGANDetector, DynGANPartitioner, KMeansPartitioner, OneHotConditioner, EmbeddingConditioner):
        check_options_schema(cls)
    det = DynGANDetector(subset=8, reset_relabelled=True)
    ctx, _ = make_ctx(FakeD(torch.linspace(-3, 3, 20)), torch.arange(20) % 3)
    det.setup(ctx)
    det.detect(ctx)
    check_state_roundtrip(det)
    det.setup(ctx)  # after a resume: back on the device, same state
    assert det.score.shape == (8,) and det.updates == 1
    part = DynGANPartitioner()
    part.partition(ctx, detection(mask(20, [0, 3])))
    check_state_roundtrip(part)


def test_the_partitioner_says_why_it_made_no_partition():
    def reason(labels, collapsed, capacity=30, **opts):
        ctx, _ = make_ctx(FakeD(torch.zeros(len(labels))), labels, capacity=capacity)
        part = DynGANPartitioner(refine=False, **opts)
        det = None if collapsed is None else detection(collapsed)
        assert part.partition(ctx, det) is None
        return part.skip_reason

    assert reason([0] * 4, None) == "no detection since the start or the last partition"
    assert "below tau (0.01)" in reason([0] * 200, mask(200, [3]), tau=0.01)
    assert "all 3 condition slots are in use" in reason([0, 0, 1, 1, 2, 2], mask(6, [0, 2, 4]), capacity=3)
    assert "collapsed as a whole" in reason([0, 0, 0], mask(3, [0, 1, 2]))
    # tau 0 lets a check with no collapsed sample through the gate: it says so, not "as a whole"
    assert reason([0] * 5, mask(5, []), tau=0.0) == "no sample is collapsed (tau 0 lets every check through)"
    # a partition made clears it
    ctx, _ = make_ctx(FakeD(torch.zeros(4)), [0] * 4)
    part = DynGANPartitioner(refine=False)
    part.skip_reason = "stale"
    assert part.partition(ctx, detection(mask(4, [1]))) is not None and part.skip_reason is None


# ---------------------------------------------------------------- the image code's variants


def test_logit_average_against_a_hand_computed_case():
    # delta 0.1: -log(0.1) = 2.3026; lam 0.2; the average of a constant logit L after n detections
    # is L * (1 - 0.8**n) from 0 (probability 0.5): L = 3 gives 0.6, 1.08, 1.46, 1.77, 2.02, 2.21,
    # 2.37 -> collapsed from the 7th; L = 2 never crosses. On the probability scale the same
    # sample (p 0.9526) needs p * (1 - 0.8**n) > 1/1.1, i.e. n >= 14.
    D = FakeD([3.0, 2.0, -1.0])
    ctx, rep = make_ctx(D, [0, 0, 0])
    ctx_p, _ = make_ctx(D, [0, 0, 0])
    on_logits, on_probs = DynGANDetector(delta=0.1, lam=0.2, average="logit"), DynGANDetector(delta=0.1, lam=0.2)
    first_logit = first_prob = None
    for n in range(1, 16):
        out, ref = on_logits.detect(ctx), on_probs.detect(ctx_p)
        avg = D.logits * (1 - 0.8 ** n)
        assert torch.allclose(on_logits.score, avg, atol=1e-5)
        assert torch.allclose(out.score, torch.sigmoid(avg), atol=1e-6)  # handed on as a probability
        assert float(rep["collapse/score_mean"]) == pytest.approx(float(torch.sigmoid(avg).mean()), abs=1e-6)
        assert out.collapsed[1:].sum() == 0 and ref.collapsed[1:].sum() == 0
        if out.collapsed[0] and first_logit is None:
            first_logit = n
        if ref.collapsed[0] and first_prob is None:
            first_prob = n
        # fresh: this pass's logit alone against -log(delta), the same on both scales
        assert out.fresh.tolist() == ref.fresh.tolist() == [True, False, False]
    assert (first_logit, first_prob) == (7, 14)


def test_logit_average_resets_relabelled_samples_to_logit_zero():
    D = FakeD([3.0, 3.0])
    ctx, _ = make_ctx(D, [0, 0])
    det = DynGANDetector(lam=0.5, average="logit", reset_relabelled=True)
    det.detect(ctx)
    ctx.labels = torch.tensor([0, 1])
    out = det.detect(ctx)
    # sample 0: 3 * (1 - 0.25) = 2.25; sample 1 reset to 0 then averaged once: 1.5
    assert torch.allclose(det.score, torch.tensor([2.25, 1.5]))
    assert torch.allclose(out.score, torch.sigmoid(torch.tensor([2.25, 1.5])))


def fresh_detection(averaged, fresh):
    c = torch.as_tensor(averaged, dtype=torch.bool)
    return DynGANDetection(collapsed=c, fraction=c.float().mean(), fresh=torch.as_tensor(fresh, dtype=torch.bool))


def test_split_on_fresh_moves_the_samples_of_the_last_pass_and_the_average_gates():
    labels = [0] * 10
    det = fresh_detection(mask(10, [1, 2]), mask(10, [2, 3, 4]))
    ctx, rep = make_ctx(FakeD(torch.zeros(10)), labels)
    upd = DynGANPartitioner(refine=False, split_on="fresh").partition(ctx, det)
    assert upd.labels.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    assert float(rep["partition/moved"]) == 3
    ctx, _ = make_ctx(FakeD(torch.zeros(10)), labels)
    assert DynGANPartitioner(refine=False).partition(ctx, det).labels.tolist() == [0, 1, 1] + [0] * 7
    # the gate is the average's fraction: none flagged on average, no partition, whatever the last pass says
    quiet = fresh_detection(mask(10, []), mask(10, [2, 3]))
    part = DynGANPartitioner(refine=False, split_on="fresh", tau=0.05)
    assert part.partition(make_ctx(FakeD(torch.zeros(10)), labels)[0], quiet) is None
    assert "below tau" in part.skip_reason
    # flagged on average, but no sample in the last pass: nothing to move, and it says so
    part = DynGANPartitioner(refine=False, split_on="fresh")
    assert part.partition(make_ctx(FakeD(torch.zeros(10)), labels)[0], fresh_detection(mask(10, [1]), mask(10, []))) is None
    assert "no sample's logit in the last detection's D pass exceeds -log(delta)" in part.skip_reason


def test_split_on_fresh_with_another_detector_moves_its_collapsed_set():
    # a plain Detection (another detector, e.g. --preset dyngan-image --detector knn-coverage) has no
    # last-pass verdict: its collapsed set is what moves (this raised, at the first partition check)
    ctx, _ = make_ctx(FakeD(torch.zeros(4)), [0] * 4)
    upd = DynGANPartitioner(refine=False, split_on="fresh").partition(ctx, detection(mask(4, [1])))
    assert upd.labels.tolist() == [0, 1, 0, 0]
    part = DynGANPartitioner(refine=False, split_on="fresh")
    assert part.partition(make_ctx(FakeD(torch.zeros(3)), [0] * 3)[0], detection(mask(3, [0, 1, 2]))) is None
    assert "collapsed as a whole" in part.skip_reason and "split_on" not in part.skip_reason


def test_split_on_fresh_names_a_partition_flagged_whole_by_the_last_pass():
    part = DynGANPartitioner(refine=False, split_on="fresh")
    det = fresh_detection(mask(4, [1]), mask(4, [0, 1, 2, 3]))
    assert part.partition(make_ctx(FakeD(torch.zeros(4)), [0] * 4)[0], det) is None
    assert part.skip_reason.startswith("every partition that holds samples the last detection's D pass flags is "
                                       "flagged as a whole (split_on 'fresh')")
    assert "score_mean" not in part.skip_reason


def test_fresh_survives_the_checkpoint():
    from core import checkpoint as ckpt_io

    D = FakeD([3.0, -1.0, 4.0, 0.0])
    ctx, _ = make_ctx(D, [0] * 4)
    det = DynGANDetector(delta=0.1, subset=3)
    out = det.detect(ctx)
    tensors = {}
    js = json.loads(json.dumps(ckpt_io.split_detection(out, tensors)))
    back = ckpt_io.join_detection(js, tensors, DynGANDetector, torch.device("cpu"))
    assert isinstance(back, DynGANDetection)
    assert torch.equal(back.fresh, out.fresh) and torch.equal(back.subset, out.subset)
    # only scored samples can be fresh: the subset's, with logit > -log(0.1)
    want = [i for i in out.subset.tolist() if float(D.logits[i]) > -math.log(0.1)]
    assert torch.nonzero(out.fresh).flatten().tolist() == sorted(want)
