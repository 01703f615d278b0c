"""Checks of the CUDA path that the CPU test suite cannot make (run on a machine with a GPU).

    python benchmarks/cuda_checks.py [--device cuda] [--steps 300]

1. No host synchronisation in the hot loop, seen by CUDA itself: each training case of
   ``tests/test_pipeline.py`` (ns, wgan-gp, dyngan with detection and partitioning, the G
   weight average) trains on the GPU with ``torch.cuda.set_sync_debug_mode("warn")`` switched
   on while the loop runs and off inside the periodic phases (logging, evaluation, checkpoint,
   detection, partitioning). Every synchronising CUDA call left is counted with the Python line
   that made it and the innermost line of this repository's code above it. This also catches syncs that no Tensor method shows (boolean-mask indexing,
   ``nonzero``, a host-side branch on a device value).
2. A DynGAN run trained on the GPU, with partitions, resumes from its checkpoint on the GPU and
   on the CPU with the same labels and prior, and ``dyngan evaluate`` reads it on the CPU.

Prints one JSON object; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from core import api
from core import checkpoint as ckpt_io
from core import rundir
from core.plugins import get_host
from core.training import Trainer

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "ns": {},
    "wgan-gp": {"loss": "wgan-gp"},
    "dyngan": {"preset": "dyngan", "options": {"dataset": {"n": 2000}, "detector": {"every": 50},
                                               "partitioner": {"every": 100}}},
    "g-ema": {"g_ema": 0.99},
    # shuffled epochs (a new permutation every 15 steps of 2,000 points, on the device), and the G
    # step drawing its own fake conditions
    "epoch": {"sampling": "epoch", "options": {"dataset": {"n": 2000}}},
    "prior-fresh": {"preset": "dyngan", "options": {"dataset": {"n": 2000}, "conditioner": {
        "fake_conditions": "prior-fresh"}}},
}


def base(out: Path, device: str, steps: int) -> dict:
    return {"dataset": "grid25", "seed": 0, "device": device, "log_every": 100, "eval_every": 0,
            "checkpoint_every": 0, "steps": steps, "out": str(out), "options": {"dataset": {"n": 2000}}}


def count_syncs(settings: dict) -> tuple[collections.Counter, int]:
    """Train with CUDA's sync debugging on outside the periodic phases; (syncs by line, steps)."""
    import core.training as T

    on_cuda = str(settings["device"]).startswith("cuda")

    def set_mode(mode: str) -> None:  # on the CPU (a dry run of this script) there is nothing to watch
        if on_cuda:
            torch.cuda.set_sync_debug_mode(mode)

    depth = {"phase": 0}
    originals = {}

    def wrap(name):
        orig = originals[name] = getattr(T.Trainer, name)

        def wrapper(self, *a, **k):
            if name == "_loop":
                set_mode("warn")
                try:
                    return orig(self, *a, **k)
                finally:
                    set_mode("default")
            depth["phase"] += 1
            set_mode("default")
            try:
                return orig(self, *a, **k)
            finally:
                depth["phase"] -= 1
                if not depth["phase"]:
                    set_mode("warn")

        setattr(T.Trainer, name, wrapper)

    for n in ("_loop",) + T.Trainer.PERIODIC_PHASES:
        wrap(n)
    syncs: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        # the line that made the call (often inside torch) and the innermost line of ours above it
        ours = [(p, f.lineno) for f in traceback.extract_stack()[:-1]
                if (p := Path(f.filename).resolve()).is_relative_to(ROOT) and p != Path(__file__).resolve()]
        via = f" via {ours[-1][0].relative_to(ROOT)}:{ours[-1][1]}" if ours else ""
        syncs[f"{Path(filename).parent.name}/{Path(filename).name}:{lineno}{via}"] += 1

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            result = api.train(settings, quiet=True)
    finally:
        for n, f in originals.items():
            setattr(T.Trainer, n, f)
    return syncs, result.step


def saved_labels(run_dir: Path) -> tuple[int, torch.Tensor, torch.Tensor]:
    step, path = ckpt_io.list_checkpoints(run_dir / rundir.CHECKPOINTS)[-1]
    t = ckpt_io.read(path).tensors
    return step, t["train/labels"], t["train/prior"]


def resumed_labels(run_dir: Path, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    host = get_host()
    cfg, rd = api.prepare({"out": str(run_dir), "device": device}, resume=True, host=host)
    tr = Trainer(cfg, host.registry, rd, resume=True, quiet=True)
    tr.load_latest()
    return tr.labels.cpu(), tr.prior.cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: these checks need a GPU (--device cpu is a dry run of the script)")
    os.environ["DYNGAN_NO_PICTURES"] = "1"
    tmp = Path(tempfile.mkdtemp(prefix="dyngan-cuda-"))
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    out: dict = {"device": name, "torch": torch.__version__}
    ok = True
    for case, extra in CASES.items():
        s = base(tmp / f"sync-{case}", args.device, args.steps)
        s.update(extra)
        syncs, steps = count_syncs(s)
        out[f"sync/{case}"] = {"steps": steps, "syncs_outside_phases": sum(syncs.values()), "where": dict(syncs)}
        ok &= steps == args.steps and not syncs
    # a partitioned run written on the GPU, resumed on the GPU and on the CPU
    run = tmp / "resume"
    s = base(run, args.device, args.steps)
    s.update(CASES["dyngan"], checkpoint_every=args.steps)
    # a loose threshold, so that the detector fires and partitions form within a short run
    s["options"] = {**s["options"], "detector": {"every": 50, "delta": 5.0}}
    api.train(s, quiet=True)
    step, labels, prior = saved_labels(run)
    res = {"checkpoint_step": step, "partitions": int((torch.bincount(labels) > 0).sum())}
    for dev in (args.device, "cpu"):
        try:
            lab, pri = resumed_labels(run, dev)
            same = torch.equal(lab, labels) and torch.equal(pri, prior)
        except Exception as e:  # noqa: BLE001 - reported, and the check fails
            same = f"{type(e).__name__}: {e}"[:300]
        res[f"resumed_on_{dev}_same_labels_and_prior"] = same
        ok &= same is True
    ev = api.evaluate(run, 2000, device="cpu")
    res["evaluate_on_cpu"] = {k: round(float(v), 4) for k, v in ev["metrics"].items() if isinstance(v, (int, float))}
    ok &= res["partitions"] > 1
    out["resume"] = res
    out["ok"] = bool(ok)
    print(json.dumps(out, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
