"""Precision, recall, density and coverage (Naeem et al., 2020) as the metric ``prdc``.

Real samples X_1..X_N and generated samples Y_1..Y_M are compared in a feature
space through k-nearest-neighbour balls. NND_k(v) is the distance from v to its
k-th nearest neighbour in its own set (itself excluded); B(v, r) is the closed
ball of radius r around v.

  precision = 1/M * #{j : Y_j in some B(X_i, NND_k(X_i))}   (fake inside the real manifold)
  recall    = 1/N * #{i : X_i in some B(Y_j, NND_k(Y_j))}   (real inside the fake manifold)
  density   = 1/(kM) * sum_j #{i : Y_j in B(X_i, NND_k(X_i))}   (can exceed 1)
  coverage  = 1/N * #{i : the nearest Y_j lies in B(X_i, NND_k(X_i))}

A collapsed generator therefore scores high precision and low recall and
coverage; swapping the roles of real and fake (a known bug) inverts that.

Feature space: the flattened sample by default. A dataset that provides a
method ``features(x: Tensor) -> Tensor`` (``(B, *shape)`` -> ``(B, F)``, e.g. a
classifier's penultimate layer for image data) has both sets mapped through it
first; it is called under ``torch.no_grad()`` on chunks of at most
``chunk_size`` samples.

Both sets are first subsampled to at most ``max_samples`` samples, chosen by a
``torch.Generator`` seeded with ``seed`` (the same subsets on every call).
Distances are computed with ``torch.cdist`` in chunks of ``chunk_size`` rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from core import hookimpl
from core.components import Dataset, Metric, Option
from core.errors import OptionError

if TYPE_CHECKING:
    from torch import Tensor

PROTOCOL = (
    "Naeem et al. 2020 PRDC, k-NN balls (closed, k=5 by default) in the dataset's features() "
    "space or on flattened samples; precision = fake inside the real manifold, recall = real "
    "inside the fake manifold; real and fake subsampled to max_samples (seeded)"
)


def _subsample(x: "Tensor", max_samples: int | None, generator: "Any") -> "Tensor":
    import torch

    if max_samples is None or x.shape[0] <= max_samples:
        return x
    idx = torch.randperm(x.shape[0], generator=generator)[:max_samples]
    return x[idx.to(x.device)]


def _featurise(x: "Tensor", fn: "Callable[[Tensor], Tensor] | None", chunk_size: int) -> "Tensor":
    import torch

    if fn is None:
        return x.reshape(x.shape[0], -1).float()
    with torch.no_grad():
        parts = [fn(x[s : s + chunk_size]) for s in range(0, x.shape[0], chunk_size)]
    f = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=0)
    if f.shape[0] != x.shape[0]:
        raise ValueError(f"features() returned {f.shape[0]} rows for {x.shape[0]} samples")
    return f.float()


def _kth_nn_radius(x: "Tensor", k: int, chunk_size: int) -> "Tensor":
    """Distance from every row of ``x`` to its k-th nearest other row."""
    import torch

    out = []
    for s in range(0, x.shape[0], chunk_size):
        d = torch.cdist(x[s : s + chunk_size], x)
        # the smallest distance is the row itself (0); the (k+1)-th is the k-th neighbour
        out.append(torch.kthvalue(d, k + 1, dim=1).values)
    return torch.cat(out)


def prdc(real: "Tensor", fake: "Tensor", k: int = 5, chunk_size: int = 1024) -> dict[str, float]:
    """PRDC between feature matrices ``real`` ``(N, F)`` and ``fake`` ``(M, F)``.

    Needs N > k and M > k. Returns ``prdc/precision``, ``prdc/recall``,
    ``prdc/density`` and ``prdc/coverage``.
    """
    import torch

    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be (N, F) and (M, F), got {tuple(real.shape)} and {tuple(fake.shape)}")
    n, m = real.shape[0], fake.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n <= k or m <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} real and fake samples, got {n} real and {m} fake")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with torch.no_grad():
        # centred on the real mean: torch.cdist expands |x|^2 + |y|^2 - 2 x.y, which loses the
        # distances of data far from the origin against its spread (readings of 300 +- 1, say);
        # PRDC depends on distances only, so the shift changes nothing else
        # (float64 kept for the subtraction; any other dtype, integers included, as float32 first)
        real = real if real.dtype == torch.float64 else real.float()
        fake = fake.to(device=real.device)
        fake = fake if fake.dtype == torch.float64 else fake.float()
        shift = real.mean(0, dtype=torch.float64)
        real = (real - shift.to(real.dtype)).float()
        fake = (fake - shift.to(fake.dtype)).float()
        r_real = _kth_nn_radius(real, k, chunk_size)  # (N,)
        r_fake = _kth_nn_radius(fake, k, chunk_size)  # (M,)

        fake_inside = torch.zeros((), dtype=torch.long, device=real.device)
        balls_hit = torch.zeros((), dtype=torch.long, device=real.device)
        real_inside_fake = torch.zeros(n, dtype=torch.bool, device=real.device)
        nearest_fake = torch.full((n,), float("inf"), device=real.device)
        for s in range(0, m, chunk_size):
            d = torch.cdist(fake[s : s + chunk_size], real)  # (c, N)
            in_real_ball = d <= r_real[None, :]
            fake_inside += in_real_ball.any(dim=1).sum()
            balls_hit += in_real_ball.sum()
            real_inside_fake |= (d <= r_fake[s : s + chunk_size, None]).any(dim=0)
            nearest_fake = torch.minimum(nearest_fake, d.min(dim=0).values)

        return {
            "prdc/precision": float(fake_inside) / m,
            "prdc/recall": float(real_inside_fake.sum()) / n,
            "prdc/density": float(balls_hit) / (k * m),
            "prdc/coverage": float((nearest_fake <= r_real).sum()) / n,
        }


class PRDC(Metric):
    """Precision, recall, density and coverage (Naeem et al. 2020) between real and fake.

    Uses ``dataset.features(x)`` as the feature map when the dataset has one,
    otherwise the flattened samples; see the module docstring.
    """

    name = "prdc"
    protocol = PROTOCOL
    options = {
        "k": Option(5, "nearest neighbours defining each ball", min=1),
        "max_samples": Option(
            5000, "subsample real and fake to at most this many (none: all)", type=int, min=1, nullable=True
        ),
        "seed": Option(0, "seed of the subsampling generator"),
        "chunk_size": Option(1024, "rows per chunk of each distance matrix", min=1),
    }

    def supports(self, dataset: Dataset) -> bool:
        return True

    def check(self, n_fake: int, n_real: int) -> None:
        k, cap = int(self.opts.k), self.opts.max_samples
        fake, real = (n if cap is None else min(n, int(cap)) for n in (n_fake, n_real))
        if fake <= k or real <= k:
            raise OptionError(
                f"metric 'prdc': k={k} needs more than {k} generated and training samples, and it would get "
                f"{fake} generated and {real} training samples; lower -o metric.prdc.k, or score more samples "
                "(eval_samples / evaluate --n" + (", metric.prdc.max_samples" if cap is not None and cap <= k else "")
                + ")")

    def compute(self, fake: "Tensor", real: "Tensor", dataset: Dataset) -> dict[str, float]:
        import torch

        g = torch.Generator().manual_seed(int(self.opts.seed))
        real_s = _subsample(real.detach(), self.opts.max_samples, g)
        fake_s = _subsample(fake.detach(), self.opts.max_samples, g)
        fn = getattr(dataset, "features", None)
        fn = fn if callable(fn) else None
        chunk = int(self.opts.chunk_size)
        real_f = _featurise(real_s, fn, chunk)
        fake_f = _featurise(fake_s.to(real_s.device), fn, chunk)
        return prdc(real_f, fake_f, k=int(self.opts.k), chunk_size=chunk)


@hookimpl
def register_metrics(register):
    register(PRDC)
