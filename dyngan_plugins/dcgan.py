"""A small DCGAN-style convolutional G and D for square images of power-of-two size.

For 8x8 images (digits, stacked digits) the defaults give the reference setting of
benchmarks.md: G: z 64 -> 4x4x128 -> 8x8xC (batch norm, ReLU, tanh output);
D: conv 64 -> conv 128 stride 2 -> linear. Larger images (16, 32, 64, ... from image-folder)
add one stride-2 layer per doubling, DCGAN-style: channels double as resolution halves, capped
at 8x the base.

Shapes. The data shape is ``(C, S, S)`` or ``(S, S)`` (one channel), S a power of two >= 8.
G has ``channels * min(8, S/r)`` feature maps at resolution r (S=8: 128 at 4x4);
D has ``d_channels * min(8, S/r)`` after the conv reaching resolution r, with
``d_channels = round(channels * d_width)``; ``d_width=0.25`` is PacGAN's weak-D setting
(D at 1/4 of G's width, their Table 3).

Conditioning (``ConditioningSpec``): G's input is ``[z ; code]`` when ``spec.g_dim > 0``;
D concatenates its ``(B, spec.d_dim)`` code to the flattened features right before the final
linear layer, which outputs ``spec.d_heads`` logits. The features D returns are what goes into
that final layer *without* the code: the flattened last conv map (``d_channels * min(8, S/4)
* 16`` values), or the extra hidden layer when ``d_features > 0``. Leaving the code out keeps
the feature space a description of the image alone, which is what detectors and partitioners
cluster.

Batch norm is in G only (D has none, so per-sample penalties such as WGAN-GP and R1 stay
valid). It is BatchNorm2d, whose statistics in train mode run over batch x height x width
(at least 16 values per channel), so G also trains with a batch of one; in eval mode it uses
the running statistics and any batch size works.
"""

from __future__ import annotations

from core import hookimpl
from core.components import ConditioningSpec, Model, Option
from core.errors import UsageError


def _image_shape(data_shape) -> tuple[int, int, bool]:
    """(channels, size, squeeze) for a ``(C, S, S)`` or ``(S, S)`` data shape, else UsageError."""
    shape = tuple(int(s) for s in data_shape)
    if len(shape) == 2:
        c, h, w, squeeze = 1, shape[0], shape[1], True
    elif len(shape) == 3:
        (c, h, w), squeeze = shape, False
    else:
        raise UsageError(
            f"model 'dcgan' needs images shaped (C, H, W) or (H, W) per sample, got {shape}; "
            "use --model mlp for vector data"
        )
    if h != w or h < 8 or h & (h - 1):
        raise UsageError(
            f"model 'dcgan' needs square images with a power-of-two side >= 8 (8, 16, 32, 64 ...), "
            f"got {h}x{w}; resize them (image-folder: -o dataset.size=32) or use --model mlp"
        )
    if c < 1:
        raise UsageError(f"model 'dcgan' needs at least one channel, got {shape}")
    return c, h, squeeze


def dcgan_init(module) -> None:
    """DCGAN initialisation: weights N(0, 0.02), batch-norm scales N(1, 0.02), biases 0."""
    from torch import nn

    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _code_or_none(code, width: int, who: str, batch: int):
    """Check a conditioning code against the spec; a ``(B, 0)`` code counts as none."""
    if code is not None and code.ndim == 2 and code.shape[1] == 0:
        code = None
    if width == 0:
        if code is not None:
            raise ValueError(f"dcgan {who} was built without conditioning but got a code {tuple(code.shape)}")
        return None
    if code is None or code.ndim != 2 or code.shape != (batch, width):
        got = None if code is None else tuple(code.shape)
        raise ValueError(f"dcgan {who} needs a code of shape ({batch}, {width}), got {got}")
    return code


