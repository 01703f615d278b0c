"""Digits, stacked digits, the digit classifier and its cache, and the stacked-modes metric."""

from __future__ import annotations

import json
import math
import sys

import pytest

import torch
import sklearn  # noqa: F401 - the digits extra is part of the test install

from core.errors import OptionError, RunFailure, UsageError  # noqa: E402
from dyngan_plugins import digits as dg  # noqa: E402
from dyngan_plugins.mixtures import Ring8  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Train the classifier once for this module, in a private cache dir ($DYNGAN_CACHE)."""
    d = tmp_path_factory.mktemp("dyngan-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYNGAN_CACHE", str(d))
        dg._MEMORY.clear()
        clf = dg.digit_classifier()
        yield d, clf
    dg._MEMORY.clear()


def _gen(seed: int) -> "torch.Generator":
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- datasets


def test_digits_dataset_shape_and_scale():
    ds = dg.Digits()
    x = ds.load(_gen(0))
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    # sklearn's pixels are integers 0..16, mapped linearly: (x + 1) * 8 is an integer
    assert torch.equal((x + 1) * 8, ((x + 1) * 8).round())
    labels = ds.labels()
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    # load returns a copy: changing it does not change the next load
    x.zero_()
    assert float(ds.load(_gen(0)).min()) == -1.0


def test_stacked_digits_shape_range_and_channels_are_digits():
    ds = dg.StackedDigits(n=3000)
    x, triples = ds.load_labelled(_gen(1))
    assert x.shape == (3000, 3, 8, 8) and x.dtype == torch.float32
    assert x.is_contiguous()
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert triples.shape == (3000, 3) and int(triples.min()) >= 0 and int(triples.max()) <= 9
    # each channel is one of the 1797 digit images
    digits = dg.Digits().load(_gen(0)).flatten(1)  # (1797, 64)
    chans = x[:200].reshape(600, 64)
    dist = torch.cdist(chans, digits)
    assert float(dist.min(dim=1).values.max()) == 0.0
    info = ds.info()
    assert info["stacked_digits"] is True and info["modes"] == 1000
    assert ds.default_model == "dcgan" and ds.default_metrics == ("stacked-modes", "prdc")


def test_stacked_digits_default_n_is_the_stacked_mnist_protocol():
    assert dg.StackedDigits().opts.n == 128_000
    with pytest.raises(OptionError):
        dg.StackedDigits(n=0)


def test_stacked_digits_are_scored_on_26000_samples_by_default():
    # the Stacked-MNIST protocol's sample count: the resolved config of a run and so
    # `dyngan evaluate` without --n; 2,500 would cap a uniform generator near 920 modes
    from core.api import resolve_settings

    assert resolve_settings({"dataset": "stacked-digits"})["eval_samples"] == 26_000
    assert resolve_settings({"dataset": "grid25"})["eval_samples"] == 2_500
    assert resolve_settings({"dataset": "stacked-digits", "eval_samples": 100})["eval_samples"] == 100


def test_stacked_digits_determinism():
    ds = dg.StackedDigits(n=2000)
    a, b = ds.load(_gen(7)), ds.load(_gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, ds.load(_gen(8)))
    assert torch.equal(a, ds.load_labelled(_gen(7))[0])


def test_stacked_digit_triples_are_roughly_uniform():
    n = 100_000
    _, triples = dg.StackedDigits(n=n).load_labelled(_gen(3))
    codes = triples[:, 0] * 100 + triples[:, 1] * 10 + triples[:, 2]
    counts = torch.bincount(codes, minlength=1000)
    assert counts.numel() == 1000 and int((counts > 0).sum()) == 1000
    # 100 expected per triple; Poisson sd 10 and the classes are not exactly balanced in sklearn
    assert 45 <= int(counts.min()) and int(counts.max()) <= 165
    p = counts.double() / n
    kl = float((p * (p * 1000).log()).sum())
    assert kl < 0.01  # a real uniform sample of this size gives about 0.005
    for k in range(3):  # each channel's classes
        freq = torch.bincount(triples[:, k], minlength=10).double() / n
        assert float((freq - 0.1).abs().max()) < 0.01


# --------------------------------------------------------------------------- the classifier


def test_split_is_stratified_and_disjoint():
    train, test = dg._split()
    labels = dg._digits()[1]
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert train.numel() + test.numel() == 1797
    per_class = torch.bincount(labels[test], minlength=10).double() / torch.bincount(labels, minlength=10)
    assert float((per_class - 0.2).abs().max()) < 0.01


def test_classifier_held_out_accuracy(cache):
    _, clf = cache
    assert clf.source == "trained"
    assert clf.accuracy >= 0.95, f"held-out accuracy {clf.accuracy:.4f}"
    assert clf.n_test == dg._split()[1].numel()
    # recompute it independently of the helper
    images, labels, _ = dg._digits()
    _, test = dg._split()
    acc = float((clf.predict(images[test]) == labels[test]).double().mean())
    assert acc == pytest.approx(clf.accuracy, abs=1e-6)
    clf.require_accurate()  # does not raise


def test_first_use_inside_a_metric_trains_under_no_grad_to_the_same_weights(cache, tmp_path, monkeypatch):
    # the trainer computes metrics under no_grad, and on a machine with no cache the first
    # stacked-modes score trains the classifier there: it failed ("does not require grad")
    from dyngan_plugins.digits import StackedDigits, StackedModes

    monkeypatch.setenv("DYNGAN_CACHE", str(tmp_path))
    images = dg._digits()[0][:30]
    fake = images.reshape(10, 3, 8, 8)
    with torch.no_grad():
        out = StackedModes().compute(fake, fake, StackedDigits())
    assert out["stacked-modes/modes"] >= 1
    fresh = dg.digit_classifier()  # from memory: the one the metric trained
    assert fresh.source == "trained" and fresh.path is not None and fresh.path.parent == tmp_path
    _, clf = cache
    assert fresh.accuracy == clf.accuracy
    theirs = clf.net.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in fresh.net.state_dict().items())


def test_classifier_cache_round_trip(cache):
    d, clf = cache
    weights, meta = dg.cache_paths(d)
    assert weights.is_file() and meta.is_file()
    assert weights.name.startswith("digit-classifier-") and dg.cache_key() in weights.name
    info = json.loads(meta.read_text())
    assert info["key"] == dg.cache_key()
    assert info["held_out_accuracy"] == pytest.approx(clf.accuracy)
    assert info["recipe"] == dg.RECIPE
    # no temp files left behind by the atomic writes
    assert sorted(p.name for p in d.iterdir()) == sorted([weights.name, meta.name])

    again = dg.digit_classifier(use_memory=False)
    assert again.source == "cache" and again is not clf
    assert again.accuracy == pytest.approx(clf.accuracy)
    for k, v in clf.net.state_dict().items():
        assert torch.equal(v, again.net.state_dict()[k]), k
    # and the in-memory copy is reused
    assert dg.digit_classifier() is dg.digit_classifier()


def test_cache_key_follows_the_recipe(monkeypatch):
    key = dg.cache_key()
    monkeypatch.setitem(dg.RECIPE, "epochs", dg.RECIPE["epochs"] + 1)
    assert dg.cache_key() != key


def _copy_cache(src, dst):
    w, m = dg.cache_paths(src)
    w2, m2 = dg.cache_paths(dst)
    w2.write_bytes(w.read_bytes())
    m2.write_text(m.read_text())
    return w2, m2


def test_cache_validation_rejects_tampering(cache, tmp_path):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    d, _ = cache
    w, m = _copy_cache(d, tmp_path)
    assert dg._load_cached(w, m) is not None  # the intact copy is accepted

    good = w.read_bytes()
    tensors = st_load(good)
    info = json.loads(m.read_text())

    def with_blob(blob, fix_sha=True):
        w.write_bytes(blob)
        i = dict(info)
        if fix_sha:
            import hashlib

            i["sha256"] = hashlib.sha256(blob).hexdigest()
        m.write_text(json.dumps(i))
        return dg._load_cached(w, m)

    # garbage bytes, even with a JSON that vouches for them
    assert with_blob(b"not a safetensors file at all") is None
    # truncated file
    assert with_blob(good[: len(good) // 2]) is None
    # a valid file whose weights changed behind the JSON's back
    changed = dict(tensors)
    changed["head.bias"] = changed["head.bias"] + 1.0
    assert with_blob(st_save(changed), fix_sha=False) is None
    # valid safetensors, sha matches, but wrong names / shapes / values
    missing = {k: v for k, v in tensors.items() if k != "head.bias"}
    assert with_blob(st_save(missing)) is None
    extra = dict(tensors, sneaky=torch.zeros(2))
    assert with_blob(st_save(extra)) is None
    reshaped = dict(tensors)
    reshaped["head.weight"] = torch.zeros(10, 32)
    assert with_blob(st_save(reshaped)) is None
    nan = dict(tensors)
    nan["head.bias"] = torch.full((10,), float("nan"))
    assert with_blob(st_save(nan)) is None
    as_double = {k: v.double() for k, v in tensors.items()}
    assert with_blob(st_save(as_double)) is None
    # intact weights but a JSON that is not JSON, or for another recipe
    w.write_bytes(good)
    m.write_text("{ not json")
    assert dg._load_cached(w, m) is None
    m.write_text(json.dumps(dict(info, key="0123456789abcdef")))
    assert dg._load_cached(w, m) is None
    m.unlink()
    assert dg._load_cached(w, m) is None


def test_corrupt_cache_is_retrained_not_trusted(cache, tmp_path):
    d, clf = cache
    w, m = _copy_cache(d, tmp_path)
    w.write_bytes(b"\x00garbage" * 100)
    fresh = dg.digit_classifier(tmp_path, use_memory=False)
    assert fresh.source == "trained"
    assert fresh.accuracy >= 0.95
    # the corrupt file was replaced by a good one that now loads from the cache
    assert dg._load_cached(w, m) is not None
    assert dg.digit_classifier(tmp_path, use_memory=False).source == "cache"
    # training is deterministic: the retrained weights are the cached ones
    for k, v in clf.net.state_dict().items():
        assert torch.equal(v, fresh.net.state_dict()[k]), k


def test_low_accuracy_classifier_refuses_to_score(cache, monkeypatch):
    _, clf = cache
    weak = dg.DigitClassifier(clf.net, accuracy=0.90, n_test=clf.n_test, source="cache", path=None)
    with pytest.raises(RunFailure, match="95%"):
        weak.require_accurate()
    monkeypatch.setattr(dg, "digit_classifier", lambda *a, **k: weak)
    ds = dg.StackedDigits(n=100)
    x = ds.load(_gen(0))
    with pytest.raises(RunFailure, match="refusing"):
        dg.StackedModes().compute(x, x, ds)
    with pytest.raises(RunFailure):
        ds.features(x)


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(UsageError, match=r'pip install "dyngan\[digits\]"'):
        dg._sklearn_datasets()


# --------------------------------------------------------------------------- features and the metric


def test_features_per_channel(cache):
    stacked = dg.StackedDigits(n=50)
    x = stacked.load(_gen(0))
    f = stacked.features(x)
    assert f.shape == (50, 3 * dg.FEATURE_DIM) and bool(torch.isfinite(f).all())
    # channel k's block is the classifier's feature of channel k alone
    single = dg.Digits().features(x[:, 1:2])
    assert single.shape == (50, dg.FEATURE_DIM)
    assert torch.allclose(f[:, dg.FEATURE_DIM : 2 * dg.FEATURE_DIM], single, atol=1e-5)
    assert not torch.allclose(f[:, : dg.FEATURE_DIM], single)


def test_stacked_modes_supports():
    m = dg.StackedModes()
    assert m.supports(dg.StackedDigits())
    assert m.supports(dg.Digits())
    assert not m.supports(Ring8())


def test_stacked_modes_on_real_stacked_digits(cache):
    n = 6000  # 26,000 in the protocol; fewer keeps the test quick
    ds = dg.StackedDigits(n=n)
    x, triples = ds.load_labelled(_gen(11))
    out = dg.StackedModes().compute(x, x, ds)
    assert set(out) == {
        "stacked-modes/modes",
        "stacked-modes/max_modes",
        "stacked-modes/kl",
        "stacked-modes/classifier_accuracy",
        "stacked-modes/n",
    }
    assert out["stacked-modes/max_modes"] == 1000 and out["stacked-modes/n"] == n
    # 6000 uniform draws cover about 997.5 of 1000 triples, with a sampling KL near 999/(2n) = 0.08
    assert out["stacked-modes/modes"] >= 980
    assert 0.0 <= out["stacked-modes/kl"] < 0.2
    assert out["stacked-modes/classifier_accuracy"] >= 0.95
    # against the true labels: the classifier-based KL is close to the label-based one
    codes = triples[:, 0] * 100 + triples[:, 1] * 10 + triples[:, 2]
    p = torch.bincount(codes, minlength=1000).double() / codes.numel()
    p = p[p > 0]
    kl_true = float((p * p.log()).sum()) + math.log(1000)
    assert abs(out["stacked-modes/kl"] - kl_true) < 0.05


def test_stacked_modes_one_repeated_image_is_one_mode(cache):
    ds = dg.StackedDigits(n=10)
    x = ds.load(_gen(0))
    out = dg.StackedModes().compute(x[:1].repeat(500, 1, 1, 1), x, ds)
    assert out["stacked-modes/modes"] == 1
    assert out["stacked-modes/kl"] == pytest.approx(math.log(1000), abs=1e-9)


def test_stacked_modes_k_equal_modes(cache):
    ds = dg.StackedDigits(n=300)
    x = ds.load(_gen(5))
    pred = cache[1].predict(x.reshape(-1, 1, 8, 8)).view(-1, 3)
    codes = pred[:, 0] * 100 + pred[:, 1] * 10 + pred[:, 2]
    # four images with four different predicted triples, 250 copies each
    picks, seen = [], set()
    for i, c in enumerate(codes.tolist()):
        if c not in seen:
            seen.add(c)
            picks.append(i)
        if len(picks) == 4:
            break
    fake = x[picks].repeat_interleave(250, dim=0)
    out = dg.StackedModes().compute(fake, x, ds)
    assert out["stacked-modes/modes"] == 4
    assert out["stacked-modes/kl"] == pytest.approx(math.log(1000 / 4), abs=1e-9)


def test_stacked_modes_single_digits_use_ten_modes(cache):
    ds = dg.Digits()
    x = ds.load(_gen(0))
    out = dg.StackedModes().compute(x, x, ds)
    assert out["stacked-modes/max_modes"] == 10 and out["stacked-modes/modes"] == 10
    assert out["stacked-modes/kl"] < 0.01  # sklearn's classes are nearly balanced


def test_stacked_modes_rejects_bad_samples(cache):
    ds = dg.StackedDigits(n=10)
    x = ds.load(_gen(0))
    m = dg.StackedModes()
    with pytest.raises(UsageError, match=r"\(M, 3, 8, 8\)"):
        m.compute(x[:, :2], x, ds)
    with pytest.raises(UsageError):
        m.compute(x[:0], x, ds)
    bad = x.clone()
    bad[3, 1, 2, 2] = float("nan")
    with pytest.raises(RunFailure, match="NaN"):
        m.compute(bad, x, ds)
