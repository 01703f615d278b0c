"""A user's own data: one array file (``tensor-file``) or a folder of images (``image-folder``).

Every problem with the data is a ``core.errors.DataError`` (exit code 2) whose one-line
message names the file. Nothing is ever unpickled: ``.npy`` headers are read and checked
before the data, and ``numpy.load`` runs with ``allow_pickle=False``.

tensor-file
  ``-o dataset.path=FILE`` (``.npy`` or ``.safetensors``; for safetensors ``-o dataset.key=NAME``
  picks a tensor, by default the only one). The array is ``(N, ...)``: axis 0 indexes the
  samples, the rest is the per-sample shape. A 1-D array of N numbers is N one-dimensional
  samples, shape ``(N, 1)``. Accepted dtypes: bool, integers, floats (bfloat16 and float16
  included); object, string, complex, structured and datetime arrays are refused, as is any
  NaN or inf (the message counts them and gives the index of the first). Values are used as
  they are (``scale`` none) or mapped linearly from [min, max] of the whole array to [-1, 1]
  (``scale=minmax``; one min and max for all values, so images keep their contrast).
  The default model is ``mlp`` (``default_model`` is fixed per dataset class and ``mlp``
  takes any shape); for image arrays ``(N, C, S, S)`` pass ``--model dcgan``.

image-folder
  ``-o dataset.path=DIR``: every ``.png``, ``.jpg`` and ``.jpeg`` under DIR (subfolders
  included, hidden ones skipped), in sorted path order. Each image is centre-cropped to a
  square, resized to ``size`` x ``size`` (bicubic), converted to ``channels`` (1 grey or 3 RGB)
  and scaled from [0, 255] (16-bit PNGs: [0, 65535]) to [-1, 1]. Needs Pillow, the optional
  extra ``dyngan[images]``. The default model is ``dcgan`` (which needs a power-of-two size).

Both: a relative ``path`` (or one starting with ``~``) is made absolute when the run is configured,
so the run's config.json names the same data from any directory; a saved run that holds a relative
path reads it relative to the current directory. Only regular files are read: a FIFO, socket or
device given as the tensor file is refused before it is opened, and image-folder skips such entries.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from core import hookimpl
from core.components import Dataset, Option
from core.errors import DataError, UsageError, one_line

if TYPE_CHECKING:
    import torch
    from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _given_path(value: str | None, what: str, dataset: str) -> Path:
    if value is None or not str(value).strip():
        raise DataError(f"dataset {dataset!r} needs a {what}: -o dataset.path=...")
    return Path(str(value)).expanduser()


def _absolute(value: Any) -> Any:
    """A ``path`` option as an absolute path (``~`` expanded, a relative one joined to the current
    directory), so that a run's config.json names the same data from any directory; None, blank
    and already absolute values unchanged."""
    if not isinstance(value, str) or not value.strip():
        return value
    p = os.path.expanduser(value)
    if os.path.isabs(p):
        return p
    try:
        return os.path.join(os.getcwd(), p)
    except OSError:  # the current directory was removed: leave the path as typed
        return value


class _PathOption:
    """Mixin for datasets whose ``path`` option names a file or folder: it resolves to an
    absolute path (a saved run with a relative one is still read relative to the current
    directory, as before, since its options are resolved again when it is loaded)."""

    @classmethod
    def resolve_options(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        opts = super().resolve_options(values)  # type: ignore[misc]
        opts["path"] = _absolute(opts.get("path"))
        return opts


# --------------------------------------------------------------------------- tensor-file


def _mode(path: Path) -> int | None:
    """``path``'s file type and mode (after symlinks), None when nothing is there. A path that cannot
    even be looked at (a name too long for the file system, a folder without search permission, a
    symlink loop, an I/O error) is a DataError naming it, not an OSError from deep inside ``load``."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise DataError(f"cannot use {str(path)!r}: {e.strerror or one_line(e)}") from None
    except ValueError as e:  # an embedded NUL byte
        raise DataError(f"cannot use {str(path)!r}: {one_line(e)}") from None


