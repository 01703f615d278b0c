"""``imbalanced-grid``: a grid of Gaussian modes with unequal weights.

The centres are those of the built-in ``grid25`` (``side`` x ``side`` points,
``spacing`` apart, centred on the origin), numbered row by row. The modes' weights
follow ``profile``:

- ``geometric``: mode i has weight proportional to ``ratio ** i``: with 25 modes
  and ratio 0.85 the last mode holds 1/50 of the first one's points;
- ``rare``: the last ``rare_modes`` modes share ``rare_fraction`` of the data
  equally, the others share the rest equally.

Mode i gets n * weight_i points, rounded by largest remainder so that the counts
add up to ``n`` exactly, and at least one point (taken from the largest mode), so
the training set is a pure function of the options and the seed. ``info()`` gives ``centres`` and ``sigma``
(so the built-in ``mixture`` metric applies), and also ``weights`` and
``counts``. Note that the metric's reverse KL compares the generated samples'
mode histogram with a *uniform* one, not with these weights.
"""

from __future__ import annotations

from typing import Any

from core import hookimpl
# OptionError (core.errors, re-exported here): bad option values, so the user gets "Error: ..." and exit 2
from core.components import Dataset, Option, OptionError

__version__ = "0.1.0"


def mode_weights(k: int, profile: str, ratio: float, rare_modes: int, rare_fraction: float) -> list[float]:
    """The ``k`` modes' weights (summing to 1) for a profile."""
    if profile == "geometric":
        raw = [ratio ** i for i in range(k)]
    elif profile == "rare":
        if rare_modes >= k:  # no common mode would be left: rare_fraction would mean nothing
            raise OptionError(f"dataset 'imbalanced-grid': rare_modes={rare_modes} leaves no common mode of the "
                              f"{k}; set -o dataset.rare_modes below {k}")
        r = rare_modes
        raw = [(1.0 - rare_fraction) / (k - r)] * (k - r) + [rare_fraction / r] * r
    else:
        raise OptionError(f"dataset 'imbalanced-grid': unknown profile {profile!r} (geometric or rare)")
    total = sum(raw)
    return [w / total for w in raw]


def mode_counts(n: int, weights: list[float]) -> list[int]:
    """Points per mode: ``n * weight`` rounded by largest remainder (summing to ``n``),
    then a mode left empty takes one point from the largest mode."""
    k = len(weights)
    if n < k:  # the options do not fit together: the user's to fix, so OptionError (exit 2)
        raise OptionError(f"dataset 'imbalanced-grid': n={n} is smaller than the number of modes ({k}); "
                          f"set -o dataset.n to at least {k} or a smaller -o dataset.side")
    share = [n * w for w in weights]
    counts = [int(s) for s in share]
    # largest remainder first, lower mode id on ties
    for i in sorted(range(k), key=lambda i: (-(share[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    for i in range(k):
        if counts[i] == 0:
            counts[max(range(k), key=lambda j: counts[j])] -= 1
            counts[i] = 1
    return counts


class ImbalancedGrid(Dataset):
    """A side x side grid of Gaussians whose modes hold unequal shares of the data."""

    name = "imbalanced-grid"
    default_model = "mlp"
    default_metrics = ("mixture",)
    options = {
        "n": Option(100_000, "number of training points", min=1),
        "side": Option(5, "modes per side", min=1),
        "spacing": Option(2.0, "distance between neighbouring centres", min=0.0),
        "sigma": Option(0.05, "standard deviation of each mode", min=0.0),
        "profile": Option("geometric", "geometric: weight ratio**i for mode i; rare: a few rare modes",
                          choices=("geometric", "rare")),
        "ratio": Option(0.85, "geometric profile: weight of mode i+1 over mode i", min=0.0, max=1.0),
        "rare_modes": Option(5, "rare profile: how many modes (the last ones) are rare", min=1),
        "rare_fraction": Option(0.02, "rare profile: fraction of the data in the rare modes together",
                                min=0.0, max=1.0),
    }

    def centres(self) -> list[list[float]]:
        side, s = self.opts.side, self.opts.spacing
        offs = [(i - (side - 1) / 2) * s for i in range(side)]
        return [[x, y] for x in offs for y in offs]

    def weights(self) -> list[float]:
        o = self.opts
        return mode_weights(o.side * o.side, o.profile, o.ratio, o.rare_modes, o.rare_fraction)

    def counts(self) -> list[int]:
        return mode_counts(int(self.opts.n), self.weights())

    def load(self, generator):
        import torch

        centres = torch.tensor(self.centres(), dtype=torch.float64)
        modes = torch.repeat_interleave(torch.arange(centres.shape[0]), torch.tensor(self.counts()))
        modes = modes[torch.randperm(modes.shape[0], generator=generator)]
        noise = torch.randn(modes.shape[0], 2, generator=generator, dtype=torch.float64)
        return (centres[modes] + self.opts.sigma * noise).to(torch.float32)

    def info(self) -> dict[str, Any]:
        return {"centres": self.centres(), "sigma": self.opts.sigma, "weights": self.weights(),
                "counts": self.counts()}


@hookimpl
def register_datasets(register):
    register(ImbalancedGrid)
