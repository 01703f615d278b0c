"""Mode-collapse metrics for Gaussian mixtures with known centres.

The metric ``mixture`` applies to every dataset whose ``info()`` gives
``{"centres": [[...], ...], "sigma": float}`` (the built-in ``ring8`` and
``grid25``, or a user mixture in any dimension with any number of centres).
It reports two protocols side by side, each named in its keys:

PacGAN / VEEGAN protocol (keys ``mixture/...``):
  ``mixture/hq``: fraction of samples whose Euclidean distance to the nearest
    centre is < ``hq_sigmas`` * sigma (3 sigma by default);
  ``mixture/modes``: number of modes with at least one high-quality sample
    (a sample belongs to its nearest centre);
  ``mixture/reverse_kl``: KL(p || uniform) in nats, where p is the histogram
    of the nearest-centre assignments of all samples (high quality or not),
    with 0 log 0 = 0.

DynGAN code protocol (keys ``mixture/dyngan/...``):
  ``mixture/dyngan/modes``: number of centres with a sample within 1 sigma of
    them;
  ``mixture/dyngan/hq1``, ``hq2``, ``hq3``: fraction of samples within 1, 2 and
    3 sigma of their nearest centre;
  ``mixture/dyngan/reverse_kl``: the same KL as above.

"Within r" is strict (distance < r) everywhere. Non-finite samples (a diverged
generator) count as low quality, cover no mode and are left out of the
assignment histogram (KL is NaN when no sample is finite).

``mixture_stats`` is the library function behind the metric, for benchmark
scripts that hold centres themselves.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from core import hookimpl
from core.components import Dataset, Metric, Option

if TYPE_CHECKING:
    from torch import Tensor

#: elements of one chunk of the (samples x centres) distance matrix, when not given
_AUTO_CHUNK_ELEMENTS = 1 << 22

PROTOCOL = (
    "PacGAN/VEEGAN (mixture/*): HQ = distance to the nearest centre < hq_sigmas*sigma "
    "(default 3), a mode is covered if it has >= 1 HQ sample assigned to it, "
    "reverse_kl = KL(nearest-centre histogram of all samples || uniform) in nats; "
    "DynGAN code (mixture/dyngan/*): a mode is covered if a sample is within 1 sigma of it, "
    "hq1/hq2/hq3 = fraction within 1/2/3 sigma of the nearest centre, KL as above"
)


def _centres_tensor(centres: "Tensor | Sequence[Sequence[float]]", device, dtype) -> "Tensor":
    import torch

    c = torch.as_tensor(centres, dtype=dtype, device=device)
    if c.dim() != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"centres must be a non-empty (K, D) array, got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError("centres must be finite")
    return c


def mixture_stats(
    fake: "Tensor",
    centres: "Tensor | Sequence[Sequence[float]]",
    sigma: float,
    hq_sigmas: float = 3.0,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Mode coverage, sample quality and reverse KL of ``fake`` against a mixture.

    fake: ``(M, D)`` generated samples (any further dimensions are flattened).
    centres: ``(K, D)`` mode centres; sigma: the modes' standard deviation.
    hq_sigmas: the PacGAN high-quality threshold, in units of sigma.
    chunk_size: samples per chunk of the distance matrix (None: sized so that a
      chunk holds about 4M distances). The answer does not depend on it.

    Returns the keys listed in the module docstring, all floats.
    """
    import torch

    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if not (math.isfinite(hq_sigmas) and hq_sigmas >= 0):
        raise ValueError(f"hq_sigmas must be a non-negative number, got {hq_sigmas!r}")
    if fake.dim() < 1 or fake.shape[0] == 0:
        raise ValueError("mixture_stats needs at least one generated sample")
    x = fake.detach().reshape(fake.shape[0], -1)
    # float64 keeps threshold decisions exact for points placed at known distances
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    x = x.to(dtype)
    c = _centres_tensor(centres, x.device, dtype)
    m, d = x.shape
    k = c.shape[0]
    if c.shape[1] != d:
        raise ValueError(f"samples have dimension {d} but the centres have dimension {c.shape[1]}")
    if chunk_size is None:
        chunk_size = max(1, _AUTO_CHUNK_ELEMENTS // k)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    sig = float(sigma)
    hq_thr = float(hq_sigmas) * sig
    assign_counts = torch.zeros(k, dtype=torch.long, device=x.device)  # all finite samples
    hq_counts = torch.zeros(k, dtype=torch.long, device=x.device)  # PacGAN HQ samples per mode
    within = torch.zeros(3, dtype=torch.long, device=x.device)  # samples within 1, 2, 3 sigma
    per_centre_min = torch.full((k,), math.inf, dtype=dtype, device=x.device)
    levels = torch.tensor([1.0, 2.0, 3.0], dtype=dtype, device=x.device) * sig

    with torch.no_grad():
        for start in range(0, m, chunk_size):
            xc = x[start : start + chunk_size]
            finite = torch.isfinite(xc).all(dim=1)
            # exact pairwise distances (no |x|^2 + |c|^2 - 2xc shortcut)
            dist = torch.cdist(xc, c, compute_mode="donot_use_mm_for_euclid_dist")
            dist = torch.where(finite[:, None], dist, torch.full_like(dist, math.inf))
            nearest_d, nearest = dist.min(dim=1)
            fin_idx = nearest[finite]
            assign_counts += torch.bincount(fin_idx, minlength=k)
            hq = finite & (nearest_d < hq_thr)
            hq_counts += torch.bincount(nearest[hq], minlength=k)
            within += (nearest_d[:, None] < levels[None, :]).sum(dim=0)
            per_centre_min = torch.minimum(per_centre_min, dist.min(dim=0).values)

    n_finite = int(assign_counts.sum())
    if n_finite > 0:
        p = assign_counts.to(dtype) / n_finite
        nz = p > 0
        kl = float((p[nz] * torch.log(p[nz] * k)).sum())
        kl = max(kl, 0.0)  # rounding can give -1e-17 for an exactly uniform histogram
    else:
        kl = math.nan

    return {
        "mixture/modes": float((hq_counts > 0).sum()),
        "mixture/hq": float(hq_counts.sum()) / m,
        "mixture/reverse_kl": kl,
        "mixture/dyngan/modes": float((per_centre_min < sig).sum()),
        "mixture/dyngan/hq1": float(within[0]) / m,
        "mixture/dyngan/hq2": float(within[1]) / m,
        "mixture/dyngan/hq3": float(within[2]) / m,
        "mixture/dyngan/reverse_kl": kl,
    }


def _mixture_info(dataset: Any) -> tuple[list, float] | None:
    """``(centres, sigma)`` from ``dataset.info()`` when they are usable, else None."""
    info_fn = getattr(dataset, "info", None)
    if not callable(info_fn):
        return None
    info = info_fn()
    if not isinstance(info, dict) or "centres" not in info or "sigma" not in info:
        return None
    centres, sigma = info["centres"], info["sigma"]
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        return None
    if not (math.isfinite(sigma) and sigma > 0):
        return None
    try:
        rows = [list(map(float, row)) for row in centres]
    except (TypeError, ValueError):
        return None
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        return None
    if not all(math.isfinite(v) for r in rows for v in r):
        return None
    return rows, float(sigma)


class MixtureMetric(Metric):
    """Modes covered, sample quality and reverse KL for mixtures with known centres.

    Supports any dataset whose ``info()`` has ``centres`` (K x D) and a positive
    ``sigma``. ``real`` is not used. See the module docstring for the keys.
    """

    name = "mixture"
    protocol = PROTOCOL
    options = {
        "hq_sigmas": Option(3.0, "PacGAN high-quality threshold, in sigmas (distance < hq_sigmas*sigma)", min=0.0),
        "chunk_size": Option(
            None, "samples per chunk of the distance matrix (none: automatic)", type=int, min=1, nullable=True
        ),
    }

    def supports(self, dataset: Dataset) -> bool:
        return _mixture_info(dataset) is not None

    def compute(self, fake: "Tensor", real: "Tensor", dataset: Dataset) -> dict[str, float]:
        found = _mixture_info(dataset)
        if found is None:
            raise ValueError(
                f"metric 'mixture' needs a dataset whose info() gives 'centres' and a positive 'sigma'; "
                f"{dataset.describe() if hasattr(dataset, 'describe') else dataset!r} does not"
            )
        centres, sigma = found
        return mixture_stats(fake, centres, sigma, hq_sigmas=self.opts.hq_sigmas, chunk_size=self.opts.chunk_size)


@hookimpl
def register_metrics(register):
    register(MixtureMetric)
