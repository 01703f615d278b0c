"""How a condition id reaches G and D: ``onehot`` and ``embedding``.

Both have a fixed capacity (number of condition slots), so opening new
conditions during training never resizes a network or an optimiser.

- ``onehot`` (DynGAN 2D code): G gets ``[z ; one-hot(c)]``, D gets
  ``[x ; one-hot(c)]``; unused slots stay 0. Fake conditions are drawn from the
  partition prior.
- ``embedding`` (DynGAN image code): G gets a learned, L2-normalised label
  embedding; D gets no code but has one output logit per condition (a
  multi-head discriminator). Fake conditions reuse the real batch's labels.

``generator_code()`` / ``discriminator_code()`` build a new module on every
call; the training loop calls each once and owns the result.
"""

from __future__ import annotations

from core import hookimpl
from core.components import FAKE_CONDITIONS, ConditioningSpec, Conditioner, Option

#: fake conditions: from the prior, one draw per D step that the G step reuses; from the prior,
#: the G step drawing its own (the DynGAN 2D code); or the real batch's labels (the image code)
_FAKE = FAKE_CONDITIONS
_FAKE_HELP = ("fake conditions: drawn from the partition prior (prior-fresh: the G step draws its own, as the "
              "DynGAN 2D code does; prior: it reuses the D step's), or the real batch's labels")


def _onehot_module(capacity: int):
    import torch
    from torch import nn

    class OneHot(nn.Module):
        """Condition ids ``(B,)`` -> one-hot codes ``(B, capacity)``; no parameters."""

        def __init__(self) -> None:
            super().__init__()
            self.capacity = capacity
            # a buffer (not saved) so that .to(device / dtype) carries it
            self.register_buffer("eye", torch.eye(capacity), persistent=False)

        def forward(self, cond):
            return self.eye[cond]

        def extra_repr(self) -> str:
            return f"capacity={self.capacity}"

    return OneHot()


def _embedding_module(capacity: int, dim: int):
    from torch import nn
    from torch.nn import functional as F

    class NormalisedEmbedding(nn.Module):
        """Condition ids ``(B,)`` -> learned codes ``(B, dim)`` of unit L2 norm."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(capacity, dim)

        def forward(self, cond):
            return F.normalize(self.embed(cond), dim=1)

    return NormalisedEmbedding()


class OneHotConditioner(Conditioner):
    """One-hot codes of fixed width ``capacity`` for G and D (DynGAN 2D code)."""

    name = "onehot"
    options = {
        "capacity": Option(30, "number of condition slots, K_max (DynGAN 2D code: 30)", min=1, max=10_000),
        "fake_conditions": Option(
            "prior", _FAKE_HELP, choices=_FAKE
        ),
    }

    def spec(self) -> ConditioningSpec:
        c = int(self.opts.capacity)
        return ConditioningSpec(g_dim=c, d_dim=c, d_heads=1, capacity=c)

    def generator_code(self):
        return _onehot_module(int(self.opts.capacity))

    def discriminator_code(self):
        return _onehot_module(int(self.opts.capacity))


class EmbeddingConditioner(Conditioner):
    """Learned L2-normalised embedding for G, one D logit per condition (DynGAN image code)."""

    name = "embedding"
    options = {
        "capacity": Option(20, "number of condition slots, K_max (DynGAN CIFAR-10 code: 20)", min=1, max=10_000),
        "dim": Option(256, "width of G's label embedding", min=1, max=8192),
        "fake_conditions": Option(
            "real", _FAKE_HELP, choices=_FAKE
        ),
    }

    def spec(self) -> ConditioningSpec:
        c = int(self.opts.capacity)
        return ConditioningSpec(g_dim=int(self.opts.dim), d_dim=0, d_heads=c, capacity=c)

    def generator_code(self):
        return _embedding_module(int(self.opts.capacity), int(self.opts.dim))

    def discriminator_code(self):
        return None


@hookimpl
def register_conditioners(register):
    register(OneHotConditioner)
    register(EmbeddingConditioner)
