"""Pictures of a run (core/report.py): files, their validity, coverage marks, panels, errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from core import report  # noqa: E402
from core.api import sample, train  # noqa: E402
from core.errors import CheckpointError, UsageError  # noqa: E402
from core.plugins import get_host  # noqa: E402
from cli_helpers import resign_checkpoint  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GREEN = (0x2C, 0xA0, 0x2C)  # matplotlib tab:green (covered modes)
RED = (0xD6, 0x27, 0x28)  # matplotlib tab:red (missed modes)


def _components(kind: str) -> set[str]:
    return set(get_host().registry.names(kind))


HAVE_DYNGAN = ({"dyngan"} <= _components("detector") and {"dyngan"} <= _components("partitioner")
               and {"onehot"} <= _components("conditioner"))
HAVE_DIGITS = "stacked-digits" in _components("dataset")


def _train(settings: dict) -> Path:
    # the pictures written at the end of training are switched off: write_report must make them
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYNGAN_NO_PICTURES", "1")
        mp.setenv("OMP_NUM_THREADS", "1")
        res = train(settings)
    run = Path(res.run_dir)
    assert not (run / report.PICTURES).exists()
    return run


@pytest.fixture(scope="module")
def run2d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "r"
    return _train({"dataset": "grid25", "steps": 60, "seed": 0, "device": "cpu", "out": str(out),
                   "log_every": 20, "eval_every": 30, "options": {"dataset": {"n": 2000}}})


@pytest.fixture(scope="module")
def run2d_pictures(run2d) -> list[Path]:
    return report.write_report(run2d)


def _check_png(path: Path) -> "Image.Image":
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"
    img = Image.open(path)
    img.load()
    assert img.format == "PNG"
    assert img.width >= 400 and img.height >= 250
    rgb = img.convert("RGB")
    lo, hi = zip(*rgb.getextrema())
    assert max(hi) - min(lo) > 100, f"{path} is (nearly) one flat colour"
    assert len(rgb.getcolors(maxcolors=1 << 20) or []) > 20, f"{path} has almost no colours"
    return rgb


def _has_colour(img: "Image.Image", colour: tuple[int, int, int], tol: int = 12, min_pixels: int = 20) -> int:
    t = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.int32)).reshape(-1, 3)
    close = (t - torch.tensor(colour)).abs().max(1).values <= tol
    return int(close.sum()) >= min_pixels


# --------------------------------------------------------------------------- coverage helper


def test_coverage_on_hand_made_samples():
    centres = [[x, y] for x in (-4.0, -2.0, 0.0, 2.0, 4.0) for y in (-4.0, -2.0, 0.0, 2.0, 4.0)]
    sigma = 0.05
    samples = torch.tensor([
        [-4.0, -4.0],                 # mode 0, exactly on it
        [-4.0, -4.0],                 # mode 0 again
        [0.0 + 2.9 * sigma, 0.0],     # mode 12, just inside 3 sigma
        [2.0 + 3.1 * sigma, 2.0],     # mode 18, just outside 3 sigma: not covered
        [1.0, 1.0],                   # between modes: covers nothing
        [100.0, -100.0],              # far-off noise
        [float("nan"), 4.0],          # a diverged sample covers nothing
        [4.0, float("inf")],
    ])
    cov = report.coverage(samples, centres, sigma)
    assert cov.dtype == torch.bool and cov.shape == (25,)
    assert set(torch.nonzero(cov).flatten().tolist()) == {0, 12}


def test_coverage_all_and_none():
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert report.coverage(centres.repeat(3, 1), centres, 0.01).all()
    assert not report.coverage(torch.full((50, 2), 7.0), centres, 0.01).any()
    # chunking must not change the answer
    x = centres[torch.arange(300) % 3] + 0.001
    assert report.coverage(x, centres, 0.01, chunk=7).all()
    with pytest.raises(ValueError, match="dimensions"):
        report.coverage(torch.zeros(4, 3), centres, 0.01)


def test_coverage_agrees_with_the_mixture_metric(run2d):
    """The rings and crosses in the picture are the modes that `mixture/modes` counts."""
    mm = pytest.importorskip("dyngan_plugins.mixture_metrics")
    from dyngan_plugins.mixtures import Grid25

    ds = Grid25()
    fake = torch.from_numpy(sample(run2d, 2500, seed=0))
    cov = report.coverage(fake, ds.info()["centres"], ds.info()["sigma"])
    stats = mm.mixture_stats(fake, ds.info()["centres"], ds.info()["sigma"])
    assert int(cov.sum()) == int(stats["mixture/modes"])


# --------------------------------------------------------------------------- a 2D run


def test_2d_run_pictures_exist_and_are_valid(run2d, run2d_pictures):
    pics = run2d / report.PICTURES
    assert run2d_pictures == [pics / "samples.png", pics / "curves.png"]
    for p in run2d_pictures:
        _check_png(p)
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in pics.iterdir()) == ["curves.png", "samples.png"]


def test_2d_picture_marks_covered_and_missed_modes(run2d, run2d_pictures):
    from dyngan_plugins.mixtures import Grid25

    info = Grid25().info()
    fake = torch.from_numpy(sample(run2d, 2500, seed=0))  # the very samples the picture draws
    cov = report.coverage(fake, info["centres"], info["sigma"])
    img = _check_png(run2d_pictures[0])
    assert _has_colour(img, GREEN) == bool(cov.any())
    assert _has_colour(img, RED) == bool((~cov).any())


def test_marks_follow_the_coverage_rule(run2d, tmp_path, monkeypatch):
    """All modes covered: green rings and no red cross; none covered: the reverse."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(run2d, run)
    real_coverage = report.coverage
    monkeypatch.setattr(report, "coverage", lambda *a, **k: torch.ones_like(real_coverage(*a, **k)))
    img = _check_png(report.write_report(run)[0])
    assert _has_colour(img, GREEN) and not _has_colour(img, RED)
    monkeypatch.setattr(report, "coverage", lambda *a, **k: torch.zeros_like(real_coverage(*a, **k)))
    img = _check_png(report.write_report(run)[0])
    assert _has_colour(img, RED) and not _has_colour(img, GREEN)


