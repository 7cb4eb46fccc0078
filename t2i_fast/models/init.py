"""The DCGAN weight initialisation that Reed et al. use for G and D."""

from __future__ import annotations

from torch import nn

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def init_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Conv / linear weights ~ N(0, std), biases 0; BatchNorm scales ~ N(1, std), shifts 0.
    Applies to every submodule; returns ``module``."""
    for m in module.modules():
        if isinstance(m, _WEIGHTED):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
    return module
