"""R-precision: does an image generated from a caption match that caption better than captions
of other classes? Each image is ranked against its caption and ``distractors`` captions drawn
from records of other classes (of other images in a dataset without classes), by the cosine
similarity of the DS-SJE image and text embeddings (``pretrain-text``: the encoders that learnt
which captions go with which images); the score is the share of images whose own caption ranks
first.

The embeddings are the project's own small DS-SJE encoders, not a published evaluator, so
scores compare runs judged by the same encoders, on the same data, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.data.dataset import Dataset
from t2i_fast.errors import DataError, T2IError
from t2i_fast.generate import TrainedModel
from t2i_fast.models import ImageEncoder, TextEncoder, preset
from t2i_fast.run import Run

_TEXT_BATCH = 1024  # captions per text-encoder call
_RANK_BATCH = 256  # images ranked at once: [256, 1 + distractors, E] similarities in memory
_TIE = 1e-6  # cosine similarities this close count as a tie


class Scorer(Protocol):
    """Embeds images and captions into one space; cosine similarity ranks them."""

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] → [N, E]."""

    def texts(self, indices: np.ndarray) -> torch.Tensor:
        """uint8 character indices [M, L] → [M, E]."""


class Encoders:
    """The image and text encoders of a ``pretrain-text`` checkpoint, in eval mode."""

    def __init__(self, path: str | Path, *, device: torch.device):
        path = Path(path)
        state = load_checkpoint(path)
        if "image_encoder" not in state or "preset" not in state:
            raise T2IError(f"{path}: holds no DS-SJE image encoder (not from 't2i-fast "
                           "pretrain-text', or from an older version): pretrain one with "
                           "'t2i-fast pretrain-text' and pass it with --encoders")
        try:
            models = preset(state["preset"])
        except (TypeError, ValueError) as exc:
            raise T2IError(f"{path}: {exc}") from exc
        self.device = device
        self.size = models.gan.image_size  # pretraining showed the image encoder this size
        self.text_encoder = TextEncoder(models.text)
        self.image_encoder = ImageEncoder(models.image)
        try:
            self.text_encoder.load_state_dict(state["text_encoder"])
            self.image_encoder.load_state_dict(state["image_encoder"])
        except RuntimeError as exc:
            raise T2IError(f"{path}: encoders do not fit preset {state['preset']!r} (a "
                           "torchvision --image-backbone cannot score retrieval)") from exc
        self.text_encoder.to(device).eval()
        self.image_encoder.to(device).eval()

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="area")
        return self.image_encoder(images)

    @torch.no_grad()
    def texts(self, indices: np.ndarray) -> torch.Tensor:
        return self.text_encoder(torch.from_numpy(indices).to(self.device))


def find_encoders(run: Run) -> Path:
    """The pretrain-text checkpoint a run trained with (``Run.pretrained_encoders``)."""
    found = run.pretrained_encoders()
    if found is not None:
        return found
    raise T2IError(f"{run.root}: no DS-SJE encoders (the run trained its text encoder from "
                   "scratch, or its pretrain-text checkpoint has moved): pass --encoders PATH")


@dataclass(frozen=True)
class Trials:
    """What is ranked: image i is generated from ``captions[i]``, and ranks the rows
    ``candidates[i]`` of ``indices``, its own caption first."""

    captions: list[str]  # [N]
    indices: np.ndarray  # uint8 [U, L]: every caption ranked, once each
    candidates: np.ndarray  # int64 [N, 1 + distractors]


def retrieval_trials(path: str | Path, *, n: int, distractors: int, seed: int) -> Trials:
    """``n`` random records (all where fewer), one random caption each, and for each
    ``distractors`` random captions of records of other classes, or of other records where all
    share one class (drawn with replacement where fewer records exist)."""
    rng = np.random.default_rng(seed)
    with Dataset(path) as ds:
        text: dict[int, tuple[list[str], np.ndarray]] = {}  # record → (captions, indices)

        def text_of(index: int) -> tuple[list[str], np.ndarray]:
            if index not in text:
                found = ds.record(index)
                text[index] = found.captions, found.char_indices
            return text[index]

        if len(ds) < 2:
            raise DataError(f"{path}: retrieval needs at least 2 records")
        classes = np.array([ds.record(i).class_id for i in range(len(ds))])
        # Without classes (every record of one, as COCO) the distractors are the captions of
        # any other image, as the loader's mismatched images are.
        others = {c: np.flatnonzero(classes != c) for c in np.unique(classes)}
        classless = len(others) < 2
        rows: dict[tuple[int, int], int] = {}  # (record, caption) → row of indices
        captions, candidates = [], []
        for i in rng.choice(len(ds), size=min(n, len(ds)), replace=False):
            pool = np.delete(np.arange(len(ds)), i) if classless else others[classes[i]]
            picks = [int(i), *rng.choice(pool, distractors, replace=len(pool) < distractors)]
            keys = [(int(j), int(rng.integers(len(text_of(j)[0])))) for j in picks]
            captions.append(text_of(keys[0][0])[0][keys[0][1]])
            candidates.append([rows.setdefault(key, len(rows)) for key in keys])
        indices = np.stack([text_of(j)[1][c] for j, c in rows])
    return Trials(captions, indices, np.array(candidates, dtype=np.int64))


def r_precision(*, images: torch.Tensor, texts: torch.Tensor, candidates: torch.Tensor) -> float:
    """Share of images [N, E] whose first candidate (column 0 of ``candidates`` [N, K], rows
    of ``texts`` [U, E]) has the highest cosine similarity; a tie at the top counts as the
    share of the tied candidates it is, what breaking ties at random scores on average."""
    images = F.normalize(images.float(), dim=1)
    texts = F.normalize(texts.float(), dim=1)
    total = 0.0
    for start in range(0, len(images), _RANK_BATCH):
        rows = candidates[start: start + _RANK_BATCH]
        scores = torch.einsum("ne,nke->nk", images[start: start + _RANK_BATCH],
                              texts[rows])  # [n, K]
        # Matrix kernels round one product differently by its position in a batch: equal
        # within _TIE is equal.
        top = scores >= scores.max(dim=1, keepdim=True).values - _TIE
        total += (top[:, 0].float() / top.sum(dim=1)).sum().item()
    return total / max(len(images), 1)


@torch.no_grad()
def evaluate_retrieval(*, model: TrainedModel, scorer: Scorer, dataset: str | Path,
                       n: int = 512, distractors: int = 99, seed: int = 0,
                       batch_size: int = 64) -> dict:
    """R-precision of ``model``'s images, one per trial (see ``retrieval_trials``), noise
    from ``seed``; with the chance level, 1 / (1 + distractors)."""
    if distractors < 1:
        raise T2IError(f"--distractors must be at least 1, got {distractors}")
    trials = retrieval_trials(dataset, n=n, distractors=distractors, seed=seed)
    images = []
    for start in range(0, len(trials.captions), batch_size):
        text = model.embed(trials.captions[start: start + batch_size])
        generated = model.generate(text, model.noise(len(text), seed + start))
        images.append(scorer.images(generated).cpu())
    texts = torch.cat([scorer.texts(trials.indices[start: start + _TEXT_BATCH]).cpu()
                       for start in range(0, len(trials.indices), _TEXT_BATCH)])
    score = r_precision(images=torch.cat(images), texts=texts,
                        candidates=torch.from_numpy(trials.candidates))
    return {"r_precision": score, "chance": 1 / (1 + distractors), "n": len(trials.captions),
            "distractors": distractors}
