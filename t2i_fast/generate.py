"""Images from a trained run: its generator and text encoder, loaded for sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.config import resolve_device
from t2i_fast.data import Dataset
from t2i_fast.data.alphabet import encode
from t2i_fast.data.format import record_key
from t2i_fast.errors import T2IError
from t2i_fast.models import Generator, TextEncoder
from t2i_fast.models.config import checkpoint_models
from t2i_fast.pictures import image_grid, to_uint8
from t2i_fast.prepare.captions import read_class_list
from t2i_fast.run import Run

# What sampling reads from a training checkpoint.
CHECKPOINT_KEYS = ("step", "preset", "G", "text_encoder")


class TrainedModel:
    """``embed`` captions, ``generate`` images [N, 3, S, S] in [-1, 1]; eval mode. Captions
    are encoded at ``doc_length`` characters, the length the text encoder learnt on."""

    def __init__(self, checkpoint: dict, *, device: torch.device, doc_length: int):
        models = checkpoint_models(checkpoint)
        self.device = device
        self.doc_length = doc_length
        self.step = checkpoint["step"]
        self.z_dim = models.gan.z_dim
        self.generator = Generator(models.gan).to(device).eval()
        # The moving average of G's weights where the run kept one: it samples more steadily.
        self.generator.load_state_dict(checkpoint.get("G_ema") or checkpoint["G"])
        self.text_encoder = TextEncoder(models.text).to(device).eval()
        self.text_encoder.load_state_dict(checkpoint["text_encoder"])

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | None = None) -> TrainedModel:
        """A run folder (its latest checkpoint) or a checkpoint file."""
        return cls.from_run(Run.at(path), device=device)

    @classmethod
    def from_run(cls, run: Run, *, device: torch.device | None = None) -> TrainedModel:
        """The run's checkpoint (the one it was opened at, else its newest)."""
        checkpoint = run.checkpoint()
        state = load_checkpoint(checkpoint, keys=CHECKPOINT_KEYS, kind="training checkpoint")
        doc_length = caption_length(state, checkpoint)
        device = device or resolve_device("auto")
        try:
            return cls(state, device=device, doc_length=doc_length)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            # A file that is a dict with the right keys may still hold the wrong networks.
            reason = str(exc).strip().splitlines()[:1]
            raise T2IError(f"{checkpoint}: cannot load its networks ({type(exc).__name__}"
                           + (f": {reason[0]}" if reason else "") + ")") from exc

    @torch.no_grad()
    def embed(self, captions: list[str]) -> torch.Tensor:
        indices = torch.stack([torch.from_numpy(encode(c, self.doc_length)) for c in captions])
        return self.text_encoder(indices.to(self.device))  # [N, E]

    @torch.no_grad()
    def generate(self, text: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z.to(self.device), text.to(self.device))

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """Noise that depends on the seed only, not on the device."""
        return torch.randn(n, self.z_dim, generator=torch.Generator().manual_seed(seed))

    def draw(self, captions: list[str], seed: int) -> np.ndarray:
        """One image of each caption, noise ``self.noise(len(captions), seed)``: uint8
        [N, S, S, 3], as the evaluations read pictures."""
        return to_uint8(self.generate(self.embed(captions), self.noise(len(captions), seed)))


@dataclass(frozen=True)
class DatasetCaption:
    """A caption of a dataset's record, with what names the record."""

    key: str  # the record's LMDB key
    name: str  # where its image came from
    class_name: str
    caption_index: int  # among the record's captions
    caption: str  # as written: TrainedModel.embed encodes it at the run's caption length


def dataset_captions(path: str | Path, *, per_image: int, classes: Path | None = None,
                     limit: int | None = None) -> list[DatasetCaption]:
    """The first ``per_image`` captions (all, where a record has fewer) of every record of the
    dataset at ``path``, in record order; with ``classes``, a file of class names one a line
    (CUB's testclasses.txt, say), only records of those classes; with ``limit``, only the
    first ``limit`` records chosen."""
    found = []
    with Dataset(path) as ds:
        wanted = None if classes is None else set(read_class_list(classes, set(ds.classes)))
        for index in range(len(ds)):
            if limit is not None and len(found) == limit:
                break
            record = ds.record(index)
            class_name = ds.classes[record.class_id]
            if wanted is None or class_name in wanted:
                found.append((index, record.name, class_name, record.captions[:per_image]))
    if not found:
        raise T2IError(f"{path}: no records of the classes in {classes}")
    return [DatasetCaption(key=record_key(index).decode(), name=name, class_name=class_name,
                           caption_index=c, caption=text)
            for index, name, class_name, texts in found for c, text in enumerate(texts)]


def interpolation_grid(model: TrainedModel, texts: list[str], *, steps: int = 8, rows: int = 4,
                       seed: int = 0) -> Image.Image:
    """The paper's interpolations as a grid of ``rows`` x ``steps`` images. Two captions:
    fixed noise per row, the text embedding walked from the first caption to the second. One
    caption: the noise walked between two draws per row."""
    if len(texts) not in (1, 2):
        raise T2IError("--text takes one caption (noise interpolation) or two (sentence)")
    alphas = torch.linspace(0, 1, steps)[:, None]  # [steps, 1]
    if len(texts) == 2:
        a, b = model.embed(list(texts)).cpu()
        text = ((1 - alphas) * a + alphas * b).repeat(rows, 1)  # [rows * steps, E]
        z = model.noise(rows, seed).repeat_interleave(steps, 0)
        labels = [f"noise {r}" for r in range(rows)]
        title = f"sentence interpolation: {texts[0]}  ->  {texts[1]}"
    else:
        text = model.embed(list(texts)).cpu().repeat(rows * steps, 1)
        ends = model.noise(2 * rows, seed).view(rows, 2, -1)  # [rows, 2, Z]
        z = torch.cat([(1 - alphas) * e[0] + alphas * e[1] for e in ends])
        labels = [f"noise pair {r}" for r in range(rows)]
        title = f"noise interpolation: {texts[0]}"
    images = model.generate(text, z).cpu()
    return image_grid(images, rows=rows, row_labels=labels, title=title)


def caption_length(state: dict, checkpoint: Path) -> int:
    """The caption length (the dataset's ``--doc-length``) a training checkpoint's text
    encoder learnt on: what it records, or for a checkpoint from before it recorded one, what
    the dataset of the run holding it says."""
    length = state.get("doc_length")
    if length is None:
        try:
            with Dataset(Run.at(checkpoint).config().data) as ds:
                length = ds.meta["doc_length"]
        except T2IError as exc:
            raise T2IError(f"{checkpoint}: records no caption length, and the dataset of its "
                           f"run cannot tell ({exc})") from exc
    if type(length) is not int or length < 1:
        raise T2IError(f"{checkpoint}: caption length {length!r} is not a positive integer")
    return length
