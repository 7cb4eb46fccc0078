"""Training-step throughput: the eager backend, stock torch.compile and the step engine, in one
run on one GPU.

    python scripts/bench_step.py [--presets reed,dcgan] [--batch-sizes 64,256] [--steps 50]
                                 [--warmup 10] [--fused-layers] [--json out.json] [--dry-run]

For each preset and batch size, from the same initial weights and the same batch:

- ``eager``: the eager backend in float32 with TF32 matmuls and convolutions, as a user
  would write the step;
- ``stock-compile``: that same step function under ``torch.compile(mode="reduce-overhead")``
  and bfloat16 autocast, nothing else changed;
- ``engine``: ``--backend compiled`` (compiled parts, CUDA graph, fused Adam and losses,
  channels_last, bfloat16).

A full GAN-INT-CLS step each (text encoding, the D update, the G update, the moving average
of G), with a frozen text encoder as ``t2i-fast train`` has after its pretraining.

Before timing, each backend's first step (the initial networks, the same batch, the same
noise) is checked: losses finite, and within 5% of eager's, which bfloat16's 8-bit mantissa
through some twenty layers allows. Throughput is timed on one batch kept on the GPU, then,
for the engine, end to end from the loader (a shapes dataset made in a temporary folder) to
give the ratio the data pipeline leaves. Peak GPU memory is per backend (reset between);
TFLOP/s counts the convolutions and matrix products of one eager step
(``torch.utils.flop_counter``: forward and backward, not elementwise work).

``--dry-run`` (no GPU needed) runs one step of each on the CPU with the small preset and
batch 4; there ``stock-compile`` is traced by Dynamo without Inductor, to check the
plumbing in seconds. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from t2i_fast.data import Loader
from t2i_fast.models import Discriminator, Generator, TextEncoder, preset
from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.provenance import commit
from t2i_fast.train.config import TrainConfig, resolve_precision
from t2i_fast.train.engine import WARMUP_STEPS, StepEngine

SEED = 0
LOSS_TOLERANCE = 0.05  # relative, bfloat16 against float32 (see the docstring)
# The engine before stock torch.compile: the CUDA graph trees that stock compile leaves
# behind would count in the peak memory of whatever came next.
BACKENDS = ("eager", "engine", "stock-compile")


def initial_weights(name: str) -> dict[str, dict]:
    torch.manual_seed(SEED)
    models = preset(name)
    return {"G": Generator(models.gan).state_dict(),
            "D": Discriminator(models.gan).state_dict(),
            "text": TextEncoder(models.text).state_dict()}


def make_engine(name: str, weights: dict, config: TrainConfig, device: torch.device, *,
                backend: str, precision: str, train_text_encoder: bool,
                fused_layers: bool = False) -> StepEngine:
    models = preset(name)
    G, D = Generator(models.gan), Discriminator(models.gan)
    text = TextEncoder(models.text)
    G.load_state_dict(weights["G"])
    D.load_state_dict(weights["D"])
    text.load_state_dict(weights["text"])
    text.requires_grad_(train_text_encoder)
    G, D, text = G.to(device), D.to(device), text.to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    # The noise of every backend's first step: this generator for eager, the device's
    # default one (seeded alike) for the engine.
    noise = torch.Generator(device=device).manual_seed(SEED + 1)
    if device.type == "cuda":
        torch.cuda.manual_seed(SEED + 1)
    return StepEngine(G=G, D=D, text_encoder=text, G_ema=G_ema, config=config, device=device,
                      noise=noise, backend=backend, precision=precision,
                      fused_layers=fused_layers)


def stepper(backend: str, engine: StepEngine, *, dry_run: bool):
    """step(batch, i) → metrics for one of BACKENDS."""
    if backend != "stock-compile":
        return lambda batch, i: engine.step(batch, step=i)
    decay = engine.config.ema_decay  # a constant: a changing float argument recompiles

    def eager_step(batch):
        return engine._eager_step(batch, decay)

    options = {"backend": "eager"} if dry_run else {"mode": "reduce-overhead"}
    compiled = torch.compile(eager_step, **options)
    # Without the cast cache: cached bf16 copies of D's weights would outlive its update
    # within the step (G's loss would see the old D).
    autocast = torch.autocast(engine.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def step(batch, i):
        with autocast:
            return compiled(batch)
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(step, batches, *, steps: int, batch_size: int, device: torch.device,
                 start: int) -> float:
    sync(device)
    tick = time.perf_counter()
    for i in range(steps):
        step(next(batches), start + i)
    sync(device)
    return steps * batch_size / (time.perf_counter() - tick)


def forever(batches):
    """The batches of a list, or a loader's epoch after epoch, without end."""
    while True:
        yield from batches