def _npy_dtype_problem(dtype) -> str | None:
    """Why a numpy dtype cannot be training data, or None if it can."""
    if dtype.hasobject:
        return "holds Python objects (a pickled object array); dyngan never unpickles data"
    kind = dtype.kind
    if kind == "c":
        return f"has complex dtype {dtype}; save the real and imaginary parts as separate features"
    if kind in "US":
        return f"holds strings (dtype {dtype}), not numbers"
    if kind == "V":
        return f"has a structured dtype {dtype}; save a plain numeric array"
    if kind in "Mm":
        return f"holds dates or times (dtype {dtype}), not numbers"
    if kind not in "biuf":
        return f"has an unsupported dtype {dtype}"
    return None


def _read_npy(path: Path) -> "Tensor":
    import numpy as np
    import torch
    from numpy.lib import format as npf

    # read and check the header before any data: an object array is refused here, so
    # nothing in the file is ever unpickled
    try:
        with open(path, "rb") as f:
            version = npf.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npf.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = npf.read_array_header_2_0(f)
            else:
                raise DataError(f"{path}: unsupported .npy format version {version[0]}.{version[1]}")
            data_bytes = path.stat().st_size - f.tell()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable .npy file ({one_line(e)})") from None
    problem = _npy_dtype_problem(dtype)
    if problem:
        raise DataError(f"{path}: {problem}")
    # the header's claim is checked against the file before anything is allocated
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > data_bytes:
        raise DataError(f"{path}: the header declares shape {tuple(shape)} ({declared} bytes of {dtype}), "
                        f"but the file holds {data_bytes} bytes of data (truncated or corrupt)")
    _check_fits_in_memory(path, int(np.prod(shape, dtype=object)), dtype.itemsize)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read the .npy data, truncated or corrupt? ({one_line(e)})") from None
    if not isinstance(arr, np.ndarray):  # e.g. a .npz archive renamed to .npy
        raise DataError(f"{path}: not a single .npy array")
    problem = _npy_dtype_problem(arr.dtype)
    if problem:
        raise DataError(f"{path}: {problem}")
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind == "f" and arr.dtype.itemsize > 8:
        arr = arr.astype(np.float64)  # long double: torch has no such dtype (training data is float32)
    elif arr.dtype.kind == "u" and arr.dtype.itemsize > 1 and arr.dtype != np.uint64:
        arr = arr.astype(np.int64)  # torch has limited unsigned support
    elif arr.dtype == np.uint64:
        arr = arr.astype(np.float64)
    return torch.from_numpy(np.asarray(arr, order="C"))  # (ascontiguousarray would make 0-d 1-d)


def _read_safetensors(path: Path, key: str | None) -> "Tensor":
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = sorted(f.keys())
            if key is None:
                if not keys:
                    raise DataError(f"{path}: holds no tensors")
                if len(keys) > 1:
                    shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                    raise DataError(
                        f"{path}: holds {len(keys)} tensors ({shown}); pick one with -o dataset.key=NAME"
                    )
                key = keys[0]
            elif key not in keys:
                shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                raise DataError(f"{path}: no tensor named {key!r} (tensors: {shown or 'none'})")
            sl = f.get_slice(key)
            numel = 1
            for d in sl.get_shape():
                numel *= int(d)
            _check_fits_in_memory(path, numel, _SAFETENSORS_ITEMSIZE.get(sl.get_dtype(), 8))
            t = f.get_tensor(key)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable .safetensors file ({one_line(e)})") from None
    if t.is_complex():
        raise DataError(f"{path}: tensor {key!r} has complex dtype {t.dtype}; save real-valued data")
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if not (t.is_floating_point() or t.dtype in _int_dtypes()):
        raise DataError(f"{path}: tensor {key!r} has unsupported dtype {t.dtype}")
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.to(torch.float32)  # the float8 types: exact in float32, which torch's checks support
    return t


_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                         "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _memory_bytes() -> int | None:
    """Memory available now (physical RAM where that cannot be told), or None."""
    from core.memory import cpu_available

    return cpu_available()


