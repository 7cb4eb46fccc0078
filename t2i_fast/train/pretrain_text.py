"""Pretraining the text encoder with the deep symmetric structured joint embedding (DS-SJE,
Reed et al., CVPR 2016): an image encoder and the char-CNN-RNN learn a space where an image
scores higher with its own class's captions than with any other class's, in both directions.
Zero-shot accuracy and retrieval precision are measured on classes never trained on."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from t2i_fast.atomic import save_atomically, write_text_atomically
from t2i_fast.config import MATCHES, FieldError, check_types, resolve_device, resolve_preset
from t2i_fast.data import Dataset, Loader
from t2i_fast.data.loader import default_size
from t2i_fast.errors import T2IError
from t2i_fast.losses import sje_loss
from t2i_fast.models import PRESETS, ImageEncoder, TextEncoder, preset
from t2i_fast.models.image_encoder import BackboneImageEncoder
from t2i_fast.run import TextEncoderFolder, jsonl_writer
from t2i_fast.train.tensorboard import EventLog, require_tensorboard


@dataclass(frozen=True)
class PretrainConfig:
    data: str
    out: str
    preset: str = "auto"  # resolved when made: reed on a GPU, small on the CPU
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    holdout_share: float = 0.25  # of the classes, held out for zero-shot evaluation
    match: str = "class"  # or "instance" (t2i_fast.config.MATCHES says what each does)
    eval_data: str | None = None  # a class-disjoint split (CUB's test) instead of holding out
    seed: int = 0
    device: str = "auto"
    image_backbone: str | None = None  # a torchvision network name, with backbone_weights
    backbone_weights: str | None = None
    tensorboard: bool = False  # each epoch's metrics as TensorBoard events too, in OUT/tensorboard/

    def __post_init__(self) -> None:
        check_types(self)
        object.__setattr__(self, "preset", resolve_preset(self.preset, self.device))
        if self.preset not in PRESETS:
            raise FieldError("preset", f"must be one of {tuple(sorted(PRESETS))}, got "
                                       f"{self.preset!r}")
        if self.lr <= 0:
            raise FieldError("lr", f"must be positive, got {self.lr}")
        if (self.image_backbone is None) != (self.backbone_weights is None):
            raise FieldError("image_backbone", "and backbone_weights go together",
                             related=("backbone_weights",))
        if self.match not in MATCHES:
            raise FieldError("match", f"must be one of {MATCHES}, got {self.match!r}")
        if not 0 <= self.holdout_share < 1:
            raise FieldError("holdout_share", f"must be in [0, 1), got {self.holdout_share}")
        if self.epochs < 1:
            raise FieldError("epochs", f"must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise FieldError("batch_size", f"must be at least 2, got {self.batch_size}")


def zero_shot_classes(count: int, share: float, seed: int) -> np.ndarray:
    """The class ids held out of pretraining to measure zero-shot accuracy on: a fixed random
    ``share`` of ``count`` classes (at least two when any are held out)."""
    n = round(count * share)
    if share > 0:
        n = min(max(n, 2), count - 2)
    return np.sort(np.random.default_rng(seed).permutation(count)[:n])


def _prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="area") if images.shape[-1] != size \
        else images


def class_averaged(text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row replaced by the mean of the rows of its class in the batch."""
    same = (labels[:, None] == labels[None, :]).to(text.dtype)  # [B, B]
    return same @ text / same.sum(1, keepdim=True)


@torch.no_grad()
def zero_shot(image_encoder: torch.nn.Module, text_encoder: TextEncoder, dataset: Path,
              classes: np.ndarray, *, size: int, device: torch.device) -> dict:
    """Top-1 zero-shot classification among ``classes`` (prototype = mean embedding of the
    class's captions) and retrieval precision@50 (images ranked for each class's prototype)."""
    image_encoder.eval()
    text_encoder.eval()
    images, labels, texts = [], [], {int(c): [] for c in classes}
    with Dataset(dataset) as ds:
        crop = default_size(min(ds.meta["image_size"]))
        for i in range(len(ds)):
            sample = ds[i]
            if sample.class_id not in texts:
                continue
            h, w, _ = sample.image.shape
            y, x = (h - crop) // 2, (w - crop) // 2
            pixels = torch.from_numpy(sample.image[y: y + crop, x: x + crop].copy())
            images.append(pixels.permute(2, 0, 1).float() / 127.5 - 1)
            labels.append(sample.class_id)
            texts[sample.class_id].append(torch.from_numpy(sample.char_indices))
    classes = np.array([c for c in classes if texts[int(c)]])  # classes with images
    if len(classes) < 2:
        raise T2IError(f"{dataset}: zero-shot evaluation needs images of at least 2 classes "
                       "(a dataset without classes, such as COCO, has none to tell apart)")
    image_emb = torch.cat([
        image_encoder(_prepare(torch.stack(images[i: i + 256]).to(device), size))
        for i in range(0, len(images), 256)])  # [N, E]
    captions = torch.cat([t for c in classes for t in texts[int(c)]])  # [M, L]
    owner = torch.cat([torch.full((len(t),), k) for k, c in enumerate(classes)
                       for t in texts[int(c)]]).to(device)  # [M]: row k of the prototypes
    text_emb = torch.cat([text_encoder(captions[i: i + 1024].to(device))
                          for i in range(0, len(captions), 1024)])  # [M, E]
    prototypes = torch.zeros(len(classes), text_emb.shape[1], device=device)
    prototypes.index_add_(0, owner, text_emb)
    prototypes /= torch.bincount(owner, minlength=len(classes))[:, None]  # [C, E]: means
    labels_t = torch.tensor(labels, device=device)
    scores = image_emb @ prototypes.T  # [N, C]
    predicted = torch.as_tensor(classes, device=device)[scores.argmax(1)]
    accuracy = (predicted == labels_t).float().mean().item()
    precisions = []
    for k, c in enumerate(classes):
        top = scores[:, k].argsort(descending=True)[:50]
        precisions.append((labels_t[top] == int(c)).float().mean().item())
    image_encoder.train()
    text_encoder.train()
    return {"zero_shot_top1": accuracy, "retrieval_p50": float(np.mean(precisions)),
            "classes": len(classes), "images": len(images)}


