"""Data-parallel throughput on the CPU: `dyngan train` in 1 process vs `torchrun` with N (Gloo).

Both train the default grid25 setup (MLP 2x128, z 50, Adam, ns loss, 100,000 points) with
the same per-process batch size, so the effective batch of an N-process run is
``batch_size x N``. Throughput is read from rank 0's metrics.jsonl (``steps_per_s`` of each
log interval, the first interval dropped as warm-up), so start-up, the final evaluation and
the checkpoint do not count. Runs alternate between the world sizes to share machine noise;
the median over intervals and repeats is reported, with the load average before and after
(other work on the machine lowers both numbers, the multi-process one more).

    OMP_NUM_THREADS=1 python benchmarks/ddp_throughput.py [--steps 2000] [--log-every 200]
        [--repeats 2] [--nproc 2] [--batch-size 128]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rates(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["steps_per_s"] for r in recs if "steps_per_s" in r][1:]  # first interval: warm-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--log-every", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    env = dict(os.environ, DYNGAN_NO_PICTURES="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="dyngan-ddp-"))
    common = ["train", "--steps", str(args.steps), "--log-every", str(args.log_every), "--device", "cpu",
              "--batch-size", str(args.batch_size), "--checkpoint-every", "0", "--eval-every", "0", "--quiet"]
    load_before = os.getloadavg()
    per: dict[int, list[float]] = {1: [], args.nproc: []}
    n = 0
    for _ in range(args.repeats):
        for ws in per:
            n += 1
            out = tmp / f"r{n}-ws{ws}"
            if ws == 1:
                cmd = [sys.executable, "-m", "core", *common, "--out", str(out)]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ws),
                       "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "core", *common,
                       "--out", str(out)]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            per[ws].extend(rates(out))
    load_after = os.getloadavg()
    result: dict = {
        "benchmark": "ddp_throughput",
        "dataset": "grid25 (100,000 points)",
        "setup": "mlp 2x128, z 50, Adam 1e-3 (0.5, 0.999), ns loss; Gloo on CPU",
        "batch_size_per_process": args.batch_size,
        "omp_num_threads": env["OMP_NUM_THREADS"],
        "steps": args.steps,
        "repeats": args.repeats,
    }
    base = None
    for ws, rs in per.items():
        sps = statistics.median(rs)
        samples = sps * args.batch_size * ws
        base = base or samples
        result[f"world_size_{ws}"] = {
            "effective_batch": args.batch_size * ws,
            "steps_per_s": round(sps, 1),
            "samples_per_s": round(samples),
            "speedup_samples_per_s": round(samples / base, 3),
        }
    result.update({
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "torch": __import__("torch").__version__,
        "date": time.strftime("%Y-%m-%d"),
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
