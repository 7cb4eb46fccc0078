"""The paper's comparison on the shapes dataset: GAN, GAN-CLS, GAN-INT and GAN-INT-CLS trained
the same way, then scored for attribute accuracy (seen and held-out colour-shape pairs),
diversity (spread and style coverage against real images), style disentangling (background
and position AUCs, beside a random encoder's and the captions') and retrieval R-precision;
GAN-INT-CLS once more with the paper's losses and generator (no mode-seeking term, no class
loss, one learning rate for G and D, G's single layout with a z of 100 and a first layer
with weights per 4×4 cell), and
the curve of GAN-INT-CLS's attribute scores against training time, from its checkpoints.

    python scripts/paper_tables.py --out paper_runs --markdown docs/results.md

Every stage writes its result into the run folder and is skipped when that result exists, so
an interrupted run continues where it stopped. One text encoder (DS-SJE on every seen class)
serves all four variants, so their differences come from the GAN objectives alone.
``--markdown FILE`` replaces only the part of FILE between the START and END markers (a new
file gets the markers), so the hand-written text around the tables stays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from t2i_fast.config import PAPER_SCHEDULE, SMALL_SCHEDULE
from t2i_fast.run import Run, TextEncoderFolder, step_of

VARIANTS = {"gan": "GAN", "cls": "GAN-CLS", "int": "GAN-INT", "int-cls": "GAN-INT-CLS",
            "int-cls-paper": "GAN-INT-CLS, the paper's losses and generator"}
# Extra runs: their variant and training flags. The paper's recipe where the small preset
# deviates (PAPER_SCHEDULE's): no mode-seeking term, no class loss (on either side), one
# learning rate, and G's single layout with a z of 100 and a first layer with weights of its
# own at every 4×4 cell.
FLAGS = {"int-cls-paper": ("int-cls", ("--mode-seeking", "0",
                                       "--class-loss", f"{PAPER_SCHEDULE.class_loss:g}",
                                       "--g-class-loss", f"{PAPER_SCHEDULE.class_loss:g}",
                                       "--d-lr-scale", f"{PAPER_SCHEDULE.d_lr_scale:g}",
                                       "--g-first-layer", PAPER_SCHEDULE.g_first_layer,
                                       "--g-layout", PAPER_SCHEDULE.g_layout,
                                       "--g-z-dim", str(PAPER_SCHEDULE.g_z_dim)))}
CURVE = "int-cls"  # the run whose checkpoints give the curve
HOLDOUT = "red circle,blue square,green triangle"
EVALS = ("attributes", "diversity", "disentangle", "retrieval")
START, END = "<!-- paper_tables:start -->", "<!-- paper_tables:end -->"


def _t2i(*args: str) -> str:
    """Runs one t2i-fast command; its stdout (the JSON of an eval) is returned."""
    command = [sys.executable, "-m", "t2i_fast", *args]
    print("$ t2i-fast " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def _cached(path: Path, make, *, needs: str | None = None) -> dict:
    """The JSON saved at ``path``, made first where it is missing or lacks the key ``needs``
    (a result saved before that key existed)."""
    if not path.exists() or (needs is not None and needs not in json.loads(path.read_text())):
        path.write_text(make())
    return json.loads(path.read_text())


def run_variant(*, variant: str, data: Path, text_encoder: Path, out: Path, epochs: int,
                seed: int, style_steps: int, checkpoint_every: int) -> dict:
    run = Run(out / variant)
    done = run.root / "paper_tables.json"  # written when every stage is: the run's minutes
    if done.exists():
        minutes = json.loads(done.read_text())["minutes"]
        return {**_results(run, variant), "minutes": minutes}
    started = time.perf_counter()
    if run.checkpoints():
        _t2i("train", "--resume", str(run.root))  # continues to the end; a no-op when finished
    else:
        shutil.rmtree(run.root, ignore_errors=True)  # stopped before its first checkpoint
        trains, flags = FLAGS.get(variant, (variant, ()))
        _t2i("train", "--data", str(data), "--run", str(run.root), "--variant", trains,
             "--preset", "small", "--epochs", str(epochs), "--seed", str(seed),
             "--text-encoder", str(text_encoder), "--device", "cpu",
             "--checkpoint-every", str(checkpoint_every), "--keep-checkpoints", "1000", *flags)
    if not run.style_encoder.exists():
        _t2i("train-style", "--run", str(run.root), "--steps", str(style_steps), "--seed",
             str(seed), "--device", "cpu")
    scores = _results(run, variant)
    minutes = round((time.perf_counter() - started) / 60, 1)
    done.write_text(json.dumps({"minutes": minutes}) + "\n")
    return {**scores, "minutes": minutes}


def _results(run: Run, variant: str) -> dict:
    """The evaluations of a trained run (each made where missing) and, for ``CURVE``, the
    curve of its checkpoints."""
    scores = {name: _cached(run.evaluation_path(name),
                            lambda name=name: _t2i("eval", name, "--run", str(run.root),
                                                   "--json"),
                            needs="generated" if name == "disentangle" else None)
              for name in EVALS}
    if variant == CURVE:
        scores["curve"] = curve(run)
    return scores


def curve(run: Run) -> list[dict]:
    """Attribute scores of every checkpoint of ``run`` (each saved beside it) against the
    minutes of training to reach it, summed from the throughput its metrics logged."""
    rows = run.metrics()
    batch = run.config().batch_size
    seconds, elapsed, last = {}, 0.0, 0
    for row in rows:  # each row's images/s covers the steps since the previous row
        elapsed += (row["step"] - last) * batch / row["images_per_s"]
        seconds[row["step"]], last = elapsed, row["step"]
    points = []
    for checkpoint in run.checkpoints():
        step = step_of(checkpoint)
        found = _cached(checkpoint.with_suffix(".attributes.json"),
                        lambda c=checkpoint: _t2i("eval", "attributes", "--run", str(c),
                                                  "--json"))
        reached = max((s for s in seconds if s <= step), default=0)
        points.append({"step": step, "minutes": round(seconds.get(reached, 0.0) / 60, 1),
                       **{k: found[k] for k in ("color_acc", "shape_acc", "size_acc")}})
    return points


def markdown(results: dict[str, dict], *, epochs: int, seed: int, minutes: float) -> str:
    """The tables of ``results`` (variant → {eval name → its JSON}): what the text asks for,
    then style (diversity, and disentangling beside its baselines)."""
    text = ("| variant | colour | shape | size | held-out colour | held-out shape | "
            "R-precision | minutes |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    for variant, r in results.items():
        a = r["attributes"]
        text += (f"| {VARIANTS[variant]} | {a['color_acc']:.3f} | {a['shape_acc']:.3f} "
                 f"| {a['size_acc']:.3f} | {a['heldout_color_acc']:.3f} "
                 f"| {a['heldout_shape_acc']:.3f} | {r['retrieval']['r_precision']:.3f} "
                 f"| {r['minutes']:.1f} |\n")
    style = ("| variant | diversity ratio | backgrounds covered | positions covered "
             "| background AUC | random encoder | captions | position AUC | random encoder "
             "| captions | on G's images |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: | ---: | ---: |\n")
    for variant, r in results.items():
        d, s = r["diversity"], r["disentangle"]
        aucs = " | ".join(f"{found[f'{factor}_auc']:.3f}"
                          for factor in ("background", "position")
                          for found in (s, s["baselines"]["random_encoder"],
                                        s["baselines"]["captions"]))
        own = s["generated"]["position_auc"]
        style += (f"| {VARIANTS[variant]} | {d['ratio']:.3f} "
                  f"| {d['backgrounds']:.3f} ({d['real_backgrounds']:.3f}) "
                  f"| {d['positions']:.3f} ({d['real_positions']:.3f}) | {aucs} "
                  f"| {'–' if own is None else f'{own:.3f}'} |\n")
    points = next((r["curve"] for r in results.values() if "curve" in r), [])
    if points:
        style += (f"\nThe curve: {VARIANTS[CURVE]}'s attribute scores at each checkpoint "
                  "against its minutes of training (from the throughput it logged).\n\n"
                  "| step | minutes | colour | shape | size |\n"
                  "| ---: | ---: | ---: | ---: | ---: |\n")
        style += "".join(f"| {p['step']} | {p['minutes']:.1f} | {p['color_acc']:.3f} "
                         f"| {p['shape_acc']:.3f} | {p['size_acc']:.3f} |\n" for p in points)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, no GPU (CPU, `small` preset)"
    return (f"Shapes dataset with {HOLDOUT.replace(',', ', ')} held out of training; "
            f"{epochs} epochs per variant, seed {seed}; {machine}; {date.today().isoformat()}. "
            f"Minutes: each run's wall time (training, style encoder, evaluations), "
            f"{minutes:.0f} in all with the dataset and text pretraining.\n\n" + text
            + "\nStyle: the diversity ratio is the spread of images from different noise "
              "over the real images' (1: as varied as the data); coverage is the share of the "
              "8 backgrounds and 9 position cells one caption's 16 images show (the real "
              "images' in parentheses); the AUCs of the style encoder stand beside a random "
              "encoder's and the captions' (the paper's text baseline), positions grouped "
              "as the paper groups poses, by k-means of the records' centres; the last "
              "column is the position study on G's own images, where the style encoder "
              "learnt (what carries over to real images is the position AUC).\n\n" + style)


def write_section(path: Path, table: str) -> None:
    """Puts ``table`` between the START and END markers of ``path``, keeping the rest; a
    missing file is made with the markers. A file without both markers, in order, is left
    alone: SystemExit names it."""
    section = f"{START}\n{table.rstrip()}\n{END}"
    if not path.exists():
        path.write_text(section + "\n")
        return
    text = path.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start or text.count(START) != 1 or text.count(END) != 1:
        raise SystemExit(f"{path}: needs one '{START}' line before one '{END}' line around "
                         "the generated tables (nothing written)")
    path.write_text(text[:start] + section + text[end + len(END):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("paper_runs"))
    parser.add_argument("--epochs", type=int, default=SMALL_SCHEDULE.epochs)
    parser.add_argument("--pretrain-epochs", type=int, default=SMALL_SCHEDULE.pretrain_epochs)
    parser.add_argument("--checkpoint-every", type=int, default=312,
                        help="Steps between checkpoints: the curve's points.")
    parser.add_argument("--style-steps", type=int, default=1000)
    parser.add_argument("--n", type=int, default=10000, help="Images in the dataset.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--markdown", type=Path, default=None,
                        help="Write the tables into this file, between its markers.")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    text = args.out / "text"
    data = args.out / "shapes_holdout.lmdb"
    if not text.exists():
        started = time.perf_counter()
        if not data.exists():
            _t2i("prepare", "shapes", "--out", str(data), "--n", str(args.n), "--holdout-pairs",
                 HOLDOUT)
        partial = args.out / "text.partial"  # renamed when complete
        shutil.rmtree(partial, ignore_errors=True)
        _t2i("pretrain-text", "--data", str(data), "--out", str(partial), "--preset", "small",
             "--epochs", str(args.pretrain_epochs), "--match", SMALL_SCHEDULE.pretrain_match,
             "--holdout-share", "0", "--seed",
             str(args.seed), "--device", "cpu")
        (partial / "paper_tables.json").write_text(json.dumps(
            {"minutes": round((time.perf_counter() - started) / 60, 1)}) + "\n")
        partial.rename(text)
    text_minutes = json.loads((text / "paper_tables.json").read_text())["minutes"]
    results = {v: run_variant(variant=v, data=data, text_encoder=TextEncoderFolder(text).encoder,
                              out=args.out, epochs=args.epochs, seed=args.seed,
                              style_steps=args.style_steps,
                              checkpoint_every=args.checkpoint_every) for v in variants}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, epochs=args.epochs, seed=args.seed,
                     minutes=text_minutes + sum(r["minutes"] for r in results.values()))
    print(table)
    if args.markdown:
        write_section(args.markdown, table)


if __name__ == "__main__":
    main()