def measure(name: str, batch_size: int, data: Path, args, device: torch.device,
            report) -> dict:
    """Each backend's row, also given to ``report`` as soon as it is measured (a run cut off
    by a time limit keeps the rows it finished)."""
    dry = args.dry_run
    weights = initial_weights(name)
    config = TrainConfig(data=str(data), run="-", preset=name, batch_size=batch_size,
                         train_text_encoder=args.train_text_encoder)
    loader = Loader(data, batch_size=batch_size, seed=SEED, dtype=torch.float32, layout="nhwc",
                    device=device if device.type == "cuda" else None)
    resident = next(iter(loader))  # kept where the step runs: "data already on the GPU"
    rows, reference, flops = [], None, None
    for backend in BACKENDS:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        # The engine's precision is what --precision auto gives: bfloat16 on a GPU only.
        precision = {"eager": "fp32", "stock-compile": "bf16",
                     "engine": resolve_precision("auto", "compiled", device)}[backend]
        row = {"preset": name, "batch_size": batch_size, "backend": backend,
               "precision": precision}
        if dry and backend == "stock-compile":
            row["compiler"] = "dynamo only (dry run)"
        engine = step = None
        try:
            engine = make_engine(name, weights, config, device,
                                 backend="compiled" if backend == "engine" else "eager",
                                 precision="fp32" if backend == "stock-compile" else precision,
                                 train_text_encoder=args.train_text_encoder,
                                 fused_layers=args.fused_layers and backend == "engine")
            step = stepper(backend, engine, dry_run=dry)
            tick = time.perf_counter()
            counter = FlopCounterMode(display=False) if backend == "eager" else None
            with counter or contextlib.nullcontext():
                first = {k: v.item() for k, v in step(resident, 0).items()}
            if counter is not None:
                flops = counter.get_total_flops()
            row["first_step_s"] = round(time.perf_counter() - tick, 3)  # compiles included
            row["first_losses"] = {k: round(first[k], 5) for k in ("d_loss", "g_loss")}
            row["finite"] = all(math.isfinite(v) for v in first.values())
            if backend == "eager":
                reference = first
            row["loss_check"] = all(
                abs(first[k] - reference[k]) <= LOSS_TOLERANCE * max(1.0, abs(reference[k]))
                for k in ("d_loss", "g_loss")) if reference else False
            if not (row["finite"] and row["loss_check"]):
                raise RuntimeError(f"first step disagrees with eager: {first} vs {reference}")
            batches = forever([resident])
            # Enough steps for the engine to compile, warm up and capture its graph.
            warmup = 0 if dry else max(args.warmup, WARMUP_STEPS + 2)
            for i in range(warmup):
                step(next(batches), 1 + i)
            timed = 1 if dry else args.steps
            row["images_per_s"] = round(images_per_s(
                step, batches, steps=timed, batch_size=batch_size, device=device,
                start=1 + warmup), 1)
            if flops:
                row["tflops"] = round(flops / batch_size * row["images_per_s"] / 1e12, 2)
            if backend == "engine":
                row["compiled_parts"] = engine.compiled_parts
                row["cuda_graph"] = engine._graph is not None
                if args.fused_layers:
                    row["fused_layers"] = engine.fused
                from_loader = forever(loader)
                row["loader_images_per_s"] = round(images_per_s(
                    step, from_loader, steps=timed, batch_size=batch_size, device=device,
                    start=1 + warmup + timed), 1)
                row["loader_ratio"] = round(row["loader_images_per_s"] / row["images_per_s"], 3)
            if device.type == "cuda":
                row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30,
                                               3)
        except Exception as exc:  # one backend failing must not hide the others' numbers
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            row.setdefault("finite", False)
        rows.append(row)
        report(row)
        del engine, step
        torch._dynamo.reset()  # its compiled code holds the networks
    loader.close()
    return {"rows": rows, "flops_per_step": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="reed,dcgan")
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (compiles)")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="update the text encoder with D (default: frozen)")
    parser.add_argument("--fused-layers", action="store_true",
                        help="the engine with conv_bn_act's Triton layers where its measured "
                             "dispatch picks them (GPU only)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--dry-run", action="store_true",
                        help="one CPU step of each backend, small preset, batch 4")
    args = parser.parse_args()
    if args.dry_run:
        if args.fused_layers:
            parser.error("--fused-layers needs a GPU")
        device, presets, sizes = torch.device("cpu"), ["small"], [4]
    elif not torch.cuda.is_available():
        print("bench_step.py: no CUDA GPU here (--dry-run checks the script on the CPU)",
              file=sys.stderr)
        sys.exit(1)
    else:
        device = torch.device("cuda")
        presets = args.presets.split(",")
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        # The eager baseline as a user would run it on this GPU.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__, "commit": commit(),
        "date": datetime.date.today().isoformat(), "dry_run": args.dry_run,
        "steps": 1 if args.dry_run else args.steps, "rows": [], "flops_per_step": {}}

    def report(row: dict) -> None:
        results["rows"].append(row)
        if args.json:  # rewritten after every row
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    with tempfile.TemporaryDirectory(prefix="bench_step_") as scratch:
        data = Path(scratch) / "shapes.lmdb"
        # 76-px records (64-px crops); enough batches an epoch that the loader's epoch
        # boundaries stay rare in the end-to-end runs.
        make_shapes(out=data, n=max(16 * max(sizes), 16) if not args.dry_run else 16)
        for name in presets:
            for batch_size in sizes:
                got = measure(name, batch_size, data, args, device, report)
                results["flops_per_step"][f"{name}/{batch_size}"] = got["flops_per_step"]
    print(f"{'preset':<8}{'batch':>6}  {'backend':<14}{'img/s':>10}{'TFLOP/s':>9}"
          f"{'peak GiB':>10}{'loader/GPU':>11}")
    for row in results["rows"]:
        if "error" in row:
            print(f"{row['preset']:<8}{row['batch_size']:>6}  {row['backend']:<14}"
                  f"failed: {row['error']}")
            continue
        print(f"{row['preset']:<8}{row['batch_size']:>6}  {row['backend']:<14}"
              f"{row['images_per_s']:>10,.0f}{row.get('tflops', float('nan')):>9.2f}"
              f"{row.get('peak_memory_gib', float('nan')):>10.2f}"
              f"{row.get('loader_ratio', float('nan')):>11.3f}")
    for name in presets:
        for batch_size in sizes:
            rate = {r["backend"]: r.get("images_per_s") for r in results["rows"]
                    if r["preset"] == name and r["batch_size"] == batch_size}
            if rate.get("engine") and rate.get("eager"):
                stock = (f", {rate['engine'] / rate['stock-compile']:.2f}x stock compile"
                         if rate.get("stock-compile") else "")
                print(f"{name} batch {batch_size}: engine {rate['engine'] / rate['eager']:.2f}x "
                      f"eager{stock}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
