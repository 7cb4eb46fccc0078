"""``t2i-fast eval``: scores of images against what their captions ask for."""

from __future__ import annotations

import json
from pathlib import Path

import click

from t2i_fast.eval.attributes import ATTRIBUTES, evaluate_dataset

_CROP = 64  # the training view of the 76-pixel records


@click.group(name="eval")
def eval_group() -> None:
    """Score images against their captions."""


@eval_group.command()
@click.option("--data", "dataset", type=click.Path(path_type=Path), required=True,
              help="A shapes dataset (from 't2i-fast prepare shapes').")
@click.option("--real", is_flag=True,
              help="Score the dataset's own images against their ground truth.")
@click.option("--n", type=click.IntRange(min=1), default=None,
              help="Score the first N records only.  [default: all]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def attributes(dataset: Path, real: bool, n: int | None, as_json: bool) -> None:
    """Colour, shape and size accuracy on the shapes dataset, each image scored by a fixed
    image analysis against its first shape."""
    if not real:
        # Generated images need a trained run to come from; until then the real images,
        # which calibrate the scorer, are all there is to score.
        raise click.UsageError("--real is required: only the dataset's own images can be "
                               "scored so far")
    scores = evaluate_dataset(dataset, n=n, crop=_CROP)
    if as_json:
        click.echo(json.dumps(scores))
        return
    click.echo(f"{'attribute':<12}accuracy")
    for key in ATTRIBUTES:
        click.echo(f"{key:<12}{scores[f'{key}_acc']:.4f}")
    click.echo(f"{'images':<12}{scores['n']}")
