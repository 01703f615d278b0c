"""Partitioner ``kmeans``: blind reclustering, as in the self-conditioned GAN
(Liu et al., CVPR 2020).

Every ``every`` steps all training samples are clustered by k-means on the
current discriminator's penultimate features (each sample passed with its
current label): k-means++ seeding from the run's generator, ``restarts`` runs,
the lowest inertia wins. k = option ``k`` clipped to the conditioner's
capacity (and to N). No detector is needed; a detection, if any, is ignored.

Stable ids: the new clusters are matched to the old labels by a maximum-overlap
assignment on the contingency table (k new clusters x capacity ids), solved
exactly with the Hungarian algorithm (``_kmeans_core.hungarian``, no SciPy).
The same clustering with its ids permuted therefore comes back with the old ids.

DDP: features are sharded and gathered; rank 0's result is broadcast.
"""

from __future__ import annotations

from typing import Any, Mapping

from core import hookimpl
from core.components import Detection, Option, Partitioner, PartitionUpdate, TrainContext


class KMeansPartitioner(Partitioner):
    """k-means on D's features every ``every`` steps, ids matched to the old ones."""

    name = "kmeans"
    options = {
        "every": Option(5000, "recluster every this many steps (self-conditioned GAN, 2D: 5000)", min=1),
        "k": Option(50, "number of clusters (self-conditioned GAN, 2D: 50); clipped to the conditioner's capacity "
                        "(onehot's default: 30) and logged as partition/k", min=1),
        "restarts": Option(10, "k-means++ restarts; the lowest inertia is kept", min=1),
        "tol": Option(
            1e-4, "Lloyd iterations stop when no centre moves this far, relative to the features' RMS spread", min=0.0
        ),
        "max_iter": Option(100, "maximum Lloyd iterations per restart", min=0),
        "batch_size": Option(8192, "samples per discriminator pass", min=1),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.partitions = 0

    def partition(self, ctx: TrainContext, detection: Detection | None) -> PartitionUpdate | None:
        from . import _kmeans_core as km

        cap = int(ctx.capacity)
        labels = ctx.labels.to(ctx.device)
        n = int(labels.shape[0])
        k = max(1, min(int(self.opts.k), cap, n))
        _, feats = km.discriminator_pass(ctx, labels, None, int(self.opts.batch_size))
        # the tolerance follows the features' scale: RMS distance to their mean
        spread = float((feats - feats.mean(0)).pow(2).sum(1).mean().sqrt())
        res = km.kmeans(
            feats, k, generator=ctx.rng, restarts=int(self.opts.restarts),
            tol=float(self.opts.tol) * max(spread, 1e-12), max_iter=int(self.opts.max_iter),
        )
        new = km.match_ids(res.labels, labels, k, cap)
        new = ctx.comm.broadcast(new, 0)
        self.partitions += 1
        ctx.report("partition/count", float(int(new.unique().numel())))
        ctx.report("partition/inertia", res.inertia / n)
        ctx.report("partition/k", float(k))  # the k used: the option, clipped to the capacity
        return PartitionUpdate(labels=new)

    def state_dict(self) -> dict[str, Any]:
        return {"partitions": self.partitions}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.partitions = int(state.get("partitions", 0))


@hookimpl
def register_partitioners(register):
    register(KMeansPartitioner)
