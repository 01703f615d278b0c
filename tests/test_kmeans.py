"""The shared k-means code and the blind ``kmeans`` partitioner (self-conditioned GAN)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from core.components import TrainContext
from dyngan_plugins import _kmeans_core as km
from dyngan_plugins.kmeans import KMeansPartitioner


def blobs(n_per=40, k=4, spread=0.1, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 10
    truth = torch.arange(k).repeat_interleave(n_per)
    x = centres[truth] + spread * torch.randn(truth.shape[0], dim, generator=g)
    return x, truth


def make_ctx(features, labels, capacity, seed=0):
    """A context whose discriminator returns fixed features (the rows of ``data`` are indices)."""
    n = features.shape[0]
    data = torch.arange(n, dtype=torch.float32)[:, None]
    calls = []

    def D(x, cond, features_=False, **kw):
        want = kw.get("features", features_)
        i = x[:, 0].long()
        calls.append(i.shape[0])
        logits = torch.zeros(i.shape[0])
        return (logits, features[i]) if want else logits

    reports = {}
    ctx = TrainContext(
        step=0, device=torch.device("cpu"), data=data, labels=labels.clone(), prior=torch.ones(capacity) / capacity,
        capacity=capacity, z_dim=2, generator=lambda z, c: z, discriminator=D,
        rng=torch.Generator().manual_seed(seed), report=lambda k, v: reports.__setitem__(k, v),
    )
    return ctx, reports


def same_partition(a, b):
    """True when labellings a and b group the samples identically (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ---------------------------------------------------------------- Hungarian


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 5), (4, 6), (2, 7)])
def test_hungarian_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = rng.integers(0, 20, size=shape).astype(float)
        col = km.hungarian(cost)
        n, m = shape
        assert len(set(col.tolist())) == n and col.min() >= 0 and col.max() < m
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        assert cost[np.arange(n), col].sum() == best


def test_hungarian_rejects_more_rows_than_columns():
    with pytest.raises(ValueError):
        km.hungarian(np.zeros((3, 2)))


def test_match_ids_undoes_a_permutation_and_uses_free_slots():
    old = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    perm = torch.tensor([2, 0, 1])  # new cluster j is old cluster perm[j]... inverted below
    inv = torch.argsort(perm)
    new = inv[old]  # the same clustering with permuted ids
    assert torch.equal(km.match_ids(new, old, 3, capacity=5), old)
    # a new clustering that splits old cluster 2: the extra cluster takes an unused id
    new = torch.tensor([1, 1, 0, 0, 2, 2, 3])
    out = km.match_ids(new, old, 4, capacity=5)
    assert torch.equal(out[:6], old[:6]) and int(out[6]) in (3, 4)


# ---------------------------------------------------------------- k-means pieces


def test_assign_is_chunk_independent_and_weighting_keeps_own_cluster():
    x, _ = blobs(n_per=30, k=3)
    c = x[torch.tensor([0, 30, 60])] + 0.5
    l1, d1 = km.assign(x, c, chunk=7)
    l2, d2 = km.assign(x, c, chunk=10_000)
    # distances come from |x|^2 - 2 x.c + |c|^2 in float32 (|x|^2 ~ 100 here), whose rounding
    # depends on the BLAS's blocking of each chunk: equal labels, distances equal to that rounding
    assert torch.equal(l1, l2) and torch.allclose(d1, d2, atol=1e-3)
    assert torch.allclose(d1, ((x - c[l1]) ** 2).sum(1), atol=1e-3)
    # a point halfway between two centres stays with its own one when its distance is down-weighted
    pts = torch.tensor([[0.45], [0.55]])
    cen = torch.tensor([[0.0], [1.0]])
    own = torch.tensor([1, 0])
    lab, _ = km.assign(pts, cen)
    assert lab.tolist() == [0, 1]
    lab, _ = km.assign(pts, cen, own=own, own_weight=torch.tensor([0.1, 0.1]))
    assert lab.tolist() == [1, 0]
    lab, _ = km.assign(pts, cen, own=own, own_weight=torch.tensor([1.0, 1.0]))
    assert lab.tolist() == [0, 1]


