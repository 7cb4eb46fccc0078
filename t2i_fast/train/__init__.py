"""GAN training (GAN, GAN-CLS, GAN-INT, GAN-INT-CLS): the loop, and its steps run eagerly or
compiled (`engine`)."""

from t2i_fast.config import VARIANTS, TrainConfig
from t2i_fast.train.loop import train

__all__ = ["VARIANTS", "TrainConfig", "train"]
