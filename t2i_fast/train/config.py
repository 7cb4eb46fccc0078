"""The resolved training configuration, written as JSON into every run directory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from t2i_fast.atomic import write_text_atomically
from t2i_fast.errors import T2IError
from t2i_fast.models import PRESETS

VARIANTS = ("gan", "cls", "int", "int-cls")
BACKENDS = ("auto", "eager", "compiled")
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` is the compiled engine on a GPU and the eager reference on the CPU, where
    Inductor's compile time outweighs what it saves on short runs."""
    if name == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return name


def resolve_precision(name: str, backend: str, device: torch.device) -> str:
    """``auto`` is bfloat16 autocast for the compiled engine on a GPU, float32 otherwise."""
    if name == "auto":
        return "bf16" if backend == "compiled" and device.type == "cuda" else "fp32"
    return name


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
    backend: str = "auto"  # eager, compiled, or auto (compiled on a GPU)
    precision: str = "auto"  # fp32, bf16, or auto (bf16 for compiled on a GPU)
    sync_bn: bool = False  # under torchrun: BatchNorm over the global batch, not each GPU's

    def __post_init__(self) -> None:
        if not 0 <= self.ema_decay < 1:
            raise T2IError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.variant not in VARIANTS:
            raise T2IError(f"--variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.preset not in PRESETS:
            raise T2IError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.backend not in BACKENDS:
            raise T2IError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise T2IError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
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
        """Whole or not at all: a kill leaves the previous config.json, never part of one."""
        write_text_atomically(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

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
