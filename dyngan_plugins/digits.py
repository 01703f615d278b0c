"""Digits: scikit-learn's bundled 8x8 digits, stacked digits (1000 modes) and their metric.

The offline stand-in for Stacked MNIST (see the reference, "Stacked MNIST (1000 modes)"):
MNIST cannot be downloaded here, but scikit-learn ships the UCI handwritten digits (1,797
images, 8x8, 10 classes). ``stacked-digits`` stacks three random ones as the channels of an
8x8x3 image, so the triple of digit classes gives 1000 modes; ``stacked-modes`` classifies
each channel of generated images with a small conv net trained on the same package data and
reports the number of distinct triples and KL(generated triple histogram || uniform), in
nats (the PacGAN protocol; numbers are not comparable with MNIST's).

The classifier is trained once, deterministically (fixed seed, fixed stratified 80/20 split),
and cached as safetensors + JSON under ``$DYNGAN_CACHE`` (default ``~/.cache/dyngan``), the
file name keyed by a hash of the training recipe and of the data. A cached file is trusted
only if its SHA-256 matches the JSON, its tensors have exactly the expected names, shapes and
dtype and are finite, and its held-out accuracy (recomputed on load) is at least 95%;
otherwise it is retrained and rewritten. Nothing is unpickled.

scikit-learn is the optional extra ``dyngan[digits]``; it is imported only when digits are
needed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import hookimpl
from core.components import Dataset, Metric, Option
from core.errors import RunFailure, UsageError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

#: the classifier must reach this held-out accuracy before it may score anything
MIN_ACCURACY = 0.95

#: everything that determines the classifier's weights; changing any of it changes the cache key
RECIPE: dict[str, Any] = {
    "format": 1,
    "arch": "conv3x3(1,16)-relu-conv3x3(16,32)-relu-maxpool2-conv3x3(32,64)-relu-maxpool2-fc(256,64)-relu-fc(64,10)",
    "input": "8x8 grey in [-1,1] (sklearn value / 8 - 1)",
    "split": "stratified, 20% of each class held out, torch.randperm seed 0",
    "seed": 0,
    "epochs": 30,
    "batch": 64,
    "optimizer": "adam wd 1e-4",
    "schedule": "onecycle max_lr 3e-3",
    "augment": "random shift of up to 1 pixel, background -1",
    "threads": 1,
}

FEATURE_DIM = 64  # width of the classifier's penultimate layer (features per channel)


def _sklearn_datasets():
    try:
        from sklearn import datasets
    except ImportError:
        raise UsageError(
            'the digits datasets need scikit-learn: pip install "dyngan[digits]"'
        ) from None
    return datasets


# --------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def _digits() -> tuple["Tensor", "Tensor", str]:
    """All 1797 digits as ``(N, 1, 8, 8)`` float32 in [-1, 1], labels ``(N,)`` and a fingerprint.

    Cached for the process; callers must not modify the returned tensors in place.
    """
    import numpy as np
    import torch

    bunch = _sklearn_datasets().load_digits()
    data = np.ascontiguousarray(bunch.data, dtype=np.float64)
    target = np.ascontiguousarray(bunch.target, dtype=np.int64)
    fingerprint = hashlib.sha256(data.tobytes() + target.tobytes()).hexdigest()
    # pixel values are integers in [0, 16]: 0 -> -1, 16 -> 1
    images = torch.from_numpy(data).to(torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0
    return images, torch.from_numpy(target), fingerprint


@functools.lru_cache(maxsize=1)
def _split() -> tuple["Tensor", "Tensor"]:
    """The fixed stratified split: (train indices, held-out indices)."""
    import torch

    _, labels, _ = _digits()
    g = torch.Generator().manual_seed(0)
    held = []
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        held.append(idx[: round(0.2 * idx.numel())])
    test = torch.cat(held).sort().values
    keep = torch.ones(labels.numel(), dtype=torch.bool)
    keep[test] = False
    return keep.nonzero().flatten(), test


# --------------------------------------------------------------------------- the classifier


def _make_net() -> "nn.Module":
    from torch import nn

    class DigitNet(nn.Module):
        """8x8 grey digit -> 10 logits; ``features`` is the 64-d penultimate layer."""

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 4x4
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 2x2
                nn.Flatten(), nn.Linear(256, FEATURE_DIM), nn.ReLU(),
            )  # fmt: skip
            self.head = nn.Linear(FEATURE_DIM, 10)

        def features(self, x):
            return self.body(x)

        def forward(self, x):
            return self.head(self.body(x))

    return DigitNet()


def _shift(x: "Tensor", gen: "torch.Generator") -> "Tensor":
    """Translate each 8x8 image by up to one pixel (background -1 fills the gap)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(3, (b,), generator=gen)
    dx = torch.randint(3, (b,), generator=gen)
    ar = torch.arange(8)
    rows = (dy[:, None] + ar)[:, :, None]  # (B, 8, 1)
    cols = (dx[:, None] + ar)[:, None, :]  # (B, 1, 8)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def _train() -> "nn.Module":
    import torch
    import torch.nn.functional as F

    images, labels, _ = _digits()
    train_idx, _ = _split()
    seed, epochs, batch = RECIPE["seed"], RECIPE["epochs"], RECIPE["batch"]
    # the weights' initialisation draws from the global RNG: fork it so that training
    # neither depends on nor disturbs the caller's random state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _make_net()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    per_epoch = -(-train_idx.numel() // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * per_epoch)
    # One thread: the same weights whatever the machine's thread count (CPU kernels may sum
    # in a different order with more threads), and these tiny batches gain nothing from more;
    # on a busy 2-core machine, 2 threads were 6x slower than 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(RECIPE["threads"])
    # the first use is often inside a metric, which the trainer calls under no_grad
    try:
        with torch.enable_grad():
            net.train()
            for _ in range(epochs):
                order = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
                for start in range(0, order.numel(), batch):
                    b = order[start : start + batch]
                    loss = F.cross_entropy(net(_shift(images[b], gen)), labels[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def _held_out_accuracy(net: "nn.Module") -> float:
    import torch

    images, labels, _ = _digits()
    _, test = _split()
    with torch.no_grad():
        pred = net(images[test]).argmax(1)
    return float((pred == labels[test]).float().mean())


class DigitClassifier:
    """The trained digit classifier and its held-out accuracy.

    ``predict(x)`` and ``features(x)`` take ``(B, 1, 8, 8)`` images in [-1, 1] on any device
    and work in chunks (no Python loop over samples). ``source`` is ``"cache"`` or
    ``"trained"``; ``path`` is the cache file (None when it could not be written).
    """

    def __init__(self, net: "nn.Module", accuracy: float, n_test: int, source: str, path: Path | None):
        self.net = net.eval()
        self.accuracy = accuracy
        self.n_test = n_test
        self.source = source
        self.path = path
        self._per_device: dict[str, "nn.Module"] = {}

    def require_accurate(self) -> None:
        """Refuse to score with a classifier below ``MIN_ACCURACY`` held-out accuracy."""
        if not self.accuracy >= MIN_ACCURACY:
            where = f"; delete {self.path} to retrain" if self.path else ""
            raise RunFailure(
                f"the digit classifier reaches only {self.accuracy:.1%} held-out accuracy "
                f"(needs {MIN_ACCURACY:.0%}); refusing to score digits with it{where}"
            )

    def _net_on(self, device: "torch.device") -> "nn.Module":
        key = str(device)
        if key not in self._per_device:
            self._per_device[key] = copy.deepcopy(self.net).to(device).eval()
        return self._per_device[key]

    def _chunked(self, x: "Tensor", fn_name: str, chunk: int) -> "Tensor":
        import torch

        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise UsageError(f"the digit classifier takes (B, 1, 8, 8) images, got {tuple(x.shape)}")
        net = self._net_on(x.device)
        fn = getattr(net, fn_name)
        with torch.no_grad():
            outs = [fn(x[i : i + chunk].float()) for i in range(0, x.shape[0], chunk)]
        if not outs:
            width = 10 if fn_name == "forward" else FEATURE_DIM
            return x.new_zeros((0, width), dtype=torch.float32)
        return torch.cat(outs)

    def logits(self, x: "Tensor", chunk: int = 8192) -> "Tensor":
        return self._chunked(x, "forward", chunk)

    def predict(self, x: "Tensor", chunk: int = 8192) -> "Tensor":
        return self.logits(x, chunk).argmax(1)

    def features(self, x: "Tensor", chunk: int = 8192) -> "Tensor":
        return self._chunked(x, "features", chunk)


def cache_dir() -> Path:
    """``$DYNGAN_CACHE`` or ``~/.cache/dyngan``."""
    env = os.environ.get("DYNGAN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dyngan"


def cache_key() -> str:
    """Hash of the training recipe and of the digits data."""
    _, _, fingerprint = _digits()
    blob = json.dumps({"recipe": RECIPE, "data": fingerprint}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_paths(directory: Path | None = None) -> tuple[Path, Path]:
    """(weights .safetensors, metadata .json) of the classifier in ``directory``."""
    d = Path(directory) if directory is not None else cache_dir()
    stem = f"digit-classifier-{cache_key()}"
    return d / f"{stem}.safetensors", d / f"{stem}.json"


def _atomic_write(path: Path, data: bytes) -> None:
    from core.checkpoint import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def _load_cached(weights: Path, meta: Path) -> "nn.Module | None":
    """The cached network, or None if anything about the cache is missing or wrong."""
    import torch
    from safetensors.torch import load as st_load

    try:
        info = json.loads(meta.read_text())
        blob = weights.read_bytes()
        if not isinstance(info, dict) or info.get("key") != cache_key():
            return None
        if info.get("sha256") != hashlib.sha256(blob).hexdigest():
            return None
        tensors = st_load(blob)
    except Exception:  # unreadable, truncated, not JSON, not safetensors: retrain
        return None
    net = _make_net()
    expected = net.state_dict()
    if set(tensors) != set(expected):
        return None
    for name, ref in expected.items():
        t = tensors[name]
        if t.shape != ref.shape or t.dtype != ref.dtype or not bool(torch.isfinite(t).all()):
            return None
    net.load_state_dict(tensors, strict=True)
    return net.eval()


_MEMORY: dict[tuple[str, str], DigitClassifier] = {}


def digit_classifier(directory: str | Path | None = None, use_memory: bool = True) -> DigitClassifier:
    """The digit classifier: from memory, else from the disk cache, else trained and cached.

    ``directory`` overrides the cache directory (default ``cache_dir()``). A cache that fails
    any check (see the module docstring) is retrained and overwritten; a cache directory that
    cannot be written leaves the freshly trained classifier in memory only.
    """
    from safetensors.torch import save as st_save

    weights, meta = cache_paths(Path(directory) if directory is not None else None)
    mem_key = (str(weights.resolve()), cache_key())
    if use_memory and mem_key in _MEMORY:
        return _MEMORY[mem_key]
    _, test = _split()
    net = _load_cached(weights, meta)
    source = "cache"
    accuracy = _held_out_accuracy(net) if net is not None else -1.0
    if net is None or accuracy < MIN_ACCURACY:
        net = _train()
        accuracy = _held_out_accuracy(net)
        source = "trained"
        state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        blob = st_save(state, metadata={"key": cache_key(), "format": str(RECIPE["format"])})
        info = {
            "key": cache_key(),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "held_out_accuracy": accuracy,
            "held_out_size": int(test.numel()),
            "recipe": RECIPE,
        }
        try:
            _atomic_write(weights, blob)  # weights first: the JSON vouches for them
            _atomic_write(meta, (json.dumps(info, indent=2) + "\n").encode())
        except OSError:
            weights_path: Path | None = None
        else:
            weights_path = weights
    else:
        weights_path = weights
    clf = DigitClassifier(net, accuracy, int(test.numel()), source, weights_path)
    _MEMORY[mem_key] = clf
    return clf


def digit_features(x: "Tensor") -> "Tensor":
    """Classifier features of digit images ``(B, C, 8, 8)``: each channel's 64 features, concatenated."""
    if x.ndim != 4 or tuple(x.shape[2:]) != (8, 8):
        raise UsageError(f"digit features need (B, C, 8, 8) images, got {tuple(x.shape)}")
    clf = digit_classifier()
    clf.require_accurate()
    b, c = x.shape[:2]
    return clf.features(x.reshape(b * c, 1, 8, 8)).view(b, c * FEATURE_DIM)


# --------------------------------------------------------------------------- datasets


class Digits(Dataset):
    """scikit-learn's 1,797 UCI digits, (N, 1, 8, 8) in [-1, 1]; 10 modes."""

    name = "digits"
    default_model = "dcgan"
    default_metrics = ("stacked-modes", "prdc")
    options: dict[str, Option] = {}

    def load(self, generator):
        images, _, _ = _digits()
        return images.clone()

    def labels(self) -> "Tensor":
        """The digit class of each training image, ``(N,)`` long."""
        return _digits()[1].clone()

    def info(self) -> dict[str, Any]:
        return {"digit_channels": 1, "modes": 10, "image_size": 8}

    def features(self, x: "Tensor") -> "Tensor":
        """The digit classifier's 64-d penultimate features (for feature-space metrics)."""
        return digit_features(x)


class StackedDigits(Dataset):
    """Three random digits stacked as channels, (N, 3, 8, 8) in [-1, 1]; 1000 modes.

    Each sample's three digit images are drawn uniformly (with replacement) from all 1,797,
    using the run's generator, so the training set is fixed by the seed.
    """

    name = "stacked-digits"
    default_model = "dcgan"
    default_metrics = ("stacked-modes", "prdc")
    #: the Stacked-MNIST protocol scores 26,000 samples: with 2,500, even a generator that draws
    #: the 1000 triples uniformly would show about 920 modes and a KL near 0.2
    eval_samples = 26_000
    options = {
        "n": Option(128_000, "number of training images (Stacked-MNIST protocol: 128,000)", min=1, max=50_000_000),
    }

    def load_labelled(self, generator: "torch.Generator") -> tuple["Tensor", "Tensor"]:
        """The training set and each image's true class triple ``(N, 3)`` (same draws as ``load``)."""
        import torch

        images, labels, _ = _digits()
        idx = torch.randint(
            images.shape[0], (self.opts.n, 3), generator=generator, device=generator.device
        ).cpu()
        return images[idx, 0].contiguous(), labels[idx]

    def load(self, generator):
        return self.load_labelled(generator)[0]

    def info(self) -> dict[str, Any]:
        return {"stacked_digits": True, "digit_channels": 3, "modes": 1000, "image_size": 8}

    def features(self, x: "Tensor") -> "Tensor":
        """Per-channel classifier features, concatenated: ``(B, 3 * 64)``."""
        return digit_features(x)


# --------------------------------------------------------------------------- the metric


def digit_tuples(clf: DigitClassifier, x: "Tensor", channels: int) -> "Tensor":
    """Each channel's most likely digit class: ``(M, channels, 8, 8)`` images -> ``(M, channels)``
    long, on the CPU."""
    return clf.predict(x.reshape(x.shape[0] * channels, 1, 8, 8)).view(x.shape[0], channels).cpu()


def tuple_counts(pred: "Tensor") -> "Tensor":
    """``(M, C)`` digit classes -> how often each of the 10**C tuples occurs (float64, index
    ``100*c0 + 10*c1 + c2`` for C = 3)."""
    import torch

    channels = pred.shape[1]
    weights = 10 ** torch.arange(channels - 1, -1, -1, device=pred.device)
    return torch.bincount((pred * weights).sum(1), minlength=10**channels).double()


def kl_to_uniform(counts: "Tensor") -> float:
    """KL(histogram ``counts`` || uniform over its bins), natural log: sum p log p + log(bins)."""
    p = counts[counts > 0] / counts.sum()
    return float((p * p.log()).sum()) + math.log(counts.numel())


class StackedModes(Metric):
    """Modes covered and KL to uniform over digit-class tuples (PacGAN's Stacked-MNIST protocol).

    Each channel of a generated ``(M, C, 8, 8)`` image is classified; a mode is a distinct
    tuple of C classes (10**C possible). Keys: ``stacked-modes/modes``,
    ``stacked-modes/max_modes``, ``stacked-modes/kl`` (KL(generated histogram || uniform),
    natural log; 0 is perfect, log(10**C) a single mode), ``stacked-modes/classifier_accuracy``
    (held-out) and ``stacked-modes/n``.
    """

    name = "stacked-modes"
    protocol = ("Stacked MNIST (PacGAN) on 8x8 sklearn digits: a mode is a tuple of per-channel digit classes "
                "(10**channels of them: 1000 on stacked-digits, 10 on digits), KL in nats")
    options: dict[str, Option] = {}

    def supports(self, dataset) -> bool:
        info = dataset.info()
        return bool(info.get("stacked_digits") or info.get("digit_channels"))

    def compute(self, fake, real, dataset) -> dict[str, float]:
        import torch

        channels = int(dataset.info().get("digit_channels", 3))
        if fake.ndim != 4 or tuple(fake.shape[1:]) != (channels, 8, 8):
            raise UsageError(
                f"metric 'stacked-modes' needs samples shaped (M, {channels}, 8, 8), got {tuple(fake.shape)}"
            )
        m = fake.shape[0]
        if m == 0:
            raise UsageError("metric 'stacked-modes' needs at least one sample")
        if not bool(torch.isfinite(fake).all()):
            raise RunFailure("metric 'stacked-modes': the generated samples contain NaN or inf")
        clf = digit_classifier()
        clf.require_accurate()
        counts = tuple_counts(digit_tuples(clf, fake, channels))
        return {
            "stacked-modes/modes": float((counts > 0).sum()),
            "stacked-modes/max_modes": float(counts.numel()),
            "stacked-modes/kl": max(kl_to_uniform(counts), 0.0),
            "stacked-modes/classifier_accuracy": float(clf.accuracy),
            "stacked-modes/n": float(m),
        }


@hookimpl
def register_datasets(register):
    register(Digits)
    register(StackedDigits)


@hookimpl
def register_metrics(register):
    register(StackedModes)
