"""Every caption's embedding, computed once: with a frozen text encoder the step gathers the
loader's caption ids (``Loader(caption_format="ids")``) from this table instead of running
the encoder on one-hot characters each step."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from t2i_fast.data.dataset import Dataset
from t2i_fast.errors import ConfigError

# Datasets with at least this many captions (by their metadata) show a progress bar: a
# 2-core CPU embeds about 100 captions/s with Reed's encoder (cub_mini's 3,760 in 32-40 s).
PROGRESS_FROM_CAPTIONS = 2_000


def embed_all_captions(*, dataset_path: str | Path, text_encoder: nn.Module,
                       device: str | torch.device | None = None,
                       dtype: torch.dtype | None = None, batch_size: int = 256,
                       show_progress: bool | None = None) -> torch.Tensor:
    """The embedding of every caption of the dataset, [n_captions, E] on ``device`` (default:
    the encoder's), row i for global caption id i: records in key order, each record's
    captions in stored order, as the loader numbers them.

    Each caption is encoded on its own (the encoder has no layer that mixes a batch's
    captions) in eval mode under no_grad, at the encoder's own precision, and stored as
    ``dtype`` (default: bfloat16 on CUDA, float32 elsewhere); the encoder's mode is restored
    afterwards. ``batch_size`` captions go through the encoder at once (their activations
    take about 1 MiB each in float32). ``show_progress`` (default: for datasets of
    PROGRESS_FROM_CAPTIONS captions or more) draws a bar on stderr.
    A bad dataset raises DataError (CorruptRecordError for a bad record) naming the file and
    the record, as ``Dataset`` does."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    run_on = next(text_encoder.parameters()).device
    device = run_on if device is None else torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    chunks: list[torch.Tensor] = []  # [<= batch_size, E] each, on device
    pending: list[np.ndarray] = []  # uint8 [n, L] per record, not yet encoded
    waiting = 0

    def encode() -> None:
        nonlocal waiting
        chars = torch.from_numpy(np.concatenate(pending)).to(run_on)  # [N, L]
        chunks.append(text_encoder(chars).to(device=device, dtype=dtype))
        pending.clear()
        waiting = 0

    was_training = text_encoder.training
    text_encoder.eval()
    try:
        with Dataset(dataset_path) as dataset, torch.no_grad():
            estimate = len(dataset) * dataset.meta["captions_per_image"]
            if show_progress is None:
                show_progress = estimate >= PROGRESS_FROM_CAPTIONS
            bar = (click.progressbar(length=len(dataset), label="embedding captions",
                                     file=sys.stderr) if show_progress else None)
            with bar or contextlib.nullcontext():
                for i in range(len(dataset)):
                    chars = dataset.record(i).char_indices
                    pending.append(chars)
                    waiting += len(chars)
                    if waiting >= batch_size:
                        encode()
                    if bar is not None:
                        bar.update(1)
                if pending:
                    encode()
    finally:
        text_encoder.train(was_training)
    return torch.cat(chunks)


def mean_embedding(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """φ(t) of the loader's batch: the mean of each sample's k caption embeddings [B, E] in
    float32, from the table [n_captions, E] (any dtype) and global caption ids [B, k] on its
    device. No host synchronisation (a CUDA graph can hold it); ids are the loader's, so in
    range."""
    if table.dim() != 2 or ids.dim() != 2:
        raise ValueError(f"mean_embedding needs a table [n_captions, E] and ids [B, k], got "
                         f"{tuple(table.shape)} and {tuple(ids.shape)}")
    return F.embedding(ids, table).mean(dim=1, dtype=torch.float32)  # [B, k, E] → [B, E]

