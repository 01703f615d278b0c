"""Where a DynGAN run's reverse KL and low-quality samples come from, condition by condition.

    python benchmarks/condition_balance.py RUN_DIR [RUN_DIR ...] [--n 20000] [--detail]
    python benchmarks/condition_balance.py --train TABLE --seeds 10-19 [--method dyngan] [--jobs 2]
                                           [--keep DIR] [--n 20000] [--detail]

For a run on a 2D mixture (grid25, ring8) that partitioned its data, every active condition c
(prior > 0) generates ``--n`` samples from the run's G (its weight average when it keeps one,
as ``dyngan evaluate`` does), each assigned to its nearest mode centre. Against the real samples
of partition c this gives, per mode m of the partition (it holds at least 10% of m's real points, or
m holds at least 10% of the partition's), the ratio
rho = (share of c's samples at m) / (share of partition c's real samples at m): how much of its
part of m the condition produces. DynGAN's detector flags a real sample when the generator
produces less than delta times the data there (D* > 1/(1+delta)), so a mode with
delta < rho < 1 is under-produced and yet never split off at that delta.

Per run: reverse KL and HQ (3 sigma) of the whole mixture (conditions drawn from the prior,
``--n`` x conditions samples), the share of samples assigned to a mode outside their
condition's partition ("leak"), the (condition, mode) pairs with rho <= 0.2, 0.2-0.5,
0.5-0.8 and above 0.8, the smallest rho, and the HQ of conditions holding one mode against those holding
several (a continuous G(z, c) puts samples between the modes of one condition).
``--detail`` adds a line per condition. ``--train`` first trains the table's runs (the suite's
command lines, ``benchmarks/suite.py``) into ``--keep`` (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

#: a mode belongs to a partition when the partition holds at least this share of the mode's real
#: points, or the mode at least this share of the partition's
MIN_SHARE = 0.10
#: rho bands: (upper bound, label)
BANDS = ((0.2, "rho<=0.2"), (0.5, "0.2-0.5"), (0.8, "0.5-0.8"), (math.inf, "rho>0.8"))


def analyse(run_dir: Path, n: int, detail: bool) -> dict:
    import torch

    from core.api import load_run
    from core.report import condition_seed

    run = load_run(run_dir)
    if run.labels is None:
        raise SystemExit(f"{run_dir}: its checkpoint holds no partition labels")
    try:
        centres = torch.as_tensor(run.info["centres"], dtype=torch.float32)
        sigma = float(run.info["sigma"])
        ok = centres.dim() == 2 and centres.shape[1:] == run.real.shape[1:] and sigma > 0
    except (KeyError, TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise SystemExit(f"{run_dir}: not a mixture dataset with centres and sigma")
    k = centres.shape[0]

    def nearest(x):
        d = torch.cdist(x.double(), centres.double())
        dist, idx = d.min(dim=1)
        return idx, dist

    real_mode, _ = nearest(run.real)
    per_mode = torch.bincount(real_mode, minlength=k).double()
    active = run.conditions
    mixture = torch.zeros(k, dtype=torch.float64)
    hq_all = leak = 0.0
    bands = dict.fromkeys([b[1] for b in BANDS], 0)
    rho_min = math.inf
    hq_by_kind = {"one mode": [0.0, 0.0], "several": [0.0, 0.0]}  # [prior-weighted HQ, prior mass]
    lines = []
    for c in active:
        p = float(run.prior[c])
        x = run.generate(n, seed=condition_seed(0, c), condition=c)  # the noise of the report's image rows
        idx, dist = nearest(x)
        q = torch.bincount(idx, minlength=k).double() / n
        counts = torch.bincount(real_mode[run.labels == c], minlength=k).double()
        r = counts / counts.sum().clamp_min(1)
        own = (counts >= MIN_SHARE * per_mode) | (r >= MIN_SHARE)
        hq = float((dist < 3 * sigma).double().mean())
        mixture += p * q
        hq_all += p * hq
        leak += p * float(q[~own].sum())
        rho = q[own] / r[own]
        rho_min = min(rho_min, float(rho.min()))
        for m_rho in rho.tolist():
            for bound, label in BANDS:
                if m_rho <= bound:
                    bands[label] += 1
                    break
        kind = "one mode" if int(own.sum()) == 1 else "several"
        hq_by_kind[kind][0] += p * hq
        hq_by_kind[kind][1] += p
        if detail:
            modes = " ".join(f"{int(m)}:{float(rr):.2f}" for m, rr in zip(own.nonzero().flatten(), rho))
            lines.append(f"  c{c:<2d} prior {p:.3f}  modes {int(own.sum())}  HQ {hq:.3f}  "
                         f"leak {float(q[~own].sum()):.3f}  rho {modes}")
    nz = mixture > 0
    kl = float((mixture[nz] * (mixture[nz] * k).log()).sum())
    last_partition = max((r["step"] for r in run.metrics if r.get("event") == "partition"), default=None)
    out = {"run": run.name, "step": run.step, "conditions": len(active), "reverse_kl": round(kl, 4),
           "hq": round(hq_all, 4), "leak": round(leak, 4), "rho_min": round(rho_min, 3), **bands,
           "hq_one_mode": round(hq_by_kind["one mode"][0] / hq_by_kind["one mode"][1], 3)
           if hq_by_kind["one mode"][1] else None,
           "hq_several": round(hq_by_kind["several"][0] / hq_by_kind["several"][1], 3)
           if hq_by_kind["several"][1] else None,
           "prior_several": round(hq_by_kind["several"][1], 3),
           "last_partition": last_partition}
    print(json.dumps(out), flush=True)
    for line in lines:
        print(line, flush=True)
    return out


def train(table: str, method: str, seeds: list[int], keep: Path, jobs: int) -> list[Path]:
    if table not in suite.TABLES or method not in suite.TABLES[table]["methods"]:
        raise SystemExit(f"unknown table or method: {table} {method}")
    keep.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **suite.RUN_ENV)

    def one(seed: int) -> Path:
        out = keep / f"{table}-{method}-{seed}"
        if not (out / "checkpoints").is_dir():
            proc = subprocess.run(suite.train_command(table, method, seed, None, out), env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"seed {seed} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        return out

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, seeds))


def seed_range(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--train", metavar="TABLE", help="train this suite table's runs first")
    ap.add_argument("--method", default="dyngan")
    ap.add_argument("--seeds", type=seed_range, default=seed_range("0-9"), help="e.g. 10-19")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="folder for the trained runs")
    ap.add_argument("--n", type=int, default=20000, help="samples per condition")
    ap.add_argument("--detail", action="store_true")
    args = ap.parse_args()
    runs = list(args.runs)
    if args.train:
        keep = args.keep or Path(tempfile.mkdtemp(prefix="dyngan-balance-"))
        runs += train(args.train, args.method, args.seeds, keep, args.jobs)
    if not runs:
        ap.error("name run directories or --train TABLE")
    results = [analyse(r, args.n, args.detail) for r in runs]
    keys = ["reverse_kl", "hq", "leak", "rho_min", *[b[1] for b in BANDS], "hq_one_mode", "hq_several",
            "prior_several", "conditions"]
    print("mean over", len(results), "runs:", json.dumps({
        key: round(sum(r[key] for r in results if r[key] is not None)
                   / max(1, sum(r[key] is not None for r in results)), 4) for key in keys}))


if __name__ == "__main__":
    main()
