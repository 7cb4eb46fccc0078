"""The fused kernels against their PyTorch forms, on a CUDA GPU.

    python scripts/bench_kernels.py [--batch 64 256] [--dtype bfloat16] [--channels-last]
                                    [--no-compile] [--no-graph] [--max-size N]
                                    [--step-json PATH]
                                    [--json PATH] [--csv PATH] [--dry-run]

Convolution → BatchNorm → LeakyReLU: every such layer of the ``reed`` generator and
discriminator (found by walking the models, see ``conv_bn_act_layers``), at each batch size,
training forward ("fwd") and forward+backward ("fwd+bwd"), as

- ``triton``: ``conv_bn_act`` with the fastest measured non-split tiling,
- ``triton-splitk``: the fastest measured split-K tiling (layers with few output tiles),
- ``triton-prologue``: the layer reading the previous layer's convolution output and
  applying its BatchNorm and LeakyReLU as the GEMM loads it (``in_scale``/``in_shift``),
- ``cudnn_fused``: aten's (cuDNN) convolution and the fused BatchNorm/LeakyReLU kernels,
- ``eager``: cuDNN convolution, then eager ``F.batch_norm`` and ``F.leaky_relu``,
- ``compile``: ``torch.compile`` of the eager layer: cuDNN with Inductor's fused BatchNorm
  and LeakyReLU,

each timed per call (``triton.testing.do_bench`` medians, launch overhead included) and
inside CUDA-graph replay (``dispatch.graph_replay_ms`` medians: as the captured step runs
it). Each layer is first measured for the dispatch table (``measure_dispatch``: the entry
``impl="auto"`` and ``choose_fused_layers`` use, listed with its winner), and every variant
is checked before it is timed: its error against eager in float32 at most 3× eager's own
error in the dtype, as in the parity tests. TFLOP/s counts the convolution's multiply-adds
(×3 with the backward: input and weight gradients); GB/s counts the compulsory traffic, each
tensor the step reads or writes once. Both are also given against this card's ceilings,
measured here: a large bfloat16 matmul and a large device-to-device copy.

Chains: every run of such layers each reading the previous one's activation (the residual
blocks' bodies) is also timed as one row (``op`` "conv_bn_act_chain", layer
``<block>.<i>+<j>+…``), forward and forward+backward, per call and in graph, as

- ``chained``: ``FusedSequential`` with the run chained: each layer but the last writes only
  its convolution's output and BatchNorm scale/shift, the next applies them in its prologue,
- ``unchained``: the same fused layers (``impl="triton"``, each its fastest measured
  tiling), each writing its activation,
- ``eager`` and ``compile``: the plain modules, eager and compiled by Inductor,

checked as the layers are; ``choose_fused_layers(mode="auto")`` on the run gives the
in-graph decision listed with it (the per-layer decisions and the chain's).

The fused GAN-CLS / GAN-INT losses are timed against their eager forms, and
``choose_matching_loss`` says which the captured step should use. ``--step-json`` reads
``bench_step.py``'s JSON and adds the whole step's summary: the engine with fused layers
off (``engine``), auto (``engine-fused-auto``) and on (``engine-fused-on``).

``--dry-run`` needs no GPU: it lists the layer shapes, then runs the whole pipeline on one
tiny layer on the CPU (Triton's interpreter, wall-clock timing, no CUDA graphs) to check the
script. Otherwise a machine without CUDA gets one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:]:
    # Triton picks interpreter or compiler when a kernel's module is imported: before that.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import csv  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from collections import OrderedDict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from t2i_fast.bench.timing import cuda_ms, matmul_tflops, wall_ms  # noqa: E402
from t2i_fast.models.config import preset  # noqa: E402
from t2i_fast.models.discriminator import Discriminator  # noqa: E402
from t2i_fast.models.generator import Generator  # noqa: E402
from t2i_fast.ops import conv_bn_act as cba  # noqa: E402
from t2i_fast.ops import dispatch  # noqa: E402
from t2i_fast.ops.fused_layers import (  # noqa: E402
    ConvBNAct,
    FusedSequential,
    LayerShape,
    choose_fused_layers,
    conv_bn_act_chains,
    conv_bn_act_layers,
)

VARIANTS = ("triton", "triton-splitk", "triton-prologue", "cudnn_fused", "eager", "compile")
MODES = ("fwd", "fwd+bwd")
TIMINGS = ("call", "graph")
STEP_ROWS = ("engine", "engine-fused-auto", "engine-fused-on")
CHAIN_VARIANTS = ("chained", "unchained", "eager", "compile")
# The dry run's layer: enough input channels for the interpreter's split-K candidate.
DRY_LAYER = LayerShape("dry.0", "conv", 64, 8, 3, 1, 1, 4, 4, 0.2)
# The dry run's chain: a 3×3 layer whose LeakyReLU the next, a 1×1 one, applies.
DRY_CHAIN = [LayerShape("dry.0", "conv", 3, 5, 3, 1, 1, 4, 4, 0.2),
             LayerShape("dry.3", "conv", 5, 4, 1, 1, 0, 4, 4, 0.0, follows="dry.0")]


def reed_layers() -> list[tuple[str, LayerShape]]:
    """("G" or "D", layer) for every conv → BatchNorm layer of the reed models."""
    gan = preset("reed").gan
    with torch.device("meta"):
        text = torch.empty(2, gan.embedding_dim)
        g = conv_bn_act_layers(Generator(gan).eval(), torch.empty(2, gan.z_dim), text)
        d = conv_bn_act_layers(Discriminator(gan).eval(),
                               torch.empty(2, 3, gan.image_size, gan.image_size), text)
    return [("G", layer) for layer in g] + [("D", layer) for layer in d]


def reed_chains() -> list[tuple[str, list[LayerShape]]]:
    """("G" or "D", chain) for every chain of the reed models' layers."""
    layers = reed_layers()
    return [(model, chain) for model in ("G", "D")
            for chain in conv_bn_act_chains([la for m, la in layers if m == model])]


