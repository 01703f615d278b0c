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

A second opinion (``--knn K``, default 5; 0 = none) labels the same generated channels without
the conv net: each takes the majority digit of its K nearest images of scikit-learn's 1,797
digits in pixel space (Euclidean). If both classifiers see the same over- and under-made digits,
the generator draws them (as far as two unrelated classifiers can tell); if only the conv net
does, it is the net's reading of G's images. The k-NN's accuracy on the digits' fixed held-out
fifth (fitted on the other four fifths) and the two classifiers' agreement on the samples are
printed beside it.

    python benchmarks/stacked_balance.py RUN_DIR [--n 26000] [--seed 0] [--generator auto|ema|raw] [--knn 5] [--json]
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


def knn_predict(x, ref, ref_labels, k: int = 5, chunk: int = 4096):
    """``(n, ...)`` images -> ``(n,)`` long: the most common digit among each image's ``k``
    nearest ``ref`` images (Euclidean distance in pixel space); a tie goes to the digit with the
    nearer neighbours."""
    import torch

    ref = ref.reshape(ref.shape[0], -1).float()
    x = x.reshape(x.shape[0], ref.shape[1]).float()
    k = min(k, ref.shape[0])
    # votes of 1, and a hair more for nearer ranks, so a tie goes to the nearer neighbours
    weight = 1.0 + 1e-3 * torch.arange(k, 0, -1, dtype=torch.float32) / k
    out = []
    for part in x.split(chunk):
        nearest = torch.cdist(part, ref).topk(k, dim=1, largest=False).indices
        votes = torch.zeros(part.shape[0], 10).scatter_add_(1, ref_labels[nearest], weight.expand(part.shape[0], k))
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def knn_opinion(fake_channels, conv_pred, k: int) -> dict:
    """The k-NN's labels of ``fake_channels`` (``(n, C, 8, 8)``) beside the conv net's ``conv_pred``."""
    from dyngan_plugins.digits import _digits, _split

    images, labels, _ = _digits()
    train, test = _split()
    held_out = float((knn_predict(images[test], images[train], labels[train], k) == labels[test]).float().mean())
    n, channels = conv_pred.shape
    pred = knn_predict(fake_channels.reshape(n * channels, 64), images, labels, k).view(n, channels)
    agree = (pred == conv_pred).float()
    return {"k": k, "held_out_accuracy": held_out, "samples": decompose(pred),
            "agreement": float(agree.mean()), "agreement_per_channel": agree.mean(0).tolist()}


def analyse(run_dir: str | Path, n: int = 26000, seed: int = 0, generator: str = "auto", knn: int = 5) -> dict:
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
    fake_pred = digit_tuples(clf, fake, channels)
    result = {"run": str(run_dir), "generator": run.weights, "step": run.step,
              "samples": decompose(fake_pred),
              "data": decompose(digit_tuples(clf, real[idx], channels))}
    if knn > 0:
        result["knn"] = knn_opinion(fake.cpu(), fake_pred, knn)
    return result


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
    ap.add_argument("--knn", type=int, default=5, help="k of the pixel-space k-NN second opinion (0 = none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.knn < 0 or args.n < 1:
        print("Error: --n must be at least 1 and --knn at least 0", file=sys.stderr)
        return 2
    from core.errors import DynganError

    try:
        result = analyse(args.run_dir, args.n, args.seed, args.generator, args.knn)
    except DynganError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(_show(f"{args.n:,} samples of {args.run_dir}", result["samples"]))
        print(_show(f"{args.n:,} draws of its training set", result["data"]))
        if "knn" in result:
            o = result["knn"]
            print(_show(f"the same samples labelled by {o['k']}-NN in pixel space (held-out accuracy "
                        f"{o['held_out_accuracy']:.3f}; agrees with the conv net on {o['agreement']:.3f} of "
                        "the channels)", o["samples"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
