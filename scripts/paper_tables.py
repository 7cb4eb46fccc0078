"""The paper's comparison on the shapes dataset: GAN, GAN-CLS, GAN-INT and GAN-INT-CLS trained
the same way, then scored for attribute accuracy (seen and held-out colour-shape pairs),
style disentangling (background and position AUCs) and retrieval R-precision.

    python scripts/paper_tables.py --out paper_runs --markdown docs/results.md

Every stage writes its result into the run folder and is skipped when that result exists, so
an interrupted run continues where it stopped. One text encoder (DS-SJE on every seen class)
serves all four variants, so their differences come from the GAN objectives alone.
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

from t2i_fast.run import Run, TextEncoderFolder

VARIANTS = {"gan": "GAN", "cls": "GAN-CLS", "int": "GAN-INT", "int-cls": "GAN-INT-CLS"}
HOLDOUT = "red circle,blue square,green triangle"


def _t2i(*args: str) -> str:
    """Runs one t2i-fast command; its stdout (the JSON of an eval) is returned."""
    command = [sys.executable, "-m", "t2i_fast", *args]
    print("$ t2i-fast " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def _cached(path: Path, make) -> dict:
    if not path.exists():
        path.write_text(make())
    return json.loads(path.read_text())


def run_variant(*, variant: str, data: Path, text_encoder: Path, out: Path, epochs: int,
                seed: int, style_steps: int) -> dict:
    run = Run(out / variant)
    started = time.perf_counter()
    if run.checkpoints():
        _t2i("train", "--resume", str(run.root))  # continues to the end; a no-op when finished
    else:
        shutil.rmtree(run.root, ignore_errors=True)  # stopped before its first checkpoint
        _t2i("train", "--data", str(data), "--run", str(run.root), "--variant", variant,
             "--preset", "small", "--epochs", str(epochs), "--seed", str(seed),
             "--text-encoder", str(text_encoder), "--device", "cpu")
    if not run.style_encoder.exists():
        _t2i("train-style", "--run", str(run.root), "--steps", str(style_steps), "--seed",
             str(seed), "--device", "cpu")
    scores = {}
    for name in ("attributes", "disentangle", "retrieval"):
        scores.update(_cached(run.evaluation_path(name),
                              lambda name=name: _t2i("eval", name, "--run", str(run.root),
                                                     "--json")))
    scores["minutes"] = round((time.perf_counter() - started) / 60, 1)
    return scores


def markdown(results: dict[str, dict], *, epochs: int, seed: int, minutes: float) -> str:
    head = ("| variant | colour | shape | size | held-out colour | held-out shape | "
            "background AUC | position AUC | R-precision |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    rows = "".join(
        f"| {VARIANTS[v]} | {r['color_acc']:.3f} | {r['shape_acc']:.3f} | {r['size_acc']:.3f} "
        f"| {r['heldout_color_acc']:.3f} | {r['heldout_shape_acc']:.3f} "
        f"| {r['background_auc']:.3f} | {r['position_auc']:.3f} | {r['r_precision']:.3f} |\n"
        for v, r in results.items())
    machine = f"{platform.machine()}, {os.cpu_count()} cores, no GPU (CPU, `small` preset)"
    return (f"Shapes dataset with {HOLDOUT.replace(',', ', ')} held out of training; "
            f"{epochs} epochs per variant, seed {seed}; {machine}; {minutes:.0f} minutes in "
            f"all on {date.today().isoformat()}.\n\n" + head + rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("paper_runs"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--style-steps", type=int, default=1000)
    parser.add_argument("--n", type=int, default=10000, help="Images in the dataset.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--markdown", type=Path, default=None,
                        help="Write the table into this file (replacing it).")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "shapes_holdout.lmdb"
    if not data.exists():
        _t2i("prepare", "shapes", "--out", str(data), "--n", str(args.n), "--holdout-pairs",
             HOLDOUT)
    text = args.out / "text"
    if not text.exists():
        partial = args.out / "text.partial"  # renamed when complete
        shutil.rmtree(partial, ignore_errors=True)
        _t2i("pretrain-text", "--data", str(data), "--out", str(partial), "--preset", "small",
             "--epochs", str(args.pretrain_epochs), "--holdout-share", "0", "--seed",
             str(args.seed), "--device", "cpu")
        partial.rename(text)
    results = {v: run_variant(variant=v, data=data, text_encoder=TextEncoderFolder(text).encoder,
                              out=args.out, epochs=args.epochs, seed=args.seed,
                              style_steps=args.style_steps) for v in variants}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, epochs=args.epochs, seed=args.seed,
                     minutes=(time.perf_counter() - started) / 60)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
