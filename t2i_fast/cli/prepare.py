"""``t2i-fast prepare``: one subcommand per source; the work is in t2i_fast.prepare."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import click

from t2i_fast.data.alphabet import DEFAULT_DOC_LENGTH
from t2i_fast.data.format import ENCODINGS
from t2i_fast.prepare.coco import SPLITS as COCO_SPLITS
from t2i_fast.prepare.coco import make_coco
from t2i_fast.prepare.cub import SPLITS, make_cub
from t2i_fast.prepare.flowers import make_flowers
from t2i_fast.prepare.folder import make_folder
from t2i_fast.prepare.shapes import make_shapes

_CPUS = os.cpu_count() or 1


def _options(*options):
    """Apply ``options`` so that --help lists them in the order given."""
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


_root = click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     required=True, help="The source's top folder.")
_out = click.option("--out", type=click.Path(path_type=Path), required=True,
                    help="Dataset to create (an LMDB folder).")
_split = click.option("--split", type=click.Choice(SPLITS), default="trainval",
                      help="Class-disjoint split (Reed et al.): trainval, test or all.")
_common = _options(
    click.option("--image-size", type=click.IntRange(8, 4096), default=76,
                 help="Stored (load) size in pixels; training crops from it."),
    click.option("--encoding", type=click.Choice(ENCODINGS), default="raw",
                 help="Pixel storage: raw (fastest to load) or jpeg (smaller)."),
    click.option("--doc-length", type=click.IntRange(1, 65535), default=DEFAULT_DOC_LENGTH,
                 help="Characters kept per caption; longer captions are truncated."),
    click.option("--overwrite", is_flag=True, help="Replace --out if it exists."),
)
_workers = click.option("--workers", type=click.IntRange(min=1), default=_CPUS,
                        help="Processes decoding images.")


def _done(out: Path, count: int) -> None:
    click.echo(f"{out}: {count} images", err=True)


def _exit_on_sigterm(signum, frame) -> None:
    # A kill (a job scheduler's time limit, `kill PID`) then unwinds like Ctrl-C, so that the
    # writer removes its temporary dataset instead of leaving it beside --out.
    raise SystemExit(128 + signum)


@click.group()
@click.pass_context
def prepare(ctx: click.Context) -> None:
    """Turn a source into a dataset (an LMDB folder) to train on."""
    # Only the main thread may set handlers; a program embedding the CLI may use another.
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


@prepare.command()
@_out
@click.option("--n", type=click.IntRange(min=1), default=10000, help="Number of images.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Same seed, same dataset.")
@click.option("--holdout-pairs", default="", show_default="none",
              help="Colour-shape pairs no image contains, comma-separated (\"red "
                   "circle,blue square\"): 'eval attributes' scores them zero-shot.")
@_common
def shapes(out: Path, n: int, seed: int, holdout_pairs: str, image_size: int, encoding: str,
           doc_length: int, overwrite: bool) -> None:
    """Synthetic coloured shapes with captions (built in, no download)."""
    pairs = [pair for pair in holdout_pairs.split(",") if pair.strip()]
    _done(out, make_shapes(out=out, n=n, seed=seed, image_size=image_size, encoding=encoding,
                           doc_length=doc_length, overwrite=overwrite, holdout_pairs=pairs))


@prepare.command()
@_root
@_out
@_split
@click.option("--bbox-crop", is_flag=True,
              help="Crop a square of 1.5x the bird's bounding box instead of the whole image.")
@_common
@_workers
def cub(root: Path, workers: int, out: Path, split: str, bbox_crop: bool, image_size: int,
        encoding: str, doc_length: int, overwrite: bool) -> None:
    """CUB-200-2011 birds: ROOT/CUB_200_2011/ with Reed et al.'s ROOT/text_c10/ captions."""
    _done(out, make_cub(root=root, out=out, split=split, bbox_crop=bbox_crop,
                        image_size=image_size, encoding=encoding, doc_length=doc_length,
                        overwrite=overwrite, workers=workers))


@prepare.command()
@_root
@_out
@_split
@_common
@_workers
def flowers(root: Path, workers: int, out: Path, split: str, image_size: int, encoding: str,
            doc_length: int, overwrite: bool) -> None:
    """Oxford-102 flowers: ROOT/jpg/ with Reed et al.'s ROOT/text_c10/ captions."""
    _done(out, make_flowers(root=root, out=out, split=split, image_size=image_size,
                            encoding=encoding, doc_length=doc_length, overwrite=overwrite,
                            workers=workers))


@prepare.command()
@_root
@_out
@_common
@_workers
def folder(root: Path, workers: int, out: Path, image_size: int, encoding: str,
           doc_length: int, overwrite: bool) -> None:
    """Your own images: each beside a same-named .txt of captions (one a line); the class is
    the sub-folder."""
    _done(out, make_folder(root=root, out=out, image_size=image_size, encoding=encoding,
                           doc_length=doc_length, overwrite=overwrite, workers=workers))


@prepare.command()
@_root
@_out
@click.option("--split", type=click.Choice(COCO_SPLITS), required=True,
              help="Reads ROOT/annotations/captions_SPLIT.json and the images in ROOT/SPLIT/.")
@_common
@_workers
def coco(root: Path, workers: int, out: Path, split: str, image_size: int, encoding: str,
         doc_length: int, overwrite: bool) -> None:
    """MS-COCO captions (2014 or 2017): every captioned image with all its captions (5 to 7),
    one class for all (COCO has none)."""
    summary = make_coco(root=root, out=out, split=split, image_size=image_size,
                        encoding=encoding, doc_length=doc_length, overwrite=overwrite,
                        workers=workers)
    _done(out, summary.images)
    if summary.uncaptioned:
        click.echo(f"{out}: skipped {summary.uncaptioned} listed images without a caption",
                   err=True)
