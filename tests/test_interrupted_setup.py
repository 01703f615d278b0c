"""Ctrl-C before the first training step, and run directories whose layout is broken: exit 130 or 2
with one line, a new run leaves nothing behind, a saved run is left as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core import training as training_mod
from core.errors import OptionError
from cli_helpers import assert_clean_error, invoke, tiny_run

BASE = ["--dataset", "grid25", "-o", "dataset.n=2000", "--device", "cpu", "--threads", "1", "-q"]


@pytest.fixture(autouse=True)
def _no_pictures(monkeypatch):
    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")


@pytest.fixture(scope="module")
def run10(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("saved") / "run10", 10, n=2000)


def all_bytes(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _interrupt(monkeypatch, where: str) -> None:
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    if where == "setup":  # building the data and networks
        monkeypatch.setattr(training_mod.Trainer, "__init__", ctrl_c)
    else:  # in Trainer.run, before the loop (loading a checkpoint, setting up components)
        monkeypatch.setattr(training_mod.Trainer, "_setup_components", ctrl_c)


@pytest.mark.parametrize("where", ["setup", "run"])
def test_ctrl_c_before_the_first_step_of_a_new_run_exits_130_and_leaves_no_run(tmp_path, monkeypatch, where):
    """It used to print click's "Aborted!" with exit 1 and leave a config.json that blocked the same
    --out, whose advice then pointed to a metrics.jsonl that did not exist."""
    out = tmp_path / "new"
    _interrupt(monkeypatch, where)
    res = invoke(["train", "--out", str(out), "--steps", "20", *BASE])
    err = assert_clean_error(res, 130, "interrupted by Ctrl-C")
    if where == "run":
        assert "before the first training step" in err and "the new run was removed" in err
    assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
    monkeypatch.undo()
    res = invoke(["train", "--out", str(out), "--steps", "20", *BASE])  # the same command now trains
    assert res.exit_code == 0, res.output
    assert (out / "checkpoints" / "step-00000020.json").exists()


@pytest.mark.parametrize("where", ["setup", "run"])
def test_ctrl_c_before_the_first_step_of_a_resume_leaves_the_run_as_it_was(tmp_path, monkeypatch, run10, where):
    out = tmp_path / "r"
    shutil.copytree(run10, out)
    before = all_bytes(out)
    _interrupt(monkeypatch, where)
    res = invoke(["train", "--resume", "--out", str(out), "--steps", "20", "-q"])
    err = assert_clean_error(res, 130, "interrupted by Ctrl-C")
    if where == "run":
        assert "its checkpoints are as they were" in err and "--resume" in err
    after = all_bytes(out)
    # a resume records a new --steps once its checkpoint loaded (for the next plain --resume): the rest is untouched
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items()
                                                                       if k != "config.json"}


def test_a_run_that_never_checkpointed_gets_the_same_advice_from_dry_run_and_train(tmp_path):
    out = tmp_path / "stopped"
    out.mkdir()
    res = invoke(["train", "--out", str(out), "--steps", "20", *BASE, "--dry-run"])
    assert res.exit_code == 0, res.output  # an empty folder is a fine --out
    # a run directory holding only its config.json (a run stopped before its first checkpoint)
    res = invoke(["train", "--out", str(tmp_path / "full"), "--steps", "10", "--checkpoint-every", "10", *BASE])
    assert res.exit_code == 0, res.output
    shutil.copy(tmp_path / "full" / "config.json", out / "config.json")
    for args in (["train", "--out", str(out), "--steps", "20", *BASE],
                 ["train", "--out", str(out), "--steps", "20", *BASE, "--dry-run"],
                 ["train", "--out", str(out), "--resume", "-q"],
                 ["train", "--out", str(out), "--resume", "--dry-run"]):
        err = assert_clean_error(invoke(args), 2, "stopped before its first checkpoint", "delete that directory")
        assert "metrics.jsonl" not in err  # there is none to see
    (out / "metrics.jsonl").write_text('{"step": 0, "event": "start"}\n')
    assert_clean_error(invoke(["train", "--out", str(out), "--resume", "-q"]), 2, "(see its metrics.jsonl)")
    assert (out / "config.json").exists()


@pytest.mark.parametrize("args", [["train", "--resume", "-q", "--out"], ["train", "--resume", "--dry-run", "--out"],
                                  ["evaluate", "--n", "50"], ["sample", "--n", "5", "--out", "SAMPLES"]])
def test_a_checkpoints_entry_that_is_a_file_is_named_not_called_an_unstarted_run(tmp_path, run10, args):
    out = tmp_path / "r"
    shutil.copytree(run10, out)
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("not a folder")
    before = all_bytes(out)
    args = [str(tmp_path / "s.npy") if a == "SAMPLES" else a for a in args]
    argv = args + [str(out)] if args[-1] == "--out" else [args[0], str(out), *args[1:]]
    err = assert_clean_error(invoke(argv), 2, "checkpoints", "is not a folder", "put the folder back")
    assert "delete" not in err and "stopped before its first checkpoint" not in err
    assert all_bytes(out) == before


def test_dry_run_says_a_run_still_starting_is_in_use_as_train_does(tmp_path):
    """A run directory holding only its config.json, locked by a training process that has not
    checkpointed yet: --dry-run must not advise deleting it."""
    import fcntl
    import os

    out = tmp_path / "live"
    tiny_run(tmp_path / "full", 5)
    out.mkdir()
    shutil.copy(tmp_path / "full" / "config.json", out / "config.json")
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a training process holds: the run directory
        for args in (["train", "--out", str(out), "--steps", "20", *BASE],
                     ["train", "--out", str(out), "--steps", "20", *BASE, "--dry-run"]):
            err = assert_clean_error(invoke(args), 2, "another dyngan process is training in")
            assert "delete" not in err
    finally:
        os.close(fd)
    assert (out / "config.json").exists()


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_before_the_first_step_of_a_new_run_exits_143_and_leaves_no_run(tmp_path, monkeypatch, name, code):
    """SIGTERM while the run is set up used to kill the process and leave a config.json that blocked
    the same --out (under torchrun, what rank 0 gets when another rank fails to set up). SIGHUP (a
    closed terminal) did the same, and is now handled as SIGTERM is."""
    import os
    import signal

    signum = getattr(signal, name, None)
    if signum is None:
        pytest.skip(f"no {name} here")

    def send(*a, **k):
        os.kill(os.getpid(), signum)

    def unhandled(signum, frame):  # stands for the default action (which would end pytest too)
        raise RuntimeError(f"{name} reached the handler train() found")

    monkeypatch.setattr(training_mod.Trainer, "_setup_components", send)
    # SIGHUP is taken over only from its default disposition (a program's own handler is left to it),
    # so it has that here: were it not handled, the process running the tests would end
    before = unhandled if name == "SIGTERM" else signal.SIG_DFL
    old = signal.signal(signum, before)
    try:
        out = tmp_path / "new"
        res = invoke(["train", "--out", str(out), "--steps", "20", *BASE])
        err = assert_clean_error(res, code, f"interrupted by {name} before the first training step")
        assert "the new run was removed" in err and not out.exists()
        assert signal.getsignal(signum) is before  # given back
    finally:
        signal.signal(signum, old)


# ---------------------------------------------------------------- a failure before the first step


def _failing_plugin(kind: str, raises: BaseException):
    """A plugin whose ``kind`` component (detector: in setup(); loss: in its first d_loss) raises."""
    import types

    from core import hookimpl
    from core.components import CollapseDetector, Loss, Option

    if kind == "detector":
        class Failing(CollapseDetector):
            name = "fails-in-setup"
            options = {"every": Option(5, "detect every this many steps", min=1)}

            def setup(self, ctx):
                raise raises

            def detect(self, ctx):  # pragma: no cover - setup() fails first
                raise AssertionError("not reached")

        return types.SimpleNamespace(register_collapse_detectors=hookimpl(lambda register: register(Failing)))

    class FailingLoss(Loss):
        name = "fails-at-first-step"

        def d_loss(self, ctx):
            raise raises

        def g_loss(self, ctx):  # pragma: no cover
            raise AssertionError("not reached")

    return types.SimpleNamespace(register_losses=hookimpl(lambda register: register(FailingLoss)))


FAILURES = [("detector", ValueError("k does not fit"), 1, "raised in setup(): ValueError: k does not fit"),
            ("detector", OptionError("detector 'fails-in-setup': k does not fit"), 2, "k does not fit"),
            ("loss", RuntimeError("shapes do not match"), 1, "raised in d_loss(): RuntimeError")]


def _failing_args(kind: str, out: Path) -> list[str]:
    pick = ["--detector", "fails-in-setup", "-o", "detector.every=5"] if kind == "detector" \
        else ["--loss", "fails-at-first-step"]
    return ["train", "--out", str(out), "--steps", "10", *pick, *BASE]


@pytest.mark.parametrize("kind, error, code, needle", FAILURES)
def test_a_failure_before_the_first_step_of_a_new_run_leaves_no_run(tmp_path, kind, error, code, needle):
    """A component's setup() (or the first step) failing used to leave config.json and an empty
    metrics.jsonl (or one holding its start line), so the same --out was refused ("holds a run that
    stopped before its first checkpoint") once the options were fixed."""
    from core.testing import plugin_host

    out = tmp_path / "new"
    with plugin_host(("failing", _failing_plugin(kind, error))):
        assert_clean_error(invoke(_failing_args(kind, out)), code, needle)
    assert not out.exists()
    res = invoke(["train", "--out", str(out), "--steps", "10", *BASE])  # the same --out now trains
    assert res.exit_code == 0, res.output
    assert (out / "checkpoints" / "step-00000010.json").exists()


@pytest.mark.parametrize("kind, error, code, needle", FAILURES[:1] + FAILURES[2:])
def test_a_failure_before_the_first_step_keeps_a_folder_that_held_other_files(tmp_path, kind, error, code, needle):
    """--out may be an existing folder without a run: the run's own files go, the folder and what it
    held before stay."""
    from core.testing import plugin_host

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with plugin_host(("failing", _failing_plugin(kind, error))):
        assert_clean_error(invoke(_failing_args(kind, out)), code, needle)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_failure_before_the_first_step_keeps_an_empty_out_folder_the_user_made(tmp_path):
    """Only what dyngan made goes: an empty --out folder that existed stays, as a new one made
    for the run (and its new parents) go."""
    from core.testing import plugin_host

    made, mine = tmp_path / "new" / "deeper", tmp_path / "mine"
    mine.mkdir()
    with plugin_host(("failing", _failing_plugin("loss", RuntimeError("first step refused")))):
        for out in (mine, made):
            assert_clean_error(invoke(_failing_args("loss", out)), 1, "first step refused")
    assert mine.is_dir() and list(mine.iterdir()) == []
    assert not (tmp_path / "new").exists()


def test_a_failure_before_the_first_step_beside_an_empty_checkpoints_folder_keeps_its_log(tmp_path):
    """A --out holding an empty checkpoints/ folder: the run is not removed (as a run whose first
    checkpoint began), and its log keeps its start record instead of being emptied half-way."""
    from core.testing import plugin_host

    out = tmp_path / "odd"
    (out / "checkpoints").mkdir(parents=True)
    with plugin_host(("failing", _failing_plugin("loss", RuntimeError("first step refused")))):
        assert_clean_error(invoke(_failing_args("loss", out)), 1, "first step refused")
    assert (out / "config.json").is_file()
    assert '"event": "start"' in (out / "metrics.jsonl").read_text()


def test_a_failing_setup_on_resume_leaves_the_saved_run_as_it_was(tmp_path, run10, monkeypatch):
    out = tmp_path / "r"
    shutil.copytree(run10, out)
    before = all_bytes(out)

    def fails(self):
        raise OptionError("set-up refused")

    monkeypatch.setattr(training_mod.Trainer, "_setup_components", fails)
    assert_clean_error(invoke(["train", "--resume", "--out", str(out), "-q"]), 2, "set-up refused")
    assert all_bytes(out) == before


def test_a_failure_after_the_first_step_keeps_the_run_and_its_log(tmp_path):
    """Only a run that trained nothing is removed: one that logged steps keeps its record."""
    import types

    from core import hookimpl
    from core.components import CollapseDetector, Option
    from core.testing import plugin_host

    class FailsInDetect(CollapseDetector):
        name = "fails-in-detect"
        options = {"every": Option(5, "detect every this many steps", min=1)}

        def detect(self, ctx):
            raise ValueError("detection broke")

    plugin = types.SimpleNamespace(register_collapse_detectors=hookimpl(lambda register: register(FailsInDetect)))
    out = tmp_path / "new"
    with plugin_host(("failing", plugin)):
        res = invoke(["train", "--out", str(out), "--steps", "20", "--detector", "fails-in-detect",
                      "-o", "detector.every=10", "--log-every", "5", "--checkpoint-every", "0", *BASE])
    assert_clean_error(res, 1, "raised in detect(): ValueError: detection broke")
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss/d" in x]
    assert logged == [5] and (out / "config.json").exists()
