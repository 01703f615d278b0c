"""The DynGAN authors' 2D procedure as a single-file oracle, to compare dyngan against.

    python benchmarks/reference_2d.py --deltas 0.04 0.2 1.0 --seeds 6 --jobs 2

Written for this project from a reading of the authors' `synthetic/train.py` (GitHub
HelloSeeing/DynGAN; see ../shared/reference/dyngan.md), keeping the choices of theirs that a
rewrite would naturally "fix", because they are what is being measured:

- grid 5x5 (spacing 2, sigma 0.1, 50 points per mode, 1,250 points), shuffled epochs of batch 128
  with the last partial batch dropped; MLPs 2x128 (G ReLU, D LeakyReLU 0.1, sigmoid output), weights
  N(0, 0.02) and zero biases; z 50 plus a 30-slot one-hot, the same one-hot appended to D's input;
  non-saturating BCE, Adam 1e-3 (0.5, 0.999), fake conditions drawn from the prior;
- every 500 steps: D over all points with their labels, score = 0.9 score + 0.1 D, collapsed = score
  above 1/(1+delta);
- every 3,000 steps, if at least 1% collapsed and a slot is free: each old partition's collapsed
  points go to one new condition (the last slot once the 30 are used), then Lloyd iterations in
  D's penultimate features from the resulting assignment, the Euclidean distance of each point to
  the centre of its post-split cluster multiplied by its score (fixed through the iterations), an
  empty cluster's centre at the origin, until the centres move less than 1e-4; prior = sizes;
- after 30,000 steps: 10,000 samples, modes = centres with a sample within 1 sigma, HQ = fraction
  within 3 sigma of the nearest centre, KL of the nearest-centre histogram (nats).

It is seeded (theirs is not) and computes the detection in one batch (theirs loops per point, the
same values). It is not dyngan's code path: agreement between the two is evidence, not identity.
Results go to benchmarks/results/reference_2d.jsonl (one line per delta and seed; a pair already
there is skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import _mean_se  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "reference_2d.jsonl"
BATCH, Z, SLOTS, HIDDEN, LAM, TAU, EVERY_DETECT, EVERY_PART, SIGMA = 128, 50, 30, 128, 0.1, 0.01, 500, 3000, 0.1


def _lloyd(feats, labels, scores, tol=1e-4, max_iter=1000):
    import numpy as np

    k = labels.max() + 1
    centres, new = np.zeros((k, feats.shape[1])), labels.copy()
    weight = np.ones((len(feats), k))
    weight[np.arange(len(feats)), labels] = scores
    for _ in range(max_iter):
        moved = np.zeros_like(centres)
        for c in range(k):
            members = np.where(new == c)[0]
            if len(members):
                moved[c] = feats[members].mean(0)
        if np.linalg.norm(moved - centres) < tol:
            break
        centres = moved
        new = (np.linalg.norm(feats[:, None, :] - centres[None], axis=2) * weight).argmin(1)
    return new


def run(delta: float, seed: int, steps: int = 30000) -> dict:
    import numpy as np
    import torch
    from torch import nn

    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    axis = np.linspace(-4, 4, 5)
    gx, gy = np.meshgrid(axis, axis)
    centres = np.stack((gx.ravel(), gy.ravel()), 1)
    data = np.repeat(centres, 50, 0) + np.random.normal(size=(1250, 2)) * SIGMA
    n = len(data)
    labels = np.zeros(n, dtype=np.int64)
    points = torch.from_numpy(data).float()

    def small_normal(m):
        if type(m) is nn.Linear:
            nn.init.normal_(m.weight, 0, 0.02)
            nn.init.zeros_(m.bias)

    G = nn.Sequential(nn.Linear(Z + SLOTS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                      nn.Linear(HIDDEN, 2))
    G.apply(small_normal)

    class CondD(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(2 + SLOTS, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
            self.l3, self.act = nn.Linear(HIDDEN, 1), nn.LeakyReLU(0.1)

        def forward(self, x, c):
            f = self.act(self.l2(self.act(self.l1(torch.cat([x, c], 1)))))
            return torch.sigmoid(self.l3(f)), f

    D = CondD()
    D.apply(small_normal)
    opt_d = torch.optim.Adam(D.parameters(), 1e-3, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), 1e-3, betas=(0.5, 0.999))
    bce, real, fake = nn.BCELoss(), torch.ones(BATCH), torch.zeros(BATCH)
    logits, active, onehot = torch.zeros(1), 1, torch.eye(SLOTS)

    def latent(m):
        c = torch.distributions.Categorical(torch.softmax(logits, 0)).sample((m,))
        return torch.cat([torch.randn(m, Z), onehot[c]], 1), c

    scores, collapsed = np.zeros(n), []
    step, partitions, first, t0 = 0, 0, None, time.perf_counter()
    while step < steps:
        order = np.random.permutation(n)
        for start in range(0, n - BATCH + 1, BATCH):
            idx = order[start:start + BATCH]
            x, y = points[idx], onehot[torch.from_numpy(labels[idx])]
            opt_d.zero_grad()
            z, c = latent(BATCH)
            xf = G(z).detach()
            (bce(D(x, y)[0].squeeze(), real) + bce(D(xf, onehot[c])[0].squeeze(), fake)).backward()
            opt_d.step()
            opt_g.zero_grad()
            z, c = latent(BATCH)
            bce(D(G(z), onehot[c])[0].squeeze(), real).backward()
            opt_g.step()
            step += 1
            if step % EVERY_DETECT == 0:
                with torch.no_grad():
                    value, feats = D(points, onehot[torch.from_numpy(labels)])
                scores = (1 - LAM) * scores + LAM * value.squeeze().double().numpy()
                collapsed, feats = list(np.where(scores > 1 / (1 + delta))[0]), feats.numpy()
            if len(collapsed) / n >= TAU and active < SLOTS and step % EVERY_PART == 0:
                partitions += 1
                first = first or step
                opened = {}
                for i in collapsed:
                    old = labels[i]
                    if old not in opened:
                        if active < SLOTS:
                            active += 1
                            logits = torch.cat([logits, torch.tensor([-1000.0])])
                        opened[old] = active - 1
                    labels[i] = opened[old]
                labels = _lloyd(feats, labels, scores)
                sizes = np.bincount(labels, minlength=active)[:active] / n
                logits = torch.log(torch.tensor(sizes, dtype=torch.float32) + 1e-7)
            if step >= steps:
                break
    with torch.no_grad():
        samples = G(latent(10000)[0]).numpy()
    dist = np.linalg.norm(samples[:, None, :] - centres[None], axis=2)
    hist = np.bincount(dist.argmin(1), minlength=25) / len(samples)
    hist = hist[hist > 0]
    return {"delta": delta, "seed": seed, "steps": steps,
            "modes": int(np.count_nonzero((dist < SIGMA).sum(0))),
            "hq3": float((dist < 3 * SIGMA).sum()) / len(samples),
            "reverse_kl": float(np.sum(hist * np.log(hist * 25))),
            "conditions": active, "partitions": partitions, "first_partition": first,
            "seconds": round(time.perf_counter() - t0, 1)}


def _summary(rows: list[dict]) -> str:
    def ms(key):
        return _mean_se([float(r[key]) for r in rows])

    return (f"delta {rows[0]['delta']}: {len(rows)} seeds, modes {ms('modes')}, HQ {ms('hq3')}, "
            f"KL {ms('reverse_kl')}, conditions {ms('conditions')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deltas", nargs="+", type=float, default=[0.2])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30000)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    done = []
    if args.results.exists():
        done = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    have = {(r["delta"], r["seed"], r["steps"]) for r in done}
    todo = [(d, s) for d in args.deltas for s in range(args.seeds) if (d, s, args.steps) not in have]
    print(f"{len(todo)} runs to do ({len(done)} in {args.results})", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(run, *zip(*todo), [args.steps] * len(todo)) if todo else []:
            row["date"] = time.strftime("%Y-%m-%d")
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            done.append(row)
    for d in args.deltas:
        rows = [r for r in done if r["delta"] == d and r["steps"] == args.steps and r["seed"] < args.seeds]
        if rows:
            print(_summary(rows))


if __name__ == "__main__":
    main()
