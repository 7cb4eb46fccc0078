"""``t2i-fast report``: one self-contained HTML page about a run."""

from __future__ import annotations

from pathlib import Path

import click

from t2i_fast.cli.output import output_file
from t2i_fast.report import make_report
from t2i_fast.run import Run


@click.command()
@click.option("--run", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="A run folder that 't2i-fast train' made.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The page to write  [default: RUN/report.html]")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Dataset whose captions drive the interpolations  [default: the run's "
                   "dataset]")
@click.option("--grids", type=click.IntRange(min=2), default=6,
              help="Sample grids shown at most, spread over training.")
@click.option("--seed", type=click.IntRange(min=0), default=0,
              help="Noise of the interpolations and style transfer.")
def report(run: Path, out: Path | None, data: Path | None, grids: int, seed: int) -> None:
    """Write one HTML page with every picture embedded: sample grids over training,
    interpolations, style transfer (where the run has a style encoder), loss curves, the last
    metrics, evaluation results saved as RUN/eval_*.json, and the configuration."""
    out = out or Run(run).report
    page = make_report(run=run, data=data, max_grids=grids, seed=seed)
    output_file(out).write_text(page)
    click.echo(f"{out}: {out.stat().st_size / 1e6:.1f} MB")
