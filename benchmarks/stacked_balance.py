"""Where a stacked-digits run's reverse KL comes from: the digit classes of each channel, or their mix.

The stacked-modes KL of n samples splits exactly into two parts:

    KL(p || uniform over 1000 triples) = sum over channels c of KL(p_c || uniform over 10 digits)
                                         + total correlation of p (>= 0)

where p is the histogram of predicted triples and p_c that of channel c's digit. The first part
is each channel drawing some digits more often than others; the second is the channels' digits
depending on each other (including the finite sample's own noise: a draw of the data itself
leaves about 0.02 there at 26,000 samples). The script draws ``--n`` samples from the run (its G
average when it keeps one, or ``--generator raw``) and as many images of its training set, and
prints both decompositions with each channel's class shares; ``--json`` prints one JSON object.

    python benchmarks/stacked_balance.py RUN_DIR [--n 26000] [--seed 0] [--generator auto|ema|raw] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def decompose(pred) -> dict:
    """``pred``: ``(n, C)`` predicted digit classes; the KL of the tuples and its split."""
    from dyngan_plugins.digits import kl_to_uniform, tuple_counts

    n, channels = pred.shape
    kl = kl_to_uniform(tuple_counts(pred))
    shares, marginal = [], []
    for ch in range(channels):
        c = tuple_counts(pred[:, ch:ch + 1])
        shares.append([round(float(v), 4) for v in c / n])
        marginal.append(kl_to_uniform(c))
    return {"n": n, "kl": kl, "marginal_kl": marginal, "marginal_kl_sum": sum(marginal),
            "dependence": kl - sum(marginal), "class_shares": shares}


def analyse(run_dir: str | Path, n: int = 26000, seed: int = 0, generator: str = "auto") -> dict:
    import torch

    from core.api import load_run
    from dyngan_plugins.digits import digit_classifier, digit_tuples

    run = load_run(run_dir, generator=generator)
    info = run.info
    channels = int(info.get("digit_channels", 0) or 0)
    if not channels:
        from core.errors import UsageError

        raise UsageError(f"{run_dir}: its dataset {run.cfg['dataset']!r} has no digit channels; this script reads "
                         "stacked-digits runs")
    clf = digit_classifier()
    fake = run.generate(n, seed=seed)
    real = run.real
    idx = torch.randint(real.shape[0], (n,), generator=torch.Generator().manual_seed(seed))
    return {"run": str(run_dir), "generator": run.weights, "step": run.step,
            "samples": decompose(digit_tuples(clf, fake, channels)),
            "data": decompose(digit_tuples(clf, real[idx], channels))}


def _show(label: str, d: dict) -> str:
    lines = [f"{label}: KL {d['kl']:.4f} = per-channel digit balance {d['marginal_kl_sum']:.4f} "
             f"({', '.join(f'{v:.4f}' for v in d['marginal_kl'])}) + dependence {d['dependence']:.4f}"]
    for ch, shares in enumerate(d["class_shares"]):
        lines.append(f"  channel {ch} digit shares 0-9: " + " ".join(f"{s:.3f}" for s in shares))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--n", type=int, default=26000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generator", default="auto", choices=("auto", "ema", "raw"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from core.errors import DynganError

    try:
        result = analyse(args.run_dir, args.n, args.seed, args.generator)
    except DynganError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(_show(f"{args.n:,} samples of {args.run_dir}", result["samples"]))
        print(_show(f"{args.n:,} draws of its training set", result["data"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
