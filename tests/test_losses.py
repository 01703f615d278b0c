"""The built-in GAN losses against direct float64 computations, and their penalties."""

from __future__ import annotations

import pytest
import torch

from core.errors import OptionError
from core.plugins import PluginHost
from dyngan_plugins import losses as L
from dyngan_plugins import mmnsat as M
from loss_contexts import d_ctx, d_ctx_logits, g_ctx

LOSSES = {
    cls.name: cls
    for cls in (L.MinimaxLoss, L.NonSaturatingLoss, L.LeastSquaresLoss, L.HingeLoss, L.WGANGPLoss, M.MMNSatLoss)
}
R1_LOSSES = ["mm", "ns", "mm-nsat", "ls", "hinge", "wgan-gp"]

L_REAL = torch.tensor([-3.0, -0.5, 0.0, 1.2, 4.0])
L_FAKE = torch.tensor([-2.0, -0.1, 0.3, 2.5, 5.0])


# ---------------------------------------------------------------- formulas, float64 by hand


def _sig(l):
    return torch.sigmoid(l.double())


def _logistic_d(lr, lf):  # -log D(x) - log(1 - D(G(z)))
    return (-torch.log(_sig(lr))).mean() + (-torch.log(1 - _sig(lf))).mean()


def _ls_d(t_r, t_f):
    return 0.5 * ((t_r - 1) ** 2).mean() + 0.5 * (t_f**2).mean()


FORMULAS = [
    # name, options, expected D loss, expected G loss
    ("mm", {}, _logistic_d, lambda lf: torch.log(1 - _sig(lf)).mean()),
    ("ns", {}, _logistic_d, lambda lf: (-torch.log(_sig(lf))).mean()),
    ("ls", {}, lambda lr, lf: _ls_d(lr.double(), lf.double()), lambda lf: (0.5 * (lf.double() - 1) ** 2).mean()),
    (
        "ls",
        {"sigmoid": True},
        lambda lr, lf: _ls_d(_sig(lr), _sig(lf)),
        lambda lf: (0.5 * (_sig(lf) - 1) ** 2).mean(),
    ),
    (
        "hinge",
        {},
        lambda lr, lf: torch.clamp(1 - lr.double(), min=0).mean() + torch.clamp(1 + lf.double(), min=0).mean(),
        lambda lf: -lf.double().mean(),
    ),
    # identity D has unit gradient norm everywhere, so the penalty is zero
    ("wgan-gp", {}, lambda lr, lf: lf.double().mean() - lr.double().mean(), lambda lf: -lf.double().mean()),
]


@pytest.mark.parametrize("name, opts, d_expected, g_expected", FORMULAS)
def test_formula_matches_direct_computation(name, opts, d_expected, g_expected):
    loss = LOSSES[name](**opts)
    ctx, _ = d_ctx_logits(L_REAL, L_FAKE)
    assert loss.d_loss(ctx).dim() == 0
    torch.testing.assert_close(loss.d_loss(ctx).double(), d_expected(L_REAL, L_FAKE), rtol=1e-5, atol=1e-6)
    gctx, _ = g_ctx(L_FAKE.clone())
    torch.testing.assert_close(loss.g_loss(gctx).double(), g_expected(L_FAKE), rtol=1e-5, atol=1e-6)


def test_mm_g_loss_is_not_the_log_sigma_one_minus_l_bug():
    # a known bug wrote log sigma(1 - l_f) for log(1 - sigma(l_f)); the two differ here
    l = torch.tensor([0.7])
    ctx, _ = g_ctx(l)
    got = L.MinimaxLoss().g_loss(ctx)
    torch.testing.assert_close(got.double(), torch.log(1 - torch.sigmoid(l.double())).mean())
    assert not torch.allclose(got, torch.nn.functional.logsigmoid(1 - l).mean())


# ---------------------------------------------------------------- finiteness


