"""MM-nsat: the formula, its sample weights in logit space, the detached R and its extremes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import OptionError
from dyngan_plugins.losses import MinimaxLoss, NonSaturatingLoss
from dyngan_plugins.mmnsat import MMNSatLoss, nsat_ratio
from loss_contexts import d_ctx_logits, g_ctx

L_FAKE = torch.tensor([-3.0, -1.0, -0.2, 0.4, 1.5, 2.0])


def logit_grad(loss, logits):
    """d g_loss / d l_i for each fake logit, and what the loss reported."""
    l = logits.clone().requires_grad_(True)
    ctx, reports = g_ctx(l)
    (g,) = torch.autograd.grad(loss.g_loss(ctx), l)
    return g, reports


def hand_R(logits):
    d = torch.sigmoid(logits.double())
    return (1 - d.mean()) / d.mean()


@pytest.mark.parametrize("a", [1.0, 0.67, 0.33, 0.0])
def test_g_loss_matches_direct_computation(a):
    ctx, reports = g_ctx(L_FAKE.clone())
    got = MMNSatLoss(a=a).g_loss(ctx)
    d, R = torch.sigmoid(L_FAKE.double()), hand_R(L_FAKE)
    # a * R * log(1 - D(G(z))) + (1 - a) * (-log D(G(z))), mean over the batch
    expected = (a * R * torch.log(1 - d) + (1 - a) * -torch.log(d)).mean()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reports["mmnsat/R"].double(), R, rtol=1e-5, atol=0)


def test_d_loss_is_the_logistic_loss():
    l_r = torch.tensor([0.5, -1.0, 2.0])
    ctx, _ = d_ctx_logits(l_r, L_FAKE[:3])
    d_r, d_f = torch.sigmoid(l_r.double()), torch.sigmoid(L_FAKE[:3].double())
    expected = (-torch.log(d_r)).mean() - torch.log(1 - d_f).mean()
    torch.testing.assert_close(MMNSatLoss().d_loss(ctx).double(), expected, rtol=1e-5, atol=1e-6)


def test_weights_are_mm_relative_and_ns_total():
    g, _ = logit_grad(MMNSatLoss(), L_FAKE)
    g_mm, _ = logit_grad(MinimaxLoss(), L_FAKE)
    g_ns, _ = logit_grad(NonSaturatingLoss(), L_FAKE)
    d = torch.sigmoid(L_FAKE)
    B = L_FAKE.shape[0]
    # all three are means, so each gradient carries the same 1/B
    torch.testing.assert_close(g_mm, -d / B)
    torch.testing.assert_close(g_ns, -(1 - d) / B)
    # relative weights are MM's: g_i proportional to D_i, the same ratio R for every sample
    ratio = g / g_mm
    torch.testing.assert_close(ratio, torch.full_like(ratio, hand_R(L_FAKE).item()))
    torch.testing.assert_close(g / g.sum(), d / d.sum())
    # total weight is NS's: sum_i R D_i = sum_i (1 - D_i)
    torch.testing.assert_close(g.abs().sum(), g_ns.abs().sum())
    # ... while the weighting differs from NS's (NS emphasises low D_i)
    assert not torch.allclose(g, g_ns)


def test_a_zero_is_ns_gan_exactly():
    g, _ = logit_grad(MMNSatLoss(a=0.0), L_FAKE)
    g_ns, _ = logit_grad(NonSaturatingLoss(), L_FAKE)
    assert torch.equal(g, g_ns)


def test_R_is_detached():
    l = L_FAKE.clone().requires_grad_(True)
    ctx, reports = g_ctx(l)
    loss = MMNSatLoss().g_loss(ctx)
    R = reports["mmnsat/R"]
    assert not R.requires_grad and R.grad_fn is None
    (g,) = torch.autograd.grad(loss, l)
    # the same loss with R a plain constant
    r_const = float(hand_R(L_FAKE))
    l2 = L_FAKE.clone().requires_grad_(True)
    (g_const,) = torch.autograd.grad((r_const * -F.softplus(l2)).mean(), l2)
    torch.testing.assert_close(g, g_const)
    # and it is not the gradient one gets when R carries a graph
    l3 = L_FAKE.clone().requires_grad_(True)
    d = torch.sigmoid(l3)
    (g_attached,) = torch.autograd.grad(((1 - d.mean()) / d.mean() * -F.softplus(l3)).mean(), l3)
    assert not torch.allclose(g, g_attached)


@pytest.mark.parametrize(
    "logits",
    [
        torch.tensor([-100.0]),
        torch.tensor([100.0]),
        torch.full((4,), -100.0),
        torch.full((4,), 100.0),
        torch.tensor([-100.0, 100.0]),
        torch.full((3,), -87.5),
    ],
)
@pytest.mark.parametrize("a", [1.0, 0.5])
def test_R_loss_and_gradient_finite_at_extremes(logits, a):
    g, reports = logit_grad(MMNSatLoss(a=a), logits)
    R = reports["mmnsat/R"]
    assert torch.isfinite(R) and R >= 0
    assert torch.isfinite(g).all()
    ctx, _ = g_ctx(logits.clone())
    assert torch.isfinite(MMNSatLoss(a=a).g_loss(ctx))


def test_R_is_accurate_near_both_ends():
    # mean D ~ 1: R -> 0 from above, computed without cancellation
    high = torch.tensor([30.0, 40.0])
    e = torch.exp(-high.double())  # 1 - D = e^-l / (1 + e^-l), exact in float64
    expected = (e / (1 + e)).mean() / (1 / (1 + e)).mean()
    torch.testing.assert_close(nsat_ratio(high).double(), expected, rtol=1e-5, atol=0)
    assert nsat_ratio(high) > 0
    # mean D tiny (but above the clamp): the NS total weight is still met exactly
    low = torch.tensor([-60.0, -70.0, -65.0])
    g, _ = logit_grad(MMNSatLoss(), low)
    g_ns, _ = logit_grad(NonSaturatingLoss(), low)
    torch.testing.assert_close(g.abs().sum(), g_ns.abs().sum())


def test_option_a_must_be_in_unit_interval():
    for bad in (2, -0.1, "x"):
        with pytest.raises(OptionError, match=r"loss 'mm-nsat'.*option 'a'"):
            MMNSatLoss(a=bad)
    assert MMNSatLoss().opts.a == 1.0
    assert MMNSatLoss(a="0.33").opts.a == pytest.approx(0.33)


@pytest.mark.parametrize("logits", [[-90.0, -95.0], [-100.0] * 4, [-75.0, -200.0, -80.0], [-69.0, -69.2],
                                    [-68.9, -69.0], [-1e4, -1e4 - 3]])
def test_the_rescaling_stays_exact_when_every_fake_logit_is_far_below_zero(logits):
    """With every fake logit below about -87, mean D used to meet R's clamp in float32 and the MM
    term's total weight fell far below NS's (0.07 instead of 2 at logits -90, -95: audit helper-36).
    The weights are now computed in log space there: MM's relative weights, NS's total, and the loss
    value R log(1 - D), each against float64."""
    l = torch.tensor(logits)
    g, _ = logit_grad(MMNSatLoss(), l)
    ld = l.double()
    log_d = F.logsigmoid(ld)
    w = torch.softmax(log_d, 0)  # D_i / sum_j D_j, exact in log space
    B = l.shape[0]
    total = torch.sigmoid(-ld).sum()  # sum_i (1 - D_i)
    torch.testing.assert_close(g.double(), -(w * total) / B, rtol=1e-5, atol=1e-30)  # e^-125 is 0 in float32
    torch.testing.assert_close(g.abs().sum().double(), total / B, rtol=1e-6, atol=0)
    # value: R log(1 - D_i) = -R softplus(l_i), with R = mean(1 - D) / mean(D) from log space
    log_R = torch.log(torch.sigmoid(-ld).mean()) - (torch.logsumexp(log_d, 0) - torch.log(torch.tensor(B * 1.0)))
    expected = -(torch.exp(log_R + torch.log(F.softplus(ld)))).mean() if F.softplus(ld).min() > 0 else None
    ctx, _ = g_ctx(l.clone())
    got = MMNSatLoss().g_loss(ctx)
    assert torch.isfinite(got)
    if expected is not None:  # softplus of -1e4 underflows even in float64; the bound below covers it
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    assert -1.0 - 1e-6 <= float(got) < 0  # R log(1 - D_i) -> -(1 - D) / D * D summed to at most -1
