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

from .components import Component, ConditioningSpec, Conditioner, Model


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


def _refuse(component: Component, method: str, problem: str) -> None:
    from .errors import ComponentFailure

    raise ComponentFailure(component.kind, component.name, component.plugin, method, ValueError(problem))


def spec_problem(spec: Any) -> str | None:
    """What keeps a conditioner's ``spec()`` from sizing the networks and the loop's tensors."""
    if not isinstance(spec, ConditioningSpec):
        return f"returned {type(spec).__name__}, not a core.components.ConditioningSpec"
    for key, low in (("capacity", 1), ("d_heads", 1), ("g_dim", 0), ("d_dim", 0)):
        v = getattr(spec, key, None)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            return f"its ConditioningSpec has {key} = {v!r}; it must be an int >= {low}"
    return None


def build_networks(
    model: Model, conditioner: Conditioner | None, data_shape: tuple[int, ...]
) -> tuple[ConditionalGenerator, ConditionalDiscriminator, ConditioningSpec]:
    """G and D wrapped with the conditioner's code modules. Each component's part is checked as it
    comes, so that its mistake fails naming it (ComponentFailure) rather than as an error in another
    plugin's code: the conditioner's spec before the model sizes its networks by it, the model's
    two trainable modules, the conditioner's code modules (their output widths: ``Trainer``'s probe)."""
    from .training import call_component

    spec = ConditioningSpec()
    if conditioner is not None:
        spec = call_component(conditioner, "spec")
        problem = spec_problem(spec)
        if problem is not None:
            _refuse(conditioner, "spec", problem)
    nets = call_component(model, "build", tuple(data_shape), spec)
    if not isinstance(nets, (tuple, list)) or len(nets) != 2:
        _refuse(model, "build", f"returned {type(nets).__name__}; it must return (G, D), two torch.nn.Modules")
    for which, net in zip("GD", nets):
        if not isinstance(net, nn.Module):
            _refuse(model, "build", f"returned a {which} of type {type(net).__name__}, not a torch.nn.Module")
        if not any(p.requires_grad for p in net.parameters()):
            _refuse(model, "build", f"returned a {which} with no trainable parameters (nothing for its optimiser)")
    codes = []
    for method, dim in (("generator_code", spec.g_dim), ("discriminator_code", spec.d_dim)):
        code = call_component(conditioner, method) if conditioner is not None else None
        if code is not None and not isinstance(code, nn.Module):
            _refuse(conditioner, method, f"returned {type(code).__name__}; it must return a torch.nn.Module or None")
        if code is None and dim > 0:
            _refuse(conditioner, method, f"returned None, but its ConditioningSpec gives the networks a code of "
                                         f"width {dim}")
        codes.append(code)
    g_net, d_net = nets
    return (
        ConditionalGenerator(g_net, codes[0]),
        ConditionalDiscriminator(d_net, codes[1], spec.d_heads),
        spec,
    )

