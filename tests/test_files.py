"""tensor-file and image-folder: good files load, bad ones are one-line DataErrors naming the file."""

from __future__ import annotations

import pickle  # only to *write* a hostile file; the code under test never unpickles
import sys

import pytest

import torch
import numpy as np

from core.errors import DataError, OptionError, UsageError  # noqa: E402
from dyngan_plugins.files import ImageFolder, TensorFile  # noqa: E402


def _load(**opts):
    return TensorFile(**opts).load(torch.Generator().manual_seed(0))


def _one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# --------------------------------------------------------------------------- tensor-file: good files


def test_npy_loads_as_float32(tmp_path):
    arr = np.arange(24, dtype=np.float64).reshape(4, 2, 3) / 7
    p = tmp_path / "data.npy"
    np.save(p, arr)
    x = _load(path=str(p))
    assert x.dtype == torch.float32 and x.shape == (4, 2, 3)
    assert torch.allclose(x, torch.from_numpy(arr).float())


def test_npy_integer_and_bool_and_big_endian(tmp_path):
    p = tmp_path / "ints.npy"
    np.save(p, np.array([[1, 2], [3, 65000]], dtype=np.uint16))
    assert _load(path=str(p)).tolist() == [[1.0, 2.0], [3.0, 65000.0]]
    np.save(p, np.array([[True, False]]))
    assert _load(path=str(p)).tolist() == [[1.0, 0.0]]
    np.save(p, np.array([[1.5, -2.0]], dtype=">f8"))
    assert _load(path=str(p)).tolist() == [[1.5, -2.0]]


def test_one_dimensional_array_is_n_scalar_samples(tmp_path):
    p = tmp_path / "v.npy"
    np.save(p, np.array([0.5, 1.5, 2.5], dtype=np.float32))
    x = _load(path=str(p))
    assert x.shape == (3, 1)


def test_minmax_scaling(tmp_path):
    p = tmp_path / "img.npy"
    np.save(p, np.array([[0, 128], [255, 64]], dtype=np.uint8))
    x = _load(path=str(p), scale="minmax")
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert x[0, 1].item() == pytest.approx(128 / 255 * 2 - 1)
    # "none" from the command line means no scaling
    assert TensorFile(path=str(p), scale="none").opts.scale is None
    with pytest.raises(OptionError):
        TensorFile(scale="zscore")
    np.save(p, np.full((3, 2), 4.0))
    with pytest.raises(DataError, match="minmax") as e:
        _load(path=str(p), scale="minmax")
    _one_line_naming(e, p)


def test_safetensors_single_and_keyed(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "one.safetensors"
    t = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    save_file({"images": t}, str(p))
    x = _load(path=str(p))
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x, t.float())

    p2 = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(2, 2), "b": torch.ones(4, 1, dtype=torch.bfloat16)}, str(p2))
    assert _load(path=str(p2), key="b").tolist() == [[1.0]] * 4
    with pytest.raises(DataError, match="dataset.key") as e:
        _load(path=str(p2))
    msg = _one_line_naming(e, p2)
    assert "a, b" in msg
    with pytest.raises(DataError, match="'c'") as e:
        _load(path=str(p2), key="c")
    _one_line_naming(e, p2)


