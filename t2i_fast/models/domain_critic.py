"""The domain critic of train-style's domain-adversarial term (Ganin & Lempitsky, ICML 2015):
a small network that tells the style encoder's features of real images from those of the
generator's. S learns to make the two alike, so that what it learnt on G's images reads the
same on real ones."""

from __future__ import annotations

import torch
from torch import nn

HIDDEN = 256


class DomainCritic(nn.Module):
    """Features [B, width] → logits [B], high for real images: two hidden layers of HIDDEN
    with LeakyReLU(0.2), no normalisation (a batch of one domain must not be recentred)."""

    def __init__(self, width: int):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.net = nn.Sequential(nn.Linear(width, HIDDEN), nn.LeakyReLU(0.2),
                                 nn.Linear(HIDDEN, HIDDEN), nn.LeakyReLU(0.2),
                                 nn.Linear(HIDDEN, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)  # [B]