def chain_name(chain: list[LayerShape]) -> str:
    """``<block>.<i>+<j>+…``: the Sequential's name and its layers' positions."""
    block = chain[0].name.rpartition(".")[0]
    return f"{block}." + "+".join(layer.name.rpartition(".")[2] for layer in chain)


def describe(layer: LayerShape) -> str:
    return (f"{layer.kind} {layer.in_channels}->{layer.out_channels} k{layer.kernel_size} "
            f"s{layer.stride} p{layer.padding} in {layer.height}x{layer.width} "
            f"slope={layer.slope}")


# -- timing ---------------------------------------------------------------------------------
def per_call_ms(fn) -> float:
    """Median ms of fn called from Python, launch overhead included."""
    if not torch.cuda.is_available():  # the dry run: wall clock
        return wall_ms(fn, reps=2)
    return cuda_ms(fn)


def cpu_timer(key: str, name: str, step) -> list[float]:
    """The dry run's dispatch timer: wall clock (there are no CUDA graphs on the CPU)."""
    return [wall_ms(step, reps=1) for _ in range(2)]


def measure_ceilings() -> dict[str, float]:
    """This card's bf16 matmul TFLOP/s and device copy GB/s."""
    src = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() / per_call_ms(lambda: dst.copy_(src)) / 1e6
    return {"bf16_matmul_tflops": round(matmul_tflops(torch.bfloat16), 1),
            "copy_gbps": round(gbps, 1)}


