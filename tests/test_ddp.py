"""Data-parallel training under torchrun: 2 processes on the CPU with Gloo.

Each launch is a real ``python -m torch.distributed.run --nproc-per-node 2 -m core train``.
With ``DYNGAN_DEBUG_DUMP_DIR`` set every rank writes its final networks, partition, prior and
batch-generator state (``core.distributed.debug_dump``), which the tests compare exactly.
Subprocess timeouts are hang guards only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
# --device cpu: these runs test Gloo on the CPU; on a one-GPU machine "auto" would pick CUDA,
# and two ranks on one GPU are refused
SMALL = ["--device", "cpu", "-o", "dataset.n=2000", "--log-every", "20", "-q"]
# DynGAN with intervals short enough to detect and partition within 60 steps; lam=1 and
# delta=1.5 make the detector flag samples (D(x) > 0.4) this early, so a partition happens
DYNGAN = ["--preset", "dyngan", "-o", "detector.every=20", "-o", "partitioner.every=40",
          "-o", "partitioner.tau=0.0", "-o", "detector.lam=1.0", "-o", "detector.delta=1.5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(dump: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DYNGAN_NO_PICTURES="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("DYNGAN_DEBUG_DUMP_DIR", None)
    if dump is not None:
        env["DYNGAN_DEBUG_DUMP_DIR"] = str(dump)
    return env


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]


def run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\n{res.stdout}\n{res.stderr[-4000:]}"
    return res


def load_dump(path: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    out: dict = dict(load_file(str(path)))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    out["step"], out["world_size"] = int(meta["step"]), int(meta["world_size"])
    return out


def dumps(d: Path) -> tuple[dict, dict]:
    return load_dump(d / "rank0.safetensors"), load_dump(d / "rank1.safetensors")


def assert_same_state(a: dict, b: dict) -> None:
    nets = [k for k in a if k.startswith(("G/", "D/", "G_ema/"))]
    assert nets and set(nets) == {k for k in b if k.startswith(("G/", "D/", "G_ema/"))}
    differ = [k for k in nets if not torch.equal(a[k], b[k])]
    assert not differ, f"parameters differ between ranks: {differ}"
    assert torch.equal(a["labels"], b["labels"]), "partition labels differ between ranks"
    assert torch.equal(a["prior"], b["prior"]), "condition prior differs between ranks"
    assert a["step"] == b["step"]


def checkpoint(run_dir: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}.safetensors"))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_collectives(tmp_path):
    """DistComm on its own: uneven all_gather, broadcast, mean, sync_grads with None gradients,
    sync_start / sync_buffers, stop-signal agreement, the DynGAN detector's sharded pass, and a
    collective timing out (tests/_ddp_worker.py asserts each on both ranks)."""
    res = run(torchrun(str(HERE / "_ddp_worker.py"), str(tmp_path), "6"),
              env_for(DYNGAN_DIST_TIMEOUT="2"), timeout=90)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["gathered"] == r1["gathered"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert r0["agreed_signum"] == r1["agreed_signum"] == 2
    assert r0["first_draw"] != r1["first_draw"]  # after sync_start the ranks draw different batches
    assert r0["rows_scored_here"] + r1["rows_scored_here"] == 101  # each rank scored its shard only
    assert min(r0["rows_scored_here"], r1["rows_scored_here"]) == 50
    assert r0["collapsed"] == r1["collapsed"] > 0
    assert r0["barrier_without_peer"] != "returned", res.stderr[-2000:]


# A fresh interpreter: joins a one-process Gloo group the way `dyngan train` does under torchrun,
# builds an optimiser (its first use imports torch._dynamo, which imports torch.distributed.nn),
# closes the group and prints the threads still alive.
_CLOSE_CHILD = """
import os, torch
from core.distributed import DistComm
comm = DistComm()
torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
import torch.distributed.nn.functional as F
held = [d for d in F.broadcast.__defaults__ if d is not None]
comm.close()
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print(len(held), ",".join(names))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc (Linux)")
def test_close_frees_the_gloo_group():
    """A finished run leaves no Gloo thread behind: torch's lazily imported
    torch.distributed.nn.functional must not capture the group in its default arguments (it did,
    so the group outlived destroy_process_group and its teardown at interpreter exit sometimes
    aborted a finished rank with SIGABRT)."""
    env = env_for(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()))
    res = subprocess.run([sys.executable, "-c", _CLOSE_CHILD], env=env, cwd=HERE.parent,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    held, names = res.stdout.split()
    assert held == "0", "torch.distributed.nn.functional's defaults hold the process group"
    assert "gloo" not in names, f"Gloo threads outlived close(): {names}"


def test_ddp_dyngan_identical_ranks_and_resume_both_ways(tmp_path):
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    res = run(torchrun("-m", "core", "train", "--out", str(run_dir), "--steps", "60", *SMALL, *DYNGAN),
              env_for(dump))
    assert res.stdout.strip().splitlines() == [str(run_dir)]  # rank 0 alone prints the run directory
    a, b = dumps(dump)
    assert a["world_size"] == 2 and a["step"] == 60
    assert_same_state(a, b)
    assert any(k.startswith("G_ema/") for k in a)  # the preset's weight average, the same on both ranks
    # a partition really happened, and both ranks hold it
    assert int((torch.bincount(a["labels"]) > 0).sum()) >= 2
    assert float(a["prior"][1]) > 0
    # each rank drew its own batches
    assert not torch.equal(a["gen"], b["gen"])
    # rank 0 alone wrote the run directory: one record per event and step
    recs = records(run_dir)
    steps = [r["step"] for r in recs if "event" not in r]
    assert steps == [20, 40, 60]
    assert sum(1 for r in recs if r.get("event") == "partition") == 1
    # the checkpoint holds rank 0's state, including its batch stream
    ck = checkpoint(run_dir, 60)
    assert torch.equal(ck["rng/train"], a["gen"])
    assert torch.equal(ck["train/labels"], a["labels"])
    for k in (k for k in a if k.startswith(("G/", "G_ema/"))):
        assert torch.equal(ck[k], a[k])

    # the DDP checkpoint resumes in one process
    dump1 = tmp_path / "dump1"
    res = run([sys.executable, "-m", "core", "train", "--out", str(run_dir), "--resume", "--steps", "80", "-q"],
              env_for(dump1))
    # the effective batch halves from here on: said even with -q, and each process start is recorded
    assert "trained by 2 processes (effective batch 256) and goes on with 1 (effective batch 128)" in res.stderr
    assert [r["processes"] for r in records(run_dir) if r.get("event") == "start"] == [2, 1]
    single = load_dump(dump1 / "rank0.safetensors")
    assert single["world_size"] == 1 and single["step"] == 80
    assert int((torch.bincount(single["labels"]) > 0).sum()) >= 2  # the partition came along
    assert [r["step"] for r in records(run_dir) if "event" not in r] == [20, 40, 60, 80]

    # and that single-process checkpoint resumes under torchrun
    dump2 = tmp_path / "dump2"
    run(torchrun("-m", "core", "train", "--out", str(run_dir), "--resume", "--steps", "100", "-q"),
        env_for(dump2))
    c, d = dumps(dump2)
    assert c["world_size"] == 2 and c["step"] == 100
    assert_same_state(c, d)
    assert not torch.equal(c["gen"], d["gen"])
    assert [r["step"] for r in records(run_dir) if "event" not in r] == [20, 40, 60, 80, 100]
    ck = checkpoint(run_dir, 100)
    assert all(torch.equal(ck[k], c[k]) for k in c if k.startswith(("G/", "D/")))


@pytest.mark.parametrize("sampling, stop", [("replacement", "checkpoint"), ("epoch", "checkpoint"),
                                             ("replacement", "final-step")])
def test_ddp_resume_with_as_many_processes_is_bit_exact(tmp_path, sampling, stop):
    """Stopped at a checkpoint and resumed under torchrun, a run ends bit-identical to the one that
    never stopped: every rank continues its own random streams (the checkpoint held rank 0's alone,
    and rank 1 derived a new batch stream from it at the resume). With shuffled epochs (2,000
    samples, 2 x 128 per step: 7 steps an epoch) the ranks share each epoch's order from the seed.
    ``final-step``: a 40-step run extended to 80, whose final step skipped the partition check of
    step 40; the resume makes it first, on every rank."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(torchrun("-m", "core", "train", "--out", str(straight), "--steps", "80", "--checkpoint-every", "40",
                 "--sampling", sampling, *SMALL, *DYNGAN), env_for())
    if stop == "checkpoint":
        shutil.copytree(straight, resumed)
        for p in (resumed / "checkpoints").glob("step-00000080.*"):
            p.unlink()
        run(torchrun("-m", "core", "train", "--out", str(resumed), "--resume", "-q"), env_for())
    else:
        run(torchrun("-m", "core", "train", "--out", str(resumed), "--steps", "40", "--checkpoint-every", "40",
                     "--sampling", sampling, *SMALL, *DYNGAN), env_for())
        run(torchrun("-m", "core", "train", "--out", str(resumed), "--resume", "--steps", "80", "-q"), env_for())
    a, b = checkpoint(straight, 80), checkpoint(resumed, 80)
    assert {"rng/rank1/train", "rng/rank1/components", "rng/rank1/cpu"} <= set(a)
    assert not torch.equal(a["rng/rank1/train"], a["rng/train"])  # rank 1's own stream, not rank 0's
    assert set(a) == set(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"not bit-identical after a torchrun resume: {differ[:8]} ({len(differ)} of {len(a)})"
    if stop == "final-step":
        def partitions(run_dir):
            return [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
                    if '"event": "partition"' in ln]
        assert partitions(resumed) == partitions(straight) == [40]


def assert_no_traceback_of_ours(stderr: str) -> None:
    """No traceback through dyngan's code (torchrun's own ChildFailedError report has none)."""
    assert not re.search(r'File "[^"]*[/\\]core[/\\]', stderr), stderr[-4000:]


def torchrun_failing(run_dir: Path, *args: str, rank: int = 1, step: int = 0, timeout: float = 120,
                     **env: str) -> subprocess.CompletedProcess:
    """`dyngan train --out RUN_DIR ARGS` under torchrun with tests/_ddp_worker.py's plugin, whose
    components fail on ``rank`` alone from ``step``; expected to fail."""
    res = subprocess.run(torchrun(str(HERE / "_ddp_worker.py"), "train", "--out", str(run_dir), *args),
                         env=env_for(DYNGAN_TEST_FAIL_RANK=str(rank), DYNGAN_TEST_FAIL_STEP=str(step),
                                     **{"DYNGAN_DIST_TIMEOUT": "30", **env}),
                         cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
    assert res.returncode != 0, res.stderr[-3000:]
    return res


def test_a_metric_failing_on_one_rank_saves_the_step_and_says_so_once(tmp_path):
    """Rank 1's metric fails at the step-40 evaluation: the ranks agree on it, save step 40 and
    stop; rank 1 shows the metric's error, rank 0 which rank failed. It used to leave rank 0 in
    the checkpoint's collective while rank 1 raised: Gloo aborted, no error shown, nothing saved."""
    run_dir = tmp_path / "run"
    res = torchrun_failing(run_dir, "--steps", "100", "--eval-every", "40", "--checkpoint-every", "100",
                           "--metrics", "onerank", *SMALL)
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2, res.stderr[-3000:]
    assert sum("onerank: boom on rank 1" in e for e in errors) == 1, errors  # the metric's error, once
    assert any("the evaluation at step 40 failed on rank 1 (that process shows the error)" in e
               for e in errors), errors
    assert all("the run is saved at step 40" in e for e in errors), errors
    assert_no_traceback_of_ours(res.stderr)
    assert "collective mismatch" not in res.stderr and "SIGABRT" not in res.stderr
    assert (run_dir / "checkpoints" / "step-00000040.json").exists()


