"""``knn-coverage``: a collapse detector that needs no discriminator.

A real sample x is *covered* when some generated sample lies within its own
k-nearest-neighbour radius among the real samples (the coverage test of Naeem et
al. 2020, asked per real sample). Every ``every`` steps the detector

1. draws ``samples`` generated samples G(z, c), c from the partition prior;
2. measures, for each scored real sample x, d_fake(x) = distance to its nearest
   generated sample;
3. flags x as collapsed when d_fake(x) > factor * r_k(x), where r_k(x) is the
   distance from x to its k-th nearest neighbour in a fixed real reference set of
   the same size as the generated set (x itself excluded).

Comparing both sets at the same size makes r_k a density estimate at the same
scale as the generated samples. The ball of radius r_k(x) holds a Gamma(k, 1) / M
share of the data's mass, so a generator that matches the data leaves x uncovered
with probability E[exp(-Gamma(k, 1))] = 2^-k, in any dimension (factor 1): 0.1 %
for the default k = 10, well below DynGAN's default tau of 1 %, so partitions open
only when modes are really missed (k = 5 would give 3 %).

Score (for a score-weighted partitioner such as ``dyngan``): d / (d + factor * r_k)
in [0, 1], above 1/2 exactly when the sample is collapsed (higher = more missed).
Features: None by default, and the ``dyngan`` partitioner then recomputes D's
features itself; ``features = "data"`` hands it the raw (flattened) data instead.

Everything is batched torch on ``ctx.device``; distances come in chunks of about
``block`` entries, computed directly (not through the |a|^2 - 2ab + |b|^2
expansion, which loses the small distances of tight modes in float32). Under
torchrun the scored samples are split with ``ctx.comm.shard`` and the distances
gathered with ``ctx.comm.all_gather``; the generated set and the random draws are
rank 0's (``ctx.comm.broadcast``), so every rank reaches the same verdict.
"""

from __future__ import annotations

from typing import Any, Mapping

from core import hookimpl
# OptionError (core.errors, re-exported here): bad option values, so the user gets "Error: ..." and exit 2
from core.components import CollapseDetector, Detection, Option, OptionError, TrainContext

__version__ = "0.1.0"


