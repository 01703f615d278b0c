"""Overhead of `dyngan train` against a bare hand-written PyTorch loop.

Both train the default grid25 setup (MLP 2x128, z 50, batch 128, Adam 1e-3 (0.5, 0.999),
non-saturating loss, 100,000 training points) in fresh processes; the bare loop is
``benchmarks/bare_loop.py``. The per-step time of each
is the difference of two run lengths divided by the difference of steps, so start-up,
imports and the final checkpoint cancel. Runs alternate between the two to share
machine noise; the median of the repeats is reported.

    python benchmarks/overhead.py [--short 1000] [--long 5000] [--repeats 3] [--threads 1]
                                  [--device cpu|cuda] [--batch-size 128] [--compile] [--no-startup]
                                  [--adam-impl fused|foreach|loop]   (both programs; default fused)

With ``--device cuda`` both programs run on the GPU and the bare loop synchronises once at
its end (``dyngan train`` does when it writes its final checkpoint); with ``--compile`` both
``torch.compile`` their two networks (compilation happens in both run lengths and cancels).

Prints one JSON line with the ratio (dyngan steps/s divided by bare steps/s: of the median
step times, and the median of each repeat's own ratio, with every repeat's) and the
start-up time of `dyngan train` (launch to the first step, from the run's `start` event,
and the part spent importing torch, the CLI and the plugins).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from core.config import ADAM_IMPL
from suite import machine

BARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bare_loop.py")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def first_step_delay(cmd: list[str], env: dict[str, str], run_dir: str) -> float:
    """Seconds from launching `dyngan train` to its first step (the run's `start` event)."""
    t = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("event") == "start":
                return rec["time"] - t
    raise RuntimeError("no start event in metrics.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=int, default=1000)
    ap.add_argument("--long", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both programs)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="torch.compile the networks in both programs")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    ap.add_argument("--adam-impl", choices=tuple(ADAM_IMPL), default="fused",
                    help="Adam's kernels in both programs (dyngan's default: fused)")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), DYNGAN_NO_PICTURES="1")
    tmp = tempfile.mkdtemp(prefix="dyngan-overhead-")

    def bare(steps: int) -> float:
        return timed([sys.executable, BARE, str(steps), "--threads", str(args.threads), "--batch-size",
                      str(args.batch_size), "--device", args.device, "--adam-impl", args.adam_impl]
                     + (["--compile"] if args.compile else []), env)

    run_id = [0]

    def dyngan_cmd(steps: int) -> tuple[list[str], str]:
        run_id[0] += 1
        out = os.path.join(tmp, f"r{run_id[0]}")
        return [sys.executable, "-m", "core", "train", "--steps", str(steps), "--out", out,
                "--device", args.device, "--threads", str(args.threads), "--quiet",
                "--batch-size", str(args.batch_size), "--compile" if args.compile else "--no-compile",
                "--checkpoint-every", "0", "--eval-every", "0", "--adam-impl", args.adam_impl], out

    def dyngan(steps: int) -> float:
        return timed(dyngan_cmd(steps)[0], env)

    per_bare, per_dyn, start_dyn = [], [], []
    if args.compile:
        # fill the compiler's caches first, so that the short and the long runs compile alike
        bare(10), dyngan(10)
    for _ in range(args.repeats):
        b_s, d_s, b_l, d_l = bare(args.short), dyngan(args.short), bare(args.long), dyngan(args.long)
        span = args.long - args.short
        per_bare.append((b_l - b_s) / span)
        per_dyn.append((d_l - d_s) / span)
        if not args.no_startup:
            cmd, out = dyngan_cmd(10)
            start_dyn.append(first_step_delay(cmd, env, out))
    pb, pd = statistics.median(per_bare), statistics.median(per_dyn)
    import torch

    result = {
        "benchmark": "overhead",
        "dataset": "grid25 (100,000 points)",
        "setup": f"mlp 2x128, z 50, batch {args.batch_size}, Adam 1e-3 (0.5, 0.999), ns loss",
        "device": args.device,
        "compile": args.compile,
        "adam_impl": args.adam_impl,
        "threads": args.threads,
        "steps": [args.short, args.long],
        "repeats": args.repeats,
        "bare_ms_per_step": round(pb * 1e3, 4),
        "dyngan_ms_per_step": round(pd * 1e3, 4),
        "bare_steps_per_s": round(1 / pb, 1),
        "dyngan_steps_per_s": round(1 / pd, 1),
        "ratio_dyngan_over_bare_steps_per_s": round(pb / pd, 4),
        # each repeat's own ratio: its four runs are back to back, so slow drifts of the machine cancel
        "ratio_per_repeat": [round(b / d, 3) for b, d in zip(per_bare, per_dyn)],
        "ratio_median_of_repeats": round(statistics.median(b / d for b, d in zip(per_bare, per_dyn)), 4),
    }
    if start_dyn:
        # import share of start-up: importing what `dyngan train` imports before it builds anything
        imp = timed([sys.executable, "-c", "import torch, core.cli, core.api, core.training; "
                     "from core.plugins import get_host; get_host()"], env)
        result.update(startup_to_first_step_s=round(statistics.median(start_dyn), 3), import_s=round(imp, 3),
                      import_share_of_startup=round(imp / statistics.median(start_dyn), 3))
    result.update(machine=machine(args.device), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
