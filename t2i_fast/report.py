"""One HTML page about a run, with every picture inside it as a data URI, so that the single
file can be mailed, archived or opened offline: sample grids over training, sentence and
noise interpolations, style transfer where the run has a style encoder, loss curves, the last
logged metrics, the evaluation results saved in the run, and its configuration."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
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
        _kernels(run),
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
        encoder = load_style_encoder(run, device=model.device).encoder
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
        # Evaluations with columns to compare get a table of their own, when the file has
        # them (an older or hand-edited one falls back to the plain list).
        shape = _SHAPED.get(name)
        shown = shape(results) if shape else None
        parts.append(f"<h3>{html.escape(name)}</h3>"
                     + (shown or _table(_flatten(results).items())))
    if not evaluations:
        parts.append(_note("no evaluation results saved in the run (e.g. 't2i-fast eval "
                           "attributes --run RUN --json > "
                           f"RUN/{run.evaluation_path('attributes').name}')"))
    return _section("Metrics", parts)


def _disentangle(results: dict) -> str | None:
    """The AUCs beside their baselines (eval disentangle); None for a file without them."""
    baselines = results.get("baselines")
    factors = ("background_auc", "position_auc")
    if not isinstance(baselines, dict) or not all(
            isinstance(found, dict) and all(key in found for key in factors)
            for found in (results, *baselines.values())):
        return None
    columns = {"style encoder": results, **{name.replace("_", " "): found
                                            for name, found in baselines.items()}}
    rows = [(key.removesuffix("_auc") + " AUC", [found[key] for found in columns.values()])
            for key in factors]
    generated = results.get("generated")
    own = generated.get("position_auc") if isinstance(generated, dict) else None
    return (_grid(["", *columns], rows)
            + _note(f"{results.get('n_pairs', '?')} pairs; 0.5 is chance. The style encoder "
                    "disentangles where it beats the random encoder; the captions are the "
                    "paper's text baseline; the position code is what an exact inverse of "
                    "a generator that draws each axis of the centre from one direction of z "
                    "scores."
                    + ("" if not isinstance(own, int | float) else
                       f" On the generator's own images the style encoder reads position at "
                       f"{own:.3f}: what it learnt; the real images' AUC is what carries "
                       "over.")
                    + _trained_with(results.get("style_encoder"))))


def _trained_with(trained: object) -> str:
    """The note's sentence on which style encoder was scored (eval disentangle's
    "style_encoder"); empty for results that do not say."""
    if not isinstance(trained, dict) or not isinstance(trained.get("steps"), int):
        return ""
    # Results from before --domain-weight record no such key: the paper's S in that respect.
    real, domain = trained.get("real_weight"), trained.get("domain_weight", 0)
    mirror = trained.get("mirror", "off")
    if not all(isinstance(w, int | float) for w in (real, domain)) or mirror not in ("on",
                                                                                    "off"):
        kind = "trained with unrecorded settings"
    elif real == domain == 0 and mirror == "off":
        kind = "the paper's, trained on G's images only"
    else:
        terms = ([f"to also rebuild real images through G at weight {real}"] if real else []) \
            + ([f"domain-adversarially at weight {domain}"] if domain else []) \
            + (["on G's images with their backgrounds mirrored"] if mirror == "on" else [])
        kind = "trained " + " and ".join(terms)
    return f" The style encoder: {trained['steps']} steps, {kind}."


def _diversity(results: dict) -> str | None:
    """Overall and per-caption spread and coverage, generated beside real (eval diversity);
    None for a file without them."""
    keys = ("spread", "backgrounds", "positions")
    per_caption = results.get("per_caption")
    if not isinstance(results.get("ratio"), int | float) or not isinstance(
            per_caption, dict) or not all(
            isinstance(row, dict) and all(k in row for k in (*keys, "ratio", "n"))
            and all(f"real_{k}" in row for k in keys)
            for row in (results, *per_caption.values())):
        return None
    labels = ("spread (mean pairwise distance)", "backgrounds covered (share of 8)",
              "position cells covered (share of 9)")
    overall = _grid(["", "generated", "real"],
                    [(label, [results[key], results[f"real_{key}"]])
                     for label, key in zip(labels, keys, strict=True)])
    rows = [(caption, [row["ratio"], row["backgrounds"], row["real_backgrounds"],
                       row["positions"], row["real_positions"], row["n"]])
            for caption, row in per_caption.items()]
    return (_note(f"spread ratio, generated over real: {results['ratio']:.3f}") + overall
            + _grid(["caption", "spread ratio", "backgrounds", "real", "positions", "real",
                     "images"], rows))


def _kernels(run: Run) -> str | None:
    """The engine's kernel choices (fused_layers.json): why, the loss kernels, and a row per
    layer of G and D it considered; None for a run without the file."""
    path = run.fusion_evidence
    if not path.is_file():
        return None
    try:
        evidence = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise T2IError(f"{path}: cannot read the kernel choices ({exc})") from exc
    if not isinstance(evidence, dict):
        raise T2IError(f"{path}: not the kernel choices (a JSON object)")
    fused, loss = evidence.get("fused_layers"), evidence.get("matching_loss")
    if not isinstance(fused, dict) or not isinstance(loss, dict):
        return _section("Kernels", [_table(_flatten(evidence).items())])
    summary = [("fused layers", fused.get("mode")), ("why", evidence.get("reason")),
               ("loss kernels", loss.get("choice"))]
    for source, found in (("fused layers", fused.get("G")), ("loss kernels", loss)):
        for key in ("refused", "unmeasured"):
            if isinstance(found, dict) and key in found:
                summary.append((f"{source}: {key}", found[key]))
    rows = []
    for network in ("G", "D"):
        layers = fused.get(network, {}).get("layers", {}) if isinstance(
            fused.get(network), dict) else {}
        for name, layer in layers.items() if isinstance(layers, dict) else ():
            if not isinstance(layer, dict):
                continue
            ms = layer.get("ms") if isinstance(layer.get("ms"), dict) else {}
            rows.append((f"{network}.{name}", [
                "yes" if layer.get("fused") else "no", "yes" if layer.get("chained") else "",
                layer.get("winner", layer.get("refused", "")),
                ms.get(layer.get("winner"), ""), ms.get("unfused", "")]))
    parts = [_table(summary)]
    if rows:
        parts.append(_grid(["layer", "fused", "chained", "winner", "winner ms", "unfused ms"],
                           rows))
    return _section("Kernels", parts, f"The engine's choices, from {path.name}: medians "
                                      "of CUDA-graph replays where they were measured.")


_SHAPED = {"eval_disentangle.json": _disentangle, "eval_diversity.json": _diversity}


def _grid(header: list[str], rows: list[tuple[str, list]]) -> str:
    """A table with a header row and a label then values in each row."""
    head = "".join(f"<th>{html.escape(str(name))}</th>" for name in header)
    body = "".join(f"<tr><th>{html.escape(str(label))}</th>"
                   + "".join(_cell(value) for value in values) + "</tr>"
                   for label, values in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value) -> str:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    style = ' class="number"' if number else ""
    return f"<td{style}>{html.escape(shown)}</td>"


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
    return "<table>" + "".join(f"<tr><th>{html.escape(str(key))}</th>{_cell(value)}</tr>"
                               for key, value in items) + "</table>"
