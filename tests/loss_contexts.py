"""Loss-step contexts built by hand, as the training loop builds them (shared by the loss tests)."""

from __future__ import annotations

import torch

from core.components import DStepContext, GStepContext


class Reports(dict):
    """A ``ctx.report`` that keeps the last value of each name and checks it is a detached tensor."""

    def __call__(self, name, value):
        assert isinstance(value, torch.Tensor), f"{name} reported as {type(value).__name__}, not a tensor"
        assert not value.requires_grad, f"{name} reported with a graph attached"
        self[name] = value


def identity_d(x, cond=None):
    """A discriminator on 1-D data whose logit is the datum: D(x) = x (unit gradient norm)."""
    return x[:, 0]


def d_ctx(real, fake, disc, *, real_grad=False, generator=None):
    """A DStepContext built by hand, as the training loop would."""
    real = real.detach().clone().requires_grad_(real_grad)
    fake = fake.detach()
    cond_r = torch.zeros(real.shape[0], dtype=torch.long)
    cond_f = torch.zeros(fake.shape[0], dtype=torch.long)
    reports = Reports()
    ctx = DStepContext(
        real=real,
        fake=fake,
        real_logits=disc(real, cond_r),
        fake_logits=disc(fake, cond_f),
        real_cond=cond_r,
        fake_cond=cond_f,
        discriminator=disc,
        report=reports,
        generator=generator,
    )
    return ctx, reports


def d_ctx_logits(l_real, l_fake, **kw):
    """A D step whose logits are exactly ``l_real`` / ``l_fake`` (data = logits, D = identity)."""
    return d_ctx(l_real[:, None], l_fake[:, None], identity_d, **kw)


def g_ctx(fake_logits):
    reports = Reports()
    ctx = GStepContext(
        fake=fake_logits[:, None],
        fake_logits=fake_logits,
        fake_cond=torch.zeros(fake_logits.shape[0], dtype=torch.long),
        real_logits=None,
        report=reports,
    )
    return ctx, reports
