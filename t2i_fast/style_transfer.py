"""Style transfer (Reed et al., ICML 2016, section 5.3): the style encoder reads a query
image's style, ŝ = S(x), and the generator draws each caption in it, G(ŝ, φ(t)); and a run's
style encoder, loaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.errors import T2IError
from t2i_fast.generate import TrainedModel
from t2i_fast.models.style_encoder import StyleEncoder, StyleEncoderConfig
from t2i_fast.prepare.files import MAX_IMAGE_BYTES, open_regular
from t2i_fast.run import Run


def load_image(path: Path, *, size: int) -> torch.Tensor:
    """Any image Pillow reads as the networks see images: RGB, the largest centred square,
    resized to ``size`` pixels, in [-1, 1]; [3, size, size]."""
    file = open_regular(path, limit=MAX_IMAGE_BYTES, what="query image")
    try:
        with file, Image.open(file) as image:
            image = image.convert("RGB")
    except Exception as exc:  # Pillow raises many types for a missing or damaged file
        raise T2IError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") \
            from exc
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image).copy())  # [size, size, 3] uint8
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


@torch.no_grad()
def style_transfer(*, model: TrainedModel, encoder: StyleEncoder, images: torch.Tensor,
                   text: torch.Tensor) -> torch.Tensor:
    """Query images [R, 3, S, S] and caption embeddings [C, E] → a grid's tiles row by row,
    [R · (C + 1), 3, S, S]: each query image, then each caption in that image's style."""
    style = encoder(images.to(model.device))  # [R, Z]
    rows, columns = len(images), len(text)
    drawn = model.generate(text.repeat(rows, 1),  # [R · C, E]
                           style.repeat_interleave(columns, 0))  # [R · C, 3, S, S]
    drawn = drawn.view(rows, columns, *drawn.shape[1:])  # [R, C, 3, S, S]
    return torch.cat([images.to(drawn.device)[:, None], drawn], dim=1).flatten(0, 1)


class StyleEncoderFile(NamedTuple):
    """A run's style encoder as ``load_style_encoder`` reads it from one file."""

    encoder: StyleEncoder  # in eval mode
    generator_step: int  # the step of the generator it inverts
    # train-style's {"steps", "real_weight", "domain_weight", "mirror"} as the file records
    # them (a weight 0 and mirror "off", the paper's S, for encoders from before that option;
    # None where forged); {} for a file that records no training settings
    training: dict


def load_style_encoder(run: Run, *, device: torch.device) -> StyleEncoderFile:
    """The run's style encoder ('t2i-fast train-style'), the generator step it inverts and
    how it was trained."""
    path = run.style_encoder
    if not path.is_file():
        raise T2IError(f"{run.root}: no style encoder (run 't2i-fast train-style --run "
                       f"{run.root}' first)")
    state = load_checkpoint(path, keys=("style_encoder", "style_config", "generator_step"),
                            kind="style encoder")
    run_config = run.config()
    expected = StyleEncoderConfig.from_gan(run_config.models().gan)
    if state["style_config"] != dataclasses.asdict(expected):
        raise T2IError(f"{path}: made for another architecture than the run's generator "
                       f"(preset {run_config.preset!r}, z of {run_config.g_z_dim}; retrain "
                       "it with --overwrite)")
    encoder = StyleEncoder(expected).to(device).eval()
    try:
        encoder.load_state_dict(state["style_encoder"])
    except (TypeError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[:1]
        raise T2IError(f"{path}: cannot load the style encoder ({type(exc).__name__}"
                       + (f": {reason[0]}" if reason else "") + ")") from exc
    return StyleEncoderFile(encoder, state["generator_step"], _training(state.get("config")))


def _training(config: object) -> dict:
    """train-style's settings that matter to the study, from the file's "config"."""
    if not isinstance(config, dict) or not isinstance(config.get("steps"), int):
        return {}
    weights = {name: config.get(name, 0.0) for name in ("real_weight", "domain_weight")}
    mirror = config.get("mirror", "off")
    return {"steps": config["steps"],
            **{name: float(weight) if isinstance(weight, int | float) else None
               for name, weight in weights.items()},
            "mirror": mirror if mirror in ("on", "off") else None}
