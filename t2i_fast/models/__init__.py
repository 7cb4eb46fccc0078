"""The plain-PyTorch networks of Reed et al. (ICML 2016): the reference implementation."""

from t2i_fast.models.config import (
    PRESETS,
    GANConfig,
    ImageEncoderConfig,
    ModelConfig,
    TextEncoderConfig,
    preset,
)
from t2i_fast.models.discriminator import Discriminator
from t2i_fast.models.generator import Generator
from t2i_fast.models.image_encoder import ImageEncoder
from t2i_fast.models.init import init_weights
from t2i_fast.models.text_encoder import TextEncoder

__all__ = [
    "PRESETS",
    "Discriminator",
    "GANConfig",
    "Generator",
    "ImageEncoder",
    "ImageEncoderConfig",
    "ModelConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "init_weights",
    "preset",
]