def weighted_line():
    # 100 points at 0 (cluster 0), 100 at 1 and one at 0.45 (cluster 1): centres 0 and ~0.9946
    x = torch.cat([torch.zeros(100, 1), torch.ones(100, 1), torch.tensor([[0.45]])])
    labels = torch.tensor([0] * 100 + [1] * 101)
    centres, _ = km.centres_of(x, labels, 2)
    return x, labels, centres


@pytest.mark.parametrize("weighting,w,stays", [
    # the authors' rule: w times the distance, 0.545 * w against 0.45
    ("reference", 0.75, True), ("reference", 0.85, False),
    # ours: w times the squared distance, 0.297 * w against 0.2025
    ("squared", 0.75, False), ("squared", 0.65, True),
])
def test_weighted_lloyd_rules(weighting, w, stays):
    x, labels, centres = weighted_line()
    weight = torch.ones(201)
    weight[200] = w
    res = km.lloyd(x, centres, labels=labels, own_weight=weight, weighting=weighting)
    assert int(res.labels[200]) == (1 if stays else 0)
    assert torch.equal(res.labels[:200], labels[:200])


def test_unknown_weighting_is_refused():
    x, labels, centres = weighted_line()
    with pytest.raises(ValueError, match="weighting must be one of squared, reference"):
        km.lloyd(x, centres, labels=labels, own_weight=torch.ones(201), weighting="cubed")


def test_centres_of_keeps_the_old_centre_of_an_empty_cluster():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    labels = torch.tensor([0, 0, 2])
    old = torch.tensor([[9.0, 9.0], [5.0, 5.0], [7.0, 7.0]])
    c, n = km.centres_of(x, labels, 3, fallback=old)
    assert n.tolist() == [2, 0, 1]
    assert torch.equal(c, torch.tensor([[1.0, 0.0], [5.0, 5.0], [10.0, 10.0]]))


def test_lloyd_converges_and_survives_an_empty_cluster():
    x, truth = blobs(k=3)
    far = torch.full((1, 3), 1e4)  # a centre nobody picks
    start = torch.cat([x[torch.tensor([0, 40, 80])] + 1.0, far])
    res = km.lloyd(x, start, tol=1e-6)
    assert same_partition(res.labels, truth)
    assert torch.equal(res.centres[3], far[0])  # the empty cluster kept its centre
    assert res.iterations < 100
    assert torch.isclose(res.inertia, ((x - res.centres[res.labels]) ** 2).sum(), rtol=1e-4)


