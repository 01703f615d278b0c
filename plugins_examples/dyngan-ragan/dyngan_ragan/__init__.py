"""``ragan``: the relativistic average GAN loss (Jolicoeur-Martineau, 2018).

With ``l_r`` / ``l_f`` the discriminator's logits on a real / fake batch and
``mean`` the batch mean, D estimates how much more realistic a real sample is
than the average fake one (and the other way round):

  D loss = softplus(-(l_r - mean l_f)) + softplus(l_f - mean l_r)
  G loss = softplus(-(l_f - mean l_r)) + softplus(l_r - mean l_f)

(``-log sigmoid(t) = softplus(-t)``, ``-log(1 - sigmoid(t)) = softplus(t)``;
each term is a batch mean). G's loss is the mirror of D's and needs D's logits on
a real batch, so the loss sets ``needs_real_in_g_step``: the loop then hands
``ctx.real_logits`` (detached) to ``g_loss``. Written on logits with softplus, it
stays finite for logits of +-100. ``r1_gamma`` adds the R1 penalty
gamma/2 E_real ||grad_x l(x)||^2 to D's loss.
"""

from __future__ import annotations

from core import hookimpl
from core.components import DStepContext, GStepContext, Loss, Option

__version__ = "0.1.0"


def ragan_d_loss(real_logits, fake_logits):
    """softplus(-(l_r - mean l_f)) + softplus(l_f - mean l_r), batch means."""
    import torch.nn.functional as F

    return (F.softplus(-(real_logits - fake_logits.mean())).mean()
            + F.softplus(fake_logits - real_logits.mean()).mean())


def ragan_g_loss(real_logits, fake_logits):
    """The mirror: softplus(-(l_f - mean l_r)) + softplus(l_r - mean l_f), batch means."""
    return ragan_d_loss(fake_logits, real_logits)


class RaGANLoss(Loss):
    """Relativistic average GAN loss on logits (RaSGAN of Jolicoeur-Martineau 2018)."""

    name = "ragan"
    needs_real_in_g_step = True
    options = {
        "r1_gamma": Option(0.0, "R1 penalty weight gamma: + gamma/2 E_real ||grad_x l(x)||^2 (0: off)", min=0.0),
    }

    @property
    def wants_real_grad(self) -> bool:
        return self.opts.r1_gamma > 0

    def d_loss(self, ctx: DStepContext):
        loss = ragan_d_loss(ctx.real_logits, ctx.fake_logits)
        if self.opts.r1_gamma > 0:
            import torch

            # grad_x l(x) per real sample; create_graph so that the penalty trains D
            (grad,) = torch.autograd.grad(ctx.real_logits.sum(), ctx.real, create_graph=True)
            r1 = grad.pow(2).flatten(1).sum(1).mean()
            ctx.report("loss/r1", r1.detach())
            loss = loss + 0.5 * self.opts.r1_gamma * r1
        return loss

    def g_loss(self, ctx: GStepContext):
        if ctx.real_logits is None:
            raise ValueError("loss 'ragan' needs D's logits on a real batch in the G step "
                             "(ctx.real_logits; the loop gives them when needs_real_in_g_step is set)")
        return ragan_g_loss(ctx.real_logits, ctx.fake_logits)


@hookimpl
def register_losses(register):
    register(RaGANLoss)
