"""Running out of memory is a usage problem (a batch size or sample count too large for the
machine): one line, exit code 2, and the run's saved checkpoints untouched."""

from __future__ import annotations

import pytest
import torch

import core.training as training
from core import api
from core.errors import OutOfMemory, UsageError, is_out_of_memory, out_of_memory
from tests.cli_helpers import invoke

ALLOC = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 800000000000 bytes. Error code 12 (Cannot allocate memory)")


def test_allocation_failures_are_recognised_and_nothing_else():
    assert is_out_of_memory(ALLOC)
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 2x5)"))
    assert not is_out_of_memory(ValueError("can't allocate memory"))  # only the allocator's RuntimeError
    # a size the allocator cannot even express (torch.zeros(2**63 - 1))
    assert is_out_of_memory(RuntimeError("Storage size calculation overflowed with sizes=[9223372036854775807]"))
    err = out_of_memory(ALLOC, "at step 3", "use a smaller --batch-size")
    assert isinstance(err, UsageError) and err.exit_code == 2
    assert str(err).startswith("out of memory at step 3 ([enforce fail") and str(err).endswith("--batch-size")


def _train(out, *more):
    return invoke(["train", "--out", str(out), "--dataset", "grid25", "--steps", "20", "--batch-size", "16",
                   "--checkpoint-every", "10", "--eval-every", "0", "--device", "cpu", "--quiet", *more])


def _oom_after(monkeypatch, steps_ok: int):
    """Make the training loop fail to allocate once it has run ``steps_ok`` more steps (the real loop,
    stopped there, also writes its end-of-run checkpoint first)."""
    real_loop = training.Trainer._loop

    def loop(self, log, flag):
        if steps_ok == 0:
            raise ALLOC
        stop_at = self.step + steps_ok
        real_steps = self.cfg["steps"]
        self.cfg["steps"] = stop_at
        try:
            real_loop(self, log, flag)
        finally:
            self.cfg["steps"] = real_steps
        raise ALLOC

    monkeypatch.setattr(training.Trainer, "_loop", loop)


def test_out_of_memory_while_training_keeps_the_checkpoints(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train(out).exit_code == 0
    ckdir = out / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckdir.iterdir()}
    assert before
    _oom_after(monkeypatch, 5)
    res = _train(out, "--resume", "--steps", "40")
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output
    assert "out of memory at step 25 on cpu with batch size 16" in lines[0]
    assert "use a smaller --batch-size" in lines[0] and "are intact" in lines[0]
    assert {p.name: p.read_bytes() for p in ckdir.iterdir() if p.name in before} == before


def test_out_of_memory_before_any_checkpoint_says_nothing_was_saved(tmp_path, monkeypatch):
    _oom_after(monkeypatch, 0)
    res = _train(tmp_path / "fresh")
    assert res.exit_code == 2, res.output
    assert "out of memory at step 0" in res.stderr and "nothing was saved" in res.stderr


def test_too_many_samples_are_refused_before_allocating(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train(out).exit_code == 0
    monkeypatch.setattr(training, "_memory_bytes", lambda device: 50_000)  # a 50 kB machine
    # 10,000 2-d float32 samples need 80 kB: refused, for every command that draws samples
    for cmd in (["evaluate", str(out), "--n", "10000"],
                ["sample", str(out), "--n", "10000", "--out", str(tmp_path / "s.npy")]):
        res = invoke(cmd)
        assert res.exit_code == 2, res.output
        assert "10,000 samples of shape (2,) need" in res.stderr and "draw fewer (--n)" in res.stderr
    assert not (tmp_path / "s.npy").exists()
    # 5,000 need 40 kB: drawn
    assert invoke(["evaluate", str(out), "--n", "5000"]).exit_code == 0


def test_generate_checks_only_past_the_first_batch():
    G = torch.nn.Linear(3, 2)
    prior = torch.ones(1)
    gen = torch.Generator().manual_seed(0)
    orig = training._memory_bytes
    try:
        training._memory_bytes = lambda device: 1  # noqa: E731
        # one batch: already allocated, nothing to refuse
        assert training.generate(G_call_module(G), 8, 3, prior, torch.device("cpu"), gen, batch=8).shape == (8, 2)
        with pytest.raises(OutOfMemory):
            training.generate(G_call_module(G), 16, 3, prior, torch.device("cpu"), gen, batch=8)
    finally:
        training._memory_bytes = orig


class G_call_module(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, z, c):
        return self.lin(z)


def _alloc_fails(*args, **kwargs):
    raise ALLOC


@pytest.mark.parametrize("where", ["generate", "metric"])
def test_out_of_memory_in_sample_and_evaluate_is_exit_2(tmp_path, monkeypatch, where):
    """An allocation that fails anyway (the check against physical memory passed, but a ulimit or
    other processes leave less): one line, exit 2, the run untouched, no samples file."""
    from core.plugins import get_host

    out = tmp_path / "run"
    assert _train(out).exit_code == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    if where == "generate":
        monkeypatch.setattr(training, "generate", _alloc_fails)
        commands = {"evaluate": "drawing 300 samples on cpu",
                    "sample": "drawing 300 samples on cpu"}
    else:  # inside a metric: a ComponentFailure around the allocator's error
        metric = get_host().registry.get("metric", "mixture")
        monkeypatch.setattr(metric, "compute", lambda self, *a: _alloc_fails())
        commands = {"evaluate": "scoring 300 samples on cpu"}
    for cmd, doing in commands.items():
        args = [cmd, str(out), "--n", "300"] + (["--out", str(tmp_path / "s.npy")] if cmd == "sample" else [])
        res = invoke(args)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.output, res.output
        assert lines[0].startswith(f"Error: out of memory {doing} ([enforce fail"), lines[0]
        assert lines[0].endswith("draw fewer (--n)")
    assert not (tmp_path / "s.npy").exists()
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_other_errors_in_evaluate_are_not_called_out_of_memory(tmp_path, monkeypatch):
    from core.errors import ComponentFailure
    from core.plugins import get_host

    out = tmp_path / "run"
    assert _train(out).exit_code == 0
    metric = get_host().registry.get("metric", "mixture")
    monkeypatch.setattr(metric, "compute", lambda self, *a: 1 / 0)
    with pytest.raises(ComponentFailure, match="ZeroDivisionError"):
        api.evaluate(out, n=300)


@pytest.mark.parametrize("batch", ["9223372036854775807", "100000000000"])
def test_a_batch_too_large_for_memory_is_refused_before_training(tmp_path, batch):
    out = tmp_path / "run"
    res = invoke(["train", "--out", str(out), "--dataset", "grid25", "--steps", "5", "--batch-size", batch,
                  "--device", "cpu", "--quiet", "-o", "dataset.n=500"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"batch size {int(batch):,}" in res.stderr and "use a smaller --batch-size" in res.stderr
    assert not out.exists()  # nothing left behind to block the same --out
