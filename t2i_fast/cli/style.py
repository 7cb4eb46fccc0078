"""``t2i-fast train-style`` and ``t2i-fast style-transfer``: the style encoder of a run."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from t2i_fast.cli.output import save_image
from t2i_fast.cli.sample import _captions
from t2i_fast.config import resolve_device
from t2i_fast.generate import TrainedModel
from t2i_fast.pictures import image_grid
from t2i_fast.run import Run
from t2i_fast.style_transfer import load_image, load_style_encoder, style_transfer
from t2i_fast.train.style import MIRRORS, StyleConfig, train_style

_RUN = click.option("--run", type=click.Path(exists=True, file_okay=False, path_type=Path),
                    required=True, help="A run folder that 't2i-fast train' made.")


@click.command(name="train-style")
@_RUN
@click.option("--steps", type=click.IntRange(min=1), default=2000)
@click.option("--batch-size", type=click.IntRange(min=2), default=64)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4)
@click.option("--seed", type=click.IntRange(min=0), default=0,
              help="Seeds the encoder's weights, the noise and the captions drawn.")
@click.option("--log-every", type=click.IntRange(min=1), default=20, help="Steps.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
@click.option("--real-weight", type=click.FloatRange(min=0), default=0.0,
              help="Also reconstruct the dataset's real images through the frozen G, "
                   "||G(S(x), φ(t)) - x||², at this weight (in-domain inversion); 0: the "
                   "paper's S, which sees only G's images.")
@click.option("--domain-weight", type=click.FloatRange(min=0), default=0.0,
              help="Also train S domain-adversarially at this weight: a critic tells its "
                   "features of real images from those of G's, and S learns to make them "
                   "alike (Ganin & Lempitsky, 2015); 0: the paper's S.")
@click.option("--mirror", type=click.Choice(MIRRORS), default="auto",
              help="G draws half of S's images with their backgrounds mirrored left-right, "
                   "z unchanged, so that S reads what a background keeps under mirroring; "
                   "auto: on for a layered generator, off (the paper's S) for the single "
                   "one, which cannot mirror its background alone.")
@click.option("--overwrite", is_flag=True, help="Replace the run's style encoder.")
def train_style_command(run: Path, overwrite: bool, **options) -> None:
    """Train the style encoder S to invert the run's generator: regress z from G(z, φ(t)),
    t the dataset's captions (with --real-weight, also reconstruct real images through G;
    with --domain-weight, also make its features of real and generated images alike).
    Writes RUN/style_encoder.pt and RUN/style_metrics.jsonl."""
    path = train_style(config=StyleConfig(run=str(run), **options), overwrite=overwrite)
    click.echo(f"{path}: use it with 't2i-fast style-transfer --run {run}'")


@click.command(name="style-transfer")
@_RUN
@click.option("--image", "images", type=click.Path(path_type=Path), multiple=True,
              required=True, help="A query image of any size and format (repeat for more).")
@click.option("--text", "texts", multiple=True, help="A caption (repeat for more).")
@click.option("--captions", "captions_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="A file with one caption per line.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default="style_transfer.png")
def style_transfer_command(run: Path, images: tuple[Path, ...], texts: tuple[str, ...],
                           captions_file: Path | None, out: Path) -> None:
    """Draw each caption in the style of each query image: G(S(x), φ(t)). A row per query
    image (shown first), a column per caption."""
    captions = _captions(texts, captions_file)
    device = resolve_device("auto")
    folder = Run(run)
    encoder, inverted_step, _ = load_style_encoder(folder, device=device)
    size = encoder.config.image_size
    queries = torch.stack([load_image(path, size=size) for path in images])  # [R, 3, S, S]
    model = TrainedModel.from_run(folder, device=device)
    if model.step != inverted_step:
        click.echo(f"warning: the style encoder inverts step {inverted_step}'s generator, the "
                   f"run is at step {model.step} (retrain it with 't2i-fast train-style --run "
                   f"{run} --overwrite')", err=True)
    tiles = style_transfer(model=model, encoder=encoder, images=queries,
                           text=model.embed(captions))
    grid = image_grid(tiles, rows=len(images), row_labels=[path.name for path in images],
                      column_labels=["query", *captions])
    save_image(grid, out)
    click.echo(f"{out}: {len(images)} images x {len(captions)} captions")