def test_report_is_a_pure_function_of_the_run(run2d, run2d_pictures):
    first = [p.read_bytes() for p in run2d_pictures]
    again = report.write_report(run2d)
    assert again == run2d_pictures
    assert [p.read_bytes() for p in again] == first
    # another seed draws other samples: the samples picture changes, the curves do not
    other = report.write_report(run2d, seed=1)
    assert other[0].read_bytes() != first[0]
    assert other[1].read_bytes() == first[1]
    report.write_report(run2d)  # leave the seed-0 pictures for the other tests


def test_curves_skip_panels_without_data(run2d, run2d_pictures, tmp_path):
    # the same tiny run without evaluation: only the losses panel
    bare = _train({"dataset": "grid25", "steps": 40, "seed": 0, "device": "cpu", "out": str(tmp_path / "b"),
                   "log_every": 20, "eval_every": 0, "metrics": [], "options": {"dataset": {"n": 2000}}})
    samples_bare, curves_bare = report.write_report(bare)
    h_bare = _check_png(curves_bare).height
    h_eval = _check_png(run2d_pictures[1]).height
    # run2d logs eval events (modes, quality, KL): three more panels
    assert h_eval > h_bare + 3 * 200
    # with no partitioner the samples picture has one panel, not two
    assert _check_png(samples_bare).width < 1000


def test_curves_plot_metrics_beyond_modes_quality_and_kl(tmp_path):
    # prdc (own data): its four values get a panel of their own
    settings = {"dataset": "grid25", "steps": 40, "seed": 0, "device": "cpu", "log_every": 20, "eval_every": 20,
                "options": {"dataset": {"n": 2000}}}
    bare = _train({**settings, "out": str(tmp_path / "b"), "metrics": []})
    prdc = _train({**settings, "out": str(tmp_path / "p"), "metrics": ["prdc"]})
    h_bare = _check_png(report.write_report(bare)[1]).height
    h_prdc = _check_png(report.write_report(prdc)[1]).height
    assert h_prdc > h_bare + 200


