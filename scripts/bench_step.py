"""Training-step throughput of the engine against the best step stock PyTorch gives, side by
side in one process on one GPU.

    python scripts/bench_step.py [--preset reed] [--batch-sizes 64,256] [--steps 100]
                                 [--repeats 3] [--warmup 10] [--rows ROW,...]
                                 [--train-text-encoder] [--json out.json] [--dry-run]

A whole GAN-INT-CLS step each (the D update on real/right, real/wrong and fake/right, then the
G update on the fake and the GAN-INT interpolated batches), from the same initial weights on
the same batch. The rows, in the order they run:

- ``eager-fp32``: the plain step (``t2i_fast/bench/plain.py``: ``torch.nn`` modules in NCHW,
  G's first layer an ``nn.ConvTranspose2d``, D's joint layer concatenation + 1×1 conv, BCE
  losses, Adam) in float32 with TF32 matmuls and convolutions: the reference;
- ``eager-bf16``: the same under bfloat16 autocast;
- ``project-eager``: the project's eager backend (``--backend eager``), float32/TF32;
- ``engine``: ``--backend compiled`` (compiled parts, one CUDA graph a step, fused Adam and
  losses, channels_last, bfloat16, the moving average of G), also timed end to end from the
  C++ loader;
- ``stock-compile-ro``: the plain step with ``torch.compile(mode="reduce-overhead")`` on its
  three forward functions (G, D's loss, G's loss), bfloat16 autocast, fused Adam, NCHW;
- ``stock-compile``: the same with ``torch.compile``'s default mode;
- ``stock-compile-ro-cl``: ``stock-compile-ro`` with networks and images in channels_last;
- ``engine-fused-auto``: the engine with ``fused_layers="auto"`` (Triton conv → BatchNorm →
  LeakyReLU, chained through the next layer's prologue, where ``choose_fused_layers``
  measures them faster in CUDA-graph replay; CUDA only), as ``t2i-fast train`` runs on a GPU;
- ``engine-fused-on``: the engine with ``fused_layers="on"``: every layer the op takes;
- ``engine-r1``: ``engine`` with ``--r1`` (every 4th step adds the R1 penalty, its D part
  eager and outside the CUDA graph): what the option costs.

The first five plain/stock rows are "stock"; ``engine_over_stock`` is the engine's images/s
over the best of them. A row that fails (to build, compile or run) is a row with its error.

The text encoder is frozen. The plain rows are given the batch's caption embeddings,
computed once beforehand by that encoder, as a user with a frozen encoder caches them; the
project's rows, as ``t2i-fast train`` does, embed every caption of the dataset once
(``embed_all_captions``) and take the loader's caption ids, gathering their rows of that
table in the step (with ``--train-text-encoder`` they run the encoder in every step instead).
The project's rows also update the moving average of G, which the plain step has not.

Before timing, each row's first step is checked against ``eager-fp32``'s (same weights,
batch and noise): losses finite and within 1% (float32 rows: TF32 rounding, and the
untrained encoder's embeddings are so alike that rounding shows through the BatchNorm over
them: 0.2% between the plain and the project's eager step on the CPU) or 5% (bfloat16 rows:
its 8-bit mantissa through some twenty layers). Then ``--warmup`` steps (compiles,
CUDA graph capture) and ``--repeats`` runs of ``--steps`` steps each, timed with CUDA
events: the median and the spread (min, max) of images/s. Peak GPU memory is per row (reset
between). FLOP/s counts the convolutions and matrix products of one plain eager step
(``torch.utils.flop_counter``, forward and backward). Kernels per step come from
``torch.profiler`` over one step of each row.

Two lower bounds on a step's time are printed beside the rows: the step's FLOPs at the
card's measured bfloat16 matmul rate (an 8192³ ``torch.mm``), and each row's kernels per step
times the measured cost of one small kernel replayed in a CUDA graph.

``--dry-run`` (no GPU needed) runs every row on the CPU with the small preset at batch 4 (2
repeats of 2 steps): the compiled stock rows through Dynamo and AOTAutograd with the
``aot_eager`` backend (no Inductor, no CUDA graphs), the engine through Inductor's CPU
backend, and the ``engine-fused-*`` rows report that they need CUDA. The last line of output
is one JSON object, with ``images_per_s`` (row → median, per batch size),
``engine_over_stock``, ``fused_over_engine`` (each fused row's images/s over
``engine``'s, per batch size) and ``r1_over_engine``. Rows of the engine carry
``backend`` (their name) and ``preset``, which ``scripts/bench_kernels.py --step-json``
reads.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from t2i_fast.bench.plain import PlainStep, load_project_weights, plain_networks
from t2i_fast.config import TrainConfig
from t2i_fast.data import Loader
from t2i_fast.models import Discriminator, Generator, TextEncoder, preset
from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.provenance import commit
from t2i_fast.train.caption_table import embed_all_captions
from t2i_fast.train.engine import WARMUP_STEPS, StepEngine

SEED = 0
TOLERANCE = {"fp32": 0.01, "bf16": 0.05}  # relative first-step loss gap to eager-fp32


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    plain: bool  # the plain step (t2i_fast/bench/plain.py), else the project's StepEngine
    precision: str  # fp32 or bf16
    compile_mode: str | None = None  # plain rows: torch.compile's mode, None for eager
    channels_last: bool = False
    fused_layers: str = "off"  # the engine's Triton layers: off, auto or on
    r1: float = 0.0  # the engine's R1 penalty (γ; every TrainConfig.r1_every steps)


ROWS = (
    Row("eager-fp32", plain=True, precision="fp32"),
    Row("eager-bf16", plain=True, precision="bf16"),
    Row("project-eager", plain=False, precision="fp32"),
    Row("engine", plain=False, precision="bf16"),
    Row("stock-compile-ro", plain=True, precision="bf16", compile_mode="reduce-overhead"),
    Row("stock-compile", plain=True, precision="bf16", compile_mode="default"),
    Row("stock-compile-ro-cl", plain=True, precision="bf16", compile_mode="reduce-overhead",
        channels_last=True),
    Row("engine-fused-auto", plain=False, precision="bf16", fused_layers="auto"),
    Row("engine-fused-on", plain=False, precision="bf16", fused_layers="on"),
    Row("engine-r1", plain=False, precision="bf16", r1=1.0),
)
FUSED = tuple(row.name for row in ROWS if row.fused_layers != "off")
STOCK = tuple(row.name for row in ROWS if row.plain)
REFERENCE = "eager-fp32"


@dataclasses.dataclass
class Setup:
    """What every row of one batch size shares."""

    name: str  # the preset
    batch_size: int
    device: torch.device
    dry_run: bool
    weights: dict[str, dict]  # the project's initial state dicts: G, D, text
    config: TrainConfig
    resident: object  # one loader batch, kept where the step runs
    text: torch.Tensor  # [B, E]: the frozen encoder's embeddings of its captions
    loader: Loader
    # With the frozen encoder: every caption's embedding, and the resident batch and loader
    # giving caption ids (the same samples); None when the project's rows train the encoder.
    table: torch.Tensor | None = None
    resident_ids: object = None
    ids_loader: Loader | None = None


def initial_weights(name: str) -> dict[str, dict]:
    torch.manual_seed(SEED)
    models = preset(name)
    return {"G": Generator(models.gan).state_dict(),
            "D": Discriminator(models.gan).state_dict(),
            "text": TextEncoder(models.text).state_dict()}


def text_encoder(name: str, weights: dict, device: torch.device) -> TextEncoder:
    encoder = TextEncoder(preset(name).text)
    encoder.load_state_dict(weights["text"])
    return encoder.to(device)


def engine_step(row: Row, setup: Setup, *, train_text_encoder: bool
                ) -> tuple[Callable[[int], tuple], StepEngine]:
    models = preset(setup.name)
    G, D = Generator(models.gan), Discriminator(models.gan)
    G.load_state_dict(setup.weights["G"])
    D.load_state_dict(setup.weights["D"])
    text = text_encoder(setup.name, setup.weights, setup.device)
    text.requires_grad_(train_text_encoder)
    G, D = G.to(setup.device), D.to(setup.device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    # The noise of the first step: this generator for the eager backend, the device's default
    # one (seeded alike) for the engine on a GPU; both draw what the plain rows draw.
    noise = torch.Generator(device=setup.device).manual_seed(SEED + 1)
    if setup.device.type == "cuda":
        torch.cuda.manual_seed(SEED + 1)
    cuda = setup.device.type == "cuda"
    config = dataclasses.replace(setup.config, r1=row.r1) if row.r1 else setup.config
    engine = StepEngine(G=G, D=D, text_encoder=text, G_ema=G_ema, config=config,
                        device=setup.device, noise=noise,
                        backend="eager" if row.name == "project-eager" else "compiled",
                        precision=row.precision if cuda else "fp32",
                        fused_layers=row.fused_layers, caption_table=setup.table)
    batch = setup.resident if setup.table is None else setup.resident_ids

    def step(i: int):
        metrics = engine.step(batch, step=i)
        return metrics["d_loss"], metrics["g_loss"]
    return step, engine


def plain_step(row: Row, setup: Setup) -> Callable[[int], tuple]:
    gan = preset(setup.name).gan
    G, D = plain_networks(gan)
    load_project_weights(G, setup.weights["G"])
    load_project_weights(D, setup.weights["D"])
    layout = torch.channels_last if row.channels_last else torch.contiguous_format
    G, D = (m.to(setup.device, memory_format=layout) for m in (G, D))
    images, wrong = (F.adaptive_avg_pool2d(t, gan.image_size).contiguous(memory_format=layout)
                     for t in (setup.resident.images, setup.resident.wrong_images))
    cuda = setup.device.type == "cuda"
    if row.compile_mode is None:
        options = None
    elif setup.dry_run:
        options = {"backend": "aot_eager"}
    else:
        options = {"mode": row.compile_mode} if row.compile_mode != "default" else {}
    train = PlainStep(G, D, fused_adam=cuda and row.compile_mode is not None,
                      autocast=torch.bfloat16 if row.precision == "bf16" else None,
                      compile=options)
    noise = torch.Generator(device=setup.device).manual_seed(SEED + 1)
    n = setup.batch_size

    def step(i: int):
        z = torch.randn(n, gan.z_dim, generator=noise, device=setup.device)
        z_mixed = torch.randn(n, gan.z_dim, generator=noise, device=setup.device)
        return train(images, wrong, setup.text, z, z_mixed)
    return step


def describe(row: Row, device: torch.device, dry_run: bool, cached: bool) -> dict:
    """The row's layouts, dtypes and machinery, as printed and in the JSON."""
    cuda = device.type == "cuda"
    precision = row.precision if (row.plain or cuda) else "fp32"  # the engine's auto
    if row.plain:
        compiler = ("eager" if row.compile_mode is None else
                    "aot_eager (dry run)" if dry_run else f"inductor {row.compile_mode}")
        return {"layout": "channels_last" if row.channels_last else "NCHW",
                "dtype": "bf16 autocast" if precision == "bf16" else
                "fp32 (TF32)" if cuda else "fp32",
                "compiler": compiler,
                "adam": "fused" if cuda and row.compile_mode else "default",
                "text": "given (cached)"}
    engine = row.name != "project-eager"
    return {"layout": "channels_last" if engine else "NCHW (2 layers out channels_last)",
            "dtype": "bf16 autocast" if precision == "bf16" else
            "fp32 (TF32)" if cuda else "fp32",
            "compiler": ("inductor + CUDA graph" if cuda else "inductor (CPU)") if engine
            else "eager",
            "adam": "fused" if engine else "default",
            "text": "cached table (caption ids)" if cached else "encoder in step",
            "fused_layers": row.fused_layers, "r1": row.r1}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable[[], None], device: torch.device) -> float:
    """The time ``run`` takes: CUDA events on a GPU (from an idle queue), else the clock."""
    synchronize(device)
    if device.type != "cuda":
        tick = time.perf_counter()
        run()
        return time.perf_counter() - tick
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def kernels_per_step(step: Callable[[], None], device: torch.device) -> int | None:
    """Kernels one step runs on the GPU (those inside CUDA graphs included); None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        synchronize(device)
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    return sum(event.get("cat") == "kernel" for event in events)


def matmul_tflops(device: torch.device) -> tuple[float, str]:
    """The card's measured matmul rate: bfloat16 8192³ on a GPU, float32 512³ on the CPU."""
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a, b, c = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
    reps = 20 if cuda else 3

    def products(count: int) -> None:
        for _ in range(count):
            torch.mm(a, b, out=c)
    products(3)
    took = seconds(lambda: products(reps), device)
    return 2 * n**3 * reps / took / 1e12, f"{str(dtype).removeprefix('torch.')} {n}³ mm"


