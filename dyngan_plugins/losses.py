"""The standard GAN losses: MM, NS, LS, hinge and WGAN-GP, plus the R1 penalty.

Notation: ``l`` is a discriminator logit, ``D = sigmoid(l)``, ``l_r`` / ``l_f``
the logits of a real / fake sample. Every loss is written on logits with
``softplus`` so that logits of +-100 give finite values and gradients
(``-log D = softplus(-l)``, ``-log(1 - D) = softplus(l)``). Every loss is the
mean over the batch, and reports only tensors through ``ctx.report``.
"""

from __future__ import annotations

from typing import Any

from core import hookimpl
from core.components import DStepContext, GStepContext, Loss, Option

R1_OPTIONS = {
    "r1_gamma": Option(
        0.0, "R1 penalty weight gamma: + gamma/2 E_real ||grad_x l(x)||^2 (StyleGAN2; 0: off)", min=0.0
    ),
}


class R1Mixin:
    """Adds the R1 penalty of Mescheder et al. (2018) to a discriminator loss.

    penalty = gamma/2 * E_real ||grad_x l(x)||^2, the StyleGAN2 convention
    (with the 1/2). Options: ``R1_OPTIONS``. When gamma > 0 the loop hands
    ``ctx.real`` with ``requires_grad`` and ``ctx.real_logits`` computed from it.
    Reports ``loss/r1``: E_real ||grad_x l(x)||^2 (without gamma/2).
    """

    opts: Any

    @property
    def wants_real_grad(self) -> bool:
        return self.opts.r1_gamma > 0

    def add_r1(self, loss: "Any", ctx: DStepContext) -> "Any":
        """``loss`` plus the R1 penalty on ``ctx``'s real batch (``loss`` itself when gamma is 0)."""
        if self.opts.r1_gamma <= 0:
            return loss
        import torch

        if not ctx.real.requires_grad:
            raise RuntimeError("the R1 penalty needs ctx.real with requires_grad (see Loss.wants_real_grad)")
        # grad_x l(x) per real sample; create_graph so that the penalty trains D
        (grad,) = torch.autograd.grad(ctx.real_logits.sum(), ctx.real, create_graph=True)
        sq_norm = grad.pow(2).flatten(1).sum(1).mean()  # E_real ||grad_x l(x)||^2
        ctx.report("loss/r1", sq_norm.detach())
        return loss + 0.5 * self.opts.r1_gamma * sq_norm


def logistic_d_loss(ctx: DStepContext) -> "Any":
    """The logistic discriminator loss, mean of -log D(x) - log(1 - D(G(z)))."""
    import torch.nn.functional as F

    # -log D(x) = softplus(-l_r); -log(1 - D(G(z))) = softplus(l_f)
    return F.softplus(-ctx.real_logits).mean() + F.softplus(ctx.fake_logits).mean()


class LogisticLoss(R1Mixin, Loss):
    """Base of the losses with the logistic discriminator loss (MM, NS, MM-nsat).

    D loss = -log D(x) - log(1 - D(G(z))) = softplus(-l_r) + softplus(l_f),
    plus the optional R1 penalty.
    """

    options = R1_OPTIONS

    def d_loss(self, ctx: DStepContext):
        return self.add_r1(logistic_d_loss(ctx), ctx)


class MinimaxLoss(LogisticLoss):
    """MM-GAN, the minimax (saturating) loss of Goodfellow et al. (2014).

    D loss = softplus(-l_r) + softplus(l_f)
    G loss = log(1 - D(G(z))) = -softplus(l_f)
    """

    name = "mm"

    def g_loss(self, ctx: GStepContext):
        import torch.nn.functional as F

        return -F.softplus(ctx.fake_logits).mean()  # log(1 - D(G(z)))


class NonSaturatingLoss(LogisticLoss):
    """NS-GAN, the non-saturating loss (the common default).

    D loss = softplus(-l_r) + softplus(l_f)
    G loss = -log D(G(z)) = softplus(-l_f)
    """

    name = "ns"

    def g_loss(self, ctx: GStepContext):
        import torch.nn.functional as F

        return F.softplus(-ctx.fake_logits).mean()  # -log D(G(z))


