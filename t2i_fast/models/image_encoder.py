"""The image side of Reed's deep structured joint embedding (DS-SJE), for pretraining the text
encoder. Reed used a pretrained GoogLeNet; this is a small CNN trained from scratch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.errors import T2IError
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


class BackboneImageEncoder(nn.Module):
    """A torchvision classification network with the user's local weights, its last linear
    layer replaced by a map to ``embedding_dim`` (Reed used a pretrained GoogLeNet). Images
    in [-1, 1] are resized to ``input_size`` and normalised as ImageNet training did."""

    def __init__(self, name: str, weights: str, *, embedding_dim: int, input_size: int = 224):
        super().__init__()
        try:
            import torchvision
        except Exception as exc:  # absent, or a build that does not match this torch
            raise T2IError(f"--image-backbone needs torchvision installed to match torch "
                           f"{torch.__version__} ({type(exc).__name__}: {exc})") from exc
        state = load_checkpoint(weights, kind=f"torchvision {name!r} state dict")
        try:
            network = torchvision.models.get_model(name, weights=None)
            network.load_state_dict(state)
        except (ValueError, RuntimeError) as exc:
            raise T2IError(f"{weights}: cannot load as torchvision {name!r}: {exc}") from exc
        last = [n for n, m in network.named_modules() if isinstance(m, nn.Linear)][-1]
        parent, _, child = last.rpartition(".")
        setattr(network.get_submodule(parent), child,
                nn.Linear(network.get_submodule(last).in_features, embedding_dim))
        self.network = network
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((images + 1) / 2, size=(self.input_size,) * 2, mode="bilinear",
                          align_corners=False)  # [B, 3, 224, 224]
        return self.network((x - self.mean) / self.std)  # [B, E]