def conv_work(layer: LayerShape, batch: int, dtype: torch.dtype) -> dict[str, dict]:
    """{mode: {"flop", "bytes"}}: multiply-adds ×2, and the compulsory traffic."""
    k2 = layer.kernel_size**2
    if layer.kind == "conv_transpose":
        out_hw = ((layer.height - 1) * layer.stride - 2 * layer.padding + layer.kernel_size,
                  (layer.width - 1) * layer.stride - 2 * layer.padding + layer.kernel_size)
        flop = 2 * batch * layer.in_channels * layer.height * layer.width * layer.out_channels * k2
    else:
        out_hw = ((layer.height + 2 * layer.padding - layer.kernel_size) // layer.stride + 1,
                  (layer.width + 2 * layer.padding - layer.kernel_size) // layer.stride + 1)
        flop = 2 * batch * layer.out_channels * out_hw[0] * out_hw[1] * layer.in_channels * k2
    size = torch.empty((), dtype=dtype).element_size()
    x = batch * layer.in_channels * layer.height * layer.width * size
    w = layer.in_channels * layer.out_channels * k2 * size
    y = batch * layer.out_channels * out_hw[0] * out_hw[1] * size
    forward = x + w + y
    # Backward reads dy, x, w and the saved activation; writes dx and dw.
    return {"fwd": {"flop": flop, "bytes": forward},
            "fwd+bwd": {"flop": 3 * flop, "bytes": forward + y + x + w + y + x + w}}


# -- the layer's variants -------------------------------------------------------------------
def make_tensors(layer: LayerShape, batch: int, dtype: torch.dtype, channels_last: bool,
                 device: str) -> dict:
    x = torch.randn(batch, layer.in_channels, layer.height, layer.width, device=device,
                    dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    shape = ((layer.in_channels, layer.out_channels) if layer.kind == "conv_transpose"
             else (layer.out_channels, layer.in_channels))
    c = layer.out_channels
    return {
        "x": x,
        "weight": 0.02 * torch.randn(*shape, layer.kernel_size, layer.kernel_size,
                                     device=device, dtype=dtype),
        "bias": None,
        "bn_weight": 1 + 0.02 * torch.randn(c, device=device),
        "bn_bias": torch.zeros(c, device=device),
        "running_mean": torch.zeros(c, device=device),
        "running_var": torch.ones(c, device=device),
        # The prologue variant's input BatchNorm (the previous layer's), and its slope.
        "in_scale": 1 + 0.1 * torch.randn(layer.in_channels, device=device),
        "in_shift": 0.1 * torch.randn(layer.in_channels, device=device),
    }


def best_tilings(entry: dict) -> dict[str, str]:
    """{"triton": fastest non-split impl, "triton-splitk": fastest split-K impl} of the
    measured candidates, where there are such."""
    found = {}
    for variant, split in (("triton", False), ("triton-splitk", True)):
        timed = {name: ms for name, ms in entry.get("ms", {}).items()
                 if name.startswith("triton:") and ("/k" in name) == split}
        if timed:
            found[variant] = min(timed, key=timed.get)
    return found


def layer_fns(layer: LayerShape, impls: dict[str, str], variants: list[str]) -> dict:
    """{variant: fn(tensors) → output}, the training layer of each variant."""
    options = {"kind": layer.kind, "stride": layer.stride, "padding": layer.padding,
               "slope": layer.slope, "training": True}

    def fused(impl, prologue=False):
        def fn(t):
            extra = ({"in_scale": t["in_scale"], "in_shift": t["in_shift"], "in_slope": 0.2}
                     if prologue else {})
            return cba.conv_bn_act(*_args(t), **options, impl=impl, **extra)
        return fn

    def eager(t):
        return cba.conv_bn_act_ref(*_args(t), **options)

    fns = {"cudnn_fused": fused("cudnn_fused"), "eager": eager}
    if "triton" in impls:
        fns["triton"] = fused(impls["triton"])
        fns["triton-prologue"] = fused(impls["triton"], prologue=True)
    if "triton-splitk" in impls:
        fns["triton-splitk"] = fused(impls["triton-splitk"])
    if "compile" in variants:
        fns["compile"] = torch.compile(eager, dynamic=False)
    return {v: fns[v] for v in variants if v in fns}


def _args(t: dict) -> tuple:
    return (t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], t["running_mean"],
            t["running_var"])


LEAVES = ("x", "weight", "bn_weight", "bn_bias")


def run_step(fn, t: dict, mode: str, grad_y: torch.Tensor | None, *, prologue: bool = False):
    """One step of ``mode``; returns the tensors to compare: output (and gradients)."""
    y = fn(t)
    if mode == "fwd":
        return [y.detach()]
    leaves = [t[k] for k in LEAVES] + ([t["in_scale"], t["in_shift"]] if prologue else [])
    return [y.detach(), *torch.autograd.grad(y, leaves, grad_y)]


@contextlib.contextmanager
def exact_float32():
    """float32 products without TF32, in cuDNN and cuBLAS."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def exact_step(fn, t: dict, mode: str, grad_y, *, prologue: bool = False):
    """run_step in float32 without TF32, on float32 copies of the same (rounded) tensors."""
    exact = {k: v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v
             for k, v in t.items()}
    with exact_float32():
        return run_step(fn, exact, mode, None if grad_y is None else grad_y.float(),
                        prologue=prologue)


def scaled_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1))
               for a, b in zip(got, want, strict=True))


def first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _reference(fn, t: dict, mode: str, grad_y, prologue: bool):
    """(exact, eager in the dtype) outputs of the eager layer, with the prologue applied to
    its input as the prologue variant's GEMM applies it."""
    if not prologue:
        return exact_step(fn, t, mode, grad_y), run_step(fn, t, mode, grad_y)

    def eager_prologue(u):
        return cba.conv_bn_act_ref(*_args(u), **u["options"], in_scale=u["in_scale"],
                                   in_shift=u["in_shift"], in_slope=0.2)
    return (exact_step(eager_prologue, t, mode, grad_y, prologue=True),
            run_step(eager_prologue, t, mode, grad_y, prologue=True))


def bench_conv(args, layers, ceilings: dict, report, *, device: str,
               timer: dispatch.Timer | None) -> tuple[list[dict], list[dict]]:
    """Rows and dispatch decisions; both so far also go to ``report`` after each layer (a
    run cut off by a time limit keeps the layers it finished)."""
    dtype = getattr(torch, args.dtype)
    rows, decisions = [], []
    variants = [v for v in VARIANTS if v != "compile" or not args.no_compile]
    timings = [m for m in TIMINGS if m == "call" or not args.no_graph]
    for batch in args.batch:
        for model, layer in layers:
            t = make_tensors(layer, batch, dtype, args.channels_last, device)
            t["options"] = {"kind": layer.kind, "stride": layer.stride,
                            "padding": layer.padding, "slope": layer.slope, "training": True}
            try:
                decision = cba.measure_dispatch(*_args(t), **t["options"], timer=timer)
            except Exception as exc:  # one layer failing must not hide the others
                decision = {"winner": "?", "key": "", "error": first_line(exc)}
            decisions.append({"model": model, "layer": layer.name, "batch": batch, **decision})
            for leaf in (*LEAVES, "in_scale", "in_shift"):
                t[leaf].requires_grad_(True)
            torch._dynamo.reset()  # a fresh compile per layer: no recompile limit to hit
            fns = layer_fns(layer, best_tilings(decision), variants)
            work = conv_work(layer, batch, dtype)
            for mode in MODES:
                grad_y = None
                if mode == "fwd+bwd":
                    grad_y = torch.randn_like(fns["eager"](t))
                # The check: each variant's error against eager in float32 (no TF32) is
                # at most 3× eager's own error in this dtype plus 2^-10 of the scale, as in
                # the parity tests; a fixed tolerance would fail rounding, such as bf16
                # flipping the ReLU mask of values next to 0 (11% of dx's scale, eager's too).
                references = {}
                for variant, fn in fns.items():
                    prologue = variant == "triton-prologue"
                    if prologue not in references:
                        references[prologue] = _reference(fns["eager"], t, mode, grad_y,
                                                          prologue)
                    exact, expected = references[prologue]
                    allowed = 3 * scaled_error(expected, exact) + 2**-10
                    base = {"op": "conv_bn_act", "model": model, "layer": layer.name,
                            "shape": describe(layer), "batch": batch, "dtype": args.dtype,
                            "layout": "channels_last" if args.channels_last else "nchw",
                            "mode": mode, "variant": variant}
                    step = functools.partial(run_step, fn, t, mode, grad_y, prologue=prologue)
                    rows += checked_and_timed(base, step, exact, allowed, timings, work[mode],
                                              ceilings)
            report(rows, decisions)
    return rows, decisions


def checked_and_timed(base: dict, step, exact: list, allowed: float, timings: list[str],
                      work: dict, ceilings: dict) -> list[dict]:
    """The rows of one variant's step, one per timing: its scaled error against ``exact``
    checked, then (if within ``allowed``) timed per call or in graph, with TFLOP/s and GB/s
    from ``work`` ({"flop", "bytes"})."""
    try:
        error = scaled_error(step(), exact)
    except Exception as exc:
        return [{**base, "check": f"error: {first_line(exc)}"}]
    check = {"max_scaled_error": error, "allowed_error": allowed,
             "check": "ok" if error <= allowed else "MISMATCH"}
    rows = []
    for timing in timings:
        row = {**base, "timing": timing, **check}
        rows.append(row)
        if row["check"] != "ok":
            continue
        try:
            ms = (per_call_ms(step) if timing == "call" else
                  statistics.median(dispatch.graph_replay_ms("", base["variant"], step)))
        except Exception as exc:
            row["check"] = f"error: {first_line(exc)}"
            continue
        row.update(ms=ms, tflops=work["flop"] / ms / 1e9, gbps=work["bytes"] / ms / 1e6)
        if ceilings:
            row["tflops_pct"] = 100 * row["tflops"] / ceilings["bf16_matmul_tflops"]
            row["gbps_pct"] = 100 * row["gbps"] / ceilings["copy_gbps"]
    return rows


# -- chains of layers -----------------------------------------------------------------------
class _Holder(nn.Module):
    """A model holding the chain's Sequential, as ``choose_fused_layers`` takes one."""

    def __init__(self, body: nn.Sequential):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def chain_modules(chain: list[LayerShape], device: str) -> tuple[nn.Sequential, list[int]]:
    """The chain as plain modules (conv, BatchNorm, activation per layer; float32) and each
    layer's position in it."""
    children, positions = [], []
    for layer in chain:
        conv = nn.ConvTranspose2d if layer.kind == "conv_transpose" else nn.Conv2d
        positions.append(len(children))
        children += [conv(layer.in_channels, layer.out_channels, layer.kernel_size,
                          layer.stride, layer.padding, bias=False),
                     nn.BatchNorm2d(layer.out_channels)]
        if layer.slope is not None:
            children.append(nn.ReLU() if layer.slope == 0 else nn.LeakyReLU(layer.slope))
    return nn.Sequential(*children).to(device).train(), positions


def chain_fns(seq: nn.Sequential, chain: list[LayerShape], positions: list[int],
              variants: list[str]) -> dict:
    """{variant: module}: the chain chained, unchained (both fused, ``impl="triton"``),
    eager and compiled, all on ``seq``'s parameters."""
    fused = {p: ConvBNAct.from_modules(seq[p], seq[p + 1], layer.slope, impl="triton")
             for p, layer in zip(positions, chain, strict=True)}
    fns = {"chained": FusedSequential(OrderedDict(seq.named_children()), fused=fused,
                                      chained=positions[:-1]),
           "unchained": FusedSequential(OrderedDict(seq.named_children()), fused=fused),
           "eager": seq}
    if "compile" in variants:
        fns["compile"] = torch.compile(seq, dynamic=False)
    return {v: fn.train() if isinstance(fn, nn.Module) else fn for v, fn in fns.items()
            if v in variants}


def chain_step(fn, x: torch.Tensor, leaves: list[torch.Tensor], mode: str, grad_y):
    """One step of the chain: under autocast when x is not float32, as the engine runs it."""
    with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != torch.float32):
        y = fn(x)
    if mode == "fwd":
        return [y.detach()]
    return [y.detach(), *torch.autograd.grad(y, leaves, grad_y)]