def test_default_model_and_info(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TensorFile.default_model == "mlp"
    assert TensorFile(path="x.npy").info()["file"] == str(tmp_path / "x.npy")  # made absolute


# --------------------------------------------------------------------------- tensor-file: bad files


def test_nan_and_inf_are_counted_and_located(tmp_path):
    arr = np.zeros((4, 3), dtype=np.float32)
    arr[1, 2] = np.nan
    arr[3, 0] = np.nan
    arr[2, 1] = np.inf
    p = tmp_path / "bad.npy"
    np.save(p, arr)
    with pytest.raises(DataError) as e:
        _load(path=str(p))
    msg = _one_line_naming(e, p)
    assert "2 NaN" in msg and "1 inf" in msg and "(1, 2)" in msg


def test_inf_in_safetensors(tmp_path):
    from safetensors.torch import save_file

    t = torch.zeros(3, 2)
    t[2, 1] = -float("inf")
    p = tmp_path / "inf.safetensors"
    save_file({"x": t}, str(p))
    with pytest.raises(DataError, match=r"1 inf value; the first at index \(2, 1\)") as e:
        _load(path=str(p))
    _one_line_naming(e, p)


def test_float64_overflowing_float32(tmp_path):
    p = tmp_path / "huge.npy"
    np.save(p, np.array([[1.0, 1e300]]))
    with pytest.raises(DataError, match="float32") as e:
        _load(path=str(p))
    _one_line_naming(e, p)


@pytest.mark.parametrize(
    "arr, words",
    [
        (np.array([["a", "b"]]), "strings"),
        (np.array([[1 + 2j, 3j]]), "complex"),
        (np.zeros(3, dtype=[("x", "f4"), ("y", "i4")]), "structured"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "dates"),
    ],
)
def test_wrong_dtypes(tmp_path, arr, words):
    p = tmp_path / "wrong.npy"
    np.save(p, arr)
    with pytest.raises(DataError, match=words) as e:
        _load(path=str(p))
    _one_line_naming(e, p)


def test_complex_safetensors_rejected(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "c.safetensors"
    save_file({"x": torch.zeros(2, 2, dtype=torch.complex64)}, str(p))
    with pytest.raises(DataError, match="complex") as e:
        _load(path=str(p))
    _one_line_naming(e, p)


def test_minmax_scales_values_near_float64s_range(tmp_path):
    p = tmp_path / "wide.npy"
    np.save(p, np.array([[1.5e308, -1.5e308], [0.0, 1.0]] * 4))  # hi - lo overflowed to inf: NaN data
    x = _load(path=str(p), scale="minmax")
    assert torch.equal(x[:2], torch.tensor([[1.0, -1.0], [0.0, 0.0]]))


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_safetensors_load_as_their_float32_values(tmp_path, dtype):
    from safetensors.torch import save_file

    x = (torch.arange(12, dtype=torch.float32).view(6, 2) / 4 - 1).to(getattr(torch, dtype))
    p = tmp_path / "f8.safetensors"
    save_file({"x": x}, str(p))
    got = _load(path=str(p))
    assert got.dtype == torch.float32 and torch.equal(got, x.to(torch.float32))
    x[2, 1] = float("nan")  # the finiteness check still applies to them
    save_file({"x": x}, str(p))
    with pytest.raises(DataError, match=r"1 NaN value; the first at index \(2, 1\)"):
        _load(path=str(p))


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="long double is float64 on this platform")
def test_long_double_npy_loads_through_float64(tmp_path):
    arr = np.arange(8, dtype=np.longdouble).reshape(4, 2) / 3
    p = tmp_path / "ld.npy"
    np.save(p, arr)
    got = _load(path=str(p))
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(arr.astype(np.float32)))


class _Boom:
    """Unpickling this would run code; the loader must refuse before that."""

    def __reduce__(self):
        return (_explode, ("unpickled!",))


def _explode(msg):
    raise AssertionError(msg)


def test_pickled_object_array_is_rejected_without_unpickling(tmp_path, monkeypatch):
    p = tmp_path / "objects.npy"
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = _Boom(), _Boom()
    np.save(p, arr, allow_pickle=True)
    # make sure nothing calls pickle at all while loading
    def no_pickle(*a, **k):
        raise AssertionError("pickle.load was called")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    with pytest.raises(DataError, match="pickle") as e:
        _load(path=str(p))
    _one_line_naming(e, p)


def test_raw_pickle_renamed_to_npy_is_rejected(tmp_path):
    p = tmp_path / "sneaky.npy"
    p.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(DataError, match="not a readable .npy") as e:
        _load(path=str(p))
    _one_line_naming(e, p)


@pytest.mark.parametrize(
    "arr",
    [np.zeros((0, 3), dtype=np.float32), np.zeros((5, 0), dtype=np.float32), np.zeros((0,), dtype=np.float32)],
)
def test_empty_arrays(tmp_path, arr):
    p = tmp_path / "empty.npy"
    np.save(p, arr)
    with pytest.raises(DataError, match="empty") as e:
        _load(path=str(p))
    _one_line_naming(e, p)


def test_scalar_array(tmp_path):
    p = tmp_path / "scalar.npy"
    np.save(p, np.float32(3.0))
    with pytest.raises(DataError, match="single number") as e:
        _load(path=str(p))
    _one_line_naming(e, p)


