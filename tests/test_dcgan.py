"""The dcgan model: shapes, conditioning, heads, widths, batch norm with tiny batches."""

from __future__ import annotations

import pytest

import torch

from core.components import ConditioningSpec  # noqa: E402
from core.errors import OptionError, UsageError  # noqa: E402
from dyngan_plugins.dcgan import DCGAN  # noqa: E402

SHAPES = [(1, 8, 8), (3, 8, 8), (3, 32, 32)]
SPECS = [
    ConditioningSpec(),
    ConditioningSpec(g_dim=7, d_dim=5, d_heads=1, capacity=5),
    ConditioningSpec(g_dim=16, d_dim=0, d_heads=20, capacity=20),  # multi-head D, no D code
]


def _codes(spec, b):
    g = torch.randn(b, spec.g_dim) if spec.g_dim else None
    d = torch.randn(b, spec.d_dim) if spec.d_dim else None
    return g, d


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec", SPECS)
def test_output_shapes(shape, spec):
    model = DCGAN()
    G, D = model.build(shape, spec)
    b = 6
    gc, dc = _codes(spec, b)
    x = G(torch.randn(b, model.z_dim), gc)
    assert x.shape == (b, *shape)
    assert float(x.detach().abs().max()) <= 1.0  # tanh output
    logits, feats = D(x, dc)
    assert logits.shape == (b, spec.d_heads)
    assert feats.ndim == 2 and feats.shape[0] == b
    # features are the flattened last conv map, without the code: channels * min(8, S/4) * 16
    s = shape[-1]
    assert feats.shape[1] == 64 * min(8, s // 4) * 16
    assert D.head.in_features == feats.shape[1] + spec.d_dim
    # gradients reach G through D
    logits.sum().backward()
    assert all(p.grad is not None for p in G.parameters())


def test_reference_small_setting_for_8x8():
    G, D = DCGAN().build((3, 8, 8), ConditioningSpec())
    assert DCGAN().z_dim == 64
    assert G.fc.in_features == 64 and G.fc.out_features == 4 * 4 * 128
    convs = [m for m in D.body if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128]
    assert convs[0].stride == (1, 1) and convs[1].stride == (2, 2)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in D.modules())


def test_conditioning_changes_the_output():
    spec = ConditioningSpec(g_dim=4, d_dim=4, d_heads=4, capacity=4)
    G, D = DCGAN().build((3, 8, 8), spec)
    G.eval()
    z = torch.randn(3, 64)
    a = G(z, torch.eye(4)[[0, 0, 0]])
    b = G(z, torch.eye(4)[[1, 1, 1]])
    assert not torch.allclose(a, b)
    x = torch.randn(3, 3, 8, 8)
    la, fa = D(x, torch.eye(4)[[0, 0, 0]])
    lb, fb = D(x, torch.eye(4)[[2, 2, 2]])
    assert torch.equal(fa, fb)  # the code joins after the features
    assert not torch.allclose(la, lb)


def test_missing_or_unexpected_code_is_an_error():
    G, D = DCGAN().build((1, 8, 8), ConditioningSpec(g_dim=3, d_dim=2, d_heads=1, capacity=3))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        G(torch.randn(2, 64), None)
    with pytest.raises(ValueError):
        D(torch.randn(2, 1, 8, 8), torch.randn(2, 3))
    G0, D0 = DCGAN().build((1, 8, 8), ConditioningSpec())
    with pytest.raises(ValueError):
        G0(torch.randn(2, 64), torch.randn(2, 3))
    # an empty (B, 0) code counts as none
    assert G0(torch.randn(2, 64), torch.zeros(2, 0)).shape == (2, 1, 8, 8)


def test_batch_of_one_in_train_and_eval_mode():
    G, D = DCGAN().build((3, 16, 16), ConditioningSpec())
    G.train()
    assert G(torch.randn(1, 64)).shape == (1, 3, 16, 16)
    G.eval()
    out = G(torch.randn(1, 64))
    assert out.shape == (1, 3, 16, 16) and bool(torch.isfinite(out).all())
    assert D(out)[0].shape == (1, 1)


def test_eval_mode_is_per_sample():
    """In eval mode batch norm uses running statistics: a sample's output ignores its batch."""
    G, _ = DCGAN().build((1, 8, 8), ConditioningSpec())
    G.train()
    for _ in range(3):
        G(torch.randn(32, 64))  # update running statistics
    G.eval()
    z = torch.randn(5, 64)
    assert torch.allclose(G(z)[:1], G(z[:1]), atol=1e-6)


def test_weak_discriminator_width():
    full = DCGAN().build((3, 8, 8), ConditioningSpec())[1]
    weak = DCGAN(d_width=0.25).build((3, 8, 8), ConditioningSpec())[1]
    c_full = [m.out_channels for m in full.body if isinstance(m, torch.nn.Conv2d)]
    c_weak = [m.out_channels for m in weak.body if isinstance(m, torch.nn.Conv2d)]
    assert c_weak == [c // 4 for c in c_full] == [16, 32]
    n_full = sum(p.numel() for p in full.parameters())
    n_weak = sum(p.numel() for p in weak.parameters())
    assert n_weak < n_full / 8


def test_width_z_dim_and_extra_feature_layer():
    model = DCGAN(z_dim=10, channels=8, d_features=32)
    G, D = model.build((3, 8, 8), ConditioningSpec(d_dim=3, d_heads=2, capacity=3))
    x = G(torch.randn(4, 10))
    logits, feats = D(x, torch.randn(4, 3))
    assert feats.shape == (4, 32) and logits.shape == (4, 2)
    assert G.fc.out_features == 4 * 4 * 16


def test_two_dimensional_images_and_64px():
    G, D = DCGAN(channels=8).build((8, 8), ConditioningSpec())
    x = G(torch.randn(2, 64))
    assert x.shape == (2, 8, 8)
    assert D(x)[0].shape == (2, 1)
    G, D = DCGAN(channels=8).build((3, 64, 64), ConditioningSpec())
    x = G(torch.randn(2, 64))
    assert x.shape == (2, 3, 64, 64) and D(x)[0].shape == (2, 1)


@pytest.mark.parametrize("shape", [(2,), (3, 8, 16), (3, 12, 12), (3, 4, 4), (1, 2, 8, 8)])
def test_unsupported_shapes_are_usage_errors(shape):
    with pytest.raises(UsageError, match="dcgan"):
        DCGAN().build(shape, ConditioningSpec())


def test_bad_options_are_errors():
    with pytest.raises(OptionError):
        DCGAN(d_width=0)
    with pytest.raises(OptionError):
        DCGAN(channels=0)
    assert DCGAN(d_width="0.25").opts.d_width == 0.25


def test_a_few_training_steps_reduce_the_d_loss():
    """Sanity: D learns to separate real 8x8 images from G's with the built networks."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    G, D = DCGAN(channels=16).build((1, 8, 8), ConditioningSpec())
    real = torch.zeros(32, 1, 8, 8)
    real[:, :, 2:6, 2:6] = 1.0
    with torch.no_grad():
        fake = G(torch.randn(32, 64))
    opt = torch.optim.Adam(D.parameters(), 2e-3, betas=(0.5, 0.999))

    def d_loss():  # -log D(x) - log(1 - D(G(z)))
        return F.softplus(-D(real)[0]).mean() + F.softplus(D(fake)[0]).mean()

    with torch.no_grad():
        first = float(d_loss())
    for _ in range(20):
        loss = d_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(d_loss()) < 0.5 * first
