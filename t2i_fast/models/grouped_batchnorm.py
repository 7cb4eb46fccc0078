"""BatchNorm with statistics per group: one network call over several batches concatenated
along the batch dimension computes what one call per batch computes.

A training step evaluates D three times (real/right, real/wrong, fake/right) and G twice
(fake and GAN-INT's interpolated embeddings). Run as one call over the concatenated batch,
each convolution is one larger launch instead of several; only BatchNorm, whose output
depends on the batch it normalises, must still see each group on its own. Here each group
is normalised with its own batch statistics, and the running statistics move as the
groups' calls one after another would move them, with ``num_batches_tracked`` counting
each group. Parameters, buffers and state-dict keys are the layers' own: nothing about a
network's checkpoint changes.

``groups`` is the number of equal groups, or the groups' sizes in order. Under
torch.compile, equal groups of a plain BatchNorm are one ``F.batch_norm`` over the batch
rearranged so that group i's channel k is channel i·C + k: pure tensor ops, which Inductor
makes one reduction for all groups with the rearrangement folded into its indexing. Run
eagerly, that rearrangement is two copies forward and two backward, which made G and D
slower than one BatchNorm call per group (CPU, batch 64); so eagerly, and for unequal groups
and the cumulative average (``momentum=None``, whose weight depends on each call's count),
BatchNorm is called once per group, and the rest of the network still runs once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Groups = int | tuple[int, ...]
# The layers that group: SyncBatchNorm and other subclasses of _BatchNorm compute their
# statistics their own way.
_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class TakesGroups(nn.Module):
    """A module whose ``forward(x, *, groups=1)`` passes ``groups`` to the BatchNorm layers
    inside it; ``grouped`` hands it on."""


def group_sizes(groups: Groups, n: int) -> tuple[int, ...]:
    """The groups' sizes for a batch of ``n``: ``groups`` equal ones, or ``groups`` itself."""
    if isinstance(groups, int):
        if groups < 1 or n % groups:
            raise ValueError(f"a batch of {n} does not split into {groups} equal groups")
        return (n // groups,) * groups
    sizes = tuple(groups)
    if not sizes or min(sizes) < 1 or sum(sizes) != n:
        raise ValueError(f"group sizes {sizes} do not make a batch of {n}")
    return sizes


def groupable(module: nn.Module) -> bool:
    """Whether every BatchNorm layer of ``module`` can take statistics per group."""
    return all(isinstance(m, _PLAIN) for m in module.modules() if isinstance(m, _BatchNorm))


def grouped(module: nn.Module, x: torch.Tensor, groups: Groups) -> torch.Tensor:
    """``module(x)`` for ``x`` made of ``groups`` along the batch, each BatchNorm layer
    inside taking each group's statistics: inside ``nn.Sequential`` containers (walked
    layer by layer) and ``TakesGroups`` modules. With one group it is ``module(x)`` itself,
    so that what replaces a container's forward (fused layers) runs."""
    if len(group_sizes(groups, len(x))) == 1:
        return module(x)
    if isinstance(module, nn.Sequential):
        for layer in module:
            x = grouped(layer, x, groups)
        return x
    if isinstance(module, _BatchNorm):
        return grouped_batch_norm(module, x, groups)
    if isinstance(module, TakesGroups):
        return module(x, groups=groups)
    return module(x)


def grouped_batch_norm(bn: _BatchNorm, x: torch.Tensor, groups: Groups) -> torch.Tensor:
    """``bn`` applied to each group of ``x`` [N, C, ...] in turn, the outputs concatenated:
    the same outputs, gradients and running statistics, to float rounding."""
    sizes = group_sizes(groups, len(x))
    if len(sizes) == 1 or not bn.training:  # in eval mode each sample is on its own
        return bn(x)
    if not isinstance(bn, _PLAIN):
        raise TypeError(f"{type(bn).__name__} does not take statistics per group")
    if (not torch.compiler.is_compiling() or len(set(sizes)) > 1
            or (bn.track_running_stats and bn.momentum is None)):
        return torch.cat([bn(part) for part in x.split(sizes)])
    g, c = len(sizes), x.shape[1]
    nhwc = (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous())
    wide = _side_by_side(x, g, nhwc)  # [n, g·C, ...]
    tracked = bn.running_mean is not None
    # The batch statistics come out through running buffers of zeros at momentum 1: the
    # batch mean and the unbiased variance, exactly what each group's call would average in.
    stats = torch.zeros(2, g * c, dtype=bn.running_mean.dtype, device=x.device) \
        if tracked else None
    y = F.batch_norm(wide, stats[0] if tracked else None, stats[1] if tracked else None,
                     _tile(bn.weight, g), _tile(bn.bias, g), training=True, momentum=1.0,
                     eps=bn.eps)
    if tracked:
        with torch.no_grad():
            bn.num_batches_tracked.add_(g)
            for mean, var in zip(stats[0].view(g, c), stats[1].view(g, c), strict=True):
                bn.running_mean.lerp_(mean, bn.momentum)
                bn.running_var.lerp_(var, bn.momentum)
    return _one_above_another(y, g, nhwc)


def _tile(parameter: torch.Tensor | None, g: int) -> torch.Tensor | None:
    """[C] → [g·C], the parameter once per group (one copy; ``repeat`` makes four)."""
    return parameter.expand(g, -1).reshape(-1) if parameter is not None else None


def _side_by_side(x: torch.Tensor, g: int, nhwc: bool) -> torch.Tensor:
    """[g·n, C, ...] → [n, g·C, ...], group i's channel k at i·C + k, in x's layout."""
    if nhwc:
        n, c, h, w = len(x) // g, *x.shape[1:]
        # [g, n, C, H, W] → [n, H, W, g, C]: the copy keeps channels innermost.
        return x.unflatten(0, (g, -1)).permute(1, 3, 4, 0, 2).reshape(n, h, w, g * c
                                                                       ).permute(0, 3, 1, 2)
    return x.unflatten(0, (g, -1)).transpose(0, 1).flatten(1, 2)


def _one_above_another(y: torch.Tensor, g: int, nhwc: bool) -> torch.Tensor:
    """The inverse of ``_side_by_side``."""
    c = y.shape[1] // g
    if nhwc:
        n, _, h, w = y.shape
        return y.permute(0, 2, 3, 1).unflatten(3, (g, c)).permute(3, 0, 1, 2, 4).reshape(
            g * n, h, w, c).permute(0, 3, 1, 2)
    return y.unflatten(1, (g, c)).transpose(0, 1).flatten(0, 1)
