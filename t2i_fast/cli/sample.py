"""``t2i-fast sample`` and ``t2i-fast interpolate``: images from a trained run."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
import torch
from PIL import Image

from t2i_fast.cli.output import output_folder, save_image
from t2i_fast.generate import TrainedModel, dataset_captions, interpolation_grid
from t2i_fast.pictures import image_grid, to_uint8
from t2i_fast.prepare.captions import read_captions

_RUN = click.option("--run", type=click.Path(exists=True, path_type=Path), required=True,
                    help="A run folder (its latest checkpoint) or a checkpoint file.")


def _captions(texts: tuple[str, ...], captions_file: Path | None) -> list[str]:
    if bool(texts) == (captions_file is not None):
        raise click.UsageError("pass captions with --text (repeatable) or --captions FILE")
    return list(texts) if texts else read_captions(captions_file)


def _entries(texts: tuple[str, ...], captions_file: Path | None, data: Path | None,
             per_image: int | None, classes: Path | None, limit: int | None) -> list[dict]:
    """What to draw: one entry per caption, ``caption`` and what index.json says of it."""
    if data is None:
        if per_image is not None or classes is not None or limit is not None:
            raise click.UsageError("--captions-per-image, --classes and --limit go with --data")
        return [{"caption": text} for text in _captions(texts, captions_file)]
    if texts or captions_file is not None:
        raise click.UsageError("pass captions with --text or --captions, or draw those of "
                               "--data DATASET, not both")
    found = dataset_captions(data, per_image=per_image or 1, classes=classes, limit=limit)
    return [dataclasses.asdict(entry) for entry in found]


@click.command()
@_RUN
@click.option("--text", "texts", multiple=True, help="A caption (repeat for more).")
@click.option("--captions", "captions_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="A file with one caption per line.")
@click.option("--data", type=click.Path(exists=True, path_type=Path), default=None,
              help="A dataset whose captions to draw (one split: for CUB's zero-shot classes, "
                   "one prepared with --split test); index.json names each image's record.")
@click.option("--captions-per-image", "per_image", type=click.IntRange(1, 255), default=None,
              show_default="1", help="With --data: the first K captions of each record (all "
                                     "where it has fewer).")
@click.option("--classes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, show_default="all",
              help="With --data: a file of class names, one a line; only their records.")
@click.option("--limit", type=click.IntRange(min=1), default=None, show_default="all",
              help="With --data: the first N records only.")
@click.option("--n", type=click.IntRange(min=1), default=None, show_default="8; 1 with --data",
              help="Images per caption.")
@click.option("--seed", type=click.IntRange(min=0), default=0,
              help="Noise seed: image j of every caption shares its noise.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="A .png for one grid (a row per caption, the caption under it), else a "
                   "folder of PNGs with index.json.")
def sample(run: Path, texts: tuple[str, ...], captions_file: Path | None, data: Path | None,
           per_image: int | None, classes: Path | None, limit: int | None, n: int | None,
           seed: int, batch_size: int, out: Path) -> None:
    """Generate images for captions: given, or those of a dataset's records."""
    entries = _entries(texts, captions_file, data, per_image, classes, limit)
    captions = [entry["caption"] for entry in entries]
    n = n or (1 if data else 8)
    model = TrainedModel.load(run)
    z = model.noise(n, seed)  # [n, Z]: column j shares its noise across captions
    jobs = [(c, j) for c in range(len(captions)) for j in range(n)]
    grid = out.suffix.lower() == ".png"
    if not grid:
        output_folder(out)
    images, index = [], []
    with click.progressbar(length=len(jobs), label="sampling", file=sys.stderr) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start: start + batch_size]
            text = model.embed([captions[c] for c, _ in chunk])
            batch = model.generate(text, z[[j for _, j in chunk]])
            if grid:
                images.append(batch.cpu())
            else:
                for (c, j), pixels in zip(chunk, to_uint8(batch), strict=True):
                    entry = entries[c]
                    name = (f"{entry['key']}_{entry['caption_index']:02d}_{j:02d}.png"
                            if data else f"{c:05d}_{j:02d}.png")
                    Image.fromarray(pixels).save(out / name)
                    index.append({"file": name, **entry, "seed": seed, "noise_index": j})
            bar.update(len(chunk))
    if grid:
        save_image(image_grid(torch.cat(images), rows=len(captions), row_labels=captions), out)
        click.echo(f"{out}: {len(captions)} captions x {n} images")
    else:
        (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        click.echo(f"{out}: {len(index)} images and index.json")


@click.command()
@_RUN
@click.option("--text", "texts", multiple=True, required=True,
              help="Two captions: sentence interpolation from the first to the second. One "
                   "caption: noise interpolation.")
@click.option("--steps", type=click.IntRange(min=2), default=8, help="Columns.")
@click.option("--rows", type=click.IntRange(min=1), default=4,
              help="Noise vectors (sentence) or noise pairs (noise interpolation).")
@click.option("--seed", type=click.IntRange(min=0), default=0)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default="interpolation.png")
def interpolate(run: Path, texts: tuple[str, ...], steps: int, rows: int, seed: int,
                out: Path) -> None:
    """The paper's interpolations: fixed noise with the text embedding walked from caption A
    to caption B, or a fixed caption with the noise walked between two draws."""
    grid = interpolation_grid(TrainedModel.load(run), list(texts), steps=steps, rows=rows,
                              seed=seed)
    save_image(grid, out)
    click.echo(f"{out}: {rows} rows x {steps} steps")
