"""How fast `dyngan --help` and `dyngan --version` answer (they must not import torch).

    python benchmarks/cli_startup.py [--repeats 10]

Runs the installed console script in fresh processes and prints one JSON line with the
median and maximum wall time of each, next to a bare `python -c pass` for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    exe = shutil.which("dyngan") or os.path.join(os.path.dirname(sys.executable), "dyngan")
    cases = {"dyngan --help": [exe, "--help"], "dyngan --version": [exe, "--version"],
             "python -c pass": [sys.executable, "-c", "pass"]}
    out = {"benchmark": "cli_startup", "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    for name, cmd in cases.items():
        wall(cmd)  # warm the file cache
        ts = [wall(cmd) for _ in range(args.repeats)]
        out[name] = {"median_s": round(statistics.median(ts), 4), "max_s": round(max(ts), 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