def _check_fits_in_memory(path: Path, numel: int, itemsize: int) -> None:
    """Refuse, before reading, an array that cannot be loaded: the raw array, its float64
    working copy and the float32 result are in memory at once."""
    need = numel * (itemsize + 8 + 4)
    have = _memory_bytes()
    if have is not None and need > have:
        raise DataError(f"{path}: {numel} values need about {need / 2**30:.1f} GiB of memory to load; "
                        f"this machine has {have / 2**30:.1f} GiB available")


def _int_dtypes() -> set:
    import torch

    names = ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")
    return {getattr(torch, n) for n in names if hasattr(torch, n)}


def _index_of_first(mask: "Tensor") -> tuple[int, ...]:
    """Index of the first True in a bool tensor, as a tuple of ints."""
    import numpy as np
    import torch

    flat = int(mask.flatten().to(torch.uint8).argmax())  # argmax returns the first maximum
    return tuple(int(i) for i in np.unravel_index(flat, tuple(mask.shape)))


def _check_finite(t: "Tensor", path: Path, note: str = "") -> None:
    import torch

    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    bad = ~finite
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(bad.sum()) - n_nan
    parts = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "inf")) if n]
    first = _index_of_first(bad)
    noun = "value" if n_nan + n_inf == 1 else "values"
    raise DataError(f"{path}: {' and '.join(parts)} {noun}{note}; the first at index {first}")


def validate_array(t: "Tensor", path: Path, scale: str | None = None) -> "Tensor":
    """Checked float32 training data ``(N, ...)`` from a raw array read from ``path``."""
    import torch

    if t.ndim == 0:
        raise DataError(f"{path}: holds a single number; need an array of samples (N, ...)")
    if t.ndim == 1:
        t = t.unsqueeze(1)  # N scalar samples
    if t.numel() == 0:
        raise DataError(f"{path}: is empty (shape {tuple(t.shape)})")
    if t.is_floating_point():
        _check_finite(t, path)
    x64 = t.to(torch.float64)
    if scale == "minmax":
        lo, hi = x64.min(), x64.max()
        if not bool(hi > lo):
            raise DataError(f"{path}: every value is {float(lo):g}; minmax scaling needs at least two values")
        # halves first: hi - lo of values near float64's range (+-1.5e308) would overflow to inf
        x64 = (x64 / 2 - lo / 2) / (hi / 2 - lo / 2) * 2.0 - 1.0
    x = x64.to(torch.float32)
    _check_finite(x, path, note=" after conversion to float32 (|value| > 3.4e38)")
    return x.contiguous()


class TensorFile(_PathOption, Dataset):
    """A user's array file, .npy or .safetensors, shaped (N, ...)."""

    name = "tensor-file"
    default_model = "mlp"
    default_metrics = ("prdc",)
    options = {
        "path": Option(None, "the .npy or .safetensors file, shaped (N, ...)", type=str, nullable=True),
        "key": Option(None, "the tensor to use in a .safetensors file (default: the only one)", type=str, nullable=True),
        "scale": Option(
            None,
            "none: use values as they are; minmax: map [min, max] of the whole array to [-1, 1]",
            type=str,
            choices=("minmax",),
            nullable=True,
        ),
    }

    def load(self, generator):
        path = _given_path(self.opts.path, ".npy or .safetensors file", self.name)
        mode = _mode(path)
        if mode is None:
            raise DataError(f"{path}: no such file")
        if stat.S_ISDIR(mode):
            raise DataError(f"{path}: is a folder, not a file (for images use --dataset image-folder)")
        if not stat.S_ISREG(mode):  # refused before opening it: a FIFO would block the read forever, a device never end
            raise DataError(f"{path}: not a regular file (a FIFO, socket or device); save the data to a file")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            if self.opts.key is not None:
                raise DataError(f"{path}: option key applies to .safetensors files only")
            raw = _read_npy(path)
        elif suffix == ".safetensors":
            raw = _read_safetensors(path, self.opts.key)
        else:
            raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .npy or .safetensors")
        return validate_array(raw, path, self.opts.scale)

    def info(self) -> dict[str, Any]:
        return {"file": self.opts.path, "key": self.opts.key, "scale": self.opts.scale}


