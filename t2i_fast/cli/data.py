"""``t2i-fast info`` and ``t2i-fast stream``: look at a dataset, and time the loader on it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from t2i_fast.cli.output import save_image
from t2i_fast.data import Dataset, Loader, sampling
from t2i_fast.data.loader import CAPTION_FORMATS, LAYOUTS, default_size
from t2i_fast.pictures import image_grid
from t2i_fast.prepare import progress

BUILT_IN = Path("shapes.lmdb")
_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float32": torch.float32}


def ensure_built_in(data: str | Path) -> None:
    """Makes the built-in shapes dataset when ``data`` names it and it is absent (configs hold
    the path as a string, options as a Path: both name it)."""
    if Path(data) == BUILT_IN and not BUILT_IN.exists():
        from t2i_fast.prepare.shapes import make_shapes

        click.echo(f"making the built-in shapes dataset at {BUILT_IN}", err=True)
        make_shapes(out=BUILT_IN)


def dataset_summary(path: Path) -> dict:
    with Dataset(path) as ds:
        meta = dict(ds.meta)
    meta["path"] = str(path)
    meta["bytes"] = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return meta


@click.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(dataset: Path, as_json: bool) -> None:
    """Show a dataset's metadata and counts."""
    meta = dataset_summary(dataset)
    if as_json:
        click.echo(json.dumps(meta))
        return
    h, w = meta["image_size"]
    classes = meta["classes"]
    counts = meta.get("class_counts", [None] * len(classes))
    listed = ", ".join(f"{name} ({n})" for name, n in zip(classes[:8], counts, strict=False))
    more = f", ... {len(classes) - 8} more" if len(classes) > 8 else ""
    rows = [
        ("dataset", meta["path"]),
        ("format version", meta["format_version"]),
        ("source / split", f"{meta.get('source', '?')} / {meta['split']}"),
        ("images", meta["count"]),
        ("stored size", f"{h}x{w}, {meta['encoding']} ({meta['pixel_format']})"),
        ("captions per image", f"{meta['captions_per_image']} to "
                               f"{meta.get('captions_per_image_max', '?')}"),
        ("document length", meta["doc_length"]),
        ("classes", f"{len(classes)}: {listed}{more}"),
        ("on disk", f"{meta['bytes'] / 2**20:.1f} MiB"),
        ("created", f"{meta.get('created', '?')} by {meta.get('created_by', '?')}"),
    ]
    for name, value in rows:
        click.echo(f"{name:<20}{value}")


@click.command()
@click.option("--data", type=click.Path(path_type=Path), default=BUILT_IN,
              help="Dataset to stream; the built-in shapes dataset is made here if absent.")
@click.option("--epochs", type=click.IntRange(min=1), default=3)
@click.option("--batch-size", type=click.IntRange(min=1), default=64)
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="Training crop (default: 64/76 of the stored size).")
@click.option("--captions-per-sample", type=click.IntRange(1, 255), default=4)
@click.option("--caption-format", type=click.Choice(CAPTION_FORMATS), default="onehot")
@click.option("--dtype", type=click.Choice(list(_DTYPES)), default="uint8")
@click.option("--layout", type=click.Choice(LAYOUTS), default="nhwc")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Loader threads (default: one per core, at most 8).")
@click.option("--seed", type=click.IntRange(min=0), default=0)
def stream(data: Path, epochs: int, batch_size: int, size: int | None, captions_per_sample: int,
           caption_format: str, dtype: str, layout: str, threads: int | None, seed: int) -> None:
    """Stream a dataset through the C++ loader and print its throughput."""
    ensure_built_in(data)
    loader = Loader(data, batch_size=batch_size, seed=seed, size=size,
                    captions_per_sample=captions_per_sample, caption_format=caption_format,
                    dtype=_DTYPES[dtype], layout=layout, num_threads=threads)
    click.echo(f"{data}: {loader.meta['count']} images, {len(loader)} batches of {batch_size} "
               f"an epoch, {loader.num_threads} loader threads, {loader.size}x{loader.size} "
               f"{dtype} {layout}, {captions_per_sample} captions as {caption_format}")
    with loader:
        for epoch in range(epochs):
            samples, start = 0, time.perf_counter()
            with progress(len(loader), f"epoch {epoch}") as bar:
                for batch in loader:
                    samples += len(batch)
                    bar.update(1)
            seconds = time.perf_counter() - start
            click.echo(f"epoch {epoch}: {samples} samples in {seconds:.3f} s, "
                       f"{samples / seconds:,.0f} samples/s"
                       + (" (first pass: reads from disk, checks every record)"
                          if epoch == 0 else ""))


@click.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default="preview.png")
@click.option("--rows", type=click.IntRange(1, 64), default=6, help="Records shown.")
@click.option("--views", type=click.IntRange(1, 16), default=4,
              help="Training views per record (the crop and flip of epochs 0, 1, ...).")
@click.option("--seed", type=click.IntRange(min=0), default=0)
def preview(dataset: Path, out: Path, rows: int, views: int, seed: int) -> None:
    """Draw records as training sees them: each row a record's stored image, then its random
    crops and flips in successive epochs, under one of its captions."""
    with Dataset(dataset) as ds:
        picked = sampling.epoch_order(seed, 0, len(ds))[:rows]
        samples = [ds[int(i)] for i in picked]
        stored = tuple(ds.meta["image_size"])
        classes = ds.classes
    size = default_size(min(stored))
    tiles = []
    for sample, index in zip(samples, picked, strict=True):
        whole = torch.from_numpy(sample.image.copy()).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
        whole = torch.nn.functional.interpolate(whole, size=(size, size), mode="area")
        tiles.append(whole[0].round().to(torch.uint8).permute(1, 2, 0))
        for epoch in range(views):
            y, x, flipped = (v[0] for v in sampling.crops(
                seed, epoch, [index], stored=stored, size=size, random_crop=True, flip=True))
            crop = sample.image[y: y + size, x: x + size]
            tiles.append(torch.from_numpy((crop[:, ::-1] if flipped else crop).copy()))
    images = torch.stack(tiles).permute(0, 3, 1, 2)  # [rows * (views + 1), 3, S, S]
    labels = [f"{s.key} ({classes[s.class_id]}): {s.captions[0]}" for s in samples]
    grid = image_grid(images, rows=rows, row_labels=labels,
                      column_labels=["stored"] + [f"epoch {e}" for e in range(views)])
    save_image(grid, out)
    click.echo(f"{out}: {rows} records, stored image and {views} training views each")
