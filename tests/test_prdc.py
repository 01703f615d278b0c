"""PRDC: known answers, the collapsed case, features hook, subsampling, chunking."""

from __future__ import annotations

import pytest
import torch

from core.components import Dataset
from core.plugins import PluginHost
from dyngan_plugins import prdc as prdc_module
from dyngan_plugins.mixtures import Grid25
from dyngan_plugins.prdc import PRDC, prdc


def test_hand_computed_1d_example():
    # k = 1. Real 0,1,2,3: every real radius is 1. Fake 0.5 and 10: each fake radius is 9.5.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    out = prdc(real, fake, k=1)
    assert out["prdc/precision"] == 0.5  # 0.5 lies in the balls of 0 and 1; 10 in none
    assert out["prdc/density"] == 1.0  # (2 + 0) balls / (k * M = 2)
    assert out["prdc/recall"] == 1.0  # every real point is within 9.5 of 0.5
    assert out["prdc/coverage"] == 0.5  # nearest fake of 0 and 1 is 0.5 (<= 1); of 2 and 3 it is not


def test_precision_and_recall_are_not_swapped():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    swapped = prdc(fake, real, k=1)  # real and fake exchanged
    # now precision asks which of 0..3 lie in the balls of 0.5 / 10 (radius 9.5): all of them
    assert swapped["prdc/precision"] == 1.0
    # and recall which of 0.5 / 10 lie in the balls of 0..3 (radius 1): only 0.5
    assert swapped["prdc/recall"] == 0.5


def test_identical_sets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    out = PRDC().compute(x, x.clone(), Grid25())
    assert out["prdc/precision"] == 1.0
    assert out["prdc/recall"] == 1.0
    assert out["prdc/coverage"] == 1.0
    assert out["prdc/density"] >= 1.0  # each point lies in its own ball and in at least k-1 others


def test_two_samples_of_one_distribution():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    out = PRDC().compute(fake, real, Grid25())
    for key in ("prdc/precision", "prdc/recall", "prdc/coverage"):
        assert out[key] > 0.85, (key, out[key])
    assert 0.8 < out["prdc/density"] < 1.2


def test_collapsed_generator():
    # real: the 25-mode grid; fake: every sample from one of its modes
    ds = Grid25(n=2500)
    real = ds.load(torch.Generator().manual_seed(2))
    centre = torch.tensor(ds.info()["centres"][12])
    fake = centre + ds.opts.sigma * torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    out = PRDC().compute(fake, real, ds)
    assert out["prdc/precision"] > 0.9
    assert out["prdc/recall"] < 0.1
    assert out["prdc/coverage"] < 0.1
    assert out["prdc/density"] > 0.5


def test_features_hook_is_used():
    calls = []

    class FirstCoordinate(Dataset):
        name = "firstcoord"

        def features(self, x):
            calls.append(tuple(x.shape))
            return x[:, :1]

    g = torch.Generator().manual_seed(4)
    real = torch.randn(200, 2, generator=g)
    fake = real.clone()
    fake[:, 1] += 50.0  # far away in raw space, identical in the first coordinate
    raw = PRDC().compute(fake, real, Grid25())
    assert raw["prdc/precision"] == 0.0 and raw["prdc/recall"] == 0.0
    feat = PRDC().compute(fake, real, FirstCoordinate())
    assert feat["prdc/precision"] == 1.0 and feat["prdc/recall"] == 1.0
    assert calls and all(shape[1] == 2 for shape in calls)


def test_images_are_flattened():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100, 3, 4, 4, generator=g)
    out = PRDC().compute(x, x, Grid25())
    assert out["prdc/precision"] == out["prdc/recall"] == out["prdc/coverage"] == 1.0


def test_subsampling_caps_and_is_deterministic():
    seen = []

    class Recording(Dataset):
        name = "recording"

        def features(self, x):
            seen.append(x.shape[0])
            return x

    g = torch.Generator().manual_seed(6)
    real, fake = torch.randn(700, 2, generator=g), torch.randn(400, 2, generator=g)
    metric = PRDC(max_samples=150, chunk_size=1000)
    first = metric.compute(fake, real, Recording())
    assert seen == [150, 150]
    assert metric.compute(fake, real, Recording()) == first
    # without a cap every sample is used
    seen.clear()
    PRDC(max_samples=None, chunk_size=1000).compute(fake, real, Recording())
    assert seen == [700, 400]


def test_chunking_gives_the_same_answer():
    g = torch.Generator().manual_seed(7)
    real, fake = torch.randn(257, 3, generator=g), 1.3 * torch.randn(190, 3, generator=g) + 0.4
    whole = prdc(real, fake, k=3, chunk_size=10_000)
    for chunk in (1, 13, 64):
        assert prdc(real, fake, k=3, chunk_size=chunk) == whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_common_shift_of_both_sets_changes_nothing(dtype):
    # PRDC depends on distances only; readings of 3000 +- 1 lost them in cdist's |x|^2 + |y|^2 - 2xy
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 8, generator=g, dtype=torch.float64)
    fake = torch.randn(400, 8, generator=g, dtype=torch.float64) * 1.2 + 0.3
    want = prdc(real, fake)
    for offset in (300.0, 3000.0):
        got = prdc((real + offset).to(dtype), (fake + offset).to(dtype))
        assert got == pytest.approx(want, abs=1e-9), offset


def test_integer_inputs_score_as_their_float_values():
    # the centring shift cast to uint8 wrapped around, to int64 was cut: real and fake moved apart
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 200, (300, 4), generator=g)
    fake = torch.randint(0, 200, (250, 4), generator=g)
    want = prdc(real.double(), fake.double())
    for rd, fd in ((torch.uint8, torch.float32), (torch.int64, torch.float32), (torch.uint8, torch.uint8)):
        assert prdc(real.to(rd), fake.to(fd)) == pytest.approx(want, abs=1e-9), (rd, fd)


def test_k_matters_and_too_few_samples_fail():
    g = torch.Generator().manual_seed(8)
    real, fake = torch.randn(300, 2, generator=g), 0.5 * torch.randn(300, 2, generator=g) + 1.0
    small, large = prdc(real, fake, k=1), prdc(real, fake, k=20)
    assert small["prdc/precision"] < large["prdc/precision"]  # bigger balls, more fake inside
    with pytest.raises(ValueError, match="more than 5"):
        PRDC().compute(torch.zeros(5, 2), torch.randn(10, 2), Grid25())


def test_keys_protocol_and_registration():
    out = PRDC().compute(torch.randn(50, 2), torch.randn(50, 2), Grid25())
    assert set(out) == {"prdc/precision", "prdc/recall", "prdc/density", "prdc/coverage"}
    assert all(isinstance(v, float) for v in out.values())
    assert "Naeem" in PRDC.protocol
    host = PluginHost()
    info = host.add_plugin("prdc", lambda: prdc_module, module="dyngan_plugins.prdc")
    assert info.error is None
    assert host.registry.get("metric", "prdc") is PRDC
