"""CoordConv's input channels (Liu et al., NeurIPS 2018): where each pixel is, for the
convolution after them.

A convolution is translation-equivariant: fed a map that is the same at every cell, it can
only make a place from the zero padding at the borders. G's uniform first layer hands its
stages such a map (one vector everywhere but for z₀), so the noise can move the shape only as
far as the padding lets it. Given x and y as two more channels, one layer draws an edge where
a channel says, relu(a·x + b(z)), and the noise moves things by moving that edge: Liu et al.'s
GANs with these channels move the objects of their shape images along a latent
interpolation, where plain convolutions fade one image into the next.
"""

from __future__ import annotations

import torch
from torch import nn

# How many channels AddCoordinates appends: x, then y.
COORDINATE_CHANNELS = 2


class AddCoordinates(nn.Module):
    """[B, C, H, W] → [B, C + 2, H, W]: the input, then x (left −1 to right 1, the same down
    each column), then y (top −1 to bottom 1, the same along each row), in the input's dtype
    and on its device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        xs = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device)
        ys = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device)
        grid = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w)])  # [2, H, W]
        return torch.cat([x, grid.expand(b, COORDINATE_CHANNELS, h, w)], dim=1)
