"""Training the style encoder S of a finished run (Reed et al., ICML 2016, section 4.4):

    L_style = E_{t, z ~ N(0, I)} ||z - S(G(z, φ(t)))||²

with G the run's generator (its moving average where the run kept one), frozen in eval mode,
and t the dataset's captions, one at a time as ``sample`` feeds them. The loss is reported per
dimension of z, so an encoder that always predicts z's mean scores 1.

With ``real_weight`` w > 0, S also learns from the dataset's real images, as in-domain GAN
inversion does (Zhu et al., ECCV 2020):

    L = L_style + w · E_{(x, t) real} ||G(S(x), φ(t)) - x||²

(pixels in [-1, 1], φ(t) the mean of the record's sampled captions as the trainer feeds it,
G frozen: the gradient reaches S through G). The paper's S sees only G's images, and where
G's images differ from real ones (on the shapes dataset, their backgrounds) its vector for a
real image answers to what it never saw; reconstruction makes it the z whose image is
nearest to x, which is what style transfer draws from. Each step then puts a batch of G's
images and one of real images through S together, so its BatchNorm statistics are of both.

With ``domain_weight`` λ > 0, S is also trained domain-adversarially (Ganin & Lempitsky, ICML
2015): a critic C learns to tell S's features (the last 4×4 map) of real images from those
of G's, and S descends

    L = L_style + λ · E[BCE(C(f), the other domain)]

so that its features of the two kinds of image come to look alike. On the shapes dataset
G draws one kind of background texture where the real images have eight, and the paper's
S, which never saw them, answers to a real image's background more than to its shape's
place; aligned, S reads the real images' positions as it reads G's, and loses what told the
backgrounds apart (docs/results.md, "A domain-adversarial style encoder").

With ``mirror`` on (the default for a layered generator), G draws each image's background
mirrored left-right with probability ½, its z unchanged: the same background code, the
same shape at the same place. G draws each code's background as one fixed picture, and S
learns to tell them apart by where their blotches lie, which no real image shares; with
mirrored pictures S must read what a background keeps under mirroring, as the real
images' kinds of background do (docs/results.md, "A style encoder that sees G's
backgrounds mirrored, and the layered layout as the default").
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from t2i_fast.atomic import save_atomically
from t2i_fast.config import FieldError, check_types, resolve_device
from t2i_fast.data import Loader
from t2i_fast.errors import T2IError
from t2i_fast.generate import TrainedModel
from t2i_fast.models.domain_critic import DomainCritic
from t2i_fast.models.generator import Generator
from t2i_fast.models.style_encoder import StyleEncoder, StyleEncoderConfig
from t2i_fast.run import Run, jsonl_writer
from t2i_fast.train.caption_table import embed_all_captions, mean_embedding

RECALIBRATION_BATCHES = 16
# Whether G draws S's images with their backgrounds mirrored at random (auto: where G is
# layered, and draws its background apart from its shape).
MIRRORS = ("auto", "on", "off")


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
    real_weight: float = 0.0  # of reconstructing real images through G; 0: the paper's S
    domain_weight: float = 0.0  # of the domain-adversarial term; 0: the paper's S
    mirror: str = "auto"  # MIRRORS; off: the paper's S

    def __post_init__(self) -> None:
        check_types(self)
        if self.mirror not in MIRRORS:
            raise FieldError("mirror", f"must be one of {MIRRORS}, got {self.mirror!r}")
        for name in ("steps", "log_every"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be at least 1, got {getattr(self, name)}")
        # BatchNorm needs two images to have a batch statistic.
        if self.batch_size < 2:
            raise FieldError("batch_size", f"must be at least 2, got {self.batch_size}")
        if self.lr <= 0:
            raise FieldError("lr", f"must be positive, got {self.lr}")
        for name in ("real_weight", "domain_weight"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise FieldError(name, f"must be finite and at least 0, got "
                                 f"{getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise FieldError(name, f"must be in [0, 1), got {getattr(self, name)}")

    @property
    def uses_real_images(self) -> bool:
        """Whether S learns from the dataset's real images besides G's."""
        return bool(self.real_weight or self.domain_weight)


def style_loss(styles: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """L_style: the squared error of S's predictions ``styles`` [B, Z] of z [B, Z], averaged
    over the batch and z's dimensions."""
    return (styles - z).square().mean()


