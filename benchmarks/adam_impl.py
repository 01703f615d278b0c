"""Per-step time of `dyngan train` with each of torch's Adam kernels (`--adam-impl`).

    python benchmarks/adam_impl.py [--repeats 5] [--short 1000] [--long 5000] [--threads 1]
                                   [--device cpu|cuda] [--preset dyngan] [--impls fused,foreach,loop]

Each repeat runs every kernel choice at two lengths, back to back and in fresh processes; the
per-step time is the difference of the two run times over the difference of steps (start-up,
the final evaluation and the checkpoint cancel). Reported: each choice's median ms per step,
and for each choice against the last one (loop by default: torch's own CPU step, dyngan's
choice before fused was the default) the median of the per-repeat speed ratios, which share the
machine's state of that repeat. Prints one JSON line; the result goes into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import timed  # noqa: E402
from suite import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--short", type=int, default=1000)
    ap.add_argument("--long", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, help="e.g. dyngan (default: plain NS-GAN)")
    ap.add_argument("--dataset", default="grid25")
    ap.add_argument("--impls", default="fused,foreach,loop",
                    help="comma-separated; the last one is the baseline of the ratios")
    args = ap.parse_args()
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if args.long <= args.short or not impls:
        ap.error("--long must exceed --short, and --impls must name at least one choice")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), DYNGAN_NO_PICTURES="1")
    tmp = tempfile.mkdtemp(prefix="dyngan-adam-impl-")
    n = [0]

    def run(impl: str, steps: int) -> float:
        n[0] += 1
        cmd = [sys.executable, "-m", "core", "train", "--out", os.path.join(tmp, f"r{n[0]}"), "--quiet",
               "--steps", str(steps), "--dataset", args.dataset, "--device", args.device,
               "--threads", str(args.threads), "--checkpoint-every", "0", "--eval-every", "0",
               "--adam-impl", impl] + (["--preset", args.preset] if args.preset else [])
        return timed(cmd, env)

    per_step: dict[str, list[float]] = {i: [] for i in impls}
    span = args.long - args.short
    for r in range(args.repeats):
        for impl in impls:
            short, long_ = run(impl, args.short), run(impl, args.long)
            per_step[impl].append((long_ - short) / span)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{i} {per_step[i][-1] * 1e3:.3f} ms/step" for i in impls), file=sys.stderr, flush=True)
    base = impls[-1]
    import torch

    result = {
        "benchmark": "adam_impl",
        "dataset": args.dataset,
        "preset": args.preset,
        "device": args.device,
        "threads": args.threads,
        "steps": [args.short, args.long],
        "repeats": args.repeats,
        "ms_per_step": {i: round(statistics.median(v) * 1e3, 4) for i, v in per_step.items()},
        f"speedup_over_{base}_per_repeat": {i: [round(b / a, 3) for a, b in zip(per_step[i], per_step[base])]
                                            for i in impls[:-1]},
        f"speedup_over_{base}_median": {i: round(statistics.median(b / a for a, b in
                                                                   zip(per_step[i], per_step[base])), 4)
                                        for i in impls[:-1]},
        "machine": machine(args.device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
