"""One HTML page about a run, with every picture inside it as a data URI, so that the single
file can be mailed, archived or opened offline: sample grids over training, sentence and
noise interpolations, style transfer where the run has a style encoder, loss curves, the last
logged metrics, the evaluation results saved in the run, and its configuration."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from pathlib import Path

from PIL import Image

from t2i_fast.data import Dataset
from t2i_fast.errors import T2IError
from t2i_fast.eval.fid import real_images
from t2i_fast.generate import TrainedModel, interpolation_grid
from t2i_fast.pictures import image_grid
from t2i_fast.run import Run
from t2i_fast.style_transfer import load_style_encoder, style_transfer

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1e1e1e; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2em; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
table { border-collapse: collapse; margin-bottom: 1em; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #777; }
"""
_STYLE_QUERIES = 4  # real images whose style the style-transfer grid shows


def make_report(*, run: str | Path, data: str | Path | None = None, max_grids: int = 6,
                seed: int = 0) -> str:
    """The page for run folder ``run`` as an HTML string; ``data`` replaces the dataset the
    run trained on (its captions drive the interpolations). At most ``max_grids`` sample
    grids, spread evenly over training, the first and the last included."""
    run = Run(run)
    config = run.config()
    dataset = Path(data) if data is not None else Path(config.data)
    if not (dataset / "data.mdb").is_file():
        raise T2IError(f"{dataset}: the run's dataset is not there (pass --data DATASET; its "
                       "captions drive the interpolations)")
    model = TrainedModel.from_run(run)
    captions = _two_captions(dataset)
    sections = [
        _samples(run, max_grids),
        _section("Interpolation", [
            _figure(interpolation_grid(model, captions, seed=seed),
                    "Sentence interpolation: fixed noise per row, the text embedding walked "
                    "from one caption to the other."),
            _figure(interpolation_grid(model, captions[:1], seed=seed),
                    "Noise interpolation: a fixed caption, the noise walked between two "
                    "draws per row."),
        ]),
        _style_transfer(run, model, dataset, captions, seed),
        _section("Loss curves", [_figure(run.loss_curves, "")]
                 if run.loss_curves.is_file() else [_note("no loss curves yet")]),
        _metrics(run),
        _section("Configuration", [_table(dataclasses.asdict(config).items())]),
    ]
    title = f"t2i-fast report: {run.root.name}"
    summary = (f"{config.variant} with the {config.preset} preset on {dataset.name}, "
               f"{_last_step(run)}")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>\n"
            + "\n".join(s for s in sections if s) + "\n</body></html>\n")


def _two_captions(dataset: Path) -> list[str]:
    """The first caption of the first record, and of the first record of another class."""
    with Dataset(dataset) as ds:
        first = ds.record(0)
        for index in range(1, len(ds)):
            other = ds.record(index)
            if other.class_id != first.class_id:
                return [first.captions[0], other.captions[0]]
    return [first.captions[0], first.captions[-1]]


def _last_step(run: Run) -> str:
    rows = run.metrics()
    return f"step {rows[-1]['step']}" if rows else "no steps logged"


def _samples(run: Run, max_grids: int) -> str:
    grids = run.sample_grids()
    if len(grids) > max_grids:
        picks = {round(k * (len(grids) - 1) / max(max_grids - 1, 1)) for k in range(max_grids)}
        grids = [grids[k] for k in sorted(picks)]
    figures = [_figure(path, f"step {step}") for step, path in grids]
    return _section("Samples over training",
                    figures or [_note("no sample grids yet")],
                    "Fixed captions (a row each) and fixed noise (a column each).")


def _style_transfer(run: Run, model: TrainedModel, dataset: Path, captions: list[str],
                    seed: int) -> str:
    """Drawn from the run's style encoder where it has one, else its saved picture; nothing
    where it has neither."""
    intro = "Each caption drawn in the style (background, position) of each real image."
    if run.style_encoder.is_file():
        encoder, _ = load_style_encoder(run, device=model.device)
        pixels, _ = real_images(dataset, n=_STYLE_QUERIES, size=encoder.config.image_size,
                                seed=seed)
        tiles = style_transfer(model=model, encoder=encoder, images=pixels.float() / 127.5 - 1,
                               text=model.embed(captions))
        grid = image_grid(tiles.cpu(), rows=len(pixels), column_labels=["query", *captions])
        return _section("Style transfer", [_figure(grid, "")], intro)
    if run.style_transfer_picture.is_file():
        return _section("Style transfer", [_figure(run.style_transfer_picture, "")], intro)
    return ""


def _metrics(run: Run) -> str:
    parts = []
    rows = run.metrics()
    if rows:
        parts.append(f"<h3>Training, step {rows[-1]['step']}</h3>" + _table(rows[-1].items()))
    evaluations = run.evaluations()
    for name, results in evaluations:
        parts.append(f"<h3>{html.escape(name)}</h3>" + _table(_flatten(results).items()))
    if not evaluations:
        parts.append(_note("no evaluation results saved in the run (e.g. 't2i-fast eval "
                           "attributes --run RUN --json > "
                           f"RUN/{run.evaluation_path('attributes').name}')"))
    return _section("Metrics", parts)


def _flatten(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _section(title: str, parts: list[str], intro: str = "") -> str:
    lead = f"<p>{html.escape(intro)}</p>" if intro else ""
    return f"<section><h2>{html.escape(title)}</h2>{lead}\n" + "\n".join(parts) + "</section>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _figure(picture: Path | Image.Image, caption: str) -> str:
    if isinstance(picture, Path):
        data = picture.read_bytes()
    else:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        data = buffer.getvalue()
    source = "data:image/png;base64," + base64.b64encode(data).decode()
    text = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(caption)}" src="{source}">{text}</figure>'


def _table(items) -> str:
    cells = []
    for key, value in items:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        style = ' class="number"' if number else ""
        cells.append(f"<tr><th>{html.escape(str(key))}</th>"
                     f"<td{style}>{html.escape(shown)}</td></tr>")
    return "<table>" + "".join(cells) + "</table>"
