"""Shared clustering code for the ``dyngan`` and ``kmeans`` partitioners.

Everything is batched torch code on the features' device; the only Python
loops run over row chunks, Lloyd iterations, restarts or the k centres of
k-means++, never over samples. Distances are squared Euclidean, computed in
row chunks so that an ``(N, k)`` matrix never has to exist at once.

Not a plugin (no hooks): a private module imported by the partitioners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DEFAULT_CHUNK = 16384


def sq_dists(x: Tensor, centres: Tensor, x_sq: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``(n, k)`` between rows of ``x`` and ``centres``
    (``x_sq``: the rows' squared norms, if already known)."""
    if x_sq is None:
        x_sq = (x * x).sum(1)
    d = torch.addmm(x_sq[:, None] + (centres * centres).sum(1)[None, :], x, centres.T, alpha=-2.0)
    return d.clamp_min_(0.0)


def assign(
    x: Tensor,
    centres: Tensor,
    own: Tensor | None = None,
    own_weight: Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    x_sq: Tensor | None = None,
    exact: bool = False,
    home: Tensor | None = None,
    open_to_all: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Nearest centre of every row of ``x``.

    With ``own`` (current cluster of each row, ``(n,)`` long) and ``own_weight``
    (``(n,)``), the squared distance of row i to its own centre ``own[i]`` is
    multiplied by ``own_weight[i]`` before the argmin (distances to the other centres are
    left as they are): DynGAN's score-weighted refinement.

    With ``home`` (``(n,)`` long) and ``open_to_all`` (``(k,)`` bool), row i may only join
    cluster ``home[i]`` or a cluster open to all.

    Returns ``(labels (n,) long, dist (n,))``: dist is the plain (unweighted)
    squared distance to the chosen centre, recomputed directly from the
    difference with ``exact`` (slower; the norm expansion loses precision far
    from the origin). ``x_sq``: the rows' squared norms, to reuse across calls.
    """
    n = x.shape[0]
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        d = sq_dists(x[s:e], centres, None if x_sq is None else x_sq[s:e])
        dw = d
        if own is not None and own_weight is not None:
            o = own[s:e, None]
            w = d.gather(1, o) * own_weight[s:e, None].to(d.dtype)
            dw = d.scatter(1, o, w)
        if home is not None and open_to_all is not None:
            allowed = open_to_all[None, :].expand_as(dw).scatter(1, home[s:e, None], True)
            dw = dw.masked_fill(~allowed, float("inf"))
        lab = dw.argmin(1)
        labels[s:e] = lab
        if exact:
            dist[s:e] = (x[s:e] - centres[lab]).pow(2).sum(1)
        else:
            dist[s:e] = d.gather(1, lab[:, None]).squeeze(1)
    return labels, dist


def centres_of(x: Tensor, labels: Tensor, k: int, fallback: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean of each cluster ``(k, F)`` and the cluster sizes ``(k,)``.

    An empty cluster keeps its ``fallback`` centre (the previous one); with no
    fallback its centre is the zero vector (callers that can have empty
    clusters at initialisation must pass one).
    """
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k)[:k]
    means = sums / counts.clamp_min(1)[:, None].to(x.dtype)
    if fallback is not None:
        means = torch.where((counts > 0)[:, None], means, fallback.to(x.dtype))
    return means, counts


@dataclass
class KMeansResult:
    labels: Tensor  # (n,) long
    centres: Tensor  # (k, F)
    inertia: Tensor  # 0-d: sum of squared distances to the assigned centres
    iterations: int


WEIGHTINGS = ("squared", "reference")


