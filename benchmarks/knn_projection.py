"""The DynGAN partitioner's 5-NN vote, exact against a random projection (option knn_dim).

    python benchmarks/knn_projection.py RUN_DIR [--step N] [--queries 10000]

With a detector subset, the partitioner labels every sample outside the subset by a 5-NN vote
among the subset in D's penultimate features. On stacked digits (128,000 images, 25,000 in the
subset, 2,048 features) that vote dominates a partition event on the CPU. This script loads a
trained run's D from one of its checkpoints, computes every sample's features under the saved
labels, partitions the subset with k-means (k=4, the kind of split a partition produces), and
times the exact vote of ``--queries`` outside samples against votes in random projections of
64-512 dimensions, with the fraction of labels they share with the exact vote.

RUN_DIR: a run that used ``--detector dyngan -o detector.subset=...`` (its checkpoints hold the
subset), e.g. the `stacked-digits-20k` suite table's DynGAN run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256, 512])
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from core.networks import build_networks
    from core.plugins import get_host
    from core.training import instantiate, load_dataset
    from dyngan_plugins import _kmeans_core as km

    torch.set_num_threads(1)
    cfg = json.loads((args.run / "config.json").read_text())
    ckpts = sorted((args.run / "checkpoints").glob("step-*.safetensors"))
    path = ckpts[-1] if args.step is None else args.run / "checkpoints" / f"step-{args.step:08d}.safetensors"
    comps = instantiate(cfg, get_host().registry)
    data = load_dataset(comps, int(cfg["seed"]))
    _, D, _ = build_networks(comps.model, comps.conditioner, tuple(data.shape[1:]))
    saved = load_file(str(path))
    D.load_state_dict({k[2:]: v for k, v in saved.items() if k.startswith("D/")})
    D.eval()
    labels, subset = saved["train/labels"].long(), saved["component/detector/subset"].long()
    with torch.no_grad():
        feats = torch.cat([D(data[s:s + 4096], labels[s:s + 4096], features=True)[1].flatten(1).float()
                           for s in range(0, data.shape[0], 4096)])
    outside = torch.ones(data.shape[0], dtype=torch.bool)
    outside[subset] = False
    ref, query = feats[subset], feats[outside][: args.queries]
    split = km.kmeans(ref, 4, generator=torch.Generator().manual_seed(0), restarts=2).labels
    print(f"{path.name}: features {tuple(feats.shape)}, subset {ref.shape[0]}, subset split "
          f"{torch.bincount(split).tolist()}, {query.shape[0]} queries of {int(outside.sum())}")
    t0 = time.perf_counter()
    exact = km.knn_vote(query, ref, split, 4, k=5)
    t_exact = time.perf_counter() - t0
    print(f"exact ({feats.shape[1]} dims): {t_exact:.1f} s")
    for dim in args.dims:
        proj = torch.randn(feats.shape[1], dim, generator=torch.Generator().manual_seed(1)) / dim ** 0.5
        t0 = time.perf_counter()
        vote = km.knn_vote(query @ proj, ref @ proj, split, 4, k=5)
        t = time.perf_counter() - t0
        print(f"knn_dim {dim}: {t:.1f} s ({t_exact / t:.1f}x faster), same label as exact: "
              f"{(vote == exact).float().mean().item():.4f}")


if __name__ == "__main__":
    main()