def kernel_floor_us(device: torch.device, *, kernels: int = 1000, replays: int = 20
                    ) -> float | None:
    """The cost of one tiny kernel replayed in a CUDA graph (µs); None on the CPU."""
    if device.type != "cuda":
        return None
    x = torch.zeros(1, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # lazy initialisation before the capture
        x.add_(1)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(kernels):
            x.add_(1)
    graph.replay()
    took = seconds(lambda: [graph.replay() for _ in range(replays)], device)
    return took / (kernels * replays) * 1e6


def first_losses(step: Callable[[int], tuple], *, count_flops: bool
                 ) -> tuple[dict[str, float], float | None]:
    counter = FlopCounterMode(display=False) if count_flops else None
    with counter or contextlib.nullcontext():
        d_loss, g_loss = step(0)
    flops = counter.get_total_flops() if counter is not None else None
    return {"d_loss": d_loss.item(), "g_loss": g_loss.item()}, flops


def error_text(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def measure_row(row: Row, setup: Setup, args, reference: dict | None) -> tuple[dict, dict]:
    """The row's results, and the first-step losses (and FLOPs) it measured."""
    device = setup.device
    out = {"row": row.name, "batch_size": setup.batch_size,
           **describe(row, device, setup.dry_run, setup.table is not None)}
    if not row.plain:  # what scripts/bench_kernels.py --step-json reads
        out.update(backend=row.name, preset=setup.name)
    found: dict = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.utils.counters.clear()
    try:
        run_row(row, setup, args, reference, out, found)
    except Exception as exc:  # one row failing must not hide the others' numbers
        out["error"] = error_text(exc)
    torch._dynamo.reset()  # its compiled code and CUDA graph trees hold the row's networks
    return out, found


def run_row(row: Row, setup: Setup, args, reference: dict | None, out: dict,
            found: dict) -> None:
    """Fills ``out`` (the row's results) and ``found`` (first losses, FLOPs) as it goes."""
    device = setup.device
    engine = None
    if row.plain:
        step = plain_step(row, setup)
    else:
        step, engine = engine_step(row, setup, train_text_encoder=args.train_text_encoder)
    tick = time.perf_counter()
    losses, flops = first_losses(step, count_flops=row.name == REFERENCE)
    out["first_step_s"] = round(time.perf_counter() - tick, 3)  # compiles included
    out["first_losses"] = {k: round(v, 5) for k, v in losses.items()}
    found.update(losses=losses, flops=flops)
    if not all(math.isfinite(v) for v in losses.values()):
        raise RuntimeError(f"first step's losses are not finite: {losses}")
    if row.name == REFERENCE:
        reference = losses
    tolerance = TOLERANCE[row.precision if (row.plain or device.type == "cuda") else "fp32"]
    # None: no reference to check against (eager-fp32 failed or was not asked for).
    out["loss_check"] = all(
        abs(losses[k] - reference[k]) <= tolerance * max(1.0, abs(reference[k]))
        for k in losses) if reference else None
    if out["loss_check"] is False:
        raise RuntimeError(f"first step disagrees with {REFERENCE}: {losses} vs {reference}")
    counter = iter(range(1, sys.maxsize))  # the step index: the engine's schedule reads it
    # Enough steps for every compile, and for the engine to warm up and capture its graph.
    for _ in range(args.warmup):
        step(next(counter))

    def steps():
        for _ in range(args.steps):
            step(next(counter))
    rates = [args.steps * setup.batch_size / seconds(steps, device)
             for _ in range(args.repeats)]
    out["images_per_s"] = round(statistics.median(rates), 1)
    out["images_per_s_min"] = round(min(rates), 1)
    out["images_per_s_max"] = round(max(rates), 1)
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    out["kernels_per_step"] = kernels_per_step(lambda: step(next(counter)), device)
    if row.compile_mode == "reduce-overhead":  # a skip leaves the row without CUDA graphs
        out["cudagraph_skips"] = int(torch._dynamo.utils.counters["inductor"]["cudagraph_skips"])
    if engine is None:
        return
    out["compiled_parts"] = engine.compiled_parts
    out["cuda_graph"] = engine._graph is not None
    if row.fused_layers != "off":
        out["fused_layers"] = engine.fused
        out["kernel_evidence"] = engine.kernel_evidence
    if row.name == "engine":
        batches = forever(setup.loader if setup.table is None else setup.ids_loader)

        def from_loader():
            for _ in range(args.steps):
                engine.step(next(batches), step=next(counter))
        out["loader_images_per_s"] = round(
            args.steps * setup.batch_size / seconds(from_loader, device), 1)
        out["loader_ratio"] = round(out["loader_images_per_s"] / out["images_per_s"], 3)


def forever(batches):
    """A loader's epochs, one after another, without end."""
    while True:
        yield from batches


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(results: dict) -> None:
    """The per-batch-size figures of the final JSON, from the rows."""
    for key in ("images_per_s", "best_stock", "engine_over_stock", "fused_over_engine",
                "r1_over_engine", "project_eager_over_plain_eager"):
        results[key] = {}
    for size in results["batch_sizes"]:
        rate = {r["row"]: r.get("images_per_s") for r in results["rows"]
                if r["batch_size"] == size}
        key = str(size)
        results["images_per_s"][key] = rate
        stock = {name: rate[name] for name in STOCK if rate.get(name)}
        best = max(stock, key=stock.get) if stock else None
        results["best_stock"][key] = best
        results["engine_over_stock"][key] = ratio(rate.get("engine"), stock.get(best))
        results["fused_over_engine"][key] = {name: ratio(rate.get(name), rate.get("engine"))
                                             for name in FUSED}
        results["r1_over_engine"][key] = ratio(rate.get("engine-r1"), rate.get("engine"))
        results["project_eager_over_plain_eager"][key] = ratio(rate.get("project-eager"),
                                                               rate.get(REFERENCE))


def print_report(results: dict) -> None:
    floor_us = results["kernel_floor_us"]
    print(f"{results['device']}, torch {results['torch']}, commit {results['commit']}, "
          f"preset {results['preset']}, {results['repeats']} x {results['steps']} steps"
          + (" (dry run: CPU, compiled stock rows through aot_eager)"
             if results["dry_run"] else ""))
    print(f"matmul rate {results['matmul_tflops']:.3g} TFLOP/s ({results['matmul_what']}); "
          "kernel floor in a CUDA graph "
          + (f"{floor_us:.2f} µs" if floor_us is not None else "n/a (no CUDA)"))
    header = (f"{'batch':>5}  {'row':<20}{'img/s':>10}{'min':>9}{'max':>9}{'TFLOP/s':>8}"
              f"{'GiB':>7}{'kernels':>8}{'floor img/s':>12}  layout, dtype, compiler, adam, "
              "text")
    print(header)
    for row in results["rows"]:
        size = row["batch_size"]
        what = f"{row['layout']}, {row['dtype']}, {row['compiler']}, {row['adam']} Adam, " \
               f"{row['text']}"
        if "error" in row:
            print(f"{size:>5}  {row['row']:<20}failed: {row['error']}  [{what}]")
            continue
        flops = results["flops_per_step"].get(str(size))
        tflops = flops / size * row["images_per_s"] / 1e12 if flops else float("nan")
        kernels = row.get("kernels_per_step")
        floor = (size / (kernels * floor_us * 1e-6) if kernels and floor_us
                 else float("nan"))
        print(f"{size:>5}  {row['row']:<20}{row['images_per_s']:>10,.0f}"
              f"{row['images_per_s_min']:>9,.0f}{row['images_per_s_max']:>9,.0f}"
              f"{tflops:>8.2f}{row.get('peak_memory_gib', float('nan')):>7.2f}"
              f"{kernels if kernels is not None else 'n/a':>8}{floor:>12,.0f}  {what}")
    for size in results["batch_sizes"]:
        key = str(size)
        flops = results["flops_per_step"].get(key)
        if flops:
            ms = flops / (results["matmul_tflops"] * 1e12) * 1e3
            print(f"batch {size}: compute floor {flops / 1e9:,.1f} GFLOP/step at the matmul "
                  f"rate = {ms:.3f} ms/step = {size / ms * 1e3:,.0f} images/s; launch floor "
                  "= kernels x kernel floor (column 'floor img/s')")
        engine = results["rows"] and next(
            (r for r in results["rows"] if r["batch_size"] == size and r["row"] == "engine"),
            None)
        if engine and "loader_ratio" in engine:
            print(f"batch {size}: engine from the C++ loader {engine['loader_images_per_s']:,.0f}"
                  f" images/s = {engine['loader_ratio']:.3f} of the resident batch's")
        best = results["best_stock"][key]
        print(f"batch {size}: engine / best stock ({best}) = "
              f"{results['engine_over_stock'][key]}, fused / engine = "
              f"{results['fused_over_engine'][key]}, project-eager / {REFERENCE} = "
              f"{results['project_eager_over_plain_eager'][key]} (should be >= 1)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="reed")
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row")
    parser.add_argument("--warmup", type=int, default=10,
                        help=f"untimed steps after the first (at least {WARMUP_STEPS + 2})")
    parser.add_argument("--rows", default=",".join(row.name for row in ROWS),
                        help="the rows to run, in their fixed order")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="the project's rows update the text encoder with D (default: "
                             "frozen)")
    parser.add_argument("--json", type=Path, help="also write the results here (after "
                                                  "every row)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every row on the CPU: small preset, batch 4, 2 x 2 steps")
    args = parser.parse_args(argv)
    wanted = args.rows.split(",")
    unknown = sorted(set(wanted) - {row.name for row in ROWS})
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {[row.name for row in ROWS]}")
    rows = [row for row in ROWS if row.name in wanted]
    if args.dry_run:
        device, name, sizes = torch.device("cpu"), "small", [4]
        args.steps, args.repeats, args.warmup = 2, 2, 0
    elif not torch.cuda.is_available():
        print("bench_step.py: no CUDA GPU here (--dry-run checks the script on the CPU)",
              file=sys.stderr)
        sys.exit(1)
    else:
        device, name = torch.device("cuda"), args.preset
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        args.warmup = max(args.warmup, WARMUP_STEPS + 2)
        # The eager reference as a user would run it on this GPU.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    rate, what = matmul_tflops(device)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__, "commit": commit(),
        "date": datetime.date.today().isoformat(), "dry_run": args.dry_run, "preset": name,
        "batch_sizes": sizes, "steps": args.steps, "repeats": args.repeats,
        "warmup": args.warmup, "matmul_tflops": round(rate, 4), "matmul_what": what,
        "kernel_floor_us": kernel_floor_us(device), "flops_per_step": {}, "rows": []}

    def save() -> None:
        summarize(results)  # a run cut off by a time limit keeps its figures so far
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    weights = initial_weights(name)
    with tempfile.TemporaryDirectory(prefix="bench_step_") as scratch:
        data = Path(scratch) / "shapes.lmdb"
        # 76-px records (64-px crops); enough batches an epoch that the loader's epoch
        # boundaries stay rare in the end-to-end runs.
        make_shapes(out=data, n=16 * max(sizes) if not args.dry_run else 16)
        for size in sizes:
            # A named encoder is frozen unless trained (the rows load the same initial one).
            # The paper's step, without the mode-seeking term and the class loss, one
            # learning rate: the plain rows' math.
            config = TrainConfig(data=str(data), run="-", preset=name, batch_size=size,
                                 text_encoder="initial weights", mode_seeking=0.0,
                                 class_loss=0.0, d_lr_scale=1.0,
                                 train_text_encoder=args.train_text_encoder)
            options = {"batch_size": size, "seed": SEED, "dtype": torch.float32,
                       "layout": "nhwc", "device": device if device.type == "cuda" else None}
            with Loader(data, **options) as loader, \
                    Loader(data, caption_format="ids", **options) as ids_loader:
                resident = next(iter(loader))
                encoder = text_encoder(name, weights, device)
                with torch.no_grad():
                    text = encoder.encode_mean(resident.captions)
                frozen = {} if args.train_text_encoder else {
                    "table": embed_all_captions(dataset_path=data, text_encoder=encoder),
                    "resident_ids": next(iter(ids_loader)), "ids_loader": ids_loader}
                setup = Setup(name=name, batch_size=size, device=device, dry_run=args.dry_run,
                              weights=weights, config=config, resident=resident, text=text,
                              loader=loader, **frozen)
                reference = None
                for row in rows:
                    out, found = measure_row(row, setup, args, reference)
                    if row.name == REFERENCE and found:
                        reference = found["losses"]
                        results["flops_per_step"][str(size)] = found["flops"]
                    results["rows"].append(out)
                    save()
    save()
    print_report(results)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