def bench_chains(args, chains, ceilings: dict, report, *, device: str,
                 timer: dispatch.Timer | None) -> tuple[list[dict], list[dict]]:
    """Rows of each chain as one step, and ``choose_fused_layers``' decision on it; both so
    far go to ``report`` after each chain."""
    dtype = getattr(torch, args.dtype)
    rows, decisions = [], []
    variants = [v for v in CHAIN_VARIANTS if v != "compile" or not args.no_compile]
    timings = [m for m in TIMINGS if m == "call" or not args.no_graph]
    for batch in args.batch:
        for model, chain in chains:
            name = chain_name(chain)
            seq, positions = chain_modules(chain, device)
            first = chain[0]
            x = torch.randn(batch, first.in_channels, first.height, first.width, device=device,
                            dtype=dtype)
            if args.channels_last:
                x = x.to(memory_format=torch.channels_last)
            try:
                with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                    _, evidence = choose_fused_layers(_Holder(copy.deepcopy(seq)), x,
                                                      mode="auto", timer=timer)
                (found,) = evidence["chains"]
                names = {f"body.{p}": layer.name for p, layer in zip(positions, chain,
                                                                      strict=True)}
                decision = {**{k: v for k, v in found.items() if k != "layers"},
                            "layer_winners": {names[n]: evidence["layers"][n].get("winner")
                                              for n in found["layers"]}}
            except Exception as exc:  # one chain failing must not hide the others
                decision = {"winner": "?", "key": "", "error": first_line(exc)}
            decisions.append({"model": model, "layer": name, "batch": batch, **decision})
            torch._dynamo.reset()
            fns = chain_fns(seq, chain, positions, variants)
            x.requires_grad_(True)
            leaves = [x, *seq.parameters()]
            exact_seq = copy.deepcopy(seq)
            x32 = x.detach().float().requires_grad_()
            work = {mode: {key: sum(conv_work(layer, batch, dtype)[mode][key]
                                    for layer in chain) for key in ("flop", "bytes")}
                    for mode in MODES}
            for mode in MODES:
                grad_y = None
                if mode == "fwd+bwd":
                    grad_y = torch.randn_like(chain_step(seq, x, leaves, "fwd", None)[0])
                with exact_float32():
                    exact = chain_step(exact_seq, x32, [x32, *exact_seq.parameters()], mode,
                                       None if grad_y is None else grad_y.float())
                allowed = 3 * scaled_error(chain_step(seq, x, leaves, mode, grad_y),
                                           exact) + 2**-10
                for variant, fn in fns.items():
                    base = {"op": "conv_bn_act_chain", "model": model, "layer": name,
                            "shape": " ; ".join(describe(layer) for layer in chain),
                            "batch": batch, "dtype": args.dtype,
                            "layout": "channels_last" if args.channels_last else "nchw",
                            "mode": mode, "variant": variant}
                    step = functools.partial(chain_step, fn, x, leaves, mode, grad_y)
                    rows += checked_and_timed(base, step, exact, allowed, timings, work[mode],
                                              ceilings)
            report(rows, decisions)
    return rows, decisions


