"""The image side of Reed's deep structured joint embedding (DS-SJE), for pretraining the text
encoder. Reed used a pretrained GoogLeNet; this is a small CNN trained from scratch."""

from __future__ import annotations

import torch
from torch import nn

from t2i_fast.models.config import ImageEncoderConfig


class ImageEncoder(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] → embeddings [B, embedding_dim]: stride-2 4×4 Conv + BN
    + LeakyReLU(0.2) per width in ``channels``, global average pooling, a linear map."""

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        widths = (3, *config.channels)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(widths[-1], config.embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)  # [B, C, H / 2^n, W / 2^n]
        return self.proj(x.mean(dim=(2, 3)))  # [B, E]