def test_garbage_and_truncated_files(tmp_path):
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"hello, this is not numpy")
    with pytest.raises(DataError, match="not a readable .npy") as e:
        _load(path=str(junk))
    _one_line_naming(e, junk)

    full = tmp_path / "full.npy"
    np.save(full, np.ones((100, 10), dtype=np.float32))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(full.read_bytes()[:300])
    with pytest.raises(DataError, match="truncated") as e:
        _load(path=str(cut))
    _one_line_naming(e, cut)

    st = tmp_path / "junk.safetensors"
    st.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(DataError, match="not a readable .safetensors") as e:
        _load(path=str(st))
    _one_line_naming(e, st)


def test_permission_error_while_reading(tmp_path, monkeypatch):
    """An unreadable file (faked: the tests may run as root, who reads anything) is a DataError naming it."""
    import builtins

    from dyngan_plugins import files

    p = tmp_path / "locked.npy"
    np.save(p, np.ones((2, 2)))

    def denied(path, *a, **k):
        if str(path) == str(p):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *a, **k)

    monkeypatch.setattr(files, "open", denied, raising=False)
    with pytest.raises(DataError, match="Permission denied") as e:
        _load(path=str(p))
    _one_line_naming(e, p)


def test_missing_file_folder_and_suffix(tmp_path):
    missing = tmp_path / "nope.npy"
    with pytest.raises(DataError, match="no such file") as e:
        _load(path=str(missing))
    _one_line_naming(e, missing)
    with pytest.raises(DataError, match="folder") as e:
        _load(path=str(tmp_path))
    _one_line_naming(e, tmp_path)
    csv = tmp_path / "data.csv"
    csv.write_text("1,2\n3,4\n")
    with pytest.raises(DataError, match=r"\.npy or \.safetensors") as e:
        _load(path=str(csv))
    _one_line_naming(e, csv)
    with pytest.raises(DataError, match="dataset.path"):
        _load()


def test_errors_are_usage_errors_with_exit_code_2(tmp_path):
    with pytest.raises(UsageError) as e:
        _load(path=str(tmp_path / "nope.npy"))
    assert e.value.exit_code == 2


# --------------------------------------------------------------------------- image-folder