def test_a_component_failing_on_one_rank_is_not_blamed_on_the_others(tmp_path):
    """Rank 1's detector raises at step 40: rank 1 names it; rank 0, whose collective in its own
    detect() then fails, says that another process stopped, in one line. It used to blame the
    detector for Gloo's "Connection closed by peer"."""
    run_dir = tmp_path / "run"
    res = torchrun_failing(run_dir, "--steps", "100", "--checkpoint-every", "20", *SMALL, *DYNGAN,
                           "--detector", "onerank", step=40)
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2, res.stderr[-3000:]
    assert sum("detector 'onerank'" in e and "onerank: boom on rank 1" in e for e in errors) == 1, errors
    peer = [e for e in errors if "another process of this torchrun job stopped or timed out" in e]
    assert len(peer) == 1 and "onerank" not in peer[0], errors
    assert f"the checkpoints in {str(run_dir)!r} are intact (the newest: step 20)" in peer[0]
    assert_no_traceback_of_ours(res.stderr)
    assert (run_dir / "checkpoints" / "step-00000020.json").exists()


def test_a_set_up_failure_on_another_rank_leaves_no_run_behind(tmp_path):
    """Rank 1 cannot set up (the preset's plugin blocked there): torchrun SIGTERMs rank 0 during its
    set-up, or rank 0's first collective fails. Either way the new run is removed, as after Ctrl-C;
    it used to leave a config.json that blocked the same --out."""
    run_dir = tmp_path / "run"
    res = torchrun_failing(run_dir, "--steps", "20", *SMALL, *DYNGAN,
                           DYNGAN_TEST_RANK1_ENV="DYNGAN_BLOCK_PLUGINS=dyngan")
    assert_no_traceback_of_ours(res.stderr)
    assert not run_dir.exists(), (sorted(p.name for p in run_dir.iterdir()), res.stderr[-3000:])
    assert "DYNGAN_BLOCK_PLUGINS" in res.stderr  # rank 1's own error


