"""GAN training (GAN, GAN-CLS, GAN-INT, GAN-INT-CLS) in plain PyTorch: the eager reference."""

from t2i_fast.train.config import VARIANTS, TrainConfig
from t2i_fast.train.loop import train

__all__ = ["VARIANTS", "TrainConfig", "train"]
