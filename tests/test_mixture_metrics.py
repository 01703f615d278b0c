"""The mixture metric: hand-made sample sets with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from core.components import Dataset
from core.plugins import PluginHost
from dyngan_plugins import mixture_metrics
from dyngan_plugins.mixture_metrics import MixtureMetric, mixture_stats
from dyngan_plugins.mixtures import Grid25, Ring8


def grid():
    info = Grid25().info()
    return torch.tensor(info["centres"], dtype=torch.float64), info["sigma"]


def test_samples_at_every_centre():
    c, s = grid()
    fake = c.repeat(4, 1)  # 100 samples, 4 per centre
    out = mixture_stats(fake, c, s)
    assert out["mixture/modes"] == 25
    assert out["mixture/hq"] == 1.0
    assert out["mixture/reverse_kl"] == pytest.approx(0.0, abs=1e-12)
    assert out["mixture/dyngan/modes"] == 25
    assert out["mixture/dyngan/hq1"] == out["mixture/dyngan/hq2"] == out["mixture/dyngan/hq3"] == 1.0
    assert all(isinstance(v, float) for v in out.values())


def test_all_samples_at_one_mode():
    c, s = grid()
    fake = c[7].repeat(50, 1) + 0.5 * s * torch.randn(50, 2, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    out = mixture_stats(fake, c, s)
    assert out["mixture/modes"] == 1
    assert out["mixture/hq"] == 1.0
    assert out["mixture/reverse_kl"] == pytest.approx(math.log(25))
    assert out["mixture/dyngan/modes"] == 1
    assert out["mixture/dyngan/reverse_kl"] == pytest.approx(math.log(25))


def test_off_mode_noise():
    c, s = grid()
    # half-way between neighbouring centres: 1 unit away from the nearest, far beyond 3 sigma (0.15)
    fake = torch.tensor([[1.0, 1.0], [-3.0, 1.0], [3.0, -3.0], [1.0, 0.0], [10.0, 10.0]])
    out = mixture_stats(fake, c, s)
    assert out["mixture/modes"] == 0
    assert out["mixture/hq"] == 0.0
    assert out["mixture/dyngan/modes"] == 0
    assert out["mixture/dyngan/hq3"] == 0.0
    # low-quality samples still enter the histogram: 5 samples over at most 5 modes, not uniform over 25
    assert out["mixture/reverse_kl"] >= math.log(25 / 5) - 1e-12


def test_two_mode_split_known_kl():
    c, s = grid()
    fake = torch.cat([c[0].repeat(30, 1), c[24].repeat(10, 1)])
    out = mixture_stats(fake, c, s)
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    expected = float((p * torch.log(p * 25)).sum())
    assert out["mixture/reverse_kl"] == pytest.approx(expected, rel=1e-12)
    assert out["mixture/modes"] == 2


def test_kl_counts_low_quality_samples_but_modes_need_hq():
    c, s = grid()
    # one sample exactly at centre 0, one at 5 sigma from centre 3 (assigned there, not HQ)
    fake = torch.stack([c[0], c[3] + torch.tensor([5 * s, 0.0], dtype=torch.float64)])
    out = mixture_stats(fake, c, s)
    assert out["mixture/modes"] == 1
    assert out["mixture/hq"] == 0.5
    assert out["mixture/reverse_kl"] == pytest.approx(math.log(25 / 2))
    # a looser threshold makes the second sample HQ too
    assert mixture_stats(fake, c, s, hq_sigmas=6.0)["mixture/modes"] == 2


def test_dyngan_thresholds():
    c, s = grid()
    off = lambda r: c[12] + torch.tensor([r * s, 0.0], dtype=torch.float64)  # noqa: E731
    out = mixture_stats(torch.stack([off(1.5)]), c, s)
    assert out["mixture/dyngan/hq1"] == 0.0
    assert out["mixture/dyngan/hq2"] == 1.0
    assert out["mixture/dyngan/hq3"] == 1.0
    assert out["mixture/dyngan/modes"] == 0  # not within 1 sigma
    assert out["mixture/modes"] == 1  # but HQ under PacGAN's 3 sigma
    out = mixture_stats(torch.stack([off(0.5), off(1.5), off(2.5), off(3.5)]), c, s)
    assert (out["mixture/dyngan/hq1"], out["mixture/dyngan/hq2"], out["mixture/dyngan/hq3"]) == (0.25, 0.5, 0.75)
    assert out["mixture/hq"] == 0.75
    assert out["mixture/dyngan/modes"] == 1


def test_hq_threshold_is_strict():
    # sigma 0.5, 3 sigma = 1.5 exactly (binary fractions): a sample at exactly 1.5 is not HQ
    origin = torch.zeros(1, 2, dtype=torch.float64)
    fake = torch.tensor([[0.0, 1.5], [0.0, 1.4999], [1.0, 0.0]], dtype=torch.float64)
    out = mixture_stats(fake, origin, 0.5)
    assert out["mixture/hq"] == pytest.approx(2 / 3)
    assert out["mixture/dyngan/hq2"] == 0.0  # the sample at 1.0 is exactly 2 sigma: not within
    assert out["mixture/dyngan/modes"] == 0


def test_ring8_centres_from_dataset():
    ds = Ring8()
    info = ds.info()
    c = torch.tensor(info["centres"])
    assert c.shape == (8, 2)
    # 8 distinct modes (the linspace-with-endpoint bug would merge two)
    assert torch.cdist(c, c).add(torch.eye(8)).min() > 0.5
    metric = MixtureMetric()
    assert metric.supports(ds)
    out = metric.compute(c[:6].repeat(3, 1), ds.load(torch.Generator().manual_seed(0)), ds)
    assert out["mixture/modes"] == 6
    assert out["mixture/hq"] == 1.0
    assert out["mixture/reverse_kl"] == pytest.approx(math.log(8 / 6))


def test_real_training_data_scores_as_perfect():
    # samples drawn from the dataset itself: every mode, nearly all HQ, small KL
    ds = Grid25(n=5000)
    real = ds.load(torch.Generator().manual_seed(1))
    out = MixtureMetric().compute(real, real, ds)
    assert out["mixture/modes"] == 25
    assert out["mixture/hq"] > 0.98  # P(chi_2 < 3) ~ 0.989
    assert 0.35 < out["mixture/dyngan/hq1"] < 0.44  # P(chi_2 < 1) ~ 0.393
    assert out["mixture/reverse_kl"] < 0.01


def test_chunking_gives_the_same_answer():
    c, s = grid()
    g = torch.Generator().manual_seed(3)
    fake = c[torch.randint(0, 20, (1003,), generator=g)] + 2 * s * torch.randn(1003, 2, generator=g, dtype=torch.float64)
    whole = mixture_stats(fake, c, s, chunk_size=10**6)
    for chunk in (1, 7, 256):
        assert mixture_stats(fake, c, s, chunk_size=chunk) == whole
    assert MixtureMetric(chunk_size=5).compute(fake, fake, Grid25()) == mixture_stats(fake, c, s)


def test_user_mixture_any_dimension():
    class Cube(Dataset):
        name = "cube3d"

        def info(self):
            return {"centres": [[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], "sigma": 0.02}

    ds = Cube()
    metric = MixtureMetric()
    assert metric.supports(ds)
    centres = torch.tensor(ds.info()["centres"])
    fake = torch.cat([centres[:4], centres[:4] + 0.5])  # 4 at centres, 4 in the middle of faces/body
    out = metric.compute(fake, fake, ds)
    assert out["mixture/modes"] == 4
    assert out["mixture/hq"] == 0.5
    with pytest.raises(ValueError, match="dimension"):
        metric.compute(torch.zeros(3, 2), None, ds)


def test_non_finite_samples_are_low_quality():
    c, s = grid()
    fake = torch.stack([c[0], c[1], torch.tensor([math.nan, 0.0], dtype=torch.float64), torch.full((2,), math.inf, dtype=torch.float64)])
    out = mixture_stats(fake, c, s)
    assert out["mixture/hq"] == 0.5
    assert out["mixture/modes"] == 2
    assert out["mixture/reverse_kl"] == pytest.approx(math.log(25 / 2))
    assert math.isnan(mixture_stats(fake[2:], c, s)["mixture/reverse_kl"])


def test_supports_only_datasets_with_centres_and_sigma():
    metric = MixtureMetric()

    class NoInfo(Dataset):
        name = "plain"

    class NoSigma(Dataset):
        name = "nosigma"

        def info(self):
            return {"centres": [[0.0, 0.0]]}

    class BadSigma(Dataset):
        name = "badsigma"

        def info(self):
            return {"centres": [[0.0, 0.0]], "sigma": 0.0}

    class Ragged(Dataset):
        name = "ragged"

        def info(self):
            return {"centres": [[0.0, 0.0], [1.0]], "sigma": 0.1}

    for ds in (NoInfo(), NoSigma(), BadSigma(), Ragged()):
        assert not metric.supports(ds), ds.name
        with pytest.raises(ValueError):
            metric.compute(torch.zeros(2, 2), torch.zeros(2, 2), ds)
    assert metric.supports(Grid25()) and metric.supports(Ring8())


def test_protocol_and_keys_name_the_protocols():
    assert "PacGAN" in MixtureMetric.protocol and "DynGAN" in MixtureMetric.protocol
    c, s = grid()
    out = MixtureMetric().compute(c, c, Grid25())
    assert all(key.startswith("mixture/") for key in out)
    assert {k for k in out if k.startswith("mixture/dyngan/")} == {
        "mixture/dyngan/modes",
        "mixture/dyngan/hq1",
        "mixture/dyngan/hq2",
        "mixture/dyngan/hq3",
        "mixture/dyngan/reverse_kl",
    }
    assert "mixture" in Grid25.default_metrics


def test_registered_through_the_plugin_host():
    host = PluginHost()
    info = host.add_plugin("mixture_metrics", lambda: mixture_metrics, module="dyngan_plugins.mixture_metrics")
    assert info.error is None
    assert host.registry.get("metric", "mixture") is MixtureMetric
