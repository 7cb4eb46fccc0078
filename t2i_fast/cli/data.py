"""``t2i-fast info`` and ``t2i-fast stream``: look at a dataset, and time the loader on it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from t2i_fast.data import Dataset, Loader
from t2i_fast.data.loader import CAPTION_FORMATS, LAYOUTS
from t2i_fast.prepare import progress

BUILT_IN = Path("shapes.lmdb")
_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float32": torch.float32}


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
    if data == BUILT_IN and not data.exists():
        from t2i_fast.prepare.shapes import make_shapes

        click.echo(f"making the built-in shapes dataset at {data}", err=True)
        make_shapes(out=data)
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
