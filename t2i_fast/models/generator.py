"""Reed et al.'s 64×64 generator G(z, φ(t)), generalised to any power-of-two size."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from t2i_fast.models.config import GANConfig
from t2i_fast.models.coordinates import COORDINATE_CHANNELS, AddCoordinates
from t2i_fast.models.grouped_batchnorm import Groups, TakesGroups, grouped
from t2i_fast.models.init import init_weights
from t2i_fast.models.layered import (
    MASK_BIAS,
    Background,
    Shift,
    background_code,
    compose,
)
from t2i_fast.models.resize_conv import NearestResizeConv


class ResidualBlock(TakesGroups):
    """x + f(x) with f a bottleneck: 1×1 conv to ``hidden``, 3×3, 3×3 back to ``channels``,
    each followed by BN, ``act`` between. The activation after the sum is the caller's."""

    def __init__(self, channels: int, hidden: int, act: Callable[[], nn.Module]):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act(),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), act(),
            nn.Conv2d(hidden, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor, *, groups: Groups = 1) -> torch.Tensor:
        return x + grouped(self.body, x, groups)


class ProjectTo4x4(nn.ConvTranspose2d):
    """G's first layer, a 4×4 transposed convolution of the 1×1 map [z, φ(t)], computed as
    one matrix product whose output [B, C, 4, 4] is channels_last. As a convolution, its
    [B, C_in, 1, 1] input is both contiguous and channels_last: torch.compile (2.11, CUDA)
    predicted one output layout where cuDNN returned the other, and failed on a stride
    assertion. Same parameters as the ``nn.ConvTranspose2d`` it is.

    ``cell_inputs``: only the first that many inputs use their weights of each cell; the
    others use their weights' mean over the cells, the same at every cell (None: all inputs
    per cell). The weight keeps its shape, so the checkpoint's tensors are the paper's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 4, *,
                 cell_inputs: int | None = None):
        super().__init__(in_channels, out_channels, kernel_size, bias=False)
        if cell_inputs is not None and not 0 <= cell_inputs <= in_channels:
            raise ValueError(f"cell_inputs must be in [0, {in_channels}], got {cell_inputs}")
        self.cell_inputs = cell_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (1, 1):
            raise ValueError(f"ProjectTo4x4 takes a 1×1 map, got {tuple(x.shape)}")
        # out[b, :, i, j] = Σ_c x[b, c] · W[c, :, i, j]: no overlap, no flip at stride 1.
        weight = self.weight  # [C_in, C_out, kH, kW]
        if self.cell_inputs is not None:
            k = self.cell_inputs
            uniform = weight[k:].mean(dim=(2, 3), keepdim=True).expand_as(weight[k:])
            weight = torch.cat([weight[:k], uniform])
        w = weight.permute(0, 2, 3, 1).flatten(1)  # [C_in, kH·kW·C_out]
        y = x.flatten(1) @ w  # [B, kH·kW·C_out]
        return y.view(len(x), *self.kernel_size, self.out_channels).permute(0, 3, 1, 2)


def bottleneck(channels: int) -> int:
    """Reed's bottleneck width: a quarter of the block's width."""
    return max(channels // 4, 1)


class Generator(nn.Module):
    """z [B, z_dim] and a text embedding [B, embedding_dim] → images [B, 3, S, S] in [-1, 1].

    The embedding is projected (Linear, BN, LeakyReLU 0.2) to ``projected_dim`` and
    concatenated after z. A 4×4 transposed convolution makes the 4×4 map (width ngf·2^(n-1)
    for n up-sampling stages; with ``first_layer`` uniform, only z₀ varies over its cells);
    each stage doubles the resolution (``upsample``: a transposed convolution, or a resize
    and a 3×3 convolution; with ``coordinates``, its input gets x and y as two more
    channels) and halves the width down to ngf, and a last one makes the 3 channels, then
    tanh. With ``residual``, a bottleneck
    residual block follows the BN of the 4×4 map and of the 8×8 map, before their ReLU.
    With ``layout`` layered, the last one makes a foreground and a mask instead, which
    ``t2i_fast.models.layered`` moves and lays over a background drawn from the noise.

    ``groups``: the batch is that many batches (or batches of those sizes) one after
    another, each with its own BatchNorm statistics, as separate calls
    (``t2i_fast.models.grouped_batchnorm``).
    """

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        n = config.num_stages
        widths = [config.ngf * 2 ** (n - 1 - i) for i in range(n)]
        self.project = nn.Sequential(
            # No bias before a BatchNorm: its shift makes a bias redundant.
            nn.Linear(config.embedding_dim, config.projected_dim, bias=False),
            nn.BatchNorm1d(config.projected_dim),
            nn.LeakyReLU(0.2),
        )
        first = ProjectTo4x4(config.z_dim + config.projected_dim, widths[0],
                             cell_inputs=1 if config.first_layer == "uniform" else None)
        stages = [self._stage([first], widths[0], config.residual)]
        for i in range(1, n):
            stages.append(self._stage(self._doubling(widths[i - 1], widths[i], bias=False),
                                      widths[i], config.residual and i == 1))
        self.stages = nn.Sequential(*stages)
        self.layered = config.layout == "layered"
        if self.layered:
            # Colour and mask logit, composed over the background in forward (models.layered).
            self.to_rgb = nn.Sequential(*self._doubling(widths[-1], 4, bias=True))
            self.background = Background(n)
            self.shift = Shift()
        else:
            self.to_rgb = nn.Sequential(*self._doubling(widths[-1], 3, bias=True), nn.Tanh())
        init_weights(self)
        if self.layered:
            self.shift.begin()
            last = self.to_rgb[-1]
            with torch.no_grad():
                (last.conv if isinstance(last, NearestResizeConv) else last).bias[3] = MASK_BIAS

    def _doubling(self, in_channels: int, out_channels: int, *, bias: bool) -> list[nn.Module]:
        """Layers that double the resolution (``GANConfig.upsample``), after the coordinate
        channels where G has them (``GANConfig.coordinates``); the convolution comes last,
        so that a BatchNorm after it follows it directly (fused_layers)."""
        coordinates = [] if self.config.coordinates == "none" else [AddCoordinates()]
        in_channels += COORDINATE_CHANNELS if coordinates else 0
        if self.config.upsample == "transposed":
            return [*coordinates, nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1,
                                                     bias=bias)]
        if self.config.upsample == "nearest":
            return [*coordinates, NearestResizeConv(in_channels, out_channels, bias=bias)]
        return [*coordinates, nn.Upsample(scale_factor=2, mode=self.config.upsample),
                nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)]

    @staticmethod
    def _stage(up: list[nn.Module], width: int, residual: bool) -> nn.Sequential:
        layers = [*up, nn.BatchNorm2d(width)]
        if residual:
            layers.append(ResidualBlock(width, bottleneck(width), nn.ReLU))
        layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, text_embedding: torch.Tensor, *,
                groups: Groups = 1) -> torch.Tensor:
        h = grouped(self.project, text_embedding, groups)  # [B, projected_dim]
        # The layered foreground is the caption's alone (models.layered); its first layer
        # keeps the paper's inputs, z's at 0, so that both layouts share one.
        seen = torch.zeros_like(z) if self.layered else z
        x = torch.cat([seen, h], dim=1)[:, :, None, None]  # [B, z_dim + P, 1, 1]
        out = self.to_rgb(grouped(self.stages, x, groups))  # [B, 3 or 4, S, S]
        if not self.layered:
            return out
        background = self.background(background_code(z), groups=groups)  # [B, 3, S, S]
        return compose(out, self.shift(z), background)
