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
from torch.nn.modules.batchnorm import _BatchNorm

from t2i_fast.models.config import BACKGROUND_CONES
from t2i_fast.models.grouped_batchnorm import Groups, group_sizes, groupable
from t2i_fast.models.resize_conv import resize_conv

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
    ReLU between), tanh.

    Every sample's background is one of BACKGROUND_CONES images, so the layers run once per
    code, on the one-hot codes themselves, and each sample takes its code's image: an eighth
    of the work of running them on every sample of a batch of 64, which had made the
    layered step 0.61× the single one on the CPU (docs/performance.md); each resize and its
    convolution run as one transposed convolution (``resize_conv``). In training each
    BatchNorm weighs a code's row by how many samples of the batch hold it
    (``counted_batch_norm``), so that outputs, gradients and running statistics are those of
    the layers run on every sample, to float rounding. ``groups``: as ``Generator``'s, each
    group with its own statistics. Call it directly, not through ``grouped``, which would
    run its layers one by one on every sample. BatchNorm layers that take their statistics
    their own way (SyncBatchNorm, under --sync-bn) run on every sample's code."""

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

    def forward(self, code: torch.Tensor, *, groups: Groups = 1) -> torch.Tensor:
        sizes = group_sizes(groups, len(code))
        parts = code.split(sizes)
        if not groupable(self):
            # SyncBatchNorm (--sync-bn) takes its statistics over every process's batch,
            # which rows counted on one process cannot give: the layers run on every sample.
            return torch.cat([self._layers(part) for part in parts])
        counts = torch.stack([part.sum(dim=0) for part in parts])  # [G, K]
        x = torch.eye(BACKGROUND_CONES, dtype=code.dtype, device=code.device
                      ).repeat(len(sizes), 1)  # [G·K, K]: every code once per group
        tables = self._layers(x, counts, sizes).unflatten(
            0, (len(sizes), BACKGROUND_CONES))  # [G, K, 3, S, S]
        return torch.cat([table[part.argmax(dim=1)]
                          for part, table in zip(parts, tables, strict=True)])

    def _layers(self, x: torch.Tensor, counts: torch.Tensor | None = None,
                sizes: tuple[int, ...] = ()) -> torch.Tensor:
        """The layers on codes ``x`` [N, K]; with ``counts``, each BatchNorm weighs the rows
        by them (``counted_batch_norm``)."""
        layers = iter(self)
        for layer in layers:
            if isinstance(layer, nn.Upsample):  # and its convolution, as one (resize_conv)
                x = resize_conv(x, next(layers))
            elif counts is not None and isinstance(layer, _BatchNorm):
                x = counted_batch_norm(layer, x, counts, sizes)
            else:
                x = layer(x)
        return x


def counted_batch_norm(bn: _BatchNorm, x: torch.Tensor, counts: torch.Tensor,
                       sizes: tuple[int, ...]) -> torch.Tensor:
    """``bn`` over rows ``x`` [G·K, C, ...] that stand for ``counts`` [G, K] samples each, G
    groups of ``sizes`` samples with their own statistics: what ``bn`` does to a batch that
    holds each row as many times as it is counted, one call per group. Statistics in
    float32 at least, as BatchNorm keeps them."""
    if not bn.training:
        return bn(x)
    dtype = torch.promote_types(x.dtype, torch.float32)
    rows = x.unflatten(0, counts.shape).to(dtype)  # [G, K, C, ...]
    spatial = tuple(range(3, rows.dim()))
    counts = counts.to(dtype)
    # [G, K, 1]: each row's share of its group (a group's counts sum to its size; no tensor
    # made from `sizes`, which a CUDA graph's capture would copy from the host).
    weights = (counts / counts.sum(dim=1, keepdim=True))[:, :, None]

    def average(values: torch.Tensor) -> torch.Tensor:  # [G, K, C, ...] → [G, C]
        per_row = values.mean(dim=spatial) if spatial else values
        return (weights * per_row).sum(dim=1)

    def per_channel(values: torch.Tensor) -> torch.Tensor:  # [G, C] → [G, 1, C, 1...]
        return values.view(*values.shape[:1], 1, values.shape[1], *(1,) * len(spatial))

    mean = average(rows)
    centred = rows - per_channel(mean)
    var = average(centred.square())  # biased, as the normalisation uses it
    y = centred * per_channel(torch.rsqrt(var + bn.eps))
    if bn.affine:
        y = y * per_channel(bn.weight[None].to(dtype)) + per_channel(bn.bias[None].to(dtype))
    if bn.track_running_stats:
        with torch.no_grad():
            per_sample = rows[0, 0, 0].numel()  # a channel's values in one sample
            for size, group_mean, group_var in zip(sizes, mean, var, strict=True):
                elements = size * per_sample  # the values a channel's statistics saw
                group_var = group_var * (elements / (elements - 1))  # unbiased, as BN keeps it
                bn.num_batches_tracked.add_(1)
                # momentum None: the cumulative average (recompute_batchnorm_stats).
                weight = (bn.momentum if bn.momentum is not None
                          else 1 / bn.num_batches_tracked.item())
                bn.running_mean.lerp_(group_mean.to(bn.running_mean.dtype), weight)
                bn.running_var.lerp_(group_var.to(bn.running_var.dtype), weight)
    return y.flatten(0, 1).to(x.dtype)


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