EXTREMES = [
    (torch.tensor([100.0]), torch.tensor([-100.0])),
    (torch.tensor([-100.0]), torch.tensor([100.0])),
    (torch.tensor([100.0]), torch.tensor([100.0])),
    (torch.tensor([-100.0]), torch.tensor([-100.0])),
    (torch.tensor([100.0, -100.0, 0.0]), torch.tensor([-100.0, 100.0, 3.0])),
]
VARIANTS = [(n, {}) for n in LOSSES] + [
    ("ls", {"sigmoid": True}),
    ("mm-nsat", {"a": 0.5}),
    ("mm-nsat", {"a": 0.0}),
] + [(n, {"r1_gamma": 10.0}) for n in R1_LOSSES]


@pytest.mark.parametrize("name, opts", VARIANTS)
@pytest.mark.parametrize("l_real, l_fake", EXTREMES)
def test_finite_losses_and_gradients_at_extreme_logits(name, opts, l_real, l_fake):
    loss = LOSSES[name](**opts)
    # D step: D(x) = w x on 1-D data, gradients to w
    w = torch.ones(1, requires_grad=True)

    def disc(x, cond=None):
        return x[:, 0] * w

    ctx, _ = d_ctx(l_real[:, None], l_fake[:, None], disc, real_grad=loss.wants_real_grad)
    d = loss.d_loss(ctx)
    (gw,) = torch.autograd.grad(d, w)
    assert torch.isfinite(d) and torch.isfinite(gw).all(), (d, gw)
    # G step: gradients to the fake logits
    lf = l_fake.clone().requires_grad_(True)
    gctx, _ = g_ctx(lf)
    g = loss.g_loss(gctx)
    (gl,) = torch.autograd.grad(g, lf)
    assert torch.isfinite(g) and torch.isfinite(gl).all(), (g, gl)


# ---------------------------------------------------------------- WGAN-GP


