"""The layered layout of G (``GANConfig.layout``): a foreground moved over a background.

After LR-GAN (Yang et al., ICLR 2017): G's last layer makes a foreground colour and a mask;
both are shifted by an offset that z's last two dimensions set; a separate network draws the
background from z's background code alone, without the caption; the image is
mask · foreground + (1 - mask) · background. The shapes dataset's captions never name a
background or a position, so G must take both from its noise: this layout makes each a
function of a few directions of z, which a style encoder reads back from an image
(docs/results.md, "A layered generator whose noise sets only the background's kind and the
shape's place").

z's layout: z₁…z₈ are the background code, the one-hot of the largest of them (eight cones
of the Gaussian, equally likely: the shapes dataset's eight kinds of background are equally
likely too); z's last two dimensions are the shift; the others are not read. The foreground
network sees none of z, only the caption: where it also saw z, G drew more of the noise
into its shapes, which a style encoder then read on G's images and met on no real one
(docs/results.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i_fast.models.config import BACKGROUND_CONES

# Where the background code lies in z (after z₀).
CODE = slice(1, 1 + BACKGROUND_CONES)
# The largest shift, a share of the image's half-width: a shape keeps some of itself in view.
MAX_SHIFT = 0.8
# The shift's gain on z at the start: ±1 of noise moves a shape by about a quarter of the
# image's width (0.8 · tanh 0.7 of the half-width).
SHIFT_GAIN = 0.7
# The mask's bias at the start: mostly background until the foreground earns its place.
MASK_BIAS = -2.0
# The background network's widths, from its 4×4 map up (then 3 channels at the image).
BACKGROUND_WIDTHS = (64, 32, 16)


def background_code(z: torch.Tensor) -> torch.Tensor:
    """z [B, Z] → the one-hot [B, BACKGROUND_CONES] of the largest of z₁…z₈."""
    return F.one_hot(z[:, CODE].argmax(dim=1), BACKGROUND_CONES).to(z.dtype)


class Background(nn.Sequential):
    """The background code [B, BACKGROUND_CONES] → an image [B, 3, S, S] in [-1, 1]: a linear
    map to a 4×4 map, then ×2 nearest resizes each with a 3×3 convolution (BatchNorm and
    ReLU between), tanh."""

    def __init__(self, stages: int):
        first = BACKGROUND_WIDTHS[0]
        layers: list[nn.Module] = [nn.Linear(BACKGROUND_CONES, first * 16, bias=False),
                                   nn.BatchNorm1d(first * 16), nn.ReLU(),
                                   nn.Unflatten(1, (first, 4, 4))]
        width = first
        for i in range(stages):
            last = i == stages - 1
            out = 3 if last else BACKGROUND_WIDTHS[min(i + 1, len(BACKGROUND_WIDTHS) - 1)]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(width, out, 3, padding=1, bias=last)]
            layers += [nn.Tanh()] if last else [nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        super().__init__(*layers)


class Shift(nn.Linear):
    """z's last two dimensions [B, 2] → the foreground's offset (x, y) [B, 2], a share of the
    image's half-width in (-MAX_SHIFT, MAX_SHIFT)."""

    def __init__(self):
        super().__init__(2, 2)

    def begin(self) -> None:
        """The shift's start (SHIFT_GAIN), set once G's weights are initialised:
        init_weights would overwrite it."""
        with torch.no_grad():
            self.weight.copy_(SHIFT_GAIN * torch.eye(2))
            self.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return MAX_SHIFT * torch.tanh(super().forward(z[:, -2:]))


def shifted(layer: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``layer`` [B, C, S, S] moved by ``offset`` [B, 2] (x, y in half-widths; bilinear,
    zeros where it comes in from outside)."""
    eye = torch.eye(2, dtype=layer.dtype, device=layer.device).expand(len(layer), 2, 2)
    theta = torch.cat([eye, -offset.to(layer.dtype)[:, :, None]], dim=2)  # [B, 2, 3]
    grid = F.affine_grid(theta, list(layer.shape), align_corners=False)  # [B, S, S, 2]
    return F.grid_sample(layer, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def compose(out: torch.Tensor, offset: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """G's last layer's output [B, 4, S, S] (colour, mask logit), the foreground's offset
    [B, 2] and the background [B, 3, S, S] → the image [B, 3, S, S] in [-1, 1]."""
    layer = shifted(torch.cat([torch.tanh(out[:, :3]), torch.sigmoid(out[:, 3:])], dim=1),
                    offset)
    mask = layer[:, 3:]  # [B, 1, S, S]
    return mask * layer[:, :3] + (1 - mask) * background
