"""Run by tests/test_ddp.py under torchrun (2 processes, Gloo): checks core.distributed.DistComm.

Each rank checks the collectives against values it can compute itself, and writes what
it saw to ``<out>/rank<R>.json`` for the test to compare across ranks. An assertion
failing here makes the rank (and so torchrun) exit non-zero.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from core.components import Comm, TrainContext
from core.distributed import DistComm, from_env


def main(out: Path) -> None:
    comm = from_env()
    assert isinstance(comm, DistComm), "torchrun variables not found"
    r, ws = comm.rank, comm.world_size
    assert ws == 2
    rec: dict = {"rank": r}

    # all_gather with a different dim 0 per rank (rank 1 holds nothing), floats and bools
    mine = torch.arange(6, dtype=torch.float32).view(3, 2) + 10 * r if r == 0 else torch.empty(0, 2)
    got = comm.all_gather(mine)
    assert torch.equal(got, torch.arange(6, dtype=torch.float32).view(3, 2)), got
    flags = torch.tensor([True, False]) if r == 0 else torch.tensor([True, True, False])
    gb = comm.all_gather(flags)
    assert gb.dtype == torch.bool and gb.tolist() == [True, False, True, True, False], gb
    rec["gathered"] = got.tolist()

    # broadcast from rank 1 leaves the caller's tensor alone
    t = torch.full((4,), float(r))
    b = comm.broadcast(t, src=1)
    assert b.tolist() == [1.0] * 4 and t.tolist() == [float(r)] * 4
    lab = comm.broadcast(torch.tensor([r, r + 5]), src=0)
    assert lab.dtype == torch.long and lab.tolist() == [0, 5]

    # all_reduce_mean
    m = comm.all_reduce_mean(torch.tensor([float(r), 2.0 * r + 1.0]))
    assert m.tolist() == [0.5, 2.0], m

    # broadcast_object
    obj = comm.broadcast_object({"run": "/x/y", "r": r} if r == 0 else None)
    assert obj == {"run": "/x/y", "r": 0}, obj

    # sync_grads: averaged gradients, None as zeros, None everywhere stays None
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    unused = torch.nn.Linear(2, 2)  # never gets a gradient on any rank
    mod = torch.nn.ModuleList([net, unused])
    for i, p in enumerate(net.parameters()):
        p.grad = torch.full_like(p, float(10 * i + r + 1))
    if r == 1:
        net[1].bias.grad = None  # rank 0 has 31, rank 1 nothing -> (31 + 0) / 2
    comm.sync_grads(mod)
    expect = [float(10 * i) + 1.5 for i in range(4)]
    expect[3] = 31.0 / 2
    for p, e in zip(net.parameters(), expect):
        assert p.grad is not None and torch.all(p.grad == e), (p.grad, e)
    assert unused.weight.grad is None and unused.bias.grad is None

    # sync_start: rank 0's parameters, buffers and tensors everywhere; rank 1 gets its own stream
    from core.distributed import rank_seed

    bn = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    with torch.no_grad():
        for p in bn.parameters():
            p.fill_(float(r + 1))
    bn[1].running_mean.fill_(float(r + 5))
    labels = torch.full((5,), r, dtype=torch.long)
    gen = torch.Generator().manual_seed(1234)
    rank0_state = gen.get_state().clone()
    comm.sync_start([bn], [labels], gen)
    assert all(torch.all(p == 1.0) for p in bn.parameters())
    assert torch.all(bn[1].running_mean == 5.0) and labels.tolist() == [0] * 5
    if r == 0:
        assert torch.equal(gen.get_state(), rank0_state)
    else:
        assert torch.equal(gen.get_state(), torch.Generator().manual_seed(rank_seed(rank0_state, 1)).get_state())
    rec["first_draw"] = torch.randint(1 << 30, (1,), generator=gen).item()
    # sync_buffers: BatchNorm statistics drift apart per rank; rank 0's win
    bn[1].running_var.fill_(float(r + 7))
    comm.sync_buffers(bn)
    assert torch.all(bn[1].running_var == 7.0)

    # a stop signal on rank 1 only: both ranks agree after the same sync
    class Flag:
        signum = None

    local = Flag()
    agreed = comm.watch(local)
    comm.sync_grads(net)
    assert agreed.signum is None
    if r == 1:
        local.signum = 2
    comm.sync_grads(net)
    rec["agreed_signum"] = agreed.signum
    assert agreed.signum == 2, agreed.signum

    # DynGAN's detector shards D's pass over the ranks and gathers the same scores as one process
    from dyngan_plugins.dyngan import DynGANDetector

    n = 101
    data = torch.linspace(-1, 1, 2 * n).view(n, 2)
    seen: list[int] = []

    def disc(x, cond, features=True):
        seen.append(int(x.shape[0]))
        f = torch.stack([x[:, 0] * x[:, 1], x[:, 0] - x[:, 1] + cond.float()], 1)
        return f.sum(1, keepdim=True) * 3.0, f

    def ctx(c: Comm) -> TrainContext:
        return TrainContext(step=1, device=torch.device("cpu"), data=data, labels=torch.zeros(n, dtype=torch.long),
                            prior=torch.tensor([1.0]), capacity=1, z_dim=1, generator=None, discriminator=disc,
                            rng=torch.Generator().manual_seed(0), report=lambda *a: None, comm=c)

    det_dist = DynGANDetector(every=1, delta=1.0, lam=1.0, batch_size=16)
    d1 = det_dist.detect(ctx(comm))
    rows_dist = sum(seen)
    seen.clear()
    det_one = DynGANDetector(every=1, delta=1.0, lam=1.0, batch_size=16)
    d0 = det_one.detect(ctx(Comm()))
    assert rows_dist == comm.shard(n)[1] - comm.shard(n)[0] and sum(seen) == n, (rows_dist, seen)
    assert torch.equal(d1.collapsed, d0.collapsed) and torch.equal(d1.score, d0.score)
    # the partitioner's feature pass is sharded too, and gathers to the single-process features
    from dyngan_plugins._kmeans_core import discriminator_pass

    zeros = torch.zeros(n, dtype=torch.long)
    _, f1 = discriminator_pass(ctx(comm), zeros, None, 16)
    _, f0 = discriminator_pass(ctx(Comm()), zeros, None, 16)
    assert f1 is not None and torch.equal(f1, f0)
    rec["rows_scored_here"] = rows_dist
    rec["collapsed"] = int(d1.collapsed.sum())

    # a peer that does not come: the collective fails within the timeout instead of hanging
    if r == 0:
        try:
            comm.barrier()
            rec["barrier_without_peer"] = "returned"
        except Exception as e:  # noqa: BLE001 - Gloo raises RuntimeError / DistBackendError
            rec["barrier_without_peer"] = type(e).__name__
    (out / f"rank{r}.json").write_text(json.dumps(rec))
    if r == 1:
        import time

        time.sleep(float(sys.argv[2]))  # longer than DYNGAN_DIST_TIMEOUT: rank 0's barrier must give up
    else:
        # leave without running destructors: tearing down a Gloo group whose collective timed out
        # can abort the process ("terminate called without an active exception"), seen once under load
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ---- `_ddp_worker.py train ARGS...`: `dyngan train ARGS` with a test plugin whose components fail
# on the rank DYNGAN_TEST_FAIL_RANK only (from step DYNGAN_TEST_FAIL_STEP, default 0); rank 1 also
# sets DYNGAN_TEST_RANK1_ENV (NAME=VALUE) in its environment before loading plugins


def _fails_here(step: int) -> bool:
    return (os.environ.get("RANK") == os.environ.get("DYNGAN_TEST_FAIL_RANK")
            and step >= int(os.environ.get("DYNGAN_TEST_FAIL_STEP", "0")))


def _boom() -> RuntimeError:
    return RuntimeError(f"onerank: boom on rank {os.environ.get('RANK')}")


def _one_rank_components() -> list:
    """Metric ``onerank`` (as one GPU running out of memory during an evaluation) and detector
    ``onerank`` (DynGAN's, raising in detect() from the step), failing on one rank only."""
    from core.components import Metric
    from dyngan_plugins.dyngan import DynGANDetector

    class OneRankMetric(Metric):
        name = "onerank"

        def compute(self, fake, real, dataset):
            if _fails_here(0):
                raise _boom()
            return {"onerank/mean": float(fake.mean())}

    class OneRankDetector(DynGANDetector):
        name = "onerank"

        def detect(self, ctx):
            if _fails_here(ctx.step):
                raise _boom()
            return super().detect(ctx)

    return [OneRankMetric, OneRankDetector]


def train_with_plugin(argv: list[str]) -> None:
    from core import hookimpl
    from core.cli import main as cli_main
    from core.testing import plugin_host

    if os.environ.get("RANK") == "1" and os.environ.get("DYNGAN_TEST_RANK1_ENV"):  # NAME=VALUE on rank 1 only
        name, _, value = os.environ["DYNGAN_TEST_RANK1_ENV"].partition("=")
        os.environ[name] = value
    metric, detector = _one_rank_components()

    class Plugin:
        @hookimpl
        def register_metrics(self, register):
            register(metric)

        @hookimpl
        def register_collapse_detectors(self, register):
            register(detector)

    with plugin_host(("onerank_plugin", Plugin()), strict=True):
        cli_main(["train", *argv])


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train_with_plugin(sys.argv[2:])
    else:
        main(Path(sys.argv[1]))