def test_kmeans_pp_restarts_and_seed():
    x, truth = blobs(k=5, n_per=30)
    res = km.kmeans(x, 5, generator=torch.Generator().manual_seed(3), restarts=4)
    assert same_partition(res.labels, truth)
    again = km.kmeans(x, 5, generator=torch.Generator().manual_seed(3), restarts=4)
    assert torch.equal(res.labels, again.labels)
    # the kept run is no worse than any single restart
    g = torch.Generator().manual_seed(3)
    singles = [float(km.lloyd(x, km.kmeans_pp(x, 5, g)).inertia) for _ in range(4)]
    assert float(res.inertia) <= min(singles) + 1e-3
    # k-means++ picks distinct points of the data
    c = km.kmeans_pp(x, 5, torch.Generator().manual_seed(1))
    assert c.shape == (5, 3) and torch.unique(c, dim=0).shape[0] == 5
    assert all(bool((x == row).all(1).any()) for row in c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draw_one_is_torch_multinomial_without_its_host_read(monkeypatch, dtype):
    """k-means++ draws each centre with draw_one: on the CPU the same index and generator state as
    torch.multinomial(probs, 1), including zero-probability entries, and no host read."""
    for seed in range(30):
        probs = torch.rand(500, generator=torch.Generator().manual_seed(100 + seed), dtype=dtype) ** 3
        probs[: 50 * (seed % 5)] = 0
        probs /= probs.sum()
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = torch.multinomial(probs, 1, generator=g1)
        got = km.draw_one(probs, g2)
        assert torch.equal(got, expected) and torch.equal(g1.get_state(), g2.get_state())
        assert float(probs[got]) > 0
    reads = []
    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1])
    km.draw_one(probs, torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert reads == []


def test_knn_vote_majority_and_tie_break():
    ref = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    ref_labels = torch.tensor([0, 0, 0, 1, 1, 1])
    q = torch.tensor([[0.05], [5.05], [2.4]])
    out = km.knn_vote(q, ref, ref_labels, n_classes=2, k=3)
    assert out.tolist() == [0, 1, 0]
    # 2 votes against 2: the class of the nearest neighbour wins
    ref = torch.tensor([[0.0], [1.0], [-1.5], [2.0]])
    out = km.knn_vote(torch.tensor([[0.1]]), ref, torch.tensor([1, 0, 0, 1]), n_classes=2, k=4)
    assert out.tolist() == [1]


def test_knn_vote_is_unchanged_by_a_common_offset_of_the_features():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2000, 16, generator=g)
    labels = (ref[:, 0] > 0).long() + 2 * (ref[:, 1] > 0).long()
    q = torch.randn(3000, 16, generator=g)
    base = km.knn_vote(q, ref, labels, 4)
    for offset in (100.0, 1000.0):  # 20 and 920 labels changed before the centring
        assert torch.equal(km.knn_vote(q + offset, ref + offset, labels, 4), base), offset


# ---------------------------------------------------------------- the partitioner


def test_kmeans_partitioner_recovers_blobs_and_keeps_ids_stable():
    x, truth = blobs(k=4)
    ctx, rep = make_ctx(x, torch.zeros(160, dtype=torch.long), capacity=10)
    part = KMeansPartitioner(k=4, restarts=3)
    upd = part.partition(ctx, None)
    assert upd is not None and upd.prior is None
    first = upd.labels
    assert same_partition(first, truth) and int(first.max()) < 10
    assert float(rep["partition/count"]) == 4
    # the same clustering again, starting from a relabelled copy: ids come back as they were
    perm = torch.tensor([7, 2, 9, 0, 1, 3, 4, 5, 6, 8])  # old id -> some other slot
    ctx2, _ = make_ctx(x, perm[first], capacity=10, seed=5)
    second = KMeansPartitioner(k=4, restarts=3).partition(ctx2, None).labels
    assert torch.equal(second, perm[first])
    assert part.state_dict() == {"partitions": 1}


def test_kmeans_partitioner_deterministic_under_a_seed_and_clipped_to_capacity():
    x, _ = blobs(k=6, n_per=20, spread=2.0)
    runs = []
    for _ in range(2):
        ctx, rep = make_ctx(x, torch.zeros(120, dtype=torch.long), capacity=3, seed=11)
        runs.append(KMeansPartitioner(restarts=2).partition(ctx, None).labels)  # k=50 by default
    assert torch.equal(runs[0], runs[1])
    assert int(runs[0].max()) < 3 and torch.unique(runs[0]).numel() == 3
    assert float(rep["partition/k"]) == 3  # the clip is logged


def test_kmeans_partitioner_registered():
    from core.plugins import load_plugins

    host = load_plugins(env={"DYNGAN_LOAD_PLUGINS": "kmeans"})
    assert not host.failed
    cls = host.registry.get("partitioner", "kmeans")
    assert cls is KMeansPartitioner
    p = cls()
    assert (p.every, p.opts.k, p.opts.restarts) == (5000, 50, 10)