def lloyd(
    x: Tensor,
    centres: Tensor,
    *,
    labels: Tensor | None = None,
    own_weight: Tensor | None = None,
    weighting: str = "squared",
    tol: float = 1e-4,
    max_iter: int = 100,
    chunk: int = DEFAULT_CHUNK,
    home: Tensor | None = None,
    open_to_all: Tensor | None = None,
) -> KMeansResult:
    """Lloyd iterations from ``centres`` until no centre moves by ``tol`` or more.

    ``own_weight`` (DynGAN's score-weighted refinement) scales each sample's
    distance to its "own" centre before the argmin; distances to other centres
    are left as they are. ``weighting`` says which distance and which centre:

    - ``squared``: the squared distance to the centre of the sample's cluster
      of the previous iteration (at first: ``labels``);
    - ``reference``: as the authors' 2D code, the Euclidean distance to the
      centre of the sample's cluster in ``labels``, fixed for all iterations.

    ``home`` and ``open_to_all`` restrict where a sample may go (see ``assign``).

    Empty clusters keep their old centre. The convergence test reads one
    number per iteration (a host sync): this runs every few thousand training
    steps, not per step.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    k = centres.shape[0]
    # work around the mean: same clustering, less cancellation in the distance expansion
    mu = x.mean(0)
    x = x - mu
    centres = centres - mu
    x_sq = (x * x).sum(1)
    weighted = own_weight is not None
    if weighted and labels is None:
        raise ValueError("weighted k-means needs the current labels")
    reference = weighting == "reference"
    # assign() scales squared distances: a factor w on the distance is w**2 on its square
    sq_weight = own_weight * own_weight if weighted and reference else own_weight
    own = labels if weighted else None  # the "own" clusters; the reference rule never moves them
    it = 0
    for it in range(1, max_iter + 1):
        labels, _ = assign(x, centres, own=own, own_weight=sq_weight, chunk=chunk, x_sq=x_sq, home=home,
                           open_to_all=open_to_all)
        if weighted and not reference:
            own = labels
        new, _ = centres_of(x, labels, k, fallback=centres)
        shift = (new - centres).norm(dim=1).max()
        centres = new
        if float(shift) < tol:
            break
    # final assignment consistent with the final centres
    labels, dist = assign(x, centres, own=own, own_weight=sq_weight, chunk=chunk, x_sq=x_sq, exact=True,
                          home=home, open_to_all=open_to_all)
    return KMeansResult(labels=labels, centres=centres + mu, inertia=dist.sum(), iterations=it)


def draw_one(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One index ``(1,)`` drawn with probability ``probs`` (non-negative, summing to 1): the index of
    the largest ``probs / Exp(1)``, which is how ``torch.multinomial(probs, 1)`` draws it, with the
    same result and generator state on the CPU, but without the host read with which multinomial
    first checks its input (on a GPU: one synchronisation per k-means++ centre)."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / q).reshape(1)


def kmeans_pp(x: Tensor, k: int, generator: torch.Generator, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """k-means++ seeding: k centres, each drawn with probability proportional to
    the squared distance to the nearest centre chosen so far."""
    n = x.shape[0]
    dev = x.device
    first = torch.randint(n, (1,), generator=generator, device=generator.device).to(dev)
    centres = [x[first]]
    x_sq = (x * x).sum(1)
    closest = torch.empty(n, dtype=x.dtype, device=dev)
    for s in range(0, n, chunk):
        closest[s:s + chunk] = sq_dists(x[s:s + chunk], centres[0], x_sq[s:s + chunk]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        # all points on existing centres (fewer distinct points than k): draw uniformly
        probs = torch.where(total > 0, closest / total.clamp_min(1e-30), torch.full_like(closest, 1.0 / n))
        idx = draw_one(probs.to(generator.device), generator).to(dev)
        c = x[idx]
        centres.append(c)
        for s in range(0, n, chunk):
            d = sq_dists(x[s:s + chunk], c, x_sq[s:s + chunk]).squeeze(1)
            closest[s:s + chunk] = torch.minimum(closest[s:s + chunk], d)
    return torch.cat(centres, 0)


def kmeans(
    x: Tensor,
    k: int,
    *,
    generator: torch.Generator,
    restarts: int = 10,
    tol: float = 1e-4,
    max_iter: int = 100,
    chunk: int = DEFAULT_CHUNK,
) -> KMeansResult:
    """Plain k-means: ``restarts`` runs from k-means++ seeds, the lowest inertia wins
    (the first one on a tie)."""
    best: KMeansResult | None = None
    xc = x - x.mean(0)  # seeding is translation invariant; centred data loses less precision
    for _ in range(restarts):
        seeds = kmeans_pp(xc, k, generator, chunk) + (x.mean(0))
        res = lloyd(x, seeds, tol=tol, max_iter=max_iter, chunk=chunk)
        if best is None or float(res.inertia) < float(best.inertia):
            best = res
    assert best is not None
    return best


def hungarian(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost assignment of every row to a distinct column (rows <= columns).

    The O(n^2 m) shortest-augmenting-path Hungarian algorithm with row/column
    potentials, its inner loop over columns vectorised with NumPy. Returns
    ``col (n,)``: the column of each row.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    if n > m:
        raise ValueError("hungarian: more rows than columns")
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)  # p[j]: row (1-based) matched to column j; 0 = none
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    for j in range(1, m + 1):
        if p[j]:
            col[p[j] - 1] = j - 1
    return col


def match_ids(new: Tensor, old: Tensor, k_new: int, capacity: int) -> Tensor:
    """Relabel clustering ``new`` (ids < k_new) with ids < capacity so that it
    overlaps the old labelling ``old`` as much as possible: a maximum-overlap
    assignment of new clusters to distinct ids on the contingency table,
    solved exactly with the Hungarian algorithm. Returns the relabelled ``new``."""
    table = torch.zeros(k_new * capacity, dtype=torch.long, device=new.device)
    table.index_add_(0, new * capacity + old, torch.ones_like(new))
    overlap = table.view(k_new, capacity).cpu().numpy()
    col = hungarian(-overlap.astype(np.float64))
    mapping = torch.as_tensor(col, dtype=torch.long, device=new.device)
    return mapping[new]


def knn_vote(
    query: Tensor,
    ref: Tensor,
    ref_labels: Tensor,
    n_classes: int,
    k: int = 5,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """Label of each query row by majority vote of its k nearest ``ref`` rows;
    a tie goes to the class of the nearer neighbours (deterministic)."""
    k = min(k, ref.shape[0])
    out = torch.empty(query.shape[0], dtype=torch.long, device=query.device)
    # every vote counts 1, plus a bonus 1e-3 * 2^-rank: among classes with equal votes the
    # one holding the nearest neighbour wins (the bonuses of later ranks never add up to it)
    bonus = 1e-3 * torch.pow(0.5, torch.arange(k, device=query.device, dtype=torch.float64))
    # centred on the reference rows' mean: sq_dists expands |x|^2 + |c|^2 - 2 x.c, which loses
    # the distances of features far from the origin against their spread
    if not ref.is_floating_point():  # (an integer mean would be cut, and differ from query's)
        ref = ref.float()
    shift = ref.mean(0, dtype=torch.float64).to(ref.dtype)
    ref = ref - shift
    for s in range(0, query.shape[0], chunk):
        d = sq_dists(query[s:s + chunk].to(ref.dtype) - shift, ref)
        nn_idx = d.topk(k, dim=1, largest=False).indices  # sorted, nearest first
        votes = torch.zeros(nn_idx.shape[0], n_classes, dtype=torch.float64, device=query.device)
        votes.scatter_add_(1, ref_labels[nn_idx], (1.0 + bonus).expand(nn_idx.shape[0], k).contiguous())
        out[s:s + chunk] = votes.argmax(1)
    return out


def discriminator_pass(
    ctx, labels: Tensor, index: Tensor | None = None, batch_size: int = 8192, with_features: bool = True
) -> tuple[Tensor, Tensor | None]:
    """D's logits ``(n,)`` and penultimate features ``(n, F)`` (float32) on the
    training samples ``index`` (all of them when None), each under its label
    in ``labels`` (N,). The rows are sharded over ranks with ``ctx.comm.shard``
    and gathered back in order with ``ctx.comm.all_gather``; no gradients.
    With ``with_features=False`` the features are not kept (None): a detection
    that needs only the scores skips copying (N, F) floats."""
    n = ctx.data.shape[0] if index is None else index.shape[0]
    start, stop = ctx.comm.shard(n)
    logits, feats = [], []
    with torch.no_grad():
        for s in range(start, max(stop, start + 1), batch_size):
            e = min(stop, s + batch_size)
            if e <= s:  # empty shard: one row, only for the feature width
                s, e = 0, 1
            rows = slice(s, e) if index is None else index[s:e]  # a slice is a view: no copy of the rows
            lg, f = ctx.discriminator(ctx.data[rows], labels[rows], features=True)
            lg = lg.reshape(-1).float()
            f = f.reshape(f.shape[0], -1).float()
            if stop <= start:
                lg, f = lg[:0], f[:0]
            logits.append(lg)
            if with_features:
                feats.append(f)
    all_logits = ctx.comm.all_gather(torch.cat(logits))
    return all_logits, (ctx.comm.all_gather(torch.cat(feats)) if with_features else None)