def reconstruction_loss(generator: torch.nn.Module, styles: torch.Tensor, text: torch.Tensor,
                        images: torch.Tensor) -> torch.Tensor:
    """The squared error of G(S(x), φ(t)) against the real images x, per pixel and channel."""
    return (generator(styles, text) - images).square().mean()


def resolve_mirror(mirror: str, generator: Generator) -> bool:
    """``StyleConfig.mirror`` for ``generator``: auto is on for the layered layout, which
    draws its background apart from its shape, and off for the single one, which does not;
    on for the single layout is a FieldError."""
    layered = generator.config.layout == "layered"
    if mirror == "on" and not layered:
        raise FieldError("mirror", "'on' needs a run whose generator is layered (it draws "
                         "its background apart from its shape); this run's is "
                         f"{generator.config.layout}")
    return layered and mirror != "off"


@contextmanager
def backgrounds_mirrored(generator: Generator, rows: torch.Tensor) -> Iterator[None]:
    """While inside, ``generator``'s background network (a layered G's) returns its pictures
    [B, 3, S, S] mirrored left-right in ``rows`` [B] (bool) and as they were elsewhere."""
    def mirror(module: torch.nn.Module, args: tuple, pictures: torch.Tensor) -> torch.Tensor:
        return torch.where(rows[:, None, None, None], pictures.flip(-1), pictures)

    handle = generator.background.register_forward_hook(mirror)
    try:
        yield
    finally:
        handle.remove()


