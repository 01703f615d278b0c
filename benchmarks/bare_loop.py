"""The bare hand-written PyTorch loop that `dyngan train` is measured against.

    python benchmarks/bare_loop.py STEPS [--threads 1] [--batch-size 128] [--device cpu] [--compile]
                                         [--adam-impl fused|foreach|loop]

Trains dyngan's default grid25 setup written out by hand: the `mlp` model's networks (G: z 50
-> 128 -> 128 -> 2 with ReLU; D: 2 -> 128 -> 128 -> 1 with LeakyReLU 0.1), Adam 1e-3
(0.5, 0.999) with the kernels `dyngan train --adam-impl` would use (fused by default, as there),
the non-saturating loss, 100,000 fixed points of the 5x5 grid. No logging, no
metrics, no checkpoint; on CUDA it synchronises once, at its end.

`overhead.py` runs it as its own process (start-up cancels between two run lengths);
`loop_profile.py` builds it with :func:`build` and steps it inside its own process.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.config import ADAM_IMPL

N_POINTS, Z_DIM = 100_000, 50


def build(dev: torch.device, batch: int, compile_: bool = False, adam_impl: str = "fused"
          ) -> tuple[nn.Module, nn.Module, Callable[[int], None]]:
    """(G, D, run): ``run(steps)`` trains ``steps`` more steps, without synchronising."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(Z_DIM, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                      nn.Linear(128, 2)).to(dev)
    D = nn.Sequential(nn.Linear(2, 128), nn.LeakyReLU(0.1), nn.Linear(128, 128), nn.LeakyReLU(0.1),
                      nn.Linear(128, 1)).to(dev)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999), **ADAM_IMPL[adam_impl])
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999), **ADAM_IMPL[adam_impl])
    grid = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    centres = torch.cartesian_prod(grid, grid)
    data = (centres[torch.randint(25, (N_POINTS,))] + 0.05 * torch.randn(N_POINTS, 2)).to(dev)
    Gc, Dc = (torch.compile(G), torch.compile(D)) if compile_ else (G, D)

    def run(steps: int) -> None:
        for _ in range(steps):
            x = data[torch.randint(N_POINTS, (batch,), device=dev)]
            with torch.no_grad():
                fake = Gc(torch.randn(batch, Z_DIM, device=dev))
            loss_d = F.softplus(-Dc(x)).mean() + F.softplus(Dc(fake)).mean()
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = F.softplus(-Dc(Gc(torch.randn(batch, Z_DIM, device=dev)))).mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()

    return G, D, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("steps", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--adam-impl", choices=tuple(ADAM_IMPL), default="fused")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    run = build(dev, args.batch_size, args.compile, args.adam_impl)[2]
    run(args.steps)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


if __name__ == "__main__":
    main()
