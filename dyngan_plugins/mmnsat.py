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


def _ratio_parts(fake_logits):
    """(mean_i D_i, 1 - mean_i D_i) from the detached fake logits; 1 - mean D is computed as
    mean sigmoid(-l), without cancellation."""
    l = fake_logits.detach()  # R is a constant: no gradient flows through it
    return l.sigmoid().mean(), (-l).sigmoid().mean()


def nsat_ratio(fake_logits):
    """R = (1 - mean_i D_i) / mean_i D_i from the fake logits, detached.

    Kept finite at the extremes: R goes smoothly to 0, never negative, as mean D -> 1, and mean D
    is clamped below at the dtype's smallest normal number, so R <= 1 / tiny (about 8.5e37 in
    float32). The clamp only acts when every fake logit is below about -87 (float32): there the
    value reported as ``mmnsat/R`` saturates, while the loss takes its weights from log space
    (``_mm_term``), so the rescaling stays exact.
    """
    import torch

    mean_d, mean_1md = _ratio_parts(fake_logits)
    return mean_1md / mean_d.clamp_min(torch.finfo(mean_d.dtype).tiny)


#: below this mean D (float32's smallest normal number is 1.2e-38) the sigmoids of the fake logits
#: lose precision and R meets its clamp, so the MM term takes its weights from log space instead
LOG_SPACE_BELOW = 1e-30


def _mm_term(l):
    """R * log(1 - D(G(z))) per fake sample, the MM-nsat term, and R (detached, as reported).

    Written directly while mean D is at least ``LOG_SPACE_BELOW``, as it is in training. Below it,
    every fake logit is below -69 + log(B) (about -64 for a batch of 128), where float32 gives
    log D_i = l_i, log(1 - D_i) = -D_i and 1 - mean D = 1 exactly; the weights w_i = R D_i then equal
    (1 - mean D) B softmax_i(l), finite and exact, and the term is -w_i (1 + l_i - l_i.detach()):
    the direct form's value R log(1 - D_i) = -R D_i and its gradient -w_i / B in l_i. A 0-d
    selection between the two on the device, no host synchronisation."""
    import torch
    import torch.nn.functional as F

    mean_d, mean_1md = _ratio_parts(l)
    R = mean_1md / mean_d.clamp_min(torch.finfo(mean_d.dtype).tiny)
    direct = R * -F.softplus(l)
    lo = l.detach()
    w = (mean_1md * lo.numel()) * torch.softmax(lo.flatten(), 0).view_as(lo)
    logspace = -w * (1 + (l - lo))
    return torch.where(mean_d < LOG_SPACE_BELOW, logspace, direct), R


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
        mm, R = _mm_term(l)  # R * log(1 - D(G(z))) per sample
        ctx.report("mmnsat/R", R)
        # a * R * log(1 - D(G(z))) + (1 - a) * (-log D(G(z)))
        return (a * mm + (1 - a) * F.softplus(-l)).mean()


@hookimpl
def register_losses(register):
    register(MMNSatLoss)