def bench_matching_loss(batches: list[int], *, device: str, timer) -> tuple[list[dict], list]:
    """The fused GAN-CLS / GAN-INT losses against their eager forms, per call; and which of
    them ``choose_matching_loss`` keeps for the captured step at each batch."""
    from t2i_fast.ops.matching_loss import (
        choose_matching_loss,
        discriminator_loss_fused,
        discriminator_loss_ref,
        generator_loss_fused,
        generator_loss_ref,
    )

    losses = {
        "discriminator_loss": (3, {"fused": discriminator_loss_fused,
                                   "eager": discriminator_loss_ref}),
        "generator_loss": (2, {"fused": generator_loss_fused, "eager": generator_loss_ref}),
    }
    rows, choices = [], []
    for batch in batches:
        for name, (count, fns) in losses.items():
            logits = [torch.randn(batch, device=device, requires_grad=True)
                      for _ in range(count)]

            def step(fn, backward: bool, logits=logits):
                loss = fn(*logits)
                if backward:
                    torch.autograd.grad(loss, logits)
                return loss

            expected = step(fns["eager"], False).detach()
            for variant, fn in fns.items():
                got = step(fn, False).detach()
                for backward in (False, True):
                    mode = "fwd+bwd" if backward else "fwd"
                    ms = per_call_ms(lambda fn=fn, backward=backward: step(fn, backward))
                    # Reads each logit; with backward, writes its gradient.
                    nbytes = 4 * batch * count * (2 if backward else 1)
                    rows.append({"op": name, "batch": batch, "mode": mode, "variant": variant,
                                 "max_scaled_error": scaled_error([got], [expected]),
                                 "ms": ms, "gbps": nbytes / ms / 1e6})
        choice, evidence = choose_matching_loss(batch_size=batch, device=device, timer=timer)
        choices.append({"batch": batch, **evidence})
    return rows, choices


