"""2D Gaussian mixtures: ring8 and grid25.

Defaults follow the PacGAN / VEEGAN protocol (100,000 fixed training points);
``points_per_mode``, ``sigma`` and ``radius`` / ``spacing`` select the DynGAN
code's protocol (e.g. ``-o dataset.points_per_mode=50 -o dataset.sigma=0.1``).
The training set is drawn once from the run's seed and then kept fixed.
"""

from __future__ import annotations

import math
from typing import Any

from core import hookimpl
from core.components import Dataset, Option
from core.errors import OptionError

#: the most training points a 2D mixture makes (n, or points_per_mode times the modes): a hundred
#: times the default; more can only be a typo, and would allocate gigabytes before failing
MAX_POINTS = 10_000_000
#: the most modes (ring8's modes, grid25's side squared)
MAX_MODES = 10_000


class _Mixture(Dataset):
    default_model = "mlp"
    default_metrics = ("mixture",)

    def centres(self) -> list[list[float]]:
        raise NotImplementedError

    @classmethod
    def mode_count(cls, opts) -> int:
        raise NotImplementedError

    @classmethod
    def resolve_options(cls, values):
        out = super().resolve_options(values)
        ppm = out.get("points_per_mode")
        if ppm is not None and "n" in values and out["n"] != cls.options["n"].default:
            # one of the two would be ignored, and config.json would state a size the data do not have
            raise OptionError(f"{cls.describe()}: give n={out['n']} or points_per_mode={ppm}, not both "
                              f"(points_per_mode makes points_per_mode x modes points)")
        if ppm is not None:
            modes = cls.mode_count(out)
            if ppm * modes > MAX_POINTS:
                raise OptionError(f"{cls.describe()}: points_per_mode={ppm} with {modes} modes makes "
                                  f"{ppm * modes} points, more than {MAX_POINTS}")
        return out

    def load(self, generator):
        import torch

        centres = torch.tensor(self.centres(), dtype=torch.float64)
        k = centres.shape[0]
        if self.opts.points_per_mode is not None:
            # DynGAN code: the same number of points in every mode
            modes = torch.arange(k).repeat_interleave(self.opts.points_per_mode)
        else:
            modes = torch.randint(k, (self.opts.n,), generator=generator)
        noise = torch.randn(modes.shape[0], 2, generator=generator, dtype=torch.float64)
        return (centres[modes] + self.opts.sigma * noise).to(torch.float32)

    def info(self) -> dict[str, Any]:
        return {"centres": self.centres(), "sigma": self.opts.sigma}


_COMMON = {
    "n": Option(100_000, "number of training points (PacGAN protocol)", min=1, max=MAX_POINTS),
    "points_per_mode": Option(
        None, "points per mode instead of n (DynGAN code: 50)", type=int, min=1, max=MAX_POINTS, nullable=True
    ),
}


class Ring8(_Mixture):
    """Eight Gaussians evenly spaced on a circle."""

    name = "ring8"
    options = {
        **_COMMON,
        "radius": Option(1.0, "radius of the ring (DynGAN code: 2)", min=0.0),
        "sigma": Option(0.01, "standard deviation of each mode (DynGAN code: 0.05)", min=0.0),
        "modes": Option(8, "number of modes on the ring", min=1, max=MAX_MODES),
    }

    @classmethod
    def mode_count(cls, opts) -> int:
        return int(opts["modes"])

    def centres(self) -> list[list[float]]:
        r, k = self.opts.radius, self.opts.modes
        # k distinct angles: 2*pi*i/k for i < k (never linspace with the endpoint)
        return [[r * math.cos(2 * math.pi * i / k), r * math.sin(2 * math.pi * i / k)] for i in range(k)]


class Grid25(_Mixture):
    """A 5x5 grid of Gaussians, centres {-4,-2,0,2,4}^2."""

    name = "grid25"
    options = {
        **_COMMON,
        "spacing": Option(2.0, "distance between neighbouring centres", min=0.0),
        "sigma": Option(0.05, "standard deviation of each mode (DynGAN code: 0.1)", min=0.0),
        "side": Option(5, "modes per side", min=1, max=100),
    }

    @classmethod
    def mode_count(cls, opts) -> int:
        return int(opts["side"]) ** 2

    def centres(self) -> list[list[float]]:
        side, s = self.opts.side, self.opts.spacing
        offs = [(i - (side - 1) / 2) * s for i in range(side)]
        return [[x, y] for x in offs for y in offs]


@hookimpl
def register_datasets(register):
    register(Ring8)
    register(Grid25)
