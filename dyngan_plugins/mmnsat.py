"""MM-nsat: the minimax generator loss rescaled to the non-saturating loss's magnitude.

Eide, Solberg and Kasen, "Sample weighting as an explanation for mode collapse
in generative adversarial networks" (arXiv 2010.02035). In logit space the MM
gradient of fake sample i is weighted by D_i = sigmoid(l_i), the NS gradient by
1 - D_i. MM-nsat keeps MM's relative weights D_i / sum_j D_j and rescales the
minibatch so that the total weight equals NS's: sum_i R D_i = sum_i (1 - D_i).
"""

from __future__ import annotations

from core import hookimpl
from core.components import GStepContext, Option

from .losses import R1_OPTIONS, LogisticLoss


def nsat_ratio(fake_logits):
    """R = (1 - mean_i D_i) / mean_i D_i from the fake logits, detached.

    Kept finite at the extremes: 1 - mean D is computed as mean sigmoid(-l)
    (no cancellation, so R goes smoothly to 0, never negative, as mean D -> 1),
    and mean D is clamped below at the dtype's smallest normal number, so
    R <= 1 / tiny (about 8.5e37 in float32). The clamp only acts when every
    fake logit is below about -87 (float32); there the exact rescaling is lost
    but the loss and its gradients stay finite.
    """
    import torch

    l = fake_logits.detach()  # R is a constant: no gradient flows through it
    mean_d = l.sigmoid().mean()  # mean_i D_i
    mean_1md = (-l).sigmoid().mean()  # 1 - mean_i D_i
    return mean_1md / mean_d.clamp_min(torch.finfo(mean_d.dtype).tiny)


class MMNSatLoss(LogisticLoss):
    """MM-nsat (Eide et al. 2020).

    D loss = softplus(-l_r) + softplus(l_f) (logistic), plus the optional R1 penalty
    G loss = a * R * log(1 - D(G(z))) + (1 - a) * (-log D(G(z)))
           = -a R softplus(l_f) + (1 - a) softplus(-l_f)
    R = (1 - mean_i D_i) / mean_i D_i over the fake batch, detached (see
    ``nsat_ratio``). a = 1 is MM-nsat, a = 0 is NS-GAN. Reports ``mmnsat/R`` at every
    G step; metrics.jsonl records the value of every ``--log-every``-th step (``--log-every 1``
    records each, at the cost of one device synchronisation per step).
    """

    name = "mm-nsat"
    options = {
        "a": Option(1.0, "mix: 1 = MM-nsat, 0 = NS-GAN (the authors also ran 0.33, 0.67)", min=0.0, max=1.0),
        **R1_OPTIONS,
    }

    def g_loss(self, ctx: GStepContext):
        import torch.nn.functional as F

        l, a = ctx.fake_logits, self.opts.a
        R = nsat_ratio(l)
        ctx.report("mmnsat/R", R)
        # a * R * log(1 - D(G(z))) + (1 - a) * (-log D(G(z)))
        return (a * R * -F.softplus(l) + (1 - a) * F.softplus(-l)).mean()


@hookimpl
def register_losses(register):
    register(MMNSatLoss)
