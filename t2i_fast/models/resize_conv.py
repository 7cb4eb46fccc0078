"""A ×2 nearest-neighbour resize then a 3×3 convolution, computed as one transposed
convolution: G's doubling layers with ``GANConfig.upsample`` nearest, and the layered
layout's background network (``t2i_fast.models.layered``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize_conv_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A 3×3 convolution's weight [C_out, C_in, 3, 3] → the stride-2 4×4 transposed
    convolution's [C_in, C_out, 4, 4] that equals a ×2 nearest resize followed by it: along
    each axis, tap k of the transposed convolution (output row 2i + k - 1 from input row i)
    is the sum of the 3×3 taps 2 - k and 3 - k, those that read the two resized rows copied
    from row i."""
    flipped = weight.transpose(0, 1).flip(-2, -1)  # [C_in, C_out, 3, 3]
    padded = F.pad(flipped, (1, 1, 1, 1))  # [C_in, C_out, 5, 5]
    return (padded[..., 1:, 1:] + padded[..., :-1, 1:]
            + padded[..., 1:, :-1] + padded[..., :-1, :-1])


def resize_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv`` (3×3, padding 1) of ``x`` [B, C, H, W] resized ×2 by nearest neighbours:
    [B, C_out, 2H, 2W], the same numbers and gradients, without the 4× larger map between
    them (on the CPU, 9× faster than the two steps for a 3-channel output at 64×64)."""
    return F.conv_transpose2d(x, resize_conv_kernel(conv.weight), conv.bias, stride=2,
                              padding=1)


class NearestResizeConv(nn.Module):
    """A ×2 nearest-neighbour resize, then ``conv``, a 3×3 convolution with padding 1 (Odena
    et al., 2016), run as ``resize_conv``: at about the speed of the paper's transposed
    layer (scripts/bench_upsample.py). Not a convolution module itself, so the fused layers
    on a GPU leave its BatchNorm unfused."""

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)

    def kernel(self) -> torch.Tensor:
        """[C_in, C_out, 4, 4]: ``resize_conv_kernel`` of ``conv``'s weight."""
        return resize_conv_kernel(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_conv(x, self.conv)
