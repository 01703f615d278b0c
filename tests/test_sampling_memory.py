"""Sampling within memory: `dyngan sample` (and ``generate``) hold one full-size copy of the samples,
refuse a count that would not fit in the memory available now (with a margin) before drawing it,
show progress on big draws; ``Run.generate`` takes integer-like conditions and checks n and seed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import core.training as training
from core import memory
from core import api
from core.config import MAX_SEED
from core.errors import OutOfMemory, UsageError
from tests.cli_helpers import invoke

BATCH = 4096  # training.generate's default batch


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampling") / "run"
    settings = {"dataset": "grid25", "steps": 20, "seed": 1, "device": "cpu", "out": str(out),
                "eval_every": 0, "options": {"dataset": {"n": 500}}}
    return api.train(settings, quiet=True).run_dir


@pytest.fixture
def full_size_allocations(monkeypatch):
    """The tensors that torch.empty allocated with a first dimension of at least two batches."""
    seen = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dim() >= 1 and t.shape[0] > 2 * BATCH:
            seen.append(t)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return seen


# --------------------------------------------------------------------------- what memory is free


def test_cpu_memory_is_what_is_available_not_the_total(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683772 kB\nMemFree:          500000 kB\n"
                       "MemAvailable:    1000000 kB\nBuffers:           10000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    assert training._memory_bytes(torch.device("cpu")) == 1000000 * 1024


@pytest.mark.parametrize("text", [None, "MemTotal: 1000 kB\n", "MemAvailable: lots\n"])
def test_without_memavailable_it_is_the_physical_memory(tmp_path, monkeypatch, text):
    meminfo = tmp_path / "meminfo"
    if text is not None:
        meminfo.write_text(text)
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    import os

    assert training._memory_bytes(torch.device("cpu")) == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_cuda_memory_is_the_free_memory_and_the_allocators_unused_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**28)
    assert training._memory_bytes(torch.device("cuda", 0)) == 3 * 2**30 + 2**30 - 2**28


def test_samples_leave_a_margin_of_the_available_memory(monkeypatch):
    G = _Lin()
    n = 3 * BATCH
    need = n * 2 * 4  # float32 samples of shape (2,)
    monkeypatch.setattr(training, "_memory_bytes", lambda device: need)  # exactly fits: too tight
    with pytest.raises(OutOfMemory, match=f"{n:,} samples of shape \\(2,\\) need .* available on cpu"):
        training.generate(G, n, 3, torch.ones(1), torch.device("cpu"), torch.Generator().manual_seed(0))
    monkeypatch.setattr(training, "_memory_bytes", lambda device: 2 * need)
    x = training.generate(G, n, 3, torch.ones(1), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert x.shape == (n, 2) and x.dtype == torch.float32


def test_the_cpu_copy_of_samples_drawn_on_another_device_is_what_is_checked(monkeypatch):
    asked = []

    def memory(device):
        asked.append(device.type)
        return 10**12

    monkeypatch.setattr(training, "_memory_bytes", memory)
    x = training.generate(_Lin(), 3 * BATCH, 3, torch.ones(1), torch.device("cpu"), torch.Generator(),
                          out_device=torch.device("cpu"))
    assert asked == ["cpu"] and x.device.type == "cpu"


# --------------------------------------------------------------------------- one copy


class _Lin(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2).to(dtype)
        self.calls = 0

    def forward(self, z, c):
        self.calls += 1
        return self.lin(z.to(self.lin.weight.dtype))


def test_generate_fills_one_preallocated_buffer(monkeypatch, full_size_allocations):
    monkeypatch.setattr(torch, "cat", _no_cat)
    G = _Lin(torch.bfloat16)  # a half-precision generator: the float32 buffer converts as it fills
    n = 3 * BATCH + 5
    x = training.generate(G, n, 3, torch.ones(1), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert x.shape == (n, 2) and x.dtype == torch.float32 and G.calls == 4
    assert len(full_size_allocations) == 1 and x.data_ptr() == full_size_allocations[0].data_ptr()
    # the same numbers as batch-by-batch drawing
    gen = torch.Generator().manual_seed(0)
    first = []
    for b in (BATCH, BATCH):
        torch.multinomial(torch.ones(1), b, replacement=True, generator=gen)
        first.append(G(torch.randn(b, 3, generator=gen), None).float())
    assert torch.equal(x[:BATCH], first[0]) and torch.equal(x[BATCH:2 * BATCH], first[1])


def test_one_batch_is_returned_as_float32():
    x = training.generate(_Lin(torch.bfloat16), 10, 3, torch.ones(1), torch.device("cpu"), torch.Generator())
    assert x.shape == (10, 2) and x.dtype == torch.float32


def _no_cat(*args, **kwargs):
    raise AssertionError("torch.cat: a second full-size copy of the samples")


def test_api_sample_returns_the_buffer_itself_as_float32(run_dir, monkeypatch, full_size_allocations):
    monkeypatch.setattr(torch, "cat", _no_cat)
    n = 3 * BATCH + 7
    arr = api.sample(run_dir, n, seed=4)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (n, 2)
    assert len(full_size_allocations) == 1
    assert np.shares_memory(arr, full_size_allocations[0].numpy())
    assert np.array_equal(arr, api.load_run(run_dir).generate(n, seed=4).numpy())


def test_cli_writes_the_samples_straight_to_the_file(run_dir, tmp_path, monkeypatch, full_size_allocations):
    monkeypatch.setattr(torch, "cat", _no_cat)
    real_save = np.save
    saved = []

    def save(file, arr, *args, **kwargs):
        saved.append((file, arr))
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    out = tmp_path / "s.npy"
    n = 3 * BATCH + 1
    res = invoke(["sample", str(run_dir), "--n", str(n), "--seed", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{out}: {n} samples of shape (2,)\n"
    (file, arr), = saved
    assert not isinstance(file, io.BytesIO) and hasattr(file, "fileno")  # no in-memory copy of the file
    assert len(full_size_allocations) == 1 and np.shares_memory(arr, full_size_allocations[0].numpy())
    assert np.array_equal(np.load(out), api.sample(run_dir, n, seed=2))
    assert [p.name for p in tmp_path.iterdir()] == ["s.npy"]  # no temporary file left


def test_cli_refuses_a_count_that_does_not_fit_before_drawing_it(run_dir, tmp_path, monkeypatch,
                                                                  full_size_allocations):
    out = tmp_path / "s.npy"
    n = 1_000_000_000
    monkeypatch.setattr(training, "_memory_bytes", lambda device: 2**30)  # a 1 GiB machine
    res = invoke(["sample", str(run_dir), "--n", str(n), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert res.stderr.startswith(f"Error: {n:,} samples of shape (2,) need 7.5 GiB, more than ")
    assert "1.0 GiB available on cpu" in res.stderr and res.stderr.endswith("draw fewer (--n)\n")
    assert full_size_allocations == [] and not out.exists()
    # what fits is drawn
    res = invoke(["sample", str(run_dir), "--n", str(3 * BATCH), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert np.load(out).shape == (3 * BATCH, 2)


def test_write_failure_leaves_no_file(run_dir, tmp_path):
    out = tmp_path / "missing" / "s.npy"
    res = invoke(["sample", str(run_dir), "--n", "5", "--out", str(out)])
    assert res.exit_code == 2 and res.stderr.startswith(f"Error: cannot write {str(out)!r}: ")
    assert res.stderr.count("\n") == 1


# --------------------------------------------------------------------------- progress


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


class _Clock:
    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_progress_on_a_terminal_updates_one_line_at_most_every_second():
    stream = _Stream(tty=True)
    # batches done at 0 (the first: the start), 0.5, 1.2, 1.7, 2.3, and the last at 2.5
    p = api.SamplingProgress(20_000_000, stream=stream, clock=_Clock([0.0, 0.5, 1.2, 1.7, 2.3, 2.5]))
    for done in (2_000_000, 4_000_000, 8_000_000, 12_000_000, 16_000_000, 20_000_000):
        p(done)
    assert stream.getvalue() == ("\rsampling: 8,000,000 / 20,000,000"
                                 "\rsampling: 16,000,000 / 20,000,000"
                                 "\rsampling: 20,000,000 / 20,000,000\n")


def test_progress_elsewhere_writes_a_line_every_ten_seconds():
    stream = _Stream(tty=False)
    p = api.SamplingProgress(4_000, stream=stream, clock=_Clock([100.0, 104.0, 110.5, 115.0, 116.0]))
    for done in (500, 1_000, 2_000, 3_000, 4_000):
        p(done)
    assert stream.getvalue() == "sampling: 2,000 / 4,000\nsampling: 4,000 / 4,000\n"


class _BrokenPipe(_Stream):
    """A progress stream whose reader went away after ``lines`` writes."""

    def __init__(self, lines):
        super().__init__(tty=False)
        self.lines, self.writes = lines, 0

    def write(self, text):
        self.writes += 1
        if self.writes > self.lines:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_progress_stops_at_a_closed_pipe_and_the_draw_goes_on():
    stream = _BrokenPipe(lines=1)
    p = api.SamplingProgress(4_000, stream=stream, clock=_Clock([0.0, 11.0, 22.0, 33.0, 44.0]))
    for done in (500, 1_000, 2_000, 3_000, 4_000):
        p(done)  # raises nothing
    assert stream.getvalue() == "sampling: 1,000 / 4,000\n"
    assert stream.writes == 2  # the failed write, then none


def test_a_quick_draw_shows_no_progress():
    for tty in (True, False):
        stream = _Stream(tty)
        p = api.SamplingProgress(3 * BATCH, stream=stream, clock=_Clock([5.0, 5.4, 5.9]))
        for done in (BATCH, 2 * BATCH, 3 * BATCH):
            p(done)
        assert stream.getvalue() == ""


def test_sample_cli_shows_progress_unless_quiet(run_dir, tmp_path, monkeypatch):
    ticks = iter(range(0, 10**6, 11))  # every batch seems to take 11 s (the first: the start)
    monkeypatch.setattr(api.SamplingProgress, "clock", staticmethod(lambda: next(ticks)))
    out = tmp_path / "s.npy"
    n = 3 * BATCH
    res = invoke(["sample", str(run_dir), "--n", str(n), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stderr == "".join(f"sampling: {k * BATCH:,} / {n:,}\n" for k in (2, 3))
    res = invoke(["sample", str(run_dir), "--n", str(n), "--out", str(out), "--quiet"])
    assert res.exit_code == 0 and res.stderr == ""
    assert res.stdout == f"{out}: {n} samples of shape (2,)\n"


# --------------------------------------------------------------------------- Run.generate's arguments


@pytest.mark.parametrize("condition", [torch.tensor(0), np.int64(0), np.array(0), torch.tensor(0, dtype=torch.int32)])
def test_integer_like_conditions_are_accepted(run_dir, condition):
    run = api.load_run(run_dir)
    assert torch.equal(run.generate(7, 3, condition=condition), run.generate(7, 3, condition=0))


@pytest.mark.parametrize("condition", [torch.tensor(1), np.int64(1)])
def test_an_integer_like_condition_not_in_use_is_named_as_an_integer(run_dir, condition):
    with pytest.raises(UsageError, match=r"^condition 1 is not in use in this run; it uses 0 "):
        api.load_run(run_dir).generate(7, 3, condition=condition)


@pytest.mark.parametrize("condition, shown", [
    (1.5, "float 1.5"), (0.0, "float 0.0"), (torch.tensor(1.5), "float 1.5"), (np.float64(0.0), "float 0.0"),
    (True, "bool True"), (torch.tensor(True), "bool True"), (np.True_, "bool True"), ("0", "str '0'"),
    (torch.tensor([0]), "Tensor of shape (1,)"), (np.array([0, 1]), "ndarray of shape (2,)"),
])
def test_a_condition_that_is_no_integer_is_a_type_error(run_dir, condition, shown):
    with pytest.raises(UsageError) as e:
        api.load_run(run_dir).generate(7, 3, condition=condition)
    assert str(e.value) == f"condition must be an integer, not {shown}"


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**64])
def test_a_seed_out_of_range_is_refused(run_dir, seed):
    with pytest.raises(UsageError) as e:
        api.load_run(run_dir).generate(7, seed)
    assert str(e.value) == f"seed must be between 0 and {MAX_SEED} (2**63 - 1), got {seed}"


def test_integer_like_seed_and_n_are_accepted(run_dir):
    run = api.load_run(run_dir)
    assert torch.equal(run.generate(np.int64(7), torch.tensor(MAX_SEED)), run.generate(7, MAX_SEED))
    with pytest.raises(UsageError, match=r"^seed must be an integer, not float 1.0$"):
        run.generate(7, 1.0)


@pytest.mark.parametrize("n, message", [(0, "n must be at least 1, got 0"), (-3, "n must be at least 1, got -3"),
                                        (2.0, "n must be an integer, not float 2.0"),
                                        (False, "n must be an integer, not bool False")])
def test_the_api_names_its_arguments_not_the_cli_flags(run_dir, n, message):
    run = api.load_run(run_dir)
    for draw in (lambda: run.generate(n), lambda: api.sample(run_dir, n)):
        with pytest.raises(UsageError) as e:
            draw()
        assert str(e.value) == message


def test_the_cli_names_its_flag(run_dir, tmp_path):
    res = invoke(["sample", str(run_dir), "--n", "0", "--out", str(tmp_path / "s.npy")])
    assert res.exit_code == 2 and res.stderr == "Error: --n must be at least 1, got 0\n"
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_a_seed_out_of_range_from_python(tmp_path):
    out = tmp_path / "r"
    api.train({"dataset": "grid25", "steps": 2, "device": "cpu", "out": str(out), "checkpoint_every": 0,
               "options": {"dataset": {"n": 500}}}, quiet=True)
    with pytest.raises(UsageError, match="seed must be between 0 and"):
        api.evaluate(out, 100, seed=-1)
    assert api.evaluate(out, 100, seed=3)["samples"] == 100
