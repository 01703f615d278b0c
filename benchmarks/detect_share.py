"""Share of a DynGAN run spent in detection and partitioning, one run at a time.

    python benchmarks/detect_share.py [--seeds 3] [--steps 30000] [--jobs 1] [--device cpu]
                                      [--json benchmarks/results/detect_share.jsonl]

Runs ``dyngan train --preset dyngan`` on grid25 (PacGAN protocol: 100,000 training points,
the default intervals: a detection pass over all points every 500 steps, a partition check
every 3,000) in fresh processes with one torch thread, through the benchmark suite's runner,
and prints per run: wall time (the whole process: start-up, 30,000 steps, final metrics),
detection and partition seconds (from the run's own event records), the time of one detection
pass, and their share of the wall time. With ``--jobs 1`` nothing
else of ours runs beside it; the suite's tables run two at a time and small training steps
suffer more from a shared core than the large matrix products of a detection pass do, which
lowers their share. ``--json FILE`` appends the whole measurement (date, commit, machine,
every run's times) to FILE as one JSON line: the raw record behind BENCHMARKS.md's table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="training device (cpu, cuda, cuda:N)")
    # the preset as it is now, with dyngan's default (fused) Adam (the older tables' runs keep the
    # preset's former detector rule, or the per-tensor Adam step they were trained with)
    ap.add_argument("--table", default="dyngan-grid25-fused-1207", choices=[t for t in suite.TABLES if "grid25" in t])
    ap.add_argument("--json", metavar="FILE", default=None, help="append the measurement to FILE as one JSON line")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dyngan-share-"))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        recs = list(pool.map(lambda s: suite.run_one(args.table, "dyngan", s, args.steps, work,
                                                         args.device), range(args.seeds)))
    steps = args.steps or suite.TABLES[args.table]["steps"]
    every = 500
    print(f"machine: {suite.machine(args.device)}; load average at the end: {os.getloadavg()[0]:.2f}; jobs {args.jobs}")
    print("| seed | wall s | detect s | partition s | ms per detection pass | share |")
    print("|---|---|---|---|---|---|")
    shares = []
    for r in recs:
        if r["rc"] != 0:
            print(f"| {r['seed']} | failed: {r.get('error')} |")
            continue
        share = (r["detect_s"] + r["partition_s"]) / r["wall_s"]
        shares.append(share)
        per_pass = 1000 * r["detect_s"] / max(1, steps // every)
        print(f"| {r['seed']} | {r['wall_s']:.1f} | {r['detect_s']:.2f} | {r['partition_s']:.2f} | "
              f"{per_pass:.0f} | {100 * share:.2f}% |")
    if shares:
        print(f"mean share {100 * statistics.mean(shares):.2f}% (max {100 * max(shares):.2f}%)")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
        rec = {"benchmark": "detect_share", "date": datetime.date.today().isoformat(), "commit": commit,
               "machine": suite.machine(args.device), "load_average_at_end": round(os.getloadavg()[0], 2),
               "table": args.table, "steps": steps, "detect_every": every, "jobs": args.jobs,
               "runs": [{k: r.get(k) for k in ("seed", "rc", "wall_s", "detect_s", "partition_s", "error")}
                        for r in recs],
               "mean_share": round(statistics.mean(shares), 5) if shares else None,
               "max_share": round(max(shares), 5) if shares else None}
        with open(args.json, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