def _rows_per_chunk(cols: int, block: int) -> int:
    return max(1, block // max(1, cols))


def _cdist(a, b):
    import torch

    # direct differences: exact for the tiny distances inside a tight mode
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def nearest_distance(x, y, block: int = 1 << 22):
    """Distance from every row of ``x`` (n, D) to its nearest row of ``y`` (m, D): ``(n,)``."""
    import torch

    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    rows = _rows_per_chunk(y.shape[0], block)
    for s in range(0, x.shape[0], rows):
        out[s:s + rows] = _cdist(x[s:s + rows], y).amin(1)
    return out


def kth_neighbour_distance(x, x_index, ref, ref_index, k: int, block: int = 1 << 22):
    """Distance from every row of ``x`` to its k-th nearest row of ``ref``, itself excluded.

    ``x_index`` / ``ref_index``: the rows' indices in the training set, so that a
    sample that is also in ``ref`` does not count as its own neighbour.
    """
    import torch

    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    rows = _rows_per_chunk(ref.shape[0], block)
    for s in range(0, x.shape[0], rows):
        d = _cdist(x[s:s + rows], ref)
        d.masked_fill_(x_index[s:s + rows, None] == ref_index[None, :], float("inf"))
        out[s:s + rows] = d.topk(k, dim=1, largest=False).values[:, k - 1]
    return out


class KNNCoverageDetector(CollapseDetector):
    """Flags the real samples that no generated sample comes near (k-NN coverage)."""

    name = "knn-coverage"
    options = {
        "every": Option(500, "detect every this many steps", min=1),
        "k": Option(10, "a sample's radius is the distance to its k-th nearest real neighbour", min=1),
        "factor": Option(1.0, "collapsed when the nearest generated sample is farther than factor * radius",
                         min=0.0),
        "samples": Option(10_000, "generated samples per detection, and the size of the real reference set "
                          "(at most the training set's size)", min=2),
        "subset": Option(None, "score only a fixed random subset of this many real samples; none = all",
                         type=int, min=1, nullable=True),
        "features": Option("none", "features handed to the partitioner: none (it computes D's) or data "
                           "(the flattened samples)", choices=("none", "data")),
        "block": Option(1 << 22, "distances computed per chunk (memory: 4 bytes each)", min=1),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.reference = None  # (M,) indices of the real reference set, drawn once
        self.subset = None  # (S,) sorted indices of the scored samples, or None for all
        self.radius = None  # (S,) k-th neighbour radius of each scored sample (recomputed in setup)
        self.updates = 0

    # ------------------------------------------------------------------ lifecycle

    def _size(self, n: int) -> int:
        return min(int(self.opts.samples), n)

    def setup(self, ctx: TrainContext) -> None:
        import torch

        n = int(ctx.data.shape[0])
        m = self._size(n)
        k = int(self.opts.k)
        if m <= k:  # the options do not fit this data: the user's to fix, so OptionError (exit 2)
            fix = f"-o detector.k below {m}" + (f" or -o detector.samples above {k}" if n > k else "")
            raise OptionError(f"detector 'knn-coverage' needs more than k={k} reference samples; "
                              f"the training set has {n} and samples={self.opts.samples}: set {fix}")
        # draws from ctx.rng; rank 0's draw wins so that every rank scores the same samples
        if self.reference is None:
            ref = torch.randperm(n, generator=ctx.rng, device=ctx.rng.device)[:m]
            self.reference = ctx.comm.broadcast(ref.sort().values.to(ctx.device), 0)
        if self.subset is None and self.opts.subset is not None and self.opts.subset < n:
            sub = torch.randperm(n, generator=ctx.rng, device=ctx.rng.device)[: int(self.opts.subset)]
            self.subset = ctx.comm.broadcast(sub.sort().values.to(ctx.device), 0)
        self.reference = self.reference.to(ctx.device, torch.long)
        if self.subset is not None:
            self.subset = self.subset.to(ctx.device, torch.long)
        for what, idx in (("reference set", self.reference), ("subset", self.subset)):
            if idx is not None and idx.numel() and int(idx.max()) >= n:
                raise ValueError(f"detector 'knn-coverage': the saved {what} does not fit a training set of {n}")
        if self.reference.shape[0] != m:
            raise ValueError(f"detector 'knn-coverage': the saved reference set has {self.reference.shape[0]} "
                             f"samples, expected {m}")
        # the training set is fixed, so the radii are computed once (and again after a resume)
        data = ctx.data.flatten(1).float()
        rows = self._rows(n, ctx.device)
        start, stop = ctx.comm.shard(rows.shape[0])
        with torch.no_grad():
            mine = kth_neighbour_distance(data[rows[start:stop]], rows[start:stop], data[self.reference],
                                          self.reference, k, int(self.opts.block))
        self.radius = ctx.comm.all_gather(mine)

    def _rows(self, n: int, device: Any):
        import torch

        return self.subset if self.subset is not None else torch.arange(n, device=device)

    def _generate(self, ctx: TrainContext, m: int):
        import torch

        out = []
        for s in range(0, m, int(ctx.batch_size)):
            b = min(int(ctx.batch_size), m - s)
            cond = torch.multinomial(ctx.prior.float(), b, replacement=True, generator=ctx.rng)
            z = torch.randn(b, ctx.z_dim, device=ctx.device, generator=ctx.rng)
            out.append(ctx.generator(z, cond).flatten(1).float())
        return ctx.comm.broadcast(torch.cat(out), 0)

    def detect(self, ctx: TrainContext) -> Detection:
        import torch

        if self.radius is None:
            self.setup(ctx)
        n = int(ctx.data.shape[0])
        data = ctx.data.flatten(1).float()
        rows = self._rows(n, ctx.device)
        with torch.no_grad():
            fake = self._generate(ctx, self._size(n))
            start, stop = ctx.comm.shard(rows.shape[0])
            d = ctx.comm.all_gather(nearest_distance(data[rows[start:stop]], fake, int(self.opts.block)))
        r = float(self.opts.factor) * self.radius
        hit = d > r
        # d / (d + factor r): in [0, 1], above 1/2 exactly when collapsed; 0 when a fake sits on x
        s = d / (d + r).clamp_min(torch.finfo(d.dtype).tiny)
        self.updates += 1
        fraction = hit.float().mean()
        if self.subset is None:
            collapsed, score = hit, s
        else:  # samples outside the subset are never flagged, and score 0 (not missed)
            collapsed = torch.zeros(n, dtype=torch.bool, device=ctx.device).index_fill_(0, rows[hit], True)
            score = torch.zeros(n, dtype=s.dtype, device=ctx.device).index_copy_(0, rows, s)
        features = data if self.opts.features == "data" else None
        ctx.report("collapse/fraction", fraction)
        ctx.report("collapse/score_mean", s.mean())
        return Detection(collapsed=collapsed, fraction=fraction, score=score, features=features)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"updates": self.updates}
        if self.reference is not None:
            out["reference"] = self.reference.detach().cpu()
        if self.subset is not None:
            out["subset"] = self.subset.detach().cpu()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        ref, sub = state.get("reference"), state.get("subset")
        self.reference = ref.long() if ref is not None else None
        self.subset = sub.long() if sub is not None else None
        self.radius = None  # recomputed by setup


@hookimpl
def register_collapse_detectors(register):
    register(KNNCoverageDetector)
