"""``--sampling``: real batches drawn with replacement (the default) or as shuffled epochs (each
training sample once per epoch, the last partial batch dropped, as the DynGAN 2D code trains)."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import (checkpoint_tensors, invoke, resign_checkpoint, resume_as_old_run, run_settings,
                         same_tensors)
from core import api
from core.components import Comm
from core.errors import UsageError
from core.plugins import get_host
from core.training import EpochBatches, Trainer

CPU = torch.device("cpu")
BASE = {"dataset": "grid25", "seed": 3, "device": "cpu", "log_every": 10, "eval_every": 0,
        "checkpoint_every": 20, "threads": 1, "batch_size": 64, "options": {"dataset": {"n": 1000}}}


def settings(out, steps=40, **extra):
    return run_settings(BASE, out, steps, **extra)


checkpoint, same = checkpoint_tensors, same_tensors


def epoch_of(batches: EpochBatches, epoch: int) -> list[torch.Tensor]:
    return [batches(epoch * batches.per_epoch + k) for k in range(batches.per_epoch)]


def test_an_epoch_takes_each_sample_at_most_once_and_drops_only_the_last_partial_batch():
    eb = EpochBatches(1000, 64, seed=7, device=CPU)
    assert eb.per_epoch == 15  # 1000 // 64; the last 40 samples of each permutation are dropped
    for epoch in (0, 1, 5):
        batches = epoch_of(eb, epoch)
        assert all(b.shape == (64,) and b.dtype == torch.long for b in batches)
        used = torch.cat(batches)
        assert used.unique().numel() == 15 * 64  # no sample twice within an epoch
        assert torch.equal(used, eb.order(epoch)[:960])  # the permutation's batches in order
        assert sorted(eb.order(epoch).tolist()) == list(range(1000))
    assert not torch.equal(eb.order(0), eb.order(1))  # each epoch shuffles anew


def test_the_order_is_a_pure_function_of_seed_and_batch_number():
    """What lets a resume, a rollback or another rank continue with no saved state."""
    a, b = EpochBatches(500, 32, seed=1, device=CPU), EpochBatches(500, 32, seed=1, device=CPU)
    forward = [a(i) for i in range(60)]  # four epochs, in order
    backward = [b(i) for i in reversed(range(60))][::-1]  # the same batch numbers, out of order
    assert all(torch.equal(x, y) for x, y in zip(forward, backward))
    other = EpochBatches(500, 32, seed=2, device=CPU)
    assert not torch.equal(other.order(0), a.order(0))


def test_torchrun_ranks_share_each_epoch_and_take_disjoint_slices():
    ranks = [EpochBatches(1000, 64, seed=4, device=CPU, rank=r, processes=3) for r in range(3)]
    assert all(r.per_epoch == 5 for r in ranks)  # 1000 // (64 x 3)
    for epoch in (0, 2):
        per_rank = [torch.cat(epoch_of(r, epoch)) for r in ranks]
        everything = torch.cat(per_rank)
        assert everything.unique().numel() == 3 * 5 * 64  # no sample on two ranks, nor twice on one
        # the same permutation on every rank: together they take its first 960 entries
        assert torch.equal(everything.sort().values, ranks[0].order(epoch)[:960].sort().values)


def test_a_restart_begins_a_new_order_at_its_batch_number():
    eb = EpochBatches(1000, 64, seed=7, device=CPU)
    before = [eb(b) for b in range(40)]
    eb.restart("rollback 1 at step 20", 20)
    assert eb.state() == {"salt": "rollback 1 at step 20", "origin": 20}
    after = [eb(b) for b in range(20, 35)]  # a whole epoch from batch 20
    assert torch.cat(after).unique().numel() == 15 * 64
    assert torch.equal(torch.cat(after), eb.order(0)[:960])
    assert not torch.equal(eb.order(0), EpochBatches(1000, 64, seed=7, device=CPU).order(0))  # keyed by the salt
    assert not any(torch.equal(x, y) for x, y in zip(before[20:35], after))
    eb.restart("", 0)
    assert all(torch.equal(x, eb(b)) for b, x in enumerate(before))  # the run's first order again


def test_fewer_samples_than_one_batch_is_a_usage_error():
    with pytest.raises(UsageError, match=r"one full batch per epoch \(64 x 2 processes = 128 training samples\), "
                                         r"and the dataset has 100; use a smaller --batch-size, fewer processes"):
        EpochBatches(100, 64, seed=0, device=CPU, processes=2)
    assert EpochBatches(128, 64, seed=0, device=CPU, processes=2).per_epoch == 1


@pytest.mark.parametrize("loss, d_steps", [("ns", 1), ("wgan-gp", 5)])
def test_the_trainer_numbers_its_real_batches_through_the_epochs(tmp_path, loss, d_steps):
    host = get_host()
    cfg, run_dir = api.prepare(settings(tmp_path / "r", steps=20, loss=loss, sampling="epoch"), host=host)
    tr = Trainer(cfg, host.registry, run_dir, quiet=True)
    seen: list[int] = []
    inner = tr.epoch_batches
    assert inner is not None and inner.per_epoch == 15

    class Numbered:  # the sampler, recording the batch numbers the loop asks for
        def __call__(self, b):
            seen.append(b)
            return inner(b)

        def state(self):
            return inner.state()

    tr.epoch_batches = Numbered()
    tr.run()
    assert seen == list(range(20 * d_steps))  # every D step takes the next batch; none skipped or repeated


def test_a_trainer_takes_its_own_rank_s_slices(tmp_path):
    class SecondOfTwo(Comm):
        rank, world_size = 1, 2

    host = get_host()
    cfg, run_dir = api.prepare(settings(tmp_path / "r", sampling="epoch"), host=host)
    eb = Trainer(cfg, host.registry, run_dir, quiet=True, comm=SecondOfTwo()).epoch_batches
    assert (eb.rank, eb.processes, eb.per_epoch) == (1, 2, 7)  # 1000 // (64 x 2)
    assert torch.equal(eb(0), eb.order(0)[64:128]) and torch.equal(eb(1), eb.order(0)[192:256])


def test_replacement_is_the_default_and_epoch_trains_differently(tmp_path):
    host = get_host()
    cfg, run_dir = api.prepare(settings(tmp_path / "d"), host=host)
    assert cfg["sampling"] == "replacement"
    assert Trainer(cfg, host.registry, run_dir, quiet=True).epoch_batches is None
    default, epoch = tmp_path / "default", tmp_path / "epoch"
    api.train(settings(default), quiet=True)
    api.train(settings(epoch, sampling="epoch"), quiet=True)
    assert json.loads((epoch / "config.json").read_text())["sampling"] == "epoch"
    a, b = checkpoint(default, 40), checkpoint(epoch, 40)
    weights = [k for k in a if k.startswith(("G/", "D/"))]
    assert weights and set(weights) <= set(b)
    assert all(not torch.equal(a[k], b[k]) for k in weights if a[k].is_floating_point())


def test_an_epoch_run_resumes_bit_exact_mid_epoch(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    api.train(settings(whole, sampling="epoch"), quiet=True)
    api.train(settings(cut, steps=20, sampling="epoch"), quiet=True)  # 20 = epoch 1, batch 5 of 15
    api.train({"out": str(cut), "steps": 40}, resume=True, quiet=True)
    assert same(checkpoint(whole, 40), checkpoint(cut, 40))


def test_a_run_from_before_the_setting_resumes_with_replacement(tmp_path):
    whole = tmp_path / "whole"
    api.train(settings(whole), quiet=True)
    old = resume_as_old_run(whole, "sampling", 40, tmp_path / "old")
    assert same(checkpoint(whole, 40), checkpoint(old, 40))
    assert "sampling" not in json.loads((old / "config.json").read_text())  # the record is left as it was


def test_bad_input_is_exit_2_and_leaves_no_run(tmp_path):
    res = invoke(["train", "--out", str(tmp_path / "a"), "--sampling", "shuffle", "--steps", "2"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "Invalid value for '--sampling': 'shuffle' is not one of 'replacement', 'epoch'" in res.stderr
    res = invoke(["train", "--out", str(tmp_path / "b"), "--sampling", "epoch", "--steps", "2", "--device", "cpu",
                  "-o", "dataset.n=100"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "--sampling epoch needs one full batch per epoch (128 training samples)" in res.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # a saved run keeps its sampling: another on --resume is refused, and the run is kept
    run = tmp_path / "r"
    api.train(settings(run, steps=20), quiet=True)
    res = invoke(["train", "--out", str(run), "--resume", "--sampling", "epoch", "--steps", "40"])
    assert res.exit_code == 2 and "Traceback" not in res.output and "sampling" in res.stderr
    assert (run / "checkpoints" / "step-00000020.safetensors").exists()
    assert not (run / "checkpoints" / "step-00000040.safetensors").exists()


def test_a_resume_with_another_number_of_processes_begins_a_new_epoch(tmp_path):
    """The epochs' slices depend on the number of processes: the order restarts at the checkpoint."""
    run = tmp_path / "r"
    api.train(settings(run, steps=20, sampling="epoch"), quiet=True)
    jpath = run / "checkpoints" / "step-00000020.json"
    assert json.loads(jpath.read_text())["sampling"] == {"salt": "", "origin": 0}
    resign_checkpoint(jpath, processes=2)  # as if trained under torchrun with two processes
    res = invoke(["train", "--out", str(run), "--resume", "--steps", "40"])
    assert res.exit_code == 0, res.output
    assert "goes on with 1 (effective batch 64): the same settings, another batch from here on, and a new " \
           "epoch begins" in res.stderr
    meta = json.loads((run / "checkpoints" / "step-00000040.json").read_text())
    assert meta["sampling"] == {"salt": "1 process from step 20", "origin": 20} and meta["processes"] == 1