def test_curves_read_every_kind_of_record(tmp_path, run2d):
    """A metrics log with detection, partition and divergence events draws all panels."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(run2d, run)
    shutil.rmtree(run / report.PICTURES, ignore_errors=True)
    h_before = _check_png(report.write_report(run)[1]).height
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        for rec in ({"step": 20, "event": "detection", "collapse/fraction": 0.3, "collapse/count": 600},
                    {"step": 40, "event": "detection", "collapse/fraction": "nan", "collapse/count": 0},
                    {"step": 40, "event": "partition", "partition/count": 3, "partition/sizes": [1, 1, 1]},
                    {"step": 50, "event": "divergence", "name": "loss/d", "value": "inf"}):
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 60, "loss/d": 1.0, "loss/g"')  # a line cut by a crash
    h_after = _check_png(report.write_report(run)[1]).height
    assert h_after > h_before + 2 * 200  # collapse and partition panels added


def test_series_and_numbers():
    recs = [{"step": 1, "loss/d": 1.5}, {"step": 2, "loss/d": "nan"}, {"step": 3, "loss/d": None},
            {"step": 4, "event": "eval", "loss/d": 9.0}, {"step": "x", "loss/d": 2.0}, {"step": 5, "loss/d": True}]
    xs, ys = report._series(recs, "loss/d", None)
    assert xs == [1, 2] and ys[0] == 1.5 and ys[1] != ys[1]  # NaN kept as NaN
    assert report._series(recs, "loss/d", "eval") == ([4], [9.0])
    # inf, and values no axis can span, are left out (matplotlib raises on them)
    recs = [{"step": 1, "loss/d": "inf"}, {"step": 2, "loss/d": -math.inf}, {"step": 3, "loss/d": 1e308},
            {"step": 4, "loss/d": -10**400}, {"step": 5, "loss/d": 1e299}, {"step": 6, "loss/d": "-2.5"}]
    assert report._series(recs, "loss/d", None) == ([5, 6], [1e299, -2.5])


@pytest.mark.parametrize("rec", [
    {"step": 30, "event": "partition", "partition/count": "inf"},
    {"step": 30, "loss/d": 1e308, "loss/g": -1e308},
    {"step": 30, "event": "eval", "mixture/hq": "inf", "mixture/reverse_kl": -1e308},
])
def test_curves_survive_values_no_axis_can_span(tmp_path, run2d, rec):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(run2d, run)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    _check_png(report.write_report(run)[1])


# --------------------------------------------------------------------------- images


def test_image_helpers():
    x = torch.tensor([-1.0, 0.0, 1.0, 5.0]).view(1, 1, 2, 2)
    rgb = report._to_rgb(x)
    assert rgb.shape == (1, 2, 2, 3)
    assert rgb[0, :, :, 0].flatten().tolist() == [0.0, 0.5, 1.0, 1.0]
    assert torch.equal(rgb[..., 0], rgb[..., 2])  # grey
    col = report._to_rgb(torch.stack([torch.full((2, 2), -1.0), torch.zeros(2, 2), torch.ones(2, 2)])[None])
    assert col[0, 0, 0].tolist() == [0.0, 0.5, 1.0]  # channel order kept: RGB
    assert report._to_rgb(torch.full((1, 3, 2, 2), float("nan"))).isfinite().all()
    rows = [torch.zeros(3, 4, 5, 3), torch.zeros(1, 4, 5, 3)]
    m = report._mosaic(rows, cols=3, pad=1)
    assert m.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
    assert float(m[1:5, 1:6].max()) == 0.0  # an image
    assert float(m[6:10, 7:12].min()) == 1.0  # the empty slot of the short row stays white


@pytest.mark.skipif(not HAVE_DIGITS, reason="the stacked-digits dataset is not installed")
def test_image_run_draws_a_sample_grid(tmp_path):
    pytest.importorskip("sklearn")
    run = _train({"dataset": "stacked-digits", "steps": 20, "seed": 0, "device": "cpu", "out": str(tmp_path / "i"),
                  "log_every": 10, "eval_every": 0, "metrics": [], "batch_size": 32,
                  "options": {"dataset": {"n": 500}}})
    paths = report.write_report(run)
    assert [p.name for p in paths] == ["samples.png", "curves.png"]
    grid = _check_png(paths[0])
    # generated and real grids side by side, 10 x 10 each
    assert grid.width > 1.5 * grid.height
    _check_png(paths[1])


# --------------------------------------------------------------------------- DynGAN runs


@pytest.mark.skipif(not HAVE_DYNGAN, reason="the DynGAN detector/partitioner/onehot conditioner are not installed")
def test_partitioned_2d_run(tmp_path, run2d_pictures):
    # delta 2 (collapsed where D's logit exceeds -log 2) flags part of the data this early, so the
    # run partitions at step 30 (delta 10 flags all of it in D's latest pass: no split)
    run = _train({"dataset": "grid25", "preset": "dyngan", "steps": 60, "seed": 0, "device": "cpu",
                  "out": str(tmp_path / "d"), "log_every": 10, "eval_every": 30,
                  "options": {"dataset": {"n": 2000}, "detector": {"every": 15, "delta": 2.0},
                              "partitioner": {"every": 30}}})
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    parts = [e for e in events if e.get("event") == "partition"]
    assert parts, "the run was expected to partition its data"
    paths = report.write_report(run)
    samples, curves = (_check_png(p) for p in paths)
    plain_samples, plain_curves = (Image.open(p) for p in run2d_pictures)
    # two panels (samples, real data by partition) instead of one
    assert samples.width > 1.6 * plain_samples.width
    # collapse and partition panels on top of the plain run's
    assert curves.height > plain_curves.height + 2 * 200
    # the partitions are drawn in tab10 colours beyond the first (partition 1: orange)
    assert _has_colour(samples, (0xFF, 0x7F, 0x0E))


@pytest.mark.skipif(not (HAVE_DYNGAN and HAVE_DIGITS), reason="DynGAN plugins or stacked-digits missing")
def test_partitioned_image_run(tmp_path):
    pytest.importorskip("sklearn")
    # partitions at step 10, when part (not all) of the data is called collapsed: with the 2D code's
    # rule (probability average, split on it), as D's latest pass at step 10 scores every image
    # alike and flags all or none of them
    run = _train({"dataset": "stacked-digits", "preset": "dyngan", "steps": 20, "seed": 0, "device": "cpu",
                  "out": str(tmp_path / "di"), "log_every": 10, "eval_every": 0, "metrics": [], "batch_size": 32,
                  "options": {"dataset": {"n": 500},
                              "detector": {"every": 10, "delta": 10.0, "average": "probability"},
                              "partitioner": {"every": 10, "split_on": "average"}}})
    from core import checkpoint as ckpt_io

    step, path = ckpt_io.list_checkpoints(run / "checkpoints")[-1]
    prior = ckpt_io.read(path).tensors["train/prior"]
    active = int((prior > 0).sum())
    assert active > 1, "the run was expected to partition its data"
    paths = report.write_report(run)
    grid = _check_png(paths[0])
    _check_png(paths[1])
    # rows of generated images per condition beside the real images of each partition
    assert grid.width > 1.5 * grid.height


HAVE_KMEANS = {"kmeans"} <= _components("partitioner") and {"onehot"} <= _components("conditioner")


@pytest.fixture(scope="module")
def kmeans_run(tmp_path_factory) -> Path:
    """A run partitioned by k-means into 5 parts (at steps 10, 20 and 30)."""
    if not HAVE_KMEANS:
        pytest.skip("the kmeans partitioner or onehot conditioner is not installed")
    out = tmp_path_factory.mktemp("kmeans") / "k"
    return _train({"dataset": "grid25", "steps": 30, "seed": 0, "device": "cpu", "out": str(out), "threads": 1,
                   "log_every": 10, "eval_every": 0, "checkpoint_every": 10, "partitioner": "kmeans",
                   "conditioner": "onehot", "options": {"dataset": {"n": 500},
                                                        "partitioner": {"every": 10, "k": 5}}})


def _forge_first_label(run: Path, value: int) -> str:
    """The newest checkpoint with its first partition label set to ``value``, still a valid checkpoint."""
    from safetensors.torch import load

    from core import checkpoint as ckpt_io

    step, jpath = ckpt_io.list_checkpoints(run / "checkpoints")[-1]
    tensors = load(jpath.with_suffix(".safetensors").read_bytes())
    tensors["train/labels"][0] = value
    resign_checkpoint(jpath, tensors)
    assert ckpt_io.read(jpath).step == step == 30  # still the run's good newest checkpoint
    return jpath.name


def _capacity(run: Path) -> int:
    from core import checkpoint as ckpt_io

    return int(ckpt_io.read(ckpt_io.list_checkpoints(run / "checkpoints")[-1][1]).tensors["train/prior"].shape[0])


@pytest.mark.parametrize("value", [2**62, "capacity", -1])
def test_out_of_range_partition_labels_draw_no_partition_panel_and_say_why(tmp_path, kmeans_run, value):
    """An edited checkpoint whose partition labels are outside [0, conditions): the report draws
    the samples without the partition panel and warns once, instead of crashing (2**62: an
    allocation overflow in bincount) or drawing a partition that does not exist."""
    import shutil

    from cli_helpers import invoke

    good = report.write_report(kmeans_run, n=50)[0]
    assert _check_png(good).width > 1000  # the unedited run: two panels (samples, partitions)
    run = tmp_path / "k"
    shutil.copytree(kmeans_run, run, ignore=shutil.ignore_patterns(report.PICTURES))
    value = _capacity(run) if value == "capacity" else value
    name = _forge_first_label(run, value)
    res = invoke(["report", str(run), "--n", "50"])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    warnings = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1, res.stderr
    assert warnings[0].startswith("warning: ") and name in warnings[0] and "partition labels out of range" \
        in warnings[0], warnings
    samples, curves = (run / report.PICTURES / f for f in ("samples.png", "curves.png"))
    assert _check_png(samples).width < 1000  # one panel: no partition picture
    _check_png(curves)


# --------------------------------------------------------------------------- errors


def test_bad_run_directories(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        report.write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        report.write_report(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        report.write_report(bad)


def test_run_without_checkpoint(tmp_path, run2d):
    import shutil

    run = tmp_path / "nock"
    run.mkdir()
    shutil.copy(run2d / "config.json", run / "config.json")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        report.write_report(run)
    assert not (run / report.PICTURES).exists()


def test_bad_n(run2d):
    with pytest.raises(UsageError, match="--n"):
        report.write_report(run2d, n=0)


def test_missing_matplotlib_names_the_extra(run2d, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UsageError, match=r'pip install "dyngan\[plots\]"'):
        report.write_report(run2d)


def _all_bytes(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _report_cli(run: Path):
    from cli_helpers import invoke

    return invoke(["report", str(run), "--n", "200"])


def _assert_cannot_write(res, run: Path) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert err.startswith("Error: cannot write pictures into") and len(err.splitlines()) == 1, err
    assert str(run / report.PICTURES) in err


def test_pictures_that_cannot_be_written_are_a_clean_error(tmp_path, run2d):
    """A write failure while saving a picture (here: a folder where samples.png goes, which also
    fails as root) is one line, exit 2, and leaves the run as it was."""
    import shutil

    run = tmp_path / "r"
    shutil.copytree(run2d, run)
    shutil.rmtree(run / report.PICTURES, ignore_errors=True)
    (run / report.PICTURES / "samples.png").mkdir(parents=True)
    before = _all_bytes(run)
    _assert_cannot_write(_report_cli(run), run)
    assert _all_bytes(run) == before
    assert sorted(p.name for p in (run / report.PICTURES).iterdir()) == ["samples.png"]  # no temporary left


def test_read_only_run_directory_is_a_clean_error(tmp_path, run2d, monkeypatch):
    """A read-only run directory whose pictures/ exists: the write fails (EROFS faked for root,
    who may write anywhere; a real chmod where the tests do not run as root)."""
    import errno
    import os
    import shutil
    import stat

    run = tmp_path / "r"
    shutil.copytree(run2d, run)
    (run / report.PICTURES).mkdir(exist_ok=True)
    before = _all_bytes(run)
    if os.geteuid() == 0:
        real_replace = os.replace

        def read_only(src, dst, *a, **k):
            if Path(dst).parent == run / report.PICTURES:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(report.os, "replace", read_only)
        _assert_cannot_write(_report_cli(run), run)
        assert "Read-only file system" in _report_cli(run).stderr
    else:
        modes = {p: p.stat().st_mode for p in [run, *run.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            _assert_cannot_write(_report_cli(run), run)
        finally:
            for p, m in modes.items():
                p.chmod(m)
    assert _all_bytes(run) == before


# ------------------------------------------------- odd tensor-file data (a QA pass)


def _tensor_run(tmp_path: Path, arr: np.ndarray, **extra) -> Path:
    p = tmp_path / "data.npy"
    np.save(p, arr)
    return _train({"dataset": "tensor-file", "steps": 5, "device": "cpu", "threads": 1, "eval_every": 0,
                   "metrics": "none", "out": str(tmp_path / "r"), "options": {"dataset": {"path": str(p)}}, **extra})


@pytest.mark.parametrize("make", [
    lambda rng: rng.standard_normal((1, 5)),  # one sample: one principal axis (IndexError)
    lambda rng: rng.uniform(-1, 1, (64, 3, 1, 8)),  # not an image: no samples picture was drawn
    lambda rng: rng.uniform(-1, 1, (64, 2, 3, 4, 5)),
    lambda rng: rng.uniform(1, 2, (64, 3)) * 1e37,  # float32's mean and SVD overflowed
    lambda rng: rng.standard_normal(64) * 1e38,  # 1-D: hi - lo overflowed in the bins
], ids=["one-sample", "C-1-W", "4-d", "huge-3-d", "huge-1-d"])
def test_report_draws_samples_of_any_trainable_data(tmp_path, make):
    run = _tensor_run(tmp_path, make(np.random.default_rng(0)).astype(np.float32))
    paths = report.write_report(run, n=200)
    assert [p.name for p in paths] == ["samples.png", "curves.png"]
    for p in paths:
        _check_png(p)


def test_report_and_evaluate_refuse_data_that_changed_shape_since_training(tmp_path):
    from core.api import evaluate
    from core.errors import DataError

    run = _tensor_run(tmp_path, np.random.default_rng(0).standard_normal((64, 50)).astype(np.float32))
    np.save(tmp_path / "data.npy", np.random.default_rng(1).standard_normal((64, 7)).astype(np.float32))
    for call in (lambda: report.write_report(run, n=50), lambda: evaluate(run, n=50)):
        with pytest.raises(DataError, match=r"its samples are now shaped \[7\], but the run was trained on samples "
                                            r"shaped \[50\]"):
            call()


# ------------------------------------------------- what the pictures show (a visual QA pass)


@pytest.fixture
def figures(monkeypatch):
    """The figures ``write_report`` saves, by file name (kept open for inspection)."""
    saved: dict[str, Any] = {}
    real_save = report._save

    def keep(fig, path):
        saved[Path(path).name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    return saved


def _kmeans_settings(tmp_path: Path, k: int, capacity: int = 30, **extra) -> dict:
    return {"dataset": "grid25", "steps": 4, "seed": 0, "device": "cpu", "out": str(tmp_path / "k"), "threads": 1,
            "log_every": 2, "eval_every": 2, "partitioner": "kmeans", "conditioner": "onehot",
            "options": {"dataset": {"n": 1000}, "partitioner": {"every": 2, "k": k, "restarts": 1},
                        "conditioner": {"capacity": capacity}}, **extra}


def test_generated_samples_are_drawn_over_the_real_data(run2d, figures):
    report.write_report(run2d)
    ax = figures["samples.png"].axes[0]
    order = {c.get_label().split(" (")[0]: c.get_zorder() for c in ax.collections}
    assert order["generated"] > order["real data"]  # drawn under it, samples in a real cluster were hidden


@pytest.mark.skipif(not HAVE_KMEANS, reason="the kmeans partitioner or onehot conditioner is not installed")
@pytest.mark.parametrize("k", [20, 30])
def test_a_partition_legend_lists_up_to_30_partitions(tmp_path, figures, k):
    run = _train(_kmeans_settings(tmp_path, k))
    report.write_report(run, n=200)
    ax2 = figures["samples.png"].axes[1]
    names = [t.get_text() for t in ax2.get_legend().get_texts()]
    assert sum(n.startswith("partition ") for n in names) == k and "mode centre" in names


@pytest.mark.skipif(not HAVE_KMEANS, reason="the kmeans partitioner or onehot conditioner is not installed")
def test_above_30_partitions_the_note_says_how_many_colours_there_are(tmp_path, figures):
    run = _train(_kmeans_settings(tmp_path, 40, capacity=40))
    report.write_report(run, n=200)
    ax2 = figures["samples.png"].axes[1]
    assert ax2.get_legend() is None
    note = " ".join(t.get_text() for t in ax2.texts)
    # 40 distinct colours (tab20, tab20b, tab20c): it said "colours repeat after 20"
    assert "40 partitions, one colour each, + a mode centre; no legend above 30" in note
    assert "repeat" not in note


@pytest.mark.skipif(not HAVE_KMEANS, reason="the kmeans partitioner or onehot conditioner is not installed")
def test_a_partitioned_one_dimensional_run_shows_its_partitions(tmp_path, figures):
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(c, 0.1, 300) for c in (-2.0, 0.0, 2.0)]).astype(np.float32)[:, None]
    p = tmp_path / "d1.npy"
    np.save(p, data)
    run = _train({"dataset": "tensor-file", "steps": 4, "seed": 0, "device": "cpu", "threads": 1,
                  "out": str(tmp_path / "r"), "eval_every": 0, "metrics": "none", "partitioner": "kmeans",
                  "conditioner": "onehot", "options": {"dataset": {"path": str(p)},
                                                       "partitioner": {"every": 2, "k": 3, "restarts": 1}}})
    report.write_report(run, n=200)
    fig = figures["samples.png"]
    assert len(fig.axes) == 2  # the partitions were only a word in the title
    ax2 = fig.axes[1]
    assert ax2.get_title() == "real data stacked by partition: 3 partitions"
    names = [t.get_text() for t in ax2.get_legend().get_texts()]
    assert len(names) == 3 and sum(int(n.split("(")[1].split()[0]) for n in names) == 900


def test_the_all_modes_line_is_inside_the_frame_and_equal_series_are_drawn_once(run2d, figures):
    report.write_report(run2d)
    axes = {ax.get_title(): ax for ax in figures["curves.png"].axes}
    modes = axes["modes covered (evaluation)"]
    assert modes.get_ylim()[1] > 25 * 1.05  # the dashed line at 25 merged with the top border
    quality = axes["high-quality samples (evaluation)"]
    labels = [ln.get_label() for ln in quality.get_lines()]
    # the PacGAN hq is the DynGAN protocol's hq3: one line labelled with both, not one hidden under the other
    assert "mixture/hq = mixture/dyngan/hq3" in labels and "mixture/dyngan/hq3" not in labels
    kl = axes["KL(generated mode histogram || uniform), 0 is best (evaluation)"]
    assert [ln.get_label() for ln in kl.get_lines()] == ["mixture/reverse_kl = mixture/dyngan/reverse_kl"]


@pytest.mark.skipif(not HAVE_KMEANS, reason="the kmeans partitioner or onehot conditioner is not installed")
def test_a_partition_none_of_the_drawn_points_is_in_keeps_its_legend_entry(tmp_path, figures, monkeypatch):
    run = _train(_kmeans_settings(tmp_path, 5))
    monkeypatch.setattr(report, "MAX_REAL_POINTS", 1)  # one real point drawn: four partitions not in it
    report.write_report(run, n=200)
    names = [t.get_text() for t in figures["samples.png"].axes[1].get_legend().get_texts()]
    assert sorted(n.split(" (")[0] for n in names if n.startswith("partition ")) == [f"partition {i}" for i in range(5)]