def _build(data_shape, spec: ConditioningSpec, opts):
    import math

    import torch
    from torch import nn

    c, size, squeeze = _image_shape(data_shape)
    n_up = int(math.log2(size)) - 2  # stride-2 layers between 4x4 and size x size
    base = int(opts.channels)
    d_base = max(1, round(base * float(opts.d_width)))

    def g_ch(r: int) -> int:  # G's channels at resolution r
        return base * min(8, size // r)

    def d_ch(r: int) -> int:  # D's channels after the conv that reaches resolution r
        return d_base * min(8, size // r)

    class Generator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shape = tuple(int(s) for s in data_shape)
            self.z_dim, self.g_dim = int(opts.z_dim), spec.g_dim
            self.fc = nn.Linear(self.z_dim + spec.g_dim, g_ch(4) * 16, bias=False)
            self.fc_norm = nn.BatchNorm2d(g_ch(4))
            blocks = []
            r = 4
            for _ in range(n_up - 1):
                blocks += [
                    nn.ConvTranspose2d(g_ch(r), g_ch(2 * r), 4, 2, 1, bias=False),
                    nn.BatchNorm2d(g_ch(2 * r)),
                    nn.ReLU(inplace=True),
                ]
                r *= 2
            blocks += [nn.ConvTranspose2d(g_ch(r), c, 4, 2, 1), nn.Tanh()]
            self.blocks = nn.Sequential(*blocks)
            self.apply(dcgan_init)

        def forward(self, z, code=None):
            b = z.shape[0]
            code = _code_or_none(code, self.g_dim, "generator", b)
            h = z if code is None else torch.cat([z, code.to(z.dtype)], dim=1)
            h = self.fc(h).view(b, g_ch(4), 4, 4)
            h = torch.relu(self.fc_norm(h))
            return self.blocks(h).view(b, *self.shape)

    class Discriminator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d_dim = spec.d_dim
            slope = float(opts.slope)
            layers = [nn.Conv2d(c, d_ch(size), 3, 1, 1), nn.LeakyReLU(slope)]
            r = size
            while r > 4:
                layers += [nn.Conv2d(d_ch(r), d_ch(r // 2), 4, 2, 1), nn.LeakyReLU(slope)]
                r //= 2
            layers.append(nn.Flatten())
            width = d_ch(4) * 16
            if opts.d_features > 0:
                layers += [nn.Linear(width, opts.d_features), nn.LeakyReLU(slope)]
                width = opts.d_features
            self.body = nn.Sequential(*layers)
            self.feature_dim = width
            self.head = nn.Linear(width + spec.d_dim, spec.d_heads)
            self.apply(dcgan_init)

        def forward(self, x, code=None):
            b = x.shape[0]
            code = _code_or_none(code, self.d_dim, "discriminator", b)
            if squeeze:
                x = x.unsqueeze(1)
            f = self.body(x)
            h = f if code is None else torch.cat([f, code.to(f.dtype)], dim=1)
            return self.head(h), f

    return Generator(), Discriminator()


class DCGAN(Model):
    """Convolutional G (batch norm, tanh) and D (LeakyReLU, no norm) for square images."""

    name = "dcgan"
    output_range = (-1.0, 1.0)  # G ends in tanh
    options = {
        "z_dim": Option(64, "dimension of the latent noise z", min=1, max=4096),
        "channels": Option(64, "G's base width: S=8 gives a 4x4x(2*channels) first map", min=1, max=4096),
        "d_width": Option(
            1.0, "D's width relative to G's (0.25: PacGAN's weak-D setting)", min=0.01, max=16.0
        ),
        "d_features": Option(
            0, "width of an extra linear layer before D's output (0: none; features = last conv map)", min=0,
            max=8192
        ),
        "slope": Option(0.2, "negative slope of D's LeakyReLU", min=0.0),
    }

    def build(self, data_shape, spec):
        return _build(data_shape, spec, self.opts)


@hookimpl
def register_models(register):
    register(DCGAN)
