"""Training the style encoder S of a finished run (Reed et al., ICML 2016, section 4.4):

    L_style = E_{t, z ~ N(0, I)} ||z - S(G(z, φ(t)))||²

with G the run's generator (its moving average where the run kept one), frozen in eval mode,
and t the dataset's captions, one at a time as ``sample`` feeds them. The loss is reported per
dimension of z, so an encoder that always predicts z's mean scores 1.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from t2i_fast.atomic import save_atomically
from t2i_fast.config import FieldError, check_types, resolve_device
from t2i_fast.data import Dataset
from t2i_fast.errors import T2IError
from t2i_fast.generate import TrainedModel
from t2i_fast.models.style_encoder import StyleEncoder, StyleEncoderConfig
from t2i_fast.run import Run, jsonl_writer

RECALIBRATION_BATCHES = 16


@dataclass(frozen=True)
class StyleConfig:
    run: str
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    seed: int = 0
    log_every: int = 20  # steps
    device: str = "auto"

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("steps", "log_every"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be at least 1, got {getattr(self, name)}")
        # BatchNorm needs two images to have a batch statistic.
        if self.batch_size < 2:
            raise FieldError("batch_size", f"must be at least 2, got {self.batch_size}")
        if self.lr <= 0:
            raise FieldError("lr", f"must be positive, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise FieldError(name, f"must be in [0, 1), got {getattr(self, name)}")


def style_loss(encoder: StyleEncoder, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The squared error of S's prediction of z, averaged over the batch and z's dimensions."""
    return (encoder(images) - z).square().mean()


@torch.no_grad()
def _recalibrate(encoder: StyleEncoder, batches: list[torch.Tensor]) -> None:
    """Re-estimates the BatchNorm statistics for the final weights, as equal-weight means over
    ``batches``: the running averages lag behind weights that moved while they accumulated, and
    eval mode would then normalise with statistics of an older network."""
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    encoder.train()
    for images in batches:
        encoder(images)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    encoder.eval()


def _caption_indices(data: Path) -> torch.Tensor:
    """Every caption of the dataset as character indices, uint8 [M, L]: the text is encoded
    batch by batch, which keeps memory at a few bytes a character for any dataset size."""
    with Dataset(data) as ds:
        return torch.cat([torch.from_numpy(ds.record(i).char_indices) for i in range(len(ds))])


def train_style(*, config: StyleConfig, overwrite: bool = False) -> Path:
    """Trains S to invert the run's generator; writes RUN/style_encoder.pt (atomically) and the
    loss to RUN/style_metrics.jsonl. Returns the encoder's path."""
    run = Run(config.run)
    device = resolve_device(config.device)
    model = TrainedModel.from_run(run, device=device)
    if run.style_encoder.exists() and not overwrite:
        raise T2IError(f"{run.style_encoder}: a style encoder exists already (pass "
                       "--overwrite to train a new one)")
    captions = _caption_indices(Path(run.config().data))

    torch.manual_seed(config.seed)
    encoder_config = StyleEncoderConfig.from_gan(model.generator.config)
    encoder = StyleEncoder(encoder_config).to(device)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=config.lr,
                                 betas=(config.beta1, config.beta2))
    draws = torch.Generator().manual_seed(config.seed)

    @torch.no_grad()
    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(len(captions), (config.batch_size,), generator=draws)
        z = torch.randn(config.batch_size, model.z_dim, generator=draws)  # [B, Z]
        text = model.text_encoder(captions[pick].to(device))  # [B, E]
        return model.generate(text, z), z.to(device)  # [B, 3, S, S], [B, Z]

    bar = click.progressbar(length=config.steps, label="training the style encoder",
                            file=sys.stderr)
    total, count = torch.zeros((), device=device), 0
    with bar, jsonl_writer(run.style_metrics, append=False) as metrics:
        for done in range(1, config.steps + 1):
            images, z = draw()
            loss = style_loss(encoder, images, z)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            count += 1
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                row = {"step": done, "loss": round(total.item() / count, 5)}
                metrics.write(row)
                total, count = torch.zeros((), device=device), 0
    _recalibrate(encoder, [draw()[0] for _ in range(RECALIBRATION_BATCHES)])
    return save_atomically({"style_encoder": encoder.state_dict(),
                            "style_config": dataclasses.asdict(encoder_config),
                            "config": dataclasses.asdict(config), "generator_step": model.step},
                           run.style_encoder)
