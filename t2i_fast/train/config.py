"""The resolved training configuration, written as JSON into every run directory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from t2i_fast.errors import T2IError
from t2i_fast.models import PRESETS

VARIANTS = ("gan", "cls", "int", "int-cls")


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class TrainConfig:
    data: str
    run: str
    preset: str = "small"
    variant: str = "int-cls"
    batch_size: int = 64
    epochs: int = 600
    max_steps: int | None = None  # stop early (smoke runs, benchmarks)
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lr_halve_every: int = 100  # epochs
    captions_per_sample: int = 4  # k caption embeddings averaged per image
    interp_beta: float = 0.5
    interp_weight: float = 1.0
    ema_decay: float = 0.999  # samples come from this moving average of G's weights; 0: off
    text_encoder: str | None = None  # a pretrain-text checkpoint; None pretrains one first
    train_text_encoder: bool = False  # update it with D (from scratch without text_encoder)
    pretrain_epochs: int = 2
    seed: int = 0
    sample_every: int = 200  # steps
    checkpoint_every: int = 500  # steps
    keep_checkpoints: int = 3
    log_every: int = 20  # steps
    device: str = "auto"
    loader_threads: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.ema_decay < 1:
            raise T2IError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.variant not in VARIANTS:
            raise T2IError(f"--variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.preset not in PRESETS:
            raise T2IError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("batch_size", "epochs", "lr_halve_every", "captions_per_sample",
                     "pretrain_epochs",
                     "sample_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise T2IError(f"--{name.replace('_', '-')} must be at least 1")

    @property
    def matching_aware(self) -> bool:
        return self.variant in ("cls", "int-cls")

    @property
    def interpolate(self) -> bool:
        return self.variant in ("int", "int-cls")

    @property
    def joint_text_encoder(self) -> bool:
        return self.train_text_encoder or self.text_encoder is None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise T2IError(f"{path}: cannot read the run's configuration: {exc}") from exc
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise T2IError(f"{path}: unknown settings {unknown} (made by another version?)")
        return cls(**values)
