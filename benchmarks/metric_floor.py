"""What the metrics give the data itself: each protocol's metrics scored on draws of its training set.

A generator that reproduced the training data exactly would score this, so it is the ceiling of
the high-quality fractions and the floor of the reverse KL for each protocol at its sample count:
a KL of 0 is out of reach with a finite sample (a uniform draw of n samples over K bins leaves a
KL of about (K - 1) / 2n), and a Gaussian mode puts only part of its mass within 3 sigma (in 2D,
1 - exp(-9/2) = 0.989). Each protocol is scored through the same components and ``score`` as
``dyngan evaluate``: the dataset as ``dyngan train --seed S`` builds it, then ``n`` training points
drawn with replacement (seeded), passed to the metrics as the "generated" samples.

    python benchmarks/metric_floor.py [--draws 5] [--out benchmarks/results/metric_floor.jsonl]

Prints one line per protocol (mean and range over the draws) and appends them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: protocol name -> (dyngan train settings, samples scored: the suite's eval_samples for it)
PROTOCOLS = {
    "grid25 (PacGAN)": ({"dataset": "grid25"}, 2500),
    "ring8 (PacGAN)": ({"dataset": "ring8"}, 2500),
    "grid25 (DynGAN code)": ({"dataset": "grid25", "options": {"dataset": {"points_per_mode": 50, "sigma": 0.1}}},
                             10000),
    "ring8 (DynGAN code)": ({"dataset": "ring8",
                             "options": {"dataset": {"points_per_mode": 50, "radius": 2, "sigma": 0.05}}}, 10000),
    "stacked-digits": ({"dataset": "stacked-digits"}, 26000),
}


def floor(settings: dict, n: int, draws: int, seed: int = 0) -> dict:
    import torch

    from core.api import resolve_settings
    from core.plugins import get_host
    from core.training import instantiate, load_dataset, score

    host = get_host()
    cfg = resolve_settings(settings | {"seed": seed}, host)
    comps = instantiate(cfg, host.registry)
    real = load_dataset(comps, seed)
    per_draw = []
    for d in range(draws):
        gen = torch.Generator().manual_seed(1000 + d)
        idx = torch.randint(real.shape[0], (n,), generator=gen)
        values, _ = score(comps, real[idx], real)
        per_draw.append(values)
    keys = [k for k in per_draw[0] if not k.endswith(("max_modes", "classifier_accuracy", "/n"))]
    summary = {k: {"mean": sum(v[k] for v in per_draw) / draws, "min": min(v[k] for v in per_draw),
                   "max": max(v[k] for v in per_draw)} for k in keys}
    return {"training_points": int(real.shape[0]), "samples": n, "draws": draws, "metrics": summary}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="protocol names (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "metric_floor.jsonl")
    args = ap.parse_args()
    import torch
    from suite import machine

    torch.set_num_threads(1)
    for name, (settings, n) in PROTOCOLS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        rec = {"protocol": name, "settings": settings, **floor(settings, n, args.draws),
               "date": time.strftime("%Y-%m-%d"), "machine": machine(), "wall_s": round(time.perf_counter() - t0, 1)}
        shown = ", ".join(f"{k} {v['mean']:.4g} [{v['min']:.4g}, {v['max']:.4g}]" for k, v in rec["metrics"].items())
        print(f"{name}: {rec['training_points']:,} training points, {n:,} samples x {args.draws} draws: {shown}")
        with args.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
