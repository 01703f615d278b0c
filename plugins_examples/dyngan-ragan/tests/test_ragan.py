"""Tests of the RaGAN loss, against the public contract only (core.testing)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dyngan_ragan
from core.components import DStepContext, GStepContext
from core.testing import check_loss, check_options_schema, check_state_roundtrip, plugin_host, single_thread
from dyngan_ragan import RaGANLoss


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def reference_d(lr, lf):
    """The paper's form in float64: -E log sigmoid(l_r - E l_f) - E log(1 - sigmoid(l_f - E l_r))."""
    lr, lf = lr.double(), lf.double()
    return -(torch.sigmoid(lr - lf.mean()).log().mean() + (1 - torch.sigmoid(lf - lr.mean())).log().mean())


def reference_g(lr, lf):
    lr, lf = lr.double(), lf.double()
    return -(torch.sigmoid(lf - lr.mean()).log().mean() + (1 - torch.sigmoid(lr - lf.mean())).log().mean())


def contexts(lr, lf, real=None):
    real = torch.zeros(lr.shape[0], 2) if real is None else real
    cond = torch.zeros(lr.shape[0], dtype=torch.long)
    reports = {}

    def report(name, value):
        reports[name] = value

    d = DStepContext(real, torch.zeros_like(real), lr, lf, cond, cond, lambda x, c: x.sum(1), report)
    g = GStepContext(torch.zeros_like(real), lf, cond, lr.detach(), report)
    return d, g, reports


def test_plugin_registers_the_loss():
    with plugin_host(dyngan_ragan, builtins=False, strict=True) as host:
        assert host.registry.get("loss", "ragan") is RaGANLoss
        assert host.plugins["dyngan_ragan"].components == {"loss": ["ragan"]}


@pytest.mark.parametrize("options", [{}, {"r1_gamma": 10.0}])
def test_conformance(options):
    check_options_schema(RaGANLoss)
    check_state_roundtrip(RaGANLoss(**options))
    check_loss(RaGANLoss, options)  # finite at logits of +-100, batch of one, deterministic
    assert RaGANLoss.needs_real_in_g_step is True
    assert RaGANLoss(**options).wants_real_grad is bool(options)


def test_matches_the_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    lr, lf = 2 * torch.randn(64, generator=g), 2 * torch.randn(64, generator=g) - 1
    loss = RaGANLoss()
    d, gctx, _ = contexts(lr, lf)
    assert loss.d_loss(d).item() == pytest.approx(reference_d(lr, lf).item(), rel=1e-5)
    assert loss.g_loss(gctx).item() == pytest.approx(reference_g(lr, lf).item(), rel=1e-5)


def test_g_loss_is_the_mirror_of_d_loss():
    g = torch.Generator().manual_seed(1)
    lr, lf = torch.randn(16, generator=g), torch.randn(16, generator=g)
    loss = RaGANLoss()
    d_swapped, _, _ = contexts(lf, lr)
    _, gctx, _ = contexts(lr, lf)
    assert torch.equal(loss.g_loss(gctx), loss.d_loss(d_swapped))


def test_at_equal_logits_both_losses_are_2_log_2():
    lr = lf = torch.full((8,), 3.0)
    d, gctx, _ = contexts(lr, lf)
    assert RaGANLoss().d_loss(d).item() == pytest.approx(2 * math.log(2))
    assert RaGANLoss().g_loss(gctx).item() == pytest.approx(2 * math.log(2))


def test_gradients_point_the_right_way():
    lr = torch.zeros(8, requires_grad=True)
    lf = torch.zeros(8, requires_grad=True)
    d, _, _ = contexts(lr, lf)
    RaGANLoss().d_loss(d).backward()
    assert bool((lr.grad < 0).all()) and bool((lf.grad > 0).all())  # D raises real, lowers fake
    lf2 = torch.zeros(8, requires_grad=True)
    _, gctx, _ = contexts(torch.zeros(8), lf2)
    RaGANLoss().g_loss(gctx).backward()
    assert bool((lf2.grad < 0).all())  # G raises its logits


def test_r1_penalty_is_added_and_reported():
    real = torch.randn(8, 2, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    w = torch.tensor([[1.5], [-0.5]])
    lr = (real @ w).view(-1)
    lf = torch.zeros(8)
    d, _, reports = contexts(lr, lf, real)
    plain = RaGANLoss().d_loss(d).item()
    with_r1 = RaGANLoss(r1_gamma=4.0).d_loss(d).item()
    sq = float((w ** 2).sum())  # ||grad_x l(x)||^2 of a linear D, the same for every sample
    assert reports["loss/r1"].item() == pytest.approx(sq)
    assert with_r1 == pytest.approx(plain + 0.5 * 4.0 * sq, rel=1e-6)


def test_g_step_without_real_logits_is_a_clear_error():
    gctx = GStepContext(torch.zeros(4, 2), torch.zeros(4), torch.zeros(4, dtype=torch.long), None, lambda *a: None)
    with pytest.raises(ValueError, match="needs_real_in_g_step"):
        RaGANLoss().g_loss(gctx)


@pytest.mark.parametrize("options", [{}, {"r1_gamma": 1.0}])
def test_trains_end_to_end(tmp_path, monkeypatch, options):
    """The loop hands real logits to g_loss (it would raise otherwise) and the losses stay finite."""
    from core.api import train

    monkeypatch.setenv("DYNGAN_NO_PICTURES", "1")
    result = train({
        "dataset": "ring8", "loss": "ragan", "steps": 60, "batch_size": 64, "seed": 0, "device": "cpu",
        "out": str(tmp_path / "run"), "log_every": 20, "threads": 1,
        "options": {"dataset": {"n": 2000}, "loss": options},
    }, quiet=True)
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [rec for rec in logged if "loss/d" in rec]
    assert [rec["step"] for rec in losses] == [20, 40, 60]
    assert all(math.isfinite(rec["loss/d"]) and math.isfinite(rec["loss/g"]) for rec in losses)
    assert all(("loss/r1" in rec) == bool(options) for rec in losses)
    assert json.loads((result.run_dir / "config.json").read_text())["loss"] == "ragan"