@pytest.mark.parametrize("bad", [{"salt": 5, "origin": 0}, {"salt": "", "origin": 41}, {"salt": "", "origin": True},
                                 [1, 2], {"salt": "\ud800", "origin": 0}])  # a lone surrogate cannot be hashed
def test_a_checkpoint_with_a_bad_epoch_order_is_not_loaded(tmp_path, bad):
    run = tmp_path / "r"
    api.train(settings(run, steps=40, sampling="epoch"), quiet=True)  # checkpoints at 20 and 40
    resign_checkpoint(run / "checkpoints" / "step-00000040.json", sampling=bad)
    res = invoke(["train", "--out", str(run), "--resume", "--steps", "60"])
    assert res.exit_code == 0, res.output  # the older checkpoint is used, the bad one set aside
    assert "step-00000040" in res.stderr and "epoch order" in res.stderr and "Traceback" not in res.output
    assert json.loads((run / "checkpoints" / "step-00000060.json").read_text())["sampling"] == \
        {"salt": "", "origin": 0}


def test_a_resume_on_another_kind_of_device_begins_a_new_epoch(tmp_path):
    """A CUDA generator draws other permutations than a CPU one: the order restarts at the
    checkpoint (imitated here by giving the random streams a CUDA generator's shape)."""
    from core import checkpoint as ckpt_io

    run = tmp_path / "r"
    api.train(settings(run, steps=20, sampling="epoch"), quiet=True)
    ck = ckpt_io.read(ckpt_io.list_checkpoints(run / "checkpoints")[-1][1])
    tensors = dict(ck.tensors)
    for k in ("rng/train", "rng/components"):
        tensors[k] = torch.arange(16, dtype=torch.uint8)  # a CUDA (Philox) generator's: seed and offset
    ckpt_io.save(run / "checkpoints", ck.step, tensors, ck.meta)
    res = invoke(["train", "--out", str(run), "--resume", "--steps", "40"])
    assert res.exit_code == 0, res.output
    assert "another kind of device than cpu" in res.stderr and "(and a new epoch begins)" in res.stderr
    assert json.loads((run / "checkpoints" / "step-00000040.json").read_text())["sampling"] == \
        {"salt": "cpu from step 20", "origin": 20}