def pretrain_text(*, config: PretrainConfig) -> Path:
    """Trains the encoders; writes OUT/config.json, OUT/metrics.jsonl (with ``tensorboard``,
    OUT/tensorboard/ too), OUT/evaluation.json and, last, OUT/text_encoder.pt (what
    ``train --text-encoder`` loads). Returns the checkpoint."""
    out = TextEncoderFolder(config.out)
    if out.root.exists():
        raise T2IError(f"{out.root}: already exists; choose another --out")
    if config.tensorboard:
        require_tensorboard()
    device = resolve_device(config.device)
    models = preset(config.preset)
    loader = Loader(config.data, batch_size=config.batch_size, seed=config.seed,
                    captions_per_sample=1, dtype=torch.float32)
    n_classes = len(loader.meta["classes"])
    # With instance matching, and always for a dataset without classes (one class for every
    # image, as COCO; docs/format.md), each image is its own class: it is matched with its own
    # captions against the other images' in the batch. Classes are held out only where there
    # are some.
    instances = n_classes == 1 or config.match == "instance"
    holdout = np.array([], dtype=np.int64) if config.eval_data or n_classes == 1 else \
        zero_shot_classes(n_classes, config.holdout_share, config.seed)
    train_mask = torch.ones(n_classes, dtype=torch.bool)
    train_mask[torch.from_numpy(holdout)] = False
    torch.manual_seed(config.seed)
    text_encoder = TextEncoder(models.text).to(device)
    if config.image_backbone:
        image_encoder = BackboneImageEncoder(config.image_backbone, config.backbone_weights,
                                             embedding_dim=models.text.embedding_dim)
    else:
        image_encoder = ImageEncoder(models.image)
    image_encoder = image_encoder.to(device)
    optimizer = torch.optim.Adam([*text_encoder.parameters(), *image_encoder.parameters()],
                                 lr=config.lr)
    size = models.gan.image_size
    out.root.mkdir(parents=True)
    write_text_atomically(out.config, json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    bar = click.progressbar(length=config.epochs * len(loader), label="pretraining text",
                            file=sys.stderr)
    events = EventLog(out.tensorboard) if config.tensorboard else contextlib.nullcontext()
    with events, bar, jsonl_writer(out.metrics, append=False) as log:
        for epoch in range(config.epochs):
            losses, start = [], time.perf_counter()
            for batch in loader:
                keep = train_mask[batch.class_ids]
                if keep.sum() < 2:
                    bar.update(1)
                    continue
                images = _prepare(batch.images[keep].to(device), size)
                labels = (batch.indices if instances else batch.class_ids)[keep].to(device)
                text = text_encoder(batch.captions[keep].to(device))[:, 0]  # [B, E]
                loss = sje_loss(image_encoder(images), class_averaged(text, labels), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
                bar.update(1)
            row = {"epoch": epoch, "loss": torch.stack(losses).mean().item(),
                   "seconds": round(time.perf_counter() - start, 2)}
            log.write(row)
            if config.tensorboard:
                events.scalars(row, step_key="epoch")
    evaluation_data = Path(config.eval_data or config.data)
    if config.eval_data:
        with Dataset(evaluation_data) as ds:
            classes = np.arange(len(ds.classes))
    elif len(holdout):
        classes = holdout
    else:  # nothing held out: the scores are on the training classes, and say so
        classes = np.arange(n_classes)
    try:
        evaluation = zero_shot(image_encoder, text_encoder, evaluation_data, classes,
                               size=size, device=device)
    except T2IError as exc:  # too few held-out classes to rank: say so, keep the encoder
        evaluation = {"skipped": str(exc)}
    evaluation["classes_seen_in_training"] = not config.eval_data and not len(holdout)
    write_text_atomically(out.evaluation, json.dumps(evaluation, indent=2) + "\n")
    # Written last and whole: its presence means the pretraining finished.
    return save_atomically({"text_encoder": text_encoder.state_dict(),
                            "text_config": dataclasses.asdict(models.text),
                            "image_encoder": image_encoder.state_dict(),
                            "image_config": dataclasses.asdict(models.image),
                            "preset": config.preset, "held_out_classes": holdout.tolist(),
                            "evaluation": evaluation}, out.encoder)
