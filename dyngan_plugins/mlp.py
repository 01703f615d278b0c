"""MLP generator and discriminator for vector data (the 2D mixtures).

Defaults follow the DynGAN reference setup: two hidden layers of 128, z of
dimension 50, ReLU in G and LeakyReLU(0.1) in D.
"""

from __future__ import annotations

import math

from core import hookimpl
from core.components import ConditioningSpec, Model, Option


def _build(data_shape, spec: ConditioningSpec, opts):
    from torch import nn

    class Generator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shape = tuple(data_shape)
            layers, width = [], opts.z_dim + spec.g_dim
            for _ in range(opts.layers):
                layers += [nn.Linear(width, opts.hidden), nn.ReLU()]
                width = opts.hidden
            layers.append(nn.Linear(width, math.prod(data_shape)))
            self.net = nn.Sequential(*layers)

        def forward(self, z, code=None):
            import torch

            h = z if code is None else torch.cat([z, code], dim=1)
            return self.net(h).view(z.shape[0], *self.shape)

    class Discriminator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers, width = [], math.prod(data_shape) + spec.d_dim
            for _ in range(opts.layers):
                layers += [nn.Linear(width, opts.hidden), nn.LeakyReLU(opts.slope)]
                width = opts.hidden
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(width, spec.d_heads)

        def forward(self, x, code=None):
            import torch

            h = x.flatten(1)
            if code is not None:
                h = torch.cat([h, code], dim=1)
            f = self.body(h)
            return self.head(f), f

    g, d = Generator(), Discriminator()
    if opts.init == "normal":  # the DynGAN reference code's: DCGAN's N(0, 0.02), zero biases
        from .dcgan import dcgan_init

        g.apply(dcgan_init)
        d.apply(dcgan_init)
    return g, d


class MLP(Model):
    """Fully connected G and D; flattens any data shape."""

    name = "mlp"
    options = {
        "z_dim": Option(50, "dimension of the latent noise z", min=1, max=4096),
        "hidden": Option(128, "width of each hidden layer", min=1, max=8192),
        "layers": Option(2, "number of hidden layers in each network", min=1, max=64),
        "slope": Option(0.1, "negative slope of D's LeakyReLU", min=0.0),
        "init": Option("torch", "initial weights: torch (PyTorch's default, uniform, fan-in scaled) or "
                       "normal (N(0, 0.02) weights and zero biases, as the DynGAN reference code)",
                       choices=("torch", "normal")),
    }

    def build(self, data_shape, spec):
        return _build(data_shape, spec, self.opts)


@hookimpl
def register_models(register):
    register(MLP)