class LeastSquaresLoss(R1Mixin, Loss):
    """LSGAN (Mao et al. 2017), on logits by default (as StudioGAN).

    With t(l) = l (or t(l) = sigmoid(l) when ``sigmoid`` is set):
    D loss = 1/2 (t(l_r) - 1)^2 + 1/2 t(l_f)^2, plus the optional R1 penalty
    G loss = 1/2 (t(l_f) - 1)^2
    """

    name = "ls"
    options = {
        "sigmoid": Option(False, "apply the squares to sigmoid(l) instead of the logit l"),
        **R1_OPTIONS,
    }

    def _t(self, logits):
        return logits.sigmoid() if self.opts.sigmoid else logits

    def d_loss(self, ctx: DStepContext):
        # 1/2 (t(l_r) - 1)^2 + 1/2 t(l_f)^2
        loss = 0.5 * (self._t(ctx.real_logits) - 1).pow(2).mean() + 0.5 * self._t(ctx.fake_logits).pow(2).mean()
        return self.add_r1(loss, ctx)

    def g_loss(self, ctx: GStepContext):
        return 0.5 * (self._t(ctx.fake_logits) - 1).pow(2).mean()  # 1/2 (t(l_f) - 1)^2


class HingeLoss(R1Mixin, Loss):
    """The hinge loss (SAGAN / BigGAN).

    D loss = relu(1 - l_r) + relu(1 + l_f), plus the optional R1 penalty
    G loss = -l_f
    """

    name = "hinge"
    options = R1_OPTIONS

    def d_loss(self, ctx: DStepContext):
        # relu(1 - l_r) + relu(1 + l_f)
        loss = (1 - ctx.real_logits).relu().mean() + (1 + ctx.fake_logits).relu().mean()
        return self.add_r1(loss, ctx)

    def g_loss(self, ctx: GStepContext):
        return -ctx.fake_logits.mean()  # -l_f


class WGANGPLoss(R1Mixin, Loss):
    """WGAN-GP (Gulrajani et al. 2017): a critic with a gradient penalty.

    D loss = l_f - l_r + lambda * E[(||grad_x l(x_hat)|| - 1)^2], plus the optional R1 penalty
    G loss = -l_f
    x_hat = a x_r + (1 - a) x_f with a ~ U[0, 1] per sample (drawn from
    ``ctx.generator``), scored under the real batch's conditions. Defaults:
    lambda 10, 5 critic steps per generator step, Adam(1e-4, betas 0.5, 0.9).
    Reports ``loss/gp``: E[(||grad|| - 1)^2] (without lambda), and ``loss/r1`` with R1.
    """

    name = "wgan-gp"
    options = {
        "gp_lambda": Option(10.0, "weight lambda of the gradient penalty", min=0.0),
        "d_steps": Option(5, "critic steps per generator step", min=1),
        **R1_OPTIONS,
    }

    @property
    def d_steps(self) -> int:
        return int(self.opts.d_steps)

    @property
    def differentiates_d(self) -> bool:
        return True  # the gradient penalty (and R1 when r1_gamma > 0)

    def optimizer_defaults(self) -> dict[str, Any]:
        return {"lr_g": 1e-4, "lr_d": 1e-4, "betas": (0.5, 0.9)}

    def d_loss(self, ctx: DStepContext):
        import torch

        real, fake = ctx.real.detach(), ctx.fake.detach()
        # a ~ U[0, 1], one per sample, broadcast over the data dimensions
        gen = ctx.generator
        shape = (real.shape[0],) + (1,) * (real.dim() - 1)
        a = torch.rand(shape, generator=gen, device=gen.device if gen is not None else real.device)
        a = a.to(device=real.device, dtype=real.dtype)
        x_hat = (a * real + (1 - a) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(ctx.discriminator(x_hat, ctx.real_cond).sum(), x_hat, create_graph=True)
        gp = (torch.linalg.vector_norm(grad.flatten(1), dim=1) - 1).pow(2).mean()  # E[(||grad|| - 1)^2]
        ctx.report("loss/gp", gp.detach())
        loss = ctx.fake_logits.mean() - ctx.real_logits.mean() + self.opts.gp_lambda * gp  # l_f - l_r + lambda gp
        return self.add_r1(loss, ctx)

    def g_loss(self, ctx: GStepContext):
        return -ctx.fake_logits.mean()  # -l_f


@hookimpl
def register_losses(register):
    for cls in (MinimaxLoss, NonSaturatingLoss, LeastSquaresLoss, HingeLoss, WGANGPLoss):
        register(cls)
