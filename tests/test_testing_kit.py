"""The conformance checks of core.testing: they pass the built-in components and catch broken ones."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from core.components import CollapseDetector, Dataset, Detection, Loss, Option
from core.plugins import load_plugins
from core.testing import (
    assert_same,
    check_dataset,
    check_detector,
    check_deterministic,
    check_loss,
    plugin_host,
    tiny_mixture,
    tiny_networks,
    tiny_train_context,
)

HOST = load_plugins()



# ---------------------------------------------------------------------- the built-ins pass


@pytest.mark.parametrize("name", sorted(HOST.registry.names("loss")))
def test_every_builtin_loss_passes_check_loss(name):
    cls = HOST.registry.get("loss", name)
    check_loss(cls)
    if "r1_gamma" in cls.options:
        check_loss(cls, {"r1_gamma": 1.0})


@pytest.mark.parametrize("options", [{"every": 1}, {"every": 2, "subset": 100, "lam": 0.5}])
def test_the_builtin_dyngan_detector_passes_check_detector(options):
    det = check_detector(HOST.registry.get("detector", "dyngan"), options)
    assert det.collapsed.shape == (256,) and det.score is not None


@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_the_builtin_mixtures_pass_check_dataset(name):
    x = check_dataset(HOST.registry.get("dataset", name), {"n": 300})
    assert x.shape == (300, 2)


# ---------------------------------------------------------------------- broken losses are caught


class GoodLoss(Loss):
    name = "kit-good"

    def d_loss(self, ctx):
        return F.softplus(-ctx.real_logits).mean() + F.softplus(ctx.fake_logits).mean()

    def g_loss(self, ctx):
        return F.softplus(-ctx.fake_logits).mean()


class LogSigmoidLoss(GoodLoss):
    """log(sigmoid(l)) underflows to -inf at l = -100 in float32."""

    def d_loss(self, ctx):
        return -(torch.sigmoid(ctx.real_logits).log().mean() + (1 - torch.sigmoid(ctx.fake_logits)).log().mean())


class VectorLoss(GoodLoss):
    def g_loss(self, ctx):
        return F.softplus(-ctx.fake_logits)  # per sample, not a scalar


class RandomLoss(GoodLoss):
    def d_loss(self, ctx):
        return super().d_loss(ctx) * (1 + torch.rand(()))  # global RNG: not reproducible


class DetachedLoss(GoodLoss):
    def g_loss(self, ctx):
        return torch.tensor(1.0)


class NeedsRealLoss(GoodLoss):
    needs_real_in_g_step = True

    def g_loss(self, ctx):
        assert ctx.real_logits is not None
        return F.softplus(ctx.real_logits.mean() - ctx.fake_logits).mean()


class BadDefaultsLoss(GoodLoss):
    def optimizer_defaults(self):
        return {"lr": 1e-3}


class RefusedDefaultsLoss(GoodLoss):
    def optimizer_defaults(self):
        return {"lr_g": -1.0}  # the kit passed it, training refused it


def test_check_loss_passes_a_good_loss_and_one_that_needs_real_logits():
    check_loss(GoodLoss)
    check_loss(NeedsRealLoss)


@pytest.mark.parametrize("cls, message", [
    (LogSigmoidLoss, "logits of -100: d_loss is inf"),
    (VectorLoss, "g_loss returned torch.float32(16,), not a 0-d float tensor"),
    (RandomLoss, "not deterministic"),
    (DetachedLoss, "g_loss does not depend on the logits"),
    (BadDefaultsLoss, "optimizer_defaults() returned the key 'lr', which dyngan does not know"),
    (RefusedDefaultsLoss, "optimizer_defaults() recommended lr_g = -1.0, which dyngan refuses"),
])
def test_check_loss_catches(cls, message):
    with pytest.raises(AssertionError) as e:
        check_loss(cls)
    assert message in str(e.value)


# ---------------------------------------------------------------------- broken detectors are caught


class GoodDetector(CollapseDetector):
    name = "kit-good"
    options = {"every": Option(1, "every", min=1)}

    def __init__(self, **options):
        super().__init__(**options)
        self.calls = 0

    def detect(self, ctx):
        self.calls += 1
        _, feats = ctx.discriminator(ctx.data, ctx.labels, features=True)
        score = feats.norm(dim=1) * self.calls
        collapsed = score > score.median()
        return Detection(collapsed=collapsed, fraction=collapsed.float().mean(), score=score, features=feats)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


class FloatMask(GoodDetector):
    def detect(self, ctx):
        d = super().detect(ctx)
        return Detection(collapsed=d.collapsed.float(), fraction=d.fraction)


class WrongFraction(GoodDetector):
    def detect(self, ctx):
        d = super().detect(ctx)
        return Detection(collapsed=torch.zeros_like(d.collapsed), fraction=torch.tensor(0.5))


class ForgetsState(GoodDetector):
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class SwitchesEval(GoodDetector):
    def detect(self, ctx):
        ctx.generator.eval()
        return super().detect(ctx)


class Unseeded(GoodDetector):
    def detect(self, ctx):
        d = super().detect(ctx)
        return Detection(collapsed=d.collapsed, fraction=d.fraction, score=torch.rand(d.collapsed.shape[0]))


class UnseededSetup(GoodDetector):
    """Draws its offset from the global RNG in setup: resumes exactly (it is saved), but two runs differ."""

    def setup(self, ctx):
        if not hasattr(self, "offset"):
            self.offset = torch.rand(())

    def detect(self, ctx):
        d = super().detect(ctx)
        return Detection(collapsed=d.collapsed, fraction=d.fraction, score=d.score + self.offset)

    def state_dict(self):
        return {**super().state_dict(), "offset": self.offset}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.offset = state["offset"]


class LeaksGrad(GoodDetector):
    def detect(self, ctx):
        with torch.enable_grad():
            _, feats = ctx.discriminator(ctx.data, ctx.labels, features=True)
        d = super().detect(ctx)
        return Detection(collapsed=d.collapsed, fraction=d.fraction, features=feats)


class ReturnsTuple(GoodDetector):
    def detect(self, ctx):
        d = super().detect(ctx)
        return d.collapsed, d.fraction


class RaisesInDetect(GoodDetector):
    def detect(self, ctx):
        raise ValueError("boom in detect")


class RaisesOnLoad(GoodDetector):
    def load_state_dict(self, state):
        raise KeyError("no such state")


def test_check_detector_passes_a_good_detector_and_returns_its_detection():
    det = check_detector(GoodDetector)
    assert isinstance(det, Detection) and det.collapsed.dtype == torch.bool
    assert det.features.shape == (256, 32)


@pytest.mark.parametrize("cls, message", [
    (FloatMask, "collapsed is torch.float32(256,), expected torch.bool (256,)"),
    (WrongFraction, "fraction is 0.5 but 0 samples are collapsed"),
    (ForgetsState, "does not detect what the original detects next"),
    (SwitchesEval, "train/eval mode was left changed"),
    (Unseeded, "or randomness not drawn from ctx.rng"),
    (UnseededSetup, "not deterministic under a fixed seed (two runs differ)"),
    (LeaksGrad, "features requires grad"),
    (ReturnsTuple, "returned tuple, not a core.components.Detection"),
    # an exception is listed as a problem naming the method, as the other kits do (it used to come bare)
    (RaisesInDetect, "detector 'kit-good': detect() raised ValueError: boom in detect"),
    (RaisesOnLoad, "load_state_dict() raised KeyError: 'no such state'"),
])
def test_check_detector_catches(cls, message):
    with pytest.raises(AssertionError) as e:
        check_detector(cls)
    assert message in str(e.value)


# ---------------------------------------------------------------------- broken datasets are caught


class GoodData(Dataset):
    name = "kit-good"
    options = {"n": Option(50, "points", min=1)}

    def load(self, generator):
        return torch.randn(self.opts.n, 3, generator=generator)

    def info(self):
        return {"dims": 3}


class Float64Data(GoodData):
    def load(self, generator):
        return super().load(generator).double()


class NaNData(GoodData):
    def load(self, generator):
        x = super().load(generator)
        x[3, 1] = math.nan
        return x


class UnseededData(GoodData):
    def load(self, generator):
        return torch.randn(self.opts.n, 3)


class FlatData(GoodData):
    def load(self, generator):
        return super().load(generator)[:, 0]


class BadInfo(GoodData):
    def info(self):
        return {"centres": torch.zeros(2, 2)}


def test_check_dataset_passes_a_good_dataset():
    assert check_dataset(GoodData, {"n": 7}).shape == (7, 3)


@pytest.mark.parametrize("cls, message", [
    (Float64Data, "dtype torch.float64, not torch.float32"),
    (NaNData, "NaN or inf"),
    (UnseededData, "not deterministic"),
    (FlatData, "shape (50,)"),
    (BadInfo, "info() is not JSON-serialisable"),
])
def test_check_dataset_catches(cls, message):
    with pytest.raises(AssertionError) as e:
        check_dataset(cls)
    assert message in str(e.value)


class RaisingData(GoodData):
    """Loads ``works`` times, then raises (counted on the class: each check makes new instances)."""

    options = {**GoodData.options, "works": Option(0, "loads that succeed", min=0)}
    calls = 0

    def load(self, generator):
        type(self).calls += 1
        if type(self).calls > self.opts.works:
            raise ValueError("file went away")
        return super().load(generator)


@pytest.mark.parametrize("works", [
    0,
    1,  # the second load, of the determinism check, raises: said as such, not as a difference
])
def test_check_dataset_names_the_method_that_raised(works):
    cls = type("Raising", (RaisingData,), {"calls": 0})
    with pytest.raises(AssertionError) as e:
        check_dataset(cls, {"works": works})
    assert str(e.value) == "dataset 'kit-good': load() raised ValueError: file went away"


# ---------------------------------------------------------------------- building blocks


def test_assert_same_and_check_deterministic():
    a = {"x": torch.tensor([1.0, math.nan]), "y": [1, 2.5, "s"], "d": Detection(torch.ones(2, dtype=torch.bool),
                                                                               torch.tensor(1.0))}
    b = {"x": torch.tensor([1.0, math.nan]), "y": [1, 2.5, "s"], "d": Detection(torch.ones(2, dtype=torch.bool),
                                                                               torch.tensor(1.0))}
    assert_same(a, b)  # NaN where NaN is the same
    for other, message in [
        ({**b, "x": torch.tensor([1.0, 2.0])}, "1 of 2 values differ"),
        ({**b, "x": torch.tensor([1, 2])}, "torch.float32(2,), then torch.int64(2,)"),
        ({**b, "y": [1, 2.5]}, "list of 3"),
        ({**b, "d": Detection(torch.zeros(2, dtype=torch.bool), torch.tensor(1.0))}, "result['d'].collapsed"),
    ]:
        with pytest.raises(AssertionError, match=None) as e:
            assert_same(a, other)
        assert message in str(e.value)
    counter = iter(range(10))
    with pytest.raises(AssertionError, match="not deterministic"):
        check_deterministic(lambda: next(counter))
    assert check_deterministic(lambda: torch.randn(3, generator=torch.Generator().manual_seed(1)), runs=3).shape == (3,)


def test_tiny_context_follows_the_calling_convention():
    ctx = tiny_train_context(capacity=3, z_dim=5)
    assert ctx.data.shape == (256, 2) and ctx.data.dtype == torch.float32
    assert ctx.labels.tolist()[:4] == [0, 1, 2, 0] and math.isclose(float(ctx.prior.sum()), 1.0)
    z = torch.randn(7, 5)
    cond = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    x = ctx.generator(z, cond)
    assert x.shape == (7, 2)
    logits, feats = ctx.discriminator(x, cond, features=True)
    assert logits.shape == (7,) and feats.shape == (7, 32)
    assert torch.equal(ctx.discriminator(x, cond), logits)
    # seeded, and without touching the global random state
    state = torch.random.get_rng_state()
    g1, _ = tiny_networks(seed=4)
    g2, _ = tiny_networks(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(g1.parameters(), g2.parameters()))
    assert torch.equal(tiny_mixture(10, seed=2), tiny_mixture(10, seed=2))


def test_plugin_host_loads_an_installed_plugin_once():
    import dyngan_plugins.losses as installed  # declared as the entry point "losses"

    with plugin_host(installed, strict=True) as host:
        assert [p.name for p in host.plugins.values() if p.module == "dyngan_plugins.losses"] == ["losses"]
        assert host.registry.get("loss", "ns").plugin == "losses"


def test_plugin_host_gives_classes_back_their_plugin_names():
    """``cls.plugin`` is shared by every host: a throwaway registration must not leak into the
    process-wide host (config.json records the plugins a run used by that attribute)."""
    import dyngan_plugins.mixtures as mixtures

    from core.plugins import get_host

    ring8 = get_host().registry.get("dataset", "ring8")
    assert ring8.plugin == "mixtures"
    with plugin_host(("kit-alias", mixtures), builtins=False) as host:
        assert host.registry.get("dataset", "ring8") is ring8 and ring8.plugin == "kit-alias"
    assert ring8.plugin == "mixtures"


# ---------------------------------------------------------------- check_metric


def test_check_metric_passes_the_built_in_metrics():
    from core.testing import check_metric
    from dyngan_plugins.mixture_metrics import MixtureMetric
    from dyngan_plugins.prdc import PRDC

    vals = check_metric(MixtureMetric)
    assert vals["mixture/modes"] == 4.0  # the default fake covers the four Gaussians
    assert set(check_metric(PRDC, {"k": 3})) == {"prdc/precision", "prdc/recall", "prdc/density", "prdc/coverage"}


def _metric(compute, name="mine"):
    from core.components import Metric

    return type("Mine", (Metric,), {"name": name, "compute": lambda self, f, r, d: compute(f, r)})


@pytest.mark.parametrize("compute, needle", [
    (lambda f, r: (r.mul_(2), {"mine/x": 1.0})[1], "changed fake or real in place"),
    (lambda f, r: {"x": 1.0}, "every key must start with 'mine/'"),
    (lambda f, r: {"mine/x": float("nan")}, "mine/x is nan, not finite"),
    (lambda f, r: {"mine/x": "high"}, "returned str for 'mine/x', not a number"),
    (lambda f, r: {"mine/x": float(torch.rand(()))}, "not deterministic"),
])
def test_check_metric_names_what_a_metric_gets_wrong(compute, needle):
    from core.testing import check_metric

    with pytest.raises(AssertionError, match=re.escape(needle)):
        check_metric(_metric(compute))


def test_check_metric_and_check_loss_name_the_method_that_raised():
    from core.testing import check_metric

    def compute(f, r):
        raise ValueError("no centres")

    with pytest.raises(AssertionError, match=re.escape("metric 'mine': compute() raised ValueError: no centres")):
        check_metric(_metric(compute))

    class Unbuildable(Loss):
        name = "unbuildable"

        def __init__(self, **options):
            super().__init__(**options)
            raise RuntimeError("needs a GPU")

    with pytest.raises(AssertionError, match=re.escape("loss 'unbuildable': __init__() raised RuntimeError: needs a GPU")):
        check_loss(Unbuildable)


def test_a_run_under_plugin_host_records_the_modules_own_version(tmp_path):
    import types as _types

    from core import api, hookimpl
    from core.testing import plugin_host
    from dyngan_plugins.losses import NonSaturatingLoss

    Renamed = type("Renamed", (NonSaturatingLoss,), {"name": "ns-copy"})
    mod = _types.ModuleType("my_ns_plugin")
    mod.__version__ = "1.2.3"
    mod.register_losses = hookimpl(lambda register: register(Renamed))
    with plugin_host(mod):
        res = api.train({"dataset": "grid25", "loss": "ns-copy", "steps": 2, "device": "cpu", "out": str(tmp_path / "r"),
                         "checkpoint_every": 0, "metrics": "none", "options": {"dataset": {"n": 300}}}, quiet=True)
    assert res.config["plugins"]["my_ns_plugin"] == {"distribution": None, "version": "1.2.3"}
