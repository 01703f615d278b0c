"""Conditional wrappers around a model's networks.

The model builds plain ``G(z, code)`` and ``D(x, code) -> (logits, features)``;
the conditioner supplies the code modules. The wrappers give the loop and the
components one calling convention, whatever the conditioner:
``G(z, cond)`` and ``D(x, cond)`` / ``D(x, cond, features=True)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .components import ConditioningSpec, Conditioner, Model


class ConditionalGenerator(nn.Module):
    def __init__(self, net: nn.Module, code: nn.Module | None) -> None:
        super().__init__()
        self.net = net
        self.code = code

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(z, None if self.code is None else self.code(cond))


class ConditionalDiscriminator(nn.Module):
    def __init__(self, net: nn.Module, code: nn.Module | None, heads: int) -> None:
        super().__init__()
        self.net = net
        self.code = code
        self.heads = heads

    def forward(self, x: torch.Tensor, cond: torch.Tensor, features: bool = False) -> Any:
        logits, feats = self.net(x, None if self.code is None else self.code(cond))
        if self.heads > 1:
            # one logit per condition: use each sample's own (multi-head discriminator)
            logits = logits.gather(1, cond.view(-1, 1)).view(-1)
        else:
            logits = logits.view(-1)
        return (logits, feats) if features else logits


def build_networks(
    model: Model, conditioner: Conditioner | None, data_shape: tuple[int, ...]
) -> tuple[ConditionalGenerator, ConditionalDiscriminator, ConditioningSpec]:
    spec = conditioner.spec() if conditioner is not None else ConditioningSpec()
    g_net, d_net = model.build(tuple(data_shape), spec)
    g_code = conditioner.generator_code() if conditioner is not None else None
    d_code = conditioner.discriminator_code() if conditioner is not None else None
    return (
        ConditionalGenerator(g_net, g_code),
        ConditionalDiscriminator(d_net, d_code, spec.d_heads),
        spec,
    )
