"""BatchNorm running statistics recomputed for a network's current weights.

A moving average of G's weights (the sampling generator) is a network no step trained: the
running statistics of G, which follow G's own recent weights, do not fit it, and the
mismatch shifts the channels that carry colour. Recomputing them for the average's weights
is what made the default job's colour scores steady; docs/results.md ("The default job's
history") has the runs before and after.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def recompute_batchnorm_stats(model: nn.Module, inputs: Iterable[tuple[torch.Tensor, ...]]
                              ) -> None:
    """Sets every BatchNorm's running mean and variance of ``model`` to the plain average of
    its batch statistics over ``model(*args)`` for each ``args`` in ``inputs`` (train-mode
    forwards, nothing else changed). The tensors are updated in place: a CUDA graph that
    reads them sees the new values. The model's mode and each layer's momentum are restored."""
    inputs = list(inputs)
    if not inputs:
        raise ValueError("recompute_batchnorm_stats needs at least one batch of inputs")
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    training = model.training
    for m in layers:
        m.running_mean.zero_()
        m.running_var.fill_(1)
        m.num_batches_tracked.zero_()
        m.momentum = None  # cumulative average: each batch weighs the same
    model.train()
    try:
        for args in inputs:
            model(*args)
    finally:
        model.train(training)
        for m, (momentum, count) in zip(layers, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
