"""What one training step launches: `dyngan train`'s loop against the bare loop (bare_loop.py).

    python benchmarks/loop_profile.py [--device cuda] [--batch-size 128] [--steps 200]

Runs both loops in this process under ``torch.profiler`` (grid25, MLP 2x128, ns loss) and
prints the time per step of each loop, measured before any profiling (median of 3 timed
blocks, the device synchronised around each), then, per step, the number of operator calls, of
CUDA kernels and of CUDA runtime calls (launches, copies, synchronisations), with the names
whose counts differ most. Used to find where `dyngan train` spends more than the bare loop.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
from bare_loop import build as build_bare
from torch.profiler import ProfilerActivity, profile


def dyngan_loop(dev: torch.device, B: int, work: str):
    """The Trainer's own loop, built once and stepped ``steps`` more at each call."""
    from core import api
    from core.plugins import get_host
    from core.training import Trainer

    out = os.path.join(work, "r")
    shutil.rmtree(out, ignore_errors=True)
    host = get_host()
    settings = {"dataset": "grid25", "seed": 0, "device": str(dev), "batch_size": B, "steps": 10**9,
                "log_every": 10**9, "eval_every": 0, "checkpoint_every": 0, "out": out}
    cfg, run_dir = api.prepare(settings, host=host)
    tr = Trainer(cfg, host.registry, run_dir, quiet=True)
    # each call ends at its last step, where the loop would log, evaluate and save: not measured here
    tr._log_step = tr._eval = tr.save = lambda *a, **k: None

    class _NoFlag:
        signum = None

    def run(steps: int) -> None:
        tr.cfg["steps"] = tr.step + steps
        tr._loop(None, _NoFlag())

    return run


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def counts(run, dev: torch.device, steps: int) -> tuple[collections.Counter, collections.Counter]:
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    with profile(activities=acts) as prof:
        run(steps)
        sync(dev)
    ops, kernels = collections.Counter(), collections.Counter()
    for e in prof.events():
        kind = str(getattr(e, "device_type", "")).rsplit(".", 1)[-1]
        (kernels if kind == "CUDA" else ops)[e.name] += 1
    return ops, kernels


def per_step_ms(run, dev: torch.device, steps: int) -> float:
    times = []
    for _ in range(3):
        sync(dev)
        t = time.perf_counter()
        run(steps)
        sync(dev)
        times.append((time.perf_counter() - t) / steps * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    os.environ["DYNGAN_NO_PICTURES"] = "1"
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    work = tempfile.mkdtemp(prefix="dyngan-prof-")
    loops = {"bare": build_bare(dev, args.batch_size)[2], "dyngan": dyngan_loop(dev, args.batch_size, work)}
    res: dict = {"device": args.device, "batch": args.batch_size, "torch": torch.__version__}
    for name, run in loops.items():
        run(50)  # warm-up: allocator, cuBLAS handles, the optimisers' state
    # timed before any profiling: a profiler can leave per-launch callbacks behind it
    for name, run in loops.items():
        res[f"{name}_ms_per_step"] = round(per_step_ms(run, dev, args.steps * 2), 4)
    prof = {name: counts(run, dev, args.steps) for name, run in loops.items()}
    (bo, bk), (do, dk) = prof["bare"], prof["dyngan"]
    n = args.steps
    runtime = ("cuda", "cu")  # runtime and driver API calls are CPU events named cuda*/cu*
    res["per_step"] = {
        "operators (aten::)": [round(sum(v for k, v in c.items() if k.startswith("aten::")) / n, 1) for c in (bo, do)],
        "cuda kernels": [round(sum(c.values()) / n, 1) for c in (bk, dk)],
        "cuda runtime calls": [round(sum(v for k, v in c.items() if k.startswith(runtime)) / n, 1) for c in (bo, do)],
    }
    for label, (a, b) in {"ops": (bo, do), "kernels": (bk, dk)}.items():
        diff = sorted(((b[k] - a[k]) / n, k) for k in set(a) | set(b))
        res[f"{label}_more_in_dyngan"] = {k: round(d, 2) for d, k in diff[::-1][: args.top] if d > 0}
        res[f"{label}_fewer_in_dyngan"] = {k: round(d, 2) for d, k in diff[: args.top // 2] if d < 0}
    res["runtime_calls_per_step"] = {k: [round(bo[k] / n, 2), round(do[k] / n, 2)]
                                     for k in sorted(set(bo) | set(do)) if k.startswith(runtime)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