# --------------------------------------------------------------------------- image-folder


def _pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise UsageError('dataset image-folder needs Pillow: pip install "dyngan[images]"') from None
    return Image, ImageOps


def _find_images(root: Path) -> list[Path]:
    """The images under ``root``, sorted by their path relative to it. Symbolic links to folders
    are followed; a folder reached twice (through a link, or a link loop) is read once, where the
    walk (depth first, names in sorted order) first reaches it. Hidden files and folders are left
    out, and so are subfolders that cannot be listed (a root-only ``lost+found`` on a data disk),
    as ``Path.rglob`` left them out; ``root`` itself that cannot be listed is an OSError."""
    found = []
    seen = set()

    def fail(e: OSError):
        if e.filename is None or os.path.abspath(e.filename) == os.path.abspath(root):
            raise e

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            p = Path(dirpath, name)
            if not name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _image_array(path: Path, size: int, channels: int, Image, ImageOps):
    """One image as float32 ``(channels, size, size)`` in [0, 1]."""
    import numpy as np

    bicubic = getattr(Image, "Resampling", Image).BICUBIC
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        w, h = im.size
        if w < 1 or h < 1:
            raise ValueError(f"empty image ({w}x{h})")
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        if im.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey: keep its full range
            a = np.asarray(im, dtype=np.float64)
            peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            grey = Image.fromarray((a / peak).astype(np.float32))  # float32 -> mode "F"
            grey = grey.crop(box).resize((size, size), bicubic)
            out = np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0)[None]
            return np.repeat(out, channels, axis=0)
        im = im.convert("RGB" if channels == 3 else "L").crop(box)
        if im.size != (size, size):
            im = im.resize((size, size), bicubic)
        a = np.asarray(im, dtype=np.float32) / 255.0
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


class ImageFolder(_PathOption, Dataset):
    """A folder of PNG/JPEG images, (N, channels, size, size) in [-1, 1]."""

    name = "image-folder"
    default_model = "dcgan"
    default_metrics = ("prdc",)
    options = {
        "path": Option(None, "the folder of .png/.jpg images (subfolders and symbolic links to folders included; a folder reached twice is read once; subfolders that cannot be listed are skipped)", type=str, nullable=True),
        "size": Option(32, "side of the square the images are resized to (dcgan: a power of two)", min=4, max=1024),
        "channels": Option(3, "1 (grey) or 3 (RGB)", choices=(1, 3)),
    }

    def load(self, generator):
        import numpy as np
        import torch

        root = _given_path(self.opts.path, "folder of images", self.name)
        mode = _mode(root)
        if mode is None:
            raise DataError(f"{root}: no such folder")
        if not stat.S_ISDIR(mode):
            raise DataError(f"{root}: not a folder (for an array file use --dataset tensor-file)")
        Image, ImageOps = _pillow()
        try:
            files = _find_images(root)
        except OSError as e:  # a subfolder that cannot be listed (an I/O error, a vanished folder)
            raise DataError(f"{root}: cannot list the images ({e.strerror or one_line(e)}"
                            + (f": {e.filename}" if e.filename else "") + ")") from None
        if not files:
            raise DataError(f"{root}: no .png, .jpg or .jpeg images in this folder or its subfolders")
        size, channels = int(self.opts.size), int(self.opts.channels)
        out = np.empty((len(files), channels, size, size), dtype=np.float32)
        for i, p in enumerate(files):
            try:
                out[i] = _image_array(p, size, channels, Image, ImageOps)
            except Exception as e:
                raise DataError(f"{p}: cannot read this image ({one_line(e)})") from None
        x = torch.from_numpy(out).mul_(2.0).sub_(1.0)  # [0, 1] -> [-1, 1]
        return x

    def info(self) -> dict[str, Any]:
        return {"folder": self.opts.path, "size": self.opts.size, "channels": self.opts.channels}


@hookimpl
def register_datasets(register):
    register(TensorFile)
    register(ImageFolder)
