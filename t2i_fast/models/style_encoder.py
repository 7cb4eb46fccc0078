"""The style encoder S of Reed et al. (ICML 2016, section 4.4): a network trained to invert the
generator, predicting the noise z from G(z, φ(t)). What a caption does not describe (the
background, the pose) can only come from z, so S(x) of a real image x carries its style."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from t2i_fast.models.config import GANConfig, _check_positive
from t2i_fast.models.init import init_weights


@dataclass(frozen=True)
class StyleEncoderConfig:
    """Images of ``image_size`` pixels → z of ``z_dim``; ``ndf`` is the first stage's width,
    doubled at each further stage as in D."""

    image_size: int = 64
    ndf: int = 64
    z_dim: int = 100

    def __post_init__(self) -> None:
        size = self.image_size
        if size < 8 or size & (size - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {size}")
        _check_positive(self, "ndf", "z_dim")

    @classmethod
    def from_gan(cls, gan: GANConfig) -> StyleEncoderConfig:
        """The encoder that inverts this GAN's generator: its resolution, z, and D's widths."""
        return cls(image_size=gan.image_size, ndf=gan.ndf, z_dim=gan.z_dim)

    @property
    def num_stages(self) -> int:
        """Stride-2 stages from the image down to 4×4."""
        return self.image_size.bit_length() - 3


class StyleEncoder(nn.Module):
    """Images [B, 3, S, S] in [-1, 1] → style vectors [B, z_dim].

    D's image path without its residual block: stride-2 4×4 convolutions from ndf (no BN on
    the first) to ndf·2^(n-1) at 4×4, each followed by LeakyReLU(0.2); then one linear map of
    the whole 4×4 map to z. Flattening rather than pooling keeps where things are, and position
    is part of style.
    """

    def __init__(self, config: StyleEncoderConfig):
        super().__init__()
        self.config = config
        widths = [config.ndf * 2**i for i in range(config.num_stages)]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.to_z = nn.Linear(widths[-1] * 4 * 4, config.z_dim)
        init_weights(self)

    @property
    def feature_width(self) -> int:
        """The width of the flattened 4×4 map that ``encode`` returns beside the styles."""
        return self.to_z.in_features

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the flattened last map [B, feature_width], the style vectors [B, z_dim])."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"the style encoder takes {size}×{size} images, got "
                             f"{tuple(images.shape[-2:])}")
        x = self.features(images).flatten(1)  # [B, ndf·2^(n-1) · 16]
        return x, self.to_z(x)  # [B, z_dim]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)[1]