def _pids_with(tag: str, rank: str | None) -> list[int]:
    """Processes whose environment holds DYNGAN_TEST_TAG=tag (and RANK=rank when given), via /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        env = dict(kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)
        if env.get(b"DYNGAN_TEST_TAG") != tag.encode():
            continue
        if rank is None or env.get(b"RANK") == rank.encode():
            out.append(int(entry.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the rank-1 process")
def test_killed_rank_fails_the_job(tmp_path):
    tag = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun("-m", "core", "train", "--out", str(run_dir), "--steps", "1000000", *SMALL),
        env=env_for(DYNGAN_TEST_TAG=tag, DYNGAN_DIST_TIMEOUT="30"), cwd=HERE.parent,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90  # hang guard for the start-up
        while time.monotonic() < deadline and proc.poll() is None:
            log = run_dir / "metrics.jsonl"
            if log.exists() and any("steps_per_s" in line for line in log.read_text().splitlines()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"training ended early: {proc.communicate()}"
        victims = _pids_with(tag, "1")
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=90)  # the hang guard: the job must end by itself
        assert proc.returncode != 0, err[-3000:]
        assert not _pids_with(tag, "0"), "rank 0 outlived the job"
        # rank 0 says so in one line, not with Gloo's traceback
        assert "Error: another process of this torchrun job stopped or timed out" in err, err[-3000:]
        assert_no_traceback_of_ours(err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ctrl_c_stops_every_rank_after_the_same_step(tmp_path):
    """SIGINT to torchrun reaches both ranks at their own moment; they agree on one step, rank 0 saves there."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun("-m", "core", "train", "--out", str(run_dir), "--steps", "1000000", *SMALL[:-1]),
        env=env_for(), cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 90  # hang guard for the start-up
        while time.monotonic() < deadline and proc.poll() is None:
            log = run_dir / "metrics.jsonl"
            if log.exists() and any("steps_per_s" in line for line in log.read_text().splitlines()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"training ended early: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    stops = re.findall(r"interrupted by Ctrl-C at step (\d+); checkpoint saved", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]  # one line per rank, the same step
    # the advice is torchrun's command, not the single-process one
    assert err.count("continue with the same torchrun command and --resume") == 2, err[-3000:]
    assert "dyngan train --out" not in err
    step = int(stops[0])
    assert (run_dir / "checkpoints" / f"step-{step:08d}.json").exists()
    assert checkpoint(run_dir, step)["rng/train"].numel() > 0


def test_dry_run_and_usage_errors_are_shown_once(tmp_path):
    """Under torchrun --dry-run prints the config once (rank 0), and an error of rank 0's while
    preparing the run is shown once: the other ranks say one short line, not the same error."""
    res = run(torchrun("-m", "core", "train", "--out", str(tmp_path / "dry"), "--steps", "7", *SMALL,
                       "--dry-run"), env_for())
    assert json.loads(res.stdout)["steps"] == 7  # one JSON document, not one per rank
    assert not (tmp_path / "dry").exists()
    res = subprocess.run(torchrun("-m", "core", "train", "--out", str(tmp_path / "r"), "--steps", "20",
                                  "--dataset", "nosuch", *SMALL),
                         env=env_for(), cwd=HERE.parent, capture_output=True, text=True, timeout=120)
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert res.returncode != 0 and len(errors) == 2, res.stderr[-3000:]
    assert sum("nosuch" in e for e in errors) == 1, errors  # rank 0's error, once
    assert "Error: rank 0 could not prepare the run (it shows why)" in errors, errors


@pytest.mark.parametrize("name, value, needle", [
    ("WORLD_SIZE", "x", "WORLD_SIZE must be an integer >= 1"),
    ("WORLD_SIZE", "0", "WORLD_SIZE must be an integer >= 1"),
    ("RANK", "2", "RANK must be an integer in [0, 1]"),
    ("LOCAL_RANK", "x", "LOCAL_RANK must be an integer >= 0"),
    ("MASTER_PORT", "99999", "MASTER_PORT must be an integer in [1, 65535]"),
])
def test_bad_torchrun_variables_are_exit_2(tmp_path, name, value, needle):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599",
           name: value}
    from click.testing import CliRunner

    from core.cli import cli

    res = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "r"), "--steps", "2", "-q"], env=env)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "1e30", "1e-300", "0", "-3", "soon"])
def test_a_dist_timeout_out_of_range_is_a_usage_error(value):
    from core.distributed import ENV_TIMEOUT, timeout_from_env
    from core.errors import UsageError

    with pytest.raises(UsageError, match=f"{ENV_TIMEOUT} must be a number of seconds between"):
        timeout_from_env({ENV_TIMEOUT: value})
    assert timeout_from_env({ENV_TIMEOUT: "2.5"}) == 2.5 and timeout_from_env({}) == 120.0


def test_a_rendezvous_that_cannot_complete_is_a_clear_failure(tmp_path):
    # one process of two: the other never comes, and the wait ends after DYNGAN_DIST_TIMEOUT
    env = env_for(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()), DYNGAN_DIST_TIMEOUT="3")
    proc = subprocess.run([sys.executable, "-m", "core", "train", "--out", str(tmp_path / "r"), *SMALL,
                           "--steps", "2"], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "could not meet" in proc.stderr and "WORLD_SIZE" in proc.stderr
    assert "Traceback" not in proc.stderr