def _domain_losses(critic: DomainCritic, optimizer: torch.optim.Optimizer,
                   features: torch.Tensor, *, fakes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of the critic on S's ``features`` [B, F] (the first ``fakes`` rows G's
    images, the rest real), then S's adversarial loss: the critic's cross entropy against
    the swapped domains, which S descends. Returns (the critic's loss before its update,
    S's loss)."""
    domain = torch.ones(len(features), device=features.device)
    domain[:fakes] = 0  # 1: real
    critic_loss = F.binary_cross_entropy_with_logits(critic(features.detach()), domain)
    optimizer.zero_grad(set_to_none=True)
    critic_loss.backward()
    optimizer.step()
    # S's loss reaches S only: the critic's weights take no gradient from it.
    critic.requires_grad_(False)
    try:
        fooled = F.binary_cross_entropy_with_logits(critic(features), 1 - domain)
    finally:
        critic.requires_grad_(True)
    return critic_loss.detach(), fooled


def _real_batches(loader: Loader, *, image_size: int, table: torch.Tensor,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (real images [B, 3, S, S] in [-1, 1], their φ(t) [B, E]) from ``loader``: the
    trainer's crops and flips, epoch after epoch, resized to G's resolution as the trainer
    does."""
    while True:
        for batch in loader:
            images = batch.images.to(device)
            if images.shape[-1] != image_size:
                images = F.adaptive_avg_pool2d(images, image_size)  # = interpolate "area"
            yield images, mean_embedding(table, batch.captions.to(table.device))


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


def train_style(*, config: StyleConfig, overwrite: bool = False) -> Path:
    """Trains S to invert the run's generator; writes RUN/style_encoder.pt (atomically) and the
    losses to RUN/style_metrics.jsonl ("loss", L_style; with ``real_weight``, also
    "reconstruction"; with ``domain_weight``, also "domain", the critic's loss, ln 2 = 0.693
    where it cannot tell the two kinds of image apart). Returns the encoder's path."""
    run = Run(config.run)
    device = resolve_device(config.device)
    model = TrainedModel.from_run(run, device=device)
    mirror = resolve_mirror(config.mirror, model.generator)
    if run.style_encoder.exists() and not overwrite:
        raise T2IError(f"{run.style_encoder}: a style encoder exists already (pass "
                       "--overwrite to train a new one)")
    run_config = run.config()
    data = Path(run_config.data)
    # Opened first: a dataset too small for a batch stops here, before any work.
    loader = Loader(data, batch_size=config.batch_size, seed=config.seed,
                    captions_per_sample=run_config.captions_per_sample, caption_format="ids",
                    dtype=torch.float32, layout="nchw") if config.uses_real_images else None
    try:
        return _train(config, run=run, model=model, data=data, loader=loader, device=device,
                      mirror=mirror)
    finally:
        if loader is not None:
            loader.close()


def _train(config: StyleConfig, *, run: Run, model: TrainedModel, data: Path,
           loader: Loader | None, device: torch.device, mirror: bool) -> Path:
    # The frozen text encoder embeds every caption once; G's draws and the real batches
    # gather from the table (2,000 steps of 64 draws embed more captions than the shapes
    # dataset's 100,000 or CUB's 118,000).
    table = embed_all_captions(dataset_path=data, text_encoder=model.text_encoder,
                               device=device, dtype=torch.float32)  # [M, E]
    real = None
    if loader is not None:
        model.generator.requires_grad_(False)
        real = _real_batches(loader, image_size=model.generator.config.image_size,
                             table=table, device=device)

    torch.manual_seed(config.seed)
    encoder_config = StyleEncoderConfig.from_gan(model.generator.config)
    encoder = StyleEncoder(encoder_config).to(device)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=config.lr,
                                 betas=(config.beta1, config.beta2))
    draws = torch.Generator().manual_seed(config.seed)
    critic = critic_optimizer = None
    if config.domain_weight:
        critic = DomainCritic(encoder.feature_width).to(device)
        critic_optimizer = torch.optim.Adam(critic.parameters(), lr=config.lr,
                                            betas=(config.beta1, config.beta2))

    @torch.no_grad()
    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(len(table), (config.batch_size,), generator=draws)
        z = torch.randn(config.batch_size, model.z_dim, generator=draws).to(device)  # [B, Z]
        text = table[pick.to(device)]
        if not mirror:
            return model.generate(text, z), z  # [B, 3, S, S], [B, Z]
        rows = (torch.rand(config.batch_size, generator=draws) < 0.5).to(device)
        with backgrounds_mirrored(model.generator, rows):
            return model.generate(text, z), z

    def step() -> dict[str, torch.Tensor]:
        """One update; returns its losses: "loss" (L_style) and, with real images, those of
        their terms."""
        images, z = draw()
        if real is not None:
            real_images, text = next(real)
            images = torch.cat([images, real_images])  # G's, then real
        features, styles = encoder.encode(images)
        losses = {"loss": style_loss(styles[:len(z)], z)}
        total = losses["loss"]
        if config.real_weight:
            losses["reconstruction"] = reconstruction_loss(
                model.generator, styles[len(z):], text, real_images)
            total = total + config.real_weight * losses["reconstruction"]
        if critic is not None:
            losses["domain"], fooled = _domain_losses(critic, critic_optimizer, features,
                                                      fakes=len(z))
            total = total + config.domain_weight * fooled
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return {name: value.detach() for name, value in losses.items()}

    def recalibration_batch() -> torch.Tensor:
        images = draw()[0]
        return images if real is None else torch.cat([images, next(real)[0]])

    bar = click.progressbar(length=config.steps, label="training the style encoder",
                            file=sys.stderr)
    sums, count = {}, 0
    with bar, jsonl_writer(run.style_metrics, append=False) as metrics:
        for done in range(1, config.steps + 1):
            for name, value in step().items():
                sums[name] = sums.get(name, 0) + value
            count += 1
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                metrics.write({"step": done, **{name: round(total.item() / count, 5)
                                                for name, total in sums.items()}})
                sums, count = {}, 0
    _recalibrate(encoder, [recalibration_batch() for _ in range(RECALIBRATION_BATCHES)])
    return save_atomically({"style_encoder": encoder.state_dict(),
                            "style_config": dataclasses.asdict(encoder_config),
                            "config": dataclasses.asdict(dataclasses.replace(
                                config, mirror="on" if mirror else "off")),
                            "generator_step": model.step},
                           run.style_encoder)
