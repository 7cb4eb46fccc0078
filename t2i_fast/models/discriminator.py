"""Reed et al.'s 64×64 matching-aware discriminator D(x, φ(t)), generalised to any
power-of-two size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i_fast.models.config import GANConfig
from t2i_fast.models.coordinates import COORDINATE_CHANNELS, AddCoordinates
from t2i_fast.models.generator import ResidualBlock, bottleneck
from t2i_fast.models.grouped_batchnorm import Groups, grouped, grouped_batch_norm
from t2i_fast.models.init import init_weights


def _leaky() -> nn.Module:
    return nn.LeakyReLU(0.2)


class Discriminator(nn.Module):
    """Images [B, 3, S, S] and a text embedding [B, embedding_dim] → one logit per image [B].

    Stride-2 4×4 convolutions take the image down to 4×4, widening from ndf (no BN on the
    first, as DCGAN) to ndf·2^(n-1); with ``residual`` a bottleneck residual block follows the
    last stage's BN, before its LeakyReLU. The embedding, projected (Linear, BN, LeakyReLU) to
    ``projected_dim`` and replicated over the 4×4 grid, is concatenated on channels; a 1×1
    convolution mixes image and text, and a valid 4×4 convolution gives the logit.

    ``forward`` never builds the replicated, concatenated tensor: the 1×1 convolution of
    cat([x, h replicated]) is conv1x1(x, W[:, :C]) + h @ W[:, C:, 0, 0].T broadcast over the
    grid, with the same parameters. torch.compile of the concatenated form in channels_last
    failed in convolution_backward with a stride assertion (torch 2.11); the split form has
    no replica and no concatenation to get wrong, and moves 16 times less text data.

    ``groups``: the batch is that many batches (or batches of those sizes) one after
    another, each with its own BatchNorm statistics, as separate calls
    (``t2i_fast.models.grouped_batchnorm``).

    With ``num_classes``, D also names each image's class (TAC-GAN, Dash et al., 2017): a
    linear map of the last stage's features averaged over the 4×4 grid, before the text joins
    them, gives class logits [B, num_classes], returned beside the match logits when
    ``forward`` is asked ``with_classes``.
    """

    def __init__(self, config: GANConfig, *, num_classes: int = 0):
        super().__init__()
        self.config = config
        n = config.num_stages
        widths = [config.ndf * 2**i for i in range(n)]
        # With CoordConv in both networks, D's first convolution sees where each pixel is.
        coordinates = [AddCoordinates()] if config.coordinates == "both" else []
        first = nn.Conv2d(3 + COORDINATE_CHANNELS * len(coordinates), widths[0], 4, 2, 1)
        stages = [nn.Sequential(*coordinates, first, _leaky())]
        for i in range(1, n):
            layers = [nn.Conv2d(widths[i - 1], widths[i], 4, 2, 1, bias=False),
                      nn.BatchNorm2d(widths[i])]
            if config.residual and i == n - 1:
                layers.append(ResidualBlock(widths[i], bottleneck(widths[i]), _leaky))
            layers.append(_leaky())
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.project = nn.Sequential(
            nn.Linear(config.embedding_dim, config.projected_dim, bias=False),
            nn.BatchNorm1d(config.projected_dim),
            _leaky(),
        )
        self.joint = nn.Sequential(
            nn.Conv2d(widths[-1] + config.projected_dim, widths[-1], 1, bias=False),
            nn.BatchNorm2d(widths[-1]),
            _leaky(),
        )
        self.logit = nn.Conv2d(widths[-1], 1, 4)
        if num_classes < 0:
            raise ValueError(f"num_classes must be at least 0, got {num_classes}")
        self.classify = nn.Linear(widths[-1], num_classes) if num_classes else None
        init_weights(self)

    def forward(self, images: torch.Tensor, text_embedding: torch.Tensor, *,
                groups: Groups = 1, with_classes: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = grouped(self.stages, images, groups)  # [B, C, 4, 4], C = ndf·2^(n-1)
        if with_classes:
            if self.classify is None:
                raise ValueError("this discriminator has no class head (num_classes=0)")
            return self._match(x, text_embedding, groups), self.classify(x.mean(dim=(2, 3)))
        return self._match(x, text_embedding, groups)

    def _match(self, x: torch.Tensor, text_embedding: torch.Tensor,
               groups: Groups) -> torch.Tensor:
        """The logits [B] of image features ``x`` [B, C, 4, 4] with the text."""
        h = grouped(self.project, text_embedding, groups)  # [B, P]
        conv, norm, act = self.joint
        w_image, w_text = conv.weight.split([x.shape[1], h.shape[1]], dim=1)
        # The 1×1 convolution as a matrix product over channels, in channels_last: a
        # convolution with this slice of the weight (strided in neither layout) made
        # torch.compile (2.11, CUDA) predict one output layout where cuDNN gave the other.
        pixels = x.permute(0, 2, 3, 1)  # [B, 4, 4, C]
        joint = F.linear(pixels, w_image.flatten(1)) + F.linear(h, w_text.flatten(1))[:, None, None]
        joint = joint.permute(0, 3, 1, 2)  # [B, C, 4, 4], channels_last
        x = act(grouped_batch_norm(norm, joint, groups))
        return self.logit(x).flatten()  # [B]
