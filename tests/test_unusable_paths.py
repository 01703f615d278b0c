"""Paths that cannot even be looked at (a component longer than the file system allows, an I/O error
while stat-ing them): every command says so in one line and exits 2, no traceback, nothing created."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
from pathlib import Path

import pytest

import core.rundir as rundir
from core.errors import UsageError
from cli_helpers import assert_clean_error, invoke, tiny_run

LONG = "x" * 256  # one component past NAME_MAX (255 on Linux and macOS file systems)
TOO_LONG = os.strerror(errno.ENAMETOOLONG)  # "File name too long"


@pytest.fixture(autouse=True)
def _no_pictures(monkeypatch):
    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished run with one checkpoint."""
    return tiny_run(tmp_path_factory.mktemp("paths") / "run", 5)


def _clean_exit_2(res, *needles):
    return assert_clean_error(res, 2, *needles)


TRAIN = ["--device", "cpu", "--steps", "5", "-q", "-o", "dataset.n=500"]
COMMANDS = {
    "sample": lambda p, tmp: ["sample", p, "--n", "5", "--out", str(tmp / "s.npy")],
    "evaluate": lambda p, tmp: ["evaluate", p],
    "report": lambda p, tmp: ["report", p],
    "train": lambda p, tmp: ["train", "--out", p, *TRAIN],
    "train --resume": lambda p, tmp: ["train", "--out", p, "--resume"],
    "train --dry-run": lambda p, tmp: ["train", "--out", p, "--dry-run", *TRAIN],
}


@pytest.mark.parametrize("where", ["relative", "inside"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_name_too_long_is_exit_2_for_every_command(tmp_path, monkeypatch, command, where):
    monkeypatch.chdir(tmp_path)
    path = LONG if where == "relative" else str(tmp_path / LONG / "run")
    err = _clean_exit_2(invoke(COMMANDS[command](path, tmp_path)), f"cannot use {path!r}", TOO_LONG)
    assert len(err) < len(path) + 100
    assert sorted(os.listdir(tmp_path)) == []  # no run directory, no samples file


def test_a_name_too_long_leaves_no_run_directory_beside_a_saved_run(tmp_path, monkeypatch, run):
    # the run next door is untouched by the refused commands
    saved = tmp_path / "saved"
    shutil.copytree(run, saved)
    before = {p: p.read_bytes() for p in sorted(saved.rglob("*")) if p.is_file()}
    monkeypatch.chdir(tmp_path)
    for command in COMMANDS.values():
        _clean_exit_2(invoke(command(str(saved / LONG), tmp_path)), TOO_LONG)
    assert {p: p.read_bytes() for p in sorted(saved.rglob("*")) if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["saved"]


@pytest.fixture
def unreadable(tmp_path, monkeypatch):
    """A folder whose entries cannot be stat-ed: every stat below it fails with EIO, an error pathlib's
    exists() / is_dir() / is_file() pass on (not only a name too long: any OSError)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    real_stat = pathlib.Path.stat

    def stat(self, *args, **kwargs):
        if str(self).startswith(str(bad) + os.sep):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    return bad


def test_any_os_error_on_a_user_path_is_a_usage_error(unreadable):
    io_error = os.strerror(errno.EIO)
    path = unreadable / "run"
    for check in (rundir.read_config, rundir.check_new, rundir.is_run):
        with pytest.raises(UsageError, match=f"cannot use '{path}': {io_error}"):
            check(path)
    with pytest.raises(UsageError, match=io_error):
        rundir.create(path)
    assert os.listdir(unreadable) == []


def test_any_os_error_on_a_user_path_is_exit_2_from_the_cli(tmp_path, unreadable):
    path = str(unreadable / "run")
    for command in COMMANDS.values():
        _clean_exit_2(invoke(command(path, tmp_path)), f"cannot use {path!r}", os.strerror(errno.EIO))
    assert os.listdir(unreadable) == []


def test_the_runs_root_that_cannot_be_listed_is_a_usage_error(unreadable):
    with pytest.raises(UsageError, match=f"cannot use '{unreadable / 'runs'}'"):
        rundir.create(None, unreadable / "runs")


def test_os_errors_are_usage_errors_and_paths_that_can_be_looked_at_are_unchanged(tmp_path, run, unreadable):
    with pytest.raises(UsageError, match=f"cannot use '{unreadable / 'run'}'"):
        rundir.check_new(unreadable / "run")
    # the usual messages still come for paths that stat fine (or do not exist)
    with pytest.raises(UsageError, match=r"is not a run directory \(it does not exist\)"):
        rundir.read_config(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        rundir.check_new(tmp_path / "f")
    with pytest.raises(UsageError, match="already holds a run"):
        rundir.check_new(Path(run))
    assert rundir.is_run(Path(run)) and not rundir.is_run(tmp_path)
    assert rundir.read_config(Path(run))["dataset"] == "grid25"


def test_a_run_that_lost_its_config_is_named_as_such_by_train_and_resume(tmp_path, run):
    """Its checkpoints still block a new run there, but the advice is not the --resume that would
    refuse it too: both say the config.json is what is missing, and nothing is removed."""
    out = tmp_path / "c9"
    shutil.copytree(run, out)
    (out / "config.json").unlink()
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    res = invoke(["train", "--out", str(out), "--steps", "10", "-q"])
    err = _clean_exit_2(res, "holds checkpoints of a run but not its config.json", "restore that file")
    assert "use --resume" not in err
    _clean_exit_2(invoke(["train", "--out", str(out), "--resume", "-q"]), "no config.json")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_a_new_run_that_fails_before_it_begins_takes_the_folders_made_for_it(tmp_path, monkeypatch):
    """runs/ (made for a numbered run) and the new parents of --out go with the failed run; a folder
    that existed before stays, even empty."""
    monkeypatch.chdir(tmp_path)
    bad = ["--sampling", "epoch", "-o", "dataset.n=100", "--steps", "5", "-q"]  # refused after the run directory is made
    _clean_exit_2(invoke(["train", *bad]), "--sampling epoch needs one full batch")
    _clean_exit_2(invoke(["train", "--out", "a/b/c", *bad]), "--sampling epoch needs one full batch")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "runs").mkdir()
    (tmp_path / "a").mkdir()
    _clean_exit_2(invoke(["train", *bad]), "--sampling epoch needs one full batch")
    _clean_exit_2(invoke(["train", "--out", "a/b/c", *bad]), "--sampling epoch needs one full batch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "runs"]
    assert list((tmp_path / "runs").iterdir()) == [] and list((tmp_path / "a").iterdir()) == []
    # a run that did begin keeps its folders, of course
    res = invoke(["train", "--out", "x/y", "--steps", "2", "-o", "dataset.n=300", "--eval-every", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x" / "y" / "config.json").is_file()