@pytest.fixture
def image_dir(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    # a red 20x10 RGB image (not square: centre-cropped) and a grey 8-bit one in a subfolder
    red = np.zeros((10, 20, 3), dtype=np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(d / "a.png")
    grey = np.full((8, 8), 128, dtype=np.uint8)
    Image.fromarray(grey).save(d / "sub" / "b.PNG")
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden").mkdir()
    (d / ".hidden" / "x.png").write_bytes(b"ignored")
    return d


def test_image_folder_loads_two_pngs(image_dir):
    x = ImageFolder(path=str(image_dir), size=8).load(torch.Generator())
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    # sorted order: a.png (red) then sub/b.PNG (grey 128)
    assert torch.allclose(x[0, 0], torch.ones(8, 8)) and torch.allclose(x[0, 1], -torch.ones(8, 8))
    assert torch.allclose(x[1], torch.full((3, 8, 8), 128 / 255 * 2 - 1), atol=1e-6)


def test_image_folder_grey_and_resize(image_dir):
    x = ImageFolder(path=str(image_dir), size=16, channels=1).load(torch.Generator())
    assert x.shape == (2, 1, 16, 16)
    assert ImageFolder.default_model == "dcgan"
    with pytest.raises(OptionError):
        ImageFolder(channels=2)


def test_image_folder_16_bit_png_keeps_its_range(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    d = tmp_path / "deep"
    d.mkdir()
    a = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    img = Image.fromarray(a)
    img.save(d / "deep.png")
    x = ImageFolder(path=str(d), size=8, channels=1).load(torch.Generator())
    assert x.shape == (1, 1, 8, 8)
    assert abs(float(x.mean())) < 0.01  # half of full scale -> about 0, not clipped to 1


def test_unreadable_image_names_the_file(image_dir):
    bad = image_dir / "sub" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff this is not really a jpeg")
    with pytest.raises(DataError, match="cannot read") as e:
        ImageFolder(path=str(image_dir), size=8).load(torch.Generator())
    _one_line_naming(e, bad)


def test_empty_and_missing_folders(tmp_path):
    pytest.importorskip("PIL")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no .png") as e:
        ImageFolder(path=str(empty)).load(torch.Generator())
    _one_line_naming(e, empty)
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match="no such folder") as e:
        ImageFolder(path=str(missing)).load(torch.Generator())
    _one_line_naming(e, missing)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        ImageFolder(path=str(a_file)).load(torch.Generator())


def test_missing_pillow_names_the_extra(image_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(UsageError, match=r'pip install "dyngan\[images\]"'):
        ImageFolder(path=str(image_dir)).load(torch.Generator())


# --------------------------------------------------------------------------- not regular files


def _in_thread(fn, timeout=30):
    """``fn()``'s exception (or None) from a daemon thread; fails instead of hanging forever."""
    import threading

    box = {}

    def run():
        try:
            fn()
            box["error"] = None
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked reading a special file"
    return box["error"]


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_tensor_file_that_is_a_fifo_is_refused_without_opening(tmp_path, suffix):
    import os

    fifo = tmp_path / f"f{suffix}"
    os.mkfifo(fifo)
    err = _in_thread(lambda: _load(path=str(fifo)))
    assert isinstance(err, DataError) and "not a regular file" in str(err), err
    assert str(fifo) in str(err) and "\n" not in str(err)
    # a symlink to it too (os.stat follows links)
    link = tmp_path / f"link{suffix}"
    link.symlink_to(fifo)
    err = _in_thread(lambda: _load(path=str(link)))
    assert isinstance(err, DataError) and "not a regular file" in str(err), err


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs here")
def test_cli_train_on_a_fifo_is_exit_2_and_leaves_no_run(tmp_path):
    import os

    from cli_helpers import invoke

    fifo = tmp_path / "f.npy"
    os.mkfifo(fifo)
    out = tmp_path / "run"
    box = {}
    err = _in_thread(lambda: box.update(res=invoke(
        ["train", "--dataset", "tensor-file", "-o", f"dataset.path={fifo}", "--device", "cpu",
         "--steps", "2", "--out", str(out), "-q"])))
    assert err is None, err
    res = box["res"]
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert "not a regular file" in res.stderr and str(fifo) in res.stderr
    assert not out.exists()


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs here")
def test_image_folder_skips_entries_that_are_not_regular_files(image_dir):
    import os

    os.mkfifo(image_dir / "c.png")  # opening it would block forever
    (image_dir / "d.png").mkdir()  # a folder named like an image
    box = {}
    err = _in_thread(lambda: box.update(x=ImageFolder(path=str(image_dir), size=8).load(None)))
    assert err is None, err
    assert box["x"].shape == (2, 3, 8, 8)


def test_image_folder_follows_links_to_folders_and_reads_each_folder_once(image_dir, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(outside / "c.png")
    (image_dir / "linked").symlink_to(outside, target_is_directory=True)
    (image_dir / "sub" / "loop").symlink_to(image_dir, target_is_directory=True)  # a link loop
    (image_dir / "zz-again").symlink_to(outside, target_is_directory=True)  # the same folder twice
    (image_dir / "broken").symlink_to(tmp_path / "gone", target_is_directory=True)
    box = {}
    err = _in_thread(lambda: box.update(x=ImageFolder(path=str(image_dir), size=8).load(None)))
    assert err is None, err
    x = box["x"]
    # a.png, linked/c.png (black), sub/b.PNG; the loop, the second link and the broken one add nothing
    assert x.shape == (3, 3, 8, 8)
    assert torch.allclose(x[1], -torch.ones(3, 8, 8))


def test_image_folder_skips_a_subfolder_it_cannot_list_but_not_its_root(image_dir, monkeypatch):
    import errno
    import os

    (image_dir / "lost+found").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) in ("lost+found", "images"):
            if os.path.basename(os.fspath(path)) == "images" and not scandir.root_denied:
                return real_scandir(path)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_scandir(path)

    scandir.root_denied = False
    monkeypatch.setattr(os, "scandir", scandir)
    # a root-only lost+found on a data disk: skipped, as Path.rglob did (the walk stopped the load)
    assert ImageFolder(path=str(image_dir), size=8).load(None).shape == (2, 3, 8, 8)
    scandir.root_denied = True
    with pytest.raises(DataError, match="cannot list the images"):
        ImageFolder(path=str(image_dir), size=8).load(None)


# --------------------------------------------------------------------------- relative paths


@pytest.mark.parametrize("cls", [TensorFile, ImageFolder])
def test_path_options_resolve_to_absolute_paths(tmp_path, monkeypatch, cls):
    import os

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cls.resolve_options({"path": "data/x"})["path"] == str(tmp_path / "data" / "x")
    assert cls.resolve_options({"path": "~/x"})["path"] == str(tmp_path / "home" / "x")
    assert cls.resolve_options({"path": "/abs/x"})["path"] == "/abs/x"
    assert cls.resolve_options({})["path"] is None  # the default, unchanged (the kit checks that)
    assert cls.resolve_options({"path": "none"})["path"] is None
    assert cls(path="y").opts.path == os.path.join(str(tmp_path), "y")


def test_relative_dataset_path_is_saved_absolute_and_old_runs_still_work(tmp_path, monkeypatch):
    """-o dataset.path=REL is stored absolute in config.json (so evaluate works from anywhere);
    a run saved with a relative path is still read relative to the current directory."""
    import json

    from cli_helpers import invoke

    data_dir, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data_dir.mkdir()
    elsewhere.mkdir()
    np.save(data_dir / "d.npy", np.random.default_rng(0).normal(size=(128, 2)).astype("f4"))
    run = tmp_path / "run"
    monkeypatch.chdir(data_dir)
    train = ["train", "--dataset", "tensor-file", "-o", "dataset.path=d.npy", "--device", "cpu",
             "--eval-every", "0", "-q", "--out", str(run)]
    dry = invoke(train[:-3] + ["--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["options"]["dataset"]["path"] == str(data_dir / "d.npy")
    assert invoke(train + ["--steps", "2"]).exit_code == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["options"]["dataset"]["path"] == str(data_dir / "d.npy")
    # resume with the same relative path given again: the same setting
    res = invoke(train + ["--steps", "4", "--resume"])
    assert res.exit_code == 0, res.output

    monkeypatch.chdir(elsewhere)
    res = invoke(["evaluate", str(run), "--n", "50"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output

    # a run saved before: a relative path in config.json, read against the current directory
    cfg["options"]["dataset"]["path"] = "d.npy"
    (run / "config.json").write_text(json.dumps(cfg, indent=2))
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    res = invoke(["evaluate", str(run), "--n", "50"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "no such file" in res.stderr and str(elsewhere / "d.npy") in res.stderr
    monkeypatch.chdir(data_dir)
    res = invoke(["evaluate", str(run), "--n", "50"])
    assert res.exit_code == 0, res.output
    res = invoke(["train", "--resume", "--out", str(run), "--steps", "6", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["options"]["dataset"]["path"] == "d.npy"
    # the resume records its new length and nothing else: the old relative path stays as it was
    assert json.loads((run / "config.json").read_text()) == {**json.loads(before[run / "config.json"]), "steps": 6}


# --------------------------------------------------------------------------- paths that cannot be looked at


def test_a_data_path_too_long_is_a_data_error_naming_it(tmp_path):
    import errno
    import os

    too_long = os.strerror(errno.ENAMETOOLONG)
    for p in (tmp_path / ("x" * 256 + ".npy"), tmp_path / ("x" * 256) / "d.npy"):
        with pytest.raises(DataError, match=f"cannot use .*: {too_long}") as e:
            _load(path=str(p))
        _one_line_naming(e, p)
    folder = tmp_path / ("y" * 256)
    with pytest.raises(DataError, match=f"cannot use .*: {too_long}") as e:
        ImageFolder(path=str(folder)).load(torch.Generator())
    _one_line_naming(e, folder)


def test_a_symlink_loop_says_so_not_no_such_file(tmp_path):
    import errno
    import os

    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(DataError, match=os.strerror(errno.ELOOP)) as e:
        _load(path=str(a))
    _one_line_naming(e, a)
    with pytest.raises(DataError, match=os.strerror(errno.ELOOP)) as e:
        ImageFolder(path=str(a)).load(torch.Generator())
    _one_line_naming(e, a)


@pytest.mark.parametrize("dataset", ["tensor-file", "image-folder"])
def test_cli_train_on_a_data_path_too_long_is_exit_2_and_leaves_no_run(tmp_path, monkeypatch, dataset):
    from cli_helpers import invoke

    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    monkeypatch.chdir(tmp_path)
    res = invoke(["train", "--dataset", dataset, "-o", "dataset.path=" + "x" * 256 + ".npy", "--device", "cpu",
                  "--steps", "2", "-q", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "cannot use" in err and "File name too long" in err, err
    assert "raised in load()" not in err
    assert not (tmp_path / "run").exists()