def _data(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_wgan_gp_penalty_zero_for_unit_gradient_norm():
    w = torch.tensor([0.6, 0.8])  # ||w|| = 1: grad_x (w . x) has norm 1 everywhere
    real, fake = _data((6, 2), 1), _data((6, 2), 2)
    ctx, reports = d_ctx(real, fake, lambda x, c: x @ w, generator=torch.Generator().manual_seed(0))
    got = L.WGANGPLoss().d_loss(ctx)
    torch.testing.assert_close(got, (fake @ w).mean() - (real @ w).mean(), rtol=1e-5, atol=1e-6)
    assert reports["loss/gp"].abs() < 1e-10


@pytest.mark.parametrize("gp_lambda", [10.0, 3.0])
def test_wgan_gp_penalty_for_gradient_norm_two(gp_lambda):
    w = torch.tensor([1.2, 1.6], requires_grad=True)  # ||w|| = 2: (2 - 1)^2 = 1 at every point
    real, fake = _data((6, 2), 1), _data((6, 2), 2)
    ctx, reports = d_ctx(real, fake, lambda x, c: x @ w)  # generator None is allowed
    got = L.WGANGPLoss(gp_lambda=gp_lambda).d_loss(ctx)
    critic = (fake @ w).mean() - (real @ w).mean()
    torch.testing.assert_close(got, critic + gp_lambda, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reports["loss/gp"], torch.tensor(1.0))
    # the penalty trains D (create_graph): d/dw lambda (||w|| - 1)^2 = 2 lambda (||w|| - 1) w / ||w||
    (gw,) = torch.autograd.grad(got, w)
    expected = fake.mean(0) - real.mean(0) + 2 * gp_lambda * (2.0 - 1.0) * w.detach() / 2.0
    torch.testing.assert_close(gw, expected, rtol=1e-5, atol=1e-5)


def test_wgan_gp_interpolates_per_sample_with_ctx_generator():
    # D(x) = 1/2 ||x||^2 on image-shaped data: grad at x_hat is x_hat itself
    def disc(x, cond=None):
        return 0.5 * x.flatten(1).pow(2).sum(1)

    real, fake = _data((5, 1, 2, 2), 3), _data((5, 1, 2, 2), 4)
    ctx, reports = d_ctx(real, fake, disc, generator=torch.Generator().manual_seed(7))
    got = L.WGANGPLoss().d_loss(ctx)
    a = torch.rand(5, generator=torch.Generator().manual_seed(7)).view(5, 1, 1, 1)  # one a per sample
    x_hat = a * real + (1 - a) * fake
    gp = (x_hat.flatten(1).norm(dim=1) - 1).pow(2).mean()
    torch.testing.assert_close(reports["loss/gp"], gp)
    assert gp > 0
    torch.testing.assert_close(got, disc(fake).mean() - disc(real).mean() + 10 * gp)
    # same seed, same draw
    ctx2, _ = d_ctx(real, fake, disc, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(L.WGANGPLoss().d_loss(ctx2), got)


def test_wgan_gp_settings():
    loss = L.WGANGPLoss()
    assert loss.d_steps == 5 and L.WGANGPLoss(d_steps=2).d_steps == 2
    assert loss.optimizer_defaults() == {"lr_g": 1e-4, "lr_d": 1e-4, "betas": (0.5, 0.9)}
    assert loss.opts.gp_lambda == 10.0
    assert L.NonSaturatingLoss().d_steps == 1
    assert not loss.wants_real_grad


# ---------------------------------------------------------------- R1


@pytest.mark.parametrize("name", R1_LOSSES)
def test_r1_matches_hand_computation_for_linear_d(name):
    w = torch.tensor([3.0, 4.0], requires_grad=True)  # grad_x (w . x) = w: ||w||^2 = 25

    def disc(x, cond=None):
        return x @ w

    real, fake = _data((4, 2), 5), _data((4, 2), 6)
    gamma = 2.0
    plain = LOSSES[name]()
    with_r1 = LOSSES[name](r1_gamma=gamma)
    assert not plain.wants_real_grad and with_r1.wants_real_grad
    ctx0, reports0 = d_ctx(real, fake, disc)
    ctx1, reports1 = d_ctx(real, fake, disc, real_grad=True)
    base, pen = plain.d_loss(ctx0), with_r1.d_loss(ctx1)
    torch.testing.assert_close(pen - base, torch.tensor(gamma / 2 * 25.0))
    torch.testing.assert_close(reports1["loss/r1"], torch.tensor(25.0))
    assert "loss/r1" not in reports0
    # the penalty reaches D's parameters: d/dw gamma/2 ||w||^2 = gamma w
    (g0,) = torch.autograd.grad(base, w)
    (g1,) = torch.autograd.grad(pen, w)
    torch.testing.assert_close(g1 - g0, gamma * w.detach())


def test_r1_on_nonlinear_d_averages_over_the_real_batch():
    def disc(x, cond=None):  # grad_x = x
        return 0.5 * x.pow(2).sum(1)

    real, fake = _data((3, 2), 8), _data((3, 2), 9)
    ctx0, _ = d_ctx(real, fake, disc)
    ctx1, _ = d_ctx(real, fake, disc, real_grad=True)
    diff = L.NonSaturatingLoss(r1_gamma=0.5).d_loss(ctx1) - L.NonSaturatingLoss().d_loss(ctx0)
    torch.testing.assert_close(diff, 0.5 / 2 * real.pow(2).sum(1).mean())


def test_wgan_gp_r1_adds_gamma_half_mean_sq_grad_norm_at_the_real_batch():
    # a nonlinear critic, so that the gradient penalty (at x_hat) and R1 (at the real batch) differ
    w = torch.tensor([[0.7, -1.3], [0.4, 0.9]], requires_grad=True)

    def disc(x, cond=None):
        return torch.tanh(x @ w).sum(1) + 0.25 * x.pow(2).sum(1)

    real, fake = _data((6, 2), 10), _data((6, 2), 11)
    gamma, seed = 3.0, 5
    ctx, reports = d_ctx(real, fake, disc, real_grad=True, generator=torch.Generator().manual_seed(seed))
    got = L.WGANGPLoss(r1_gamma=gamma).d_loss(ctx)

    # expected, computed here: the WGAN-GP D loss with the same interpolation draw ...
    a = torch.rand(6, generator=torch.Generator().manual_seed(seed))[:, None]
    x_hat = (a * real + (1 - a) * fake).requires_grad_(True)
    (g_hat,) = torch.autograd.grad(disc(x_hat).sum(), x_hat, create_graph=True)
    gp = (g_hat.norm(dim=1) - 1).pow(2).mean()
    wgan = disc(fake).mean() - disc(real).mean() + 10.0 * gp
    # ... plus gamma/2 E_real ||grad_x l(x)||^2
    x_r = real.clone().requires_grad_(True)
    (g_r,) = torch.autograd.grad(disc(x_r).sum(), x_r, create_graph=True)
    sq = g_r.pow(2).sum(1).mean()
    torch.testing.assert_close(got, wgan + gamma / 2 * sq)
    torch.testing.assert_close(reports["loss/r1"], sq.detach())
    torch.testing.assert_close(reports["loss/gp"], gp.detach())
    assert (sq - (g_hat.pow(2).sum(1).mean())).abs() > 1e-3  # R1 is not taken at x_hat
    # and it trains the critic like the expected value does
    (g_got,) = torch.autograd.grad(got, w)
    (g_exp,) = torch.autograd.grad(wgan + gamma / 2 * sq, w)
    torch.testing.assert_close(g_got, g_exp)


def test_r1_without_real_grad_is_a_clear_error():
    ctx, _ = d_ctx_logits(L_REAL, L_FAKE, real_grad=False)
    with pytest.raises(RuntimeError, match="requires_grad"):
        L.NonSaturatingLoss(r1_gamma=1.0).d_loss(ctx)


# ---------------------------------------------------------------- options and registration


def test_option_errors_name_component_and_option():
    with pytest.raises(OptionError, match=r"loss 'ns'.*'r1_gamma'"):
        L.NonSaturatingLoss(r1_gamma=-1.0)
    with pytest.raises(OptionError, match=r"loss 'ls'.*'sigmoid'"):
        L.LeastSquaresLoss(sigmoid=3)
    assert L.LeastSquaresLoss(sigmoid="true").opts.sigmoid is True


@pytest.mark.parametrize("name", R1_LOSSES)
def test_every_r1_loss_has_the_same_r1_gamma_option(name):
    cls = LOSSES[name]
    assert cls.options["r1_gamma"] is L.R1_OPTIONS["r1_gamma"]
    assert cls().opts.r1_gamma == 0.0 and not cls().wants_real_grad  # off by default
    assert cls(r1_gamma="0.5").opts.r1_gamma == 0.5 and cls(r1_gamma=0.5).wants_real_grad
    with pytest.raises(OptionError, match=rf"loss '{name}'.*'r1_gamma'"):
        cls(r1_gamma=-1.0)
    with pytest.raises(OptionError, match=rf"loss '{name}'.*'r1_gamma'"):
        cls(r1_gamma="much")


def test_wgan_gp_r1_gamma_from_the_command_line(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from core.cli import cli

    monkeypatch.chdir(tmp_path)

    def dry_run(*opts):
        return CliRunner().invoke(cli, ["train", "--dry-run", "--loss", "wgan-gp", "--out", "r", *opts])

    res = dry_run("-o", "loss.r1_gamma=0.1")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["options"]["loss"]["r1_gamma"] == 0.1
    assert json.loads(dry_run().stdout)["options"]["loss"]["r1_gamma"] == 0.0
    res = dry_run("-o", "loss.r1_gamma=-1")
    assert res.exit_code == 2 and "r1_gamma" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


def test_plugins_register_every_loss():
    host = PluginHost()
    for plugin, module in (("losses", L), ("mmnsat", M)):
        info = host.add_plugin(plugin, lambda m=module: m, module=module.__name__)
        assert info.error is None, info.error
    assert host.registry.names("loss") == sorted(LOSSES)
    assert host.registry.get("loss", "mm-nsat").plugin == "mmnsat"
    for name, cls in LOSSES.items():
        assert cls.name == name and "G loss" in cls.__doc__