def step_summary(path: Path) -> list[dict]:
    """bench_step.py's engine rows with fused layers off / auto / on, per preset and batch,
    with each one's speed-up over ``engine`` (off) measured in the same run."""
    rows = json.loads(path.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row.get("backend") in STEP_ROWS:
            groups.setdefault((row.get("preset"), row.get("batch_size")),
                              {})[row["backend"]] = row
    summary = []
    for (name, batch), by_backend in groups.items():
        base = by_backend.get("engine", {}).get("images_per_s")
        for backend in STEP_ROWS:
            rate = by_backend.get(backend, {}).get("images_per_s")
            summary.append({"preset": name, "batch_size": batch, "backend": backend,
                            "images_per_s": rate,
                            "vs_off": round(rate / base, 3) if rate and base else None,
                            "fused_layers": by_backend.get(backend, {}).get("fused_layers")})
    return summary


# -- output ---------------------------------------------------------------------------------
def print_conv_table(rows: list[dict], decisions: list[dict], *,
                     variants: tuple[str, ...] = VARIANTS, perf: str = "triton") -> None:
    """One line per layer (or chain), mode and timing: each variant's ms, ``perf``'s TFLOP/s
    and GB/s, and the in-graph decision."""
    chosen = {(d["model"], d["layer"], d["batch"]): d.get("winner", "?") for d in decisions}
    by_step: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_step.setdefault((row["model"], row["layer"], row["batch"], row["mode"],
                            row.get("timing", "-")), {})[row["variant"]] = row
    variants = [v for v in variants if any(v in step for step in by_step.values())]
    print(f"{'model':5} {'layer':18} {'batch':>5} {'mode':7} {'timing':6} "
          + " ".join(f"{v + ' ms':>19}" for v in variants)
          + f" {perf + ' TFLOP/s (%)':>18} {perf + ' GB/s (%)':>17}  in-graph winner")
    for (model, name, batch, mode, timing), step in by_step.items():
        cells = []
        for v in variants:
            row = step.get(v, {})
            cells.append(f"{row['ms']:19.4f}" if "ms" in row
                         else f"{row.get('check', '-')[:19]:>19}")
        tri = step.get(perf, {})
        perf = ""
        if "tflops_pct" in tri:
            perf = (f"{tri['tflops']:10.1f} ({tri['tflops_pct']:4.1f}%)"
                    f"{tri['gbps']:10.0f} ({tri['gbps_pct']:4.1f}%)")
        winner = chosen.get((model, name, batch), "?")
        print(f"{model:5} {name:18} {batch:5} {mode:7} {timing:6} " + " ".join(cells)
              + f" {perf:>36}  {winner}")


def print_loss_table(rows: list[dict], choices: list[dict]) -> None:
    print(f"{'loss':20} {'batch':>5} {'mode':8} {'variant':8} {'ms':>10} {'GB/s':>8}")
    for row in rows:
        print(f"{row['op']:20} {row['batch']:5} {row['mode']:8} {row['variant']:8} "
              f"{row['ms']:10.4f} {row['gbps']:8.2f}")
    for choice in choices:
        print(f"captured step at batch {choice['batch']}: {choice['choice']} losses "
              f"(in-graph ms {choice.get('ms', choice.get('refused'))})")


def print_step_summary(summary: list[dict]) -> None:
    print(f"{'preset':8} {'batch':>5} {'engine':18} {'images/s':>10} {'vs off':>7}")
    for row in summary:
        rate = f"{row['images_per_s']:10,.0f}" if row["images_per_s"] else f"{'-':>10}"
        ratio = f"{row['vs_off']:7.3f}" if row["vs_off"] else f"{'-':>7}"
        print(f"{row['preset'] or '-':8} {row['batch_size'] or '-':>5} {row['backend']:18} "
              f"{rate} {ratio}")


def write_outputs(args, result: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.csv:
        rows = result["conv"] + result.get("chain", []) + result["loss"]
        fields = list(dict.fromkeys(key for row in rows for key in row))
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile variant (its compiles take minutes)")
    parser.add_argument("--no-graph", action="store_true",
                        help="time per call only, not also inside CUDA-graph replay")
    parser.add_argument("--max-size", type=int, metavar="N",
                        help="only the layers whose input is at most N×N (the small-M "
                             "layers split-K is for: --max-size 8)")
    parser.add_argument("--step-json", metavar="PATH", type=Path,
                        help="bench_step.py's JSON: add the whole step's summary, fused "
                             "layers off / auto / on")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--csv", metavar="PATH")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the layer shapes and run one tiny layer on the CPU "
                             "(Triton's interpreter; no GPU needed)")
    args = parser.parse_args(argv)
    if not args.dry_run:
        return run(args)
    # The dry run's dispatch decisions (CPU timings) stay out of the real table.
    saved = os.environ.get("T2I_FAST_DISPATCH")
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["T2I_FAST_DISPATCH"] = str(Path(scratch) / "dispatch.json")
        try:
            return run(args)
        finally:
            if saved is None:
                del os.environ["T2I_FAST_DISPATCH"]
            else:
                os.environ["T2I_FAST_DISPATCH"] = saved


def run(args) -> int:
    result = {"conv": [], "chain": [], "loss": [], "dispatch": [], "matching_loss": [],
              "step": []}
    summary = []
    if args.step_json:
        try:
            summary = result["step"] = step_summary(args.step_json)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # the step's stage failed
            result["step_error"] = f"{args.step_json}: {first_line(exc)}"
            print(f"no step summary: {result['step_error']}")
    if args.dry_run:
        print("model layer batch shape")
        for batch in args.batch:
            for model, layer in reed_layers():
                print(f"{model} {layer.name} {batch} {describe(layer)}")
            for model, chain in reed_chains():
                print(f"{model} {chain_name(chain)} {batch} chain of {len(chain)} layers")
        args.batch, args.no_compile, args.no_graph, args.dtype = [2], True, True, "float32"
        device, ceilings, timer = "cpu", {}, cpu_timer
        layers, chains = [("dry", DRY_LAYER)], [("dry", DRY_CHAIN)]
    elif not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "--dry-run checks the script without one", file=sys.stderr)
        return 2
    else:
        device, timer = "cuda", None
        def small(layer: LayerShape) -> bool:
            return args.max_size is None or max(layer.height, layer.width) <= args.max_size
        layers = [(model, layer) for model, layer in reed_layers() if small(layer)]
        chains = [(model, chain) for model, chain in reed_chains()
                  if all(small(layer) for layer in chain)]
        ceilings = measure_ceilings()
        name = torch.cuda.get_device_name()
        print(f"{name}: bf16 matmul {ceilings['bf16_matmul_tflops']} TFLOP/s, "
              f"copy {ceilings['copy_gbps']} GB/s")
        result.update(device=name, torch=torch.__version__, ceilings=ceilings)
    torch.manual_seed(0)

    def report(conv_rows: list[dict], decisions: list[dict]) -> None:
        result.update(conv=conv_rows, dispatch=decisions)
        write_outputs(args, result)

    def report_chains(chain_rows: list[dict], decisions: list[dict]) -> None:
        result.update(chain=chain_rows, dispatch=layer_decisions + decisions)
        write_outputs(args, result)

    if summary:
        print_step_summary(summary)
    # The losses first: they take seconds, the layers minutes.
    result["loss"], result["matching_loss"] = bench_matching_loss(
        args.batch, device=device, timer=timer)
    print_loss_table(result["loss"], result["matching_loss"])
    conv_rows, layer_decisions = bench_conv(args, layers, ceilings, report, device=device,
                                            timer=timer)
    print_conv_table(conv_rows, layer_decisions)
    chain_rows, chain_decisions = bench_chains(args, chains, ceilings, report_chains,
                                               device=device, timer=timer)
    print_conv_table(chain_rows, chain_decisions, variants=CHAIN_VARIANTS, perf="chained")
    print(f"dispatch decisions recorded in {dispatch.dispatch_file()}")
    write_outputs(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
