"""The fused kernels against their PyTorch forms, on a CUDA GPU.

    python scripts/bench_kernels.py [--batch 64 256] [--dtype bfloat16] [--channels-last]
                                    [--no-compile] [--json PATH] [--csv PATH] [--dry-run]

Convolution → BatchNorm → LeakyReLU: every such layer of the ``reed`` generator and
discriminator (found by walking the models, see ``conv_bn_act_layers``), at each batch size,
in training forward, training forward+backward and eval forward, as

- ``triton``: ``conv_bn_act(impl="triton")`` (the implicit-GEMM kernel with the measured
  tiling; conv gradients from aten),
- ``cudnn_fused``: aten's (cuDNN) convolution and the fused BatchNorm/LeakyReLU kernels,
- ``eager``: cuDNN convolution, then eager ``F.batch_norm`` and ``F.leaky_relu``,
- ``compile``: ``torch.compile`` (Inductor) of the eager layer.

Each layer is first measured for the dispatch table (``measure_dispatch``: the decisions
``impl="auto"`` will use, written to the dispatch JSON and listed here), and every variant is
checked before it is timed (``triton.testing.do_bench`` medians): its error against eager in
float32 at most 3× eager's own error in the dtype, as in the parity tests.
TFLOP/s counts the convolution's multiply-adds (×3 with the backward: input and weight
gradients); GB/s counts the compulsory traffic, each tensor the step reads or writes once.
Both are also given against this card's ceilings, measured here: a large bfloat16 matmul and
a large device-to-device copy.

The fused GAN-CLS / GAN-INT losses (``t2i_fast.ops.matching_loss``) are timed against their
eager forms, forward and forward+backward.

``--dry-run`` lists the layer shapes and needs no GPU; otherwise a machine without CUDA gets
one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from pathlib import Path

import torch

from t2i_fast.models.config import preset
from t2i_fast.models.discriminator import Discriminator
from t2i_fast.models.generator import Generator
from t2i_fast.ops import conv_bn_act as cba
from t2i_fast.ops import dispatch
from t2i_fast.ops.fused_layers import LayerShape, conv_bn_act_layers

VARIANTS = ("triton", "cudnn_fused", "eager", "compile")
MODES = ("train fwd", "train fwd+bwd", "eval fwd")


def reed_layers() -> list[tuple[str, LayerShape]]:
    """("G" or "D", layer) for every conv → BatchNorm layer of the reed models."""
    gan = preset("reed").gan
    with torch.device("meta"):
        text = torch.empty(2, gan.embedding_dim)
        g = conv_bn_act_layers(Generator(gan).eval(), torch.empty(2, gan.z_dim), text)
        d = conv_bn_act_layers(Discriminator(gan).eval(),
                               torch.empty(2, 3, gan.image_size, gan.image_size), text)
    return [("G", layer) for layer in g] + [("D", layer) for layer in d]


def describe(layer: LayerShape) -> str:
    return (f"{layer.kind} {layer.in_channels}->{layer.out_channels} k{layer.kernel_size} "
            f"s{layer.stride} p{layer.padding} in {layer.height}x{layer.width} "
            f"slope={layer.slope}")


def dry_run(batches: list[int]) -> None:
    print("model layer batch shape")
    for batch in batches:
        for model, layer in reed_layers():
            print(f"{model} {layer.name} {batch} {describe(layer)}")


# -- measurement ----------------------------------------------------------------------------
def bench(fn, **kwargs) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median", **kwargs))


def measure_ceilings() -> dict[str, float]:
    """This card's bf16 matmul TFLOP/s and device copy GB/s."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * n**3 / bench(lambda: a @ b) / 1e9
    src = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e6
    return {"bf16_matmul_tflops": round(tflops, 1), "copy_gbps": round(gbps, 1)}


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
    return {"train fwd": {"flop": flop, "bytes": forward},
            "train fwd+bwd": {"flop": 3 * flop, "bytes": forward + y + x + w + y + x + w},
            "eval fwd": {"flop": flop, "bytes": forward}}


def make_tensors(layer: LayerShape, batch: int, dtype: torch.dtype,
                 channels_last: bool) -> dict:
    x = torch.randn(batch, layer.in_channels, layer.height, layer.width, device="cuda",
                    dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    shape = ((layer.in_channels, layer.out_channels) if layer.kind == "conv_transpose"
             else (layer.out_channels, layer.in_channels))
    c = layer.out_channels
    return {
        "x": x,
        "weight": 0.02 * torch.randn(*shape, layer.kernel_size, layer.kernel_size,
                                     device="cuda", dtype=dtype),
        "bias": None,
        "bn_weight": 1 + 0.02 * torch.randn(c, device="cuda"),
        "bn_bias": torch.zeros(c, device="cuda"),
        "running_mean": torch.zeros(c, device="cuda"),
        "running_var": torch.ones(c, device="cuda"),
    }


def layer_fn(variant: str, layer: LayerShape, *, training: bool):
    options = {"kind": layer.kind, "stride": layer.stride, "padding": layer.padding,
               "slope": layer.slope, "training": training}
    if variant in ("triton", "cudnn_fused"):
        return functools.partial(cba.conv_bn_act, **options, impl=variant)
    eager = functools.partial(cba.conv_bn_act_ref, **options)
    return torch.compile(eager, dynamic=False) if variant == "compile" else eager


def run_step(fn, t: dict, mode: str, grad_y: torch.Tensor | None):
    """One step of ``mode``; returns the tensors to compare: output (and gradients)."""
    leaves = [t["x"], t["weight"], t["bn_weight"], t["bn_bias"]]
    if mode == "eval fwd":
        with torch.no_grad():
            return [fn(t["x"], t["weight"], None, t["bn_weight"], t["bn_bias"],
                       t["running_mean"], t["running_var"])]
    y = fn(t["x"], t["weight"], None, t["bn_weight"], t["bn_bias"], t["running_mean"],
           t["running_var"])
    if mode == "train fwd":
        return [y]
    y.backward(grad_y)
    grads = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    return [y.detach(), *grads]


def exact_step(fn, t: dict, mode: str, grad_y: torch.Tensor | None) -> list[torch.Tensor]:
    """run_step in float32 without TF32, on float32 copies of the same (rounded) tensors."""
    exact = {k: v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v
             for k, v in t.items()}
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return run_step(fn, exact, mode, None if grad_y is None else grad_y.float())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def scaled_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1))
               for a, b in zip(got, want, strict=True))


def first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def bench_conv(args, ceilings: dict, report) -> tuple[list[dict], list[dict]]:
    """Rows and dispatch decisions; both so far also go to ``report`` after each layer (a
    run cut off by a time limit keeps the layers it finished)."""
    dtype = getattr(torch, args.dtype)
    rows, decisions = [], []
    variants = [v for v in VARIANTS if v != "compile" or not args.no_compile]
    for batch in args.batch:
        for model, layer in reed_layers():
            t = make_tensors(layer, batch, dtype, args.channels_last)
            stats = {k: t[k] for k in ("x", "weight", "bias", "bn_weight", "bn_bias",
                                       "running_mean", "running_var")}
            for training in (True, False):
                try:
                    decision = cba.measure_dispatch(
                        **stats, kind=layer.kind, stride=layer.stride, padding=layer.padding,
                        slope=layer.slope, training=training)
                except Exception as exc:  # one layer failing must not hide the others
                    decision = {"impl": "?", "key": f"{'train' if training else 'eval'}",
                                "error": first_line(exc)}
                decisions.append({"model": model, "layer": layer.name, "batch": batch,
                                  **decision})
            for leaf in ("x", "weight", "bn_weight", "bn_bias"):
                t[leaf].requires_grad_(True)
            torch._dynamo.reset()  # a fresh compile per layer: no recompile limit to hit
            fns = {v: {training: layer_fn(v, layer, training=training)
                       for training in (True, False)} for v in variants}
            work = conv_work(layer, batch, dtype)
            for mode in MODES:
                training = mode != "eval fwd"
                grad_y = None
                if mode == "train fwd+bwd":
                    grad_y = torch.randn_like(run_step(fns["eager"][True], t, "train fwd",
                                                       None)[0])
                # The check: each variant's error against eager in float32 (no TF32) is
                # at most 3× eager's own error in this dtype plus 2^-10 of the scale, as in
                # the parity tests; a fixed tolerance would fail rounding, such as bf16
                # flipping the ReLU mask of values next to 0 (11% of dx's scale, eager's too).
                exact = exact_step(fns["eager"][training], t, mode, grad_y)
                expected = run_step(fns["eager"][training], t, mode, grad_y)
                allowed = 3 * scaled_error(expected, exact) + 2**-10
                for variant in variants:
                    fn = fns[variant][training]
                    row = {"op": "conv_bn_act", "model": model, "layer": layer.name,
                           "shape": describe(layer), "batch": batch, "dtype": args.dtype,
                           "layout": "channels_last" if args.channels_last else "nchw",
                           "mode": mode, "variant": variant}
                    try:
                        error = scaled_error(run_step(fn, t, mode, grad_y), exact)
                    except Exception as exc:
                        row["check"] = f"error: {first_line(exc)}"
                        rows.append(row)
                        continue
                    row["max_scaled_error"] = error
                    row["allowed_error"] = allowed
                    if error > allowed:
                        row["check"] = "MISMATCH"
                        rows.append(row)
                        continue
                    row["check"] = "ok"
                    ms = bench(functools.partial(run_step, fn, t, mode, grad_y))
                    flop, nbytes = work[mode]["flop"], work[mode]["bytes"]
                    row.update(ms=ms, tflops=flop / ms / 1e9, gbps=nbytes / ms / 1e6)
                    row["tflops_pct"] = 100 * row["tflops"] / ceilings["bf16_matmul_tflops"]
                    row["gbps_pct"] = 100 * row["gbps"] / ceilings["copy_gbps"]
                    rows.append(row)
            report(rows, decisions)
    return rows, decisions


def bench_matching_loss(batches: list[int]) -> list[dict]:
    """The fused GAN-CLS / GAN-INT losses against their eager forms."""
    from t2i_fast.ops.matching_loss import (
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
    rows = []
    for batch in batches:
        for name, (count, fns) in losses.items():
            logits = [torch.randn(batch, device="cuda", requires_grad=True)
                      for _ in range(count)]

            def step(fn, backward: bool, logits=logits):
                loss = fn(*logits)
                if backward:
                    loss.backward()
                return loss

            expected = step(fns["eager"], False)
            for variant, fn in fns.items():
                got = step(fn, False)
                for backward in (False, True):
                    mode = "fwd+bwd" if backward else "fwd"
                    ms = bench(lambda fn=fn, backward=backward: step(fn, backward),
                               grad_to_none=logits)
                    # Reads each logit; with backward, writes its gradient.
                    nbytes = 4 * batch * count * (2 if backward else 1)
                    rows.append({"op": name, "batch": batch, "mode": mode, "variant": variant,
                                 "max_scaled_error": scaled_error([got], [expected]),
                                 "ms": ms, "gbps": nbytes / ms / 1e6})
    return rows


# -- output ---------------------------------------------------------------------------------
def print_conv_table(rows: list[dict], decisions: list[dict]) -> None:
    chosen = {(d["model"], d["layer"], d["batch"], d["key"].endswith("train")): d["impl"]
              for d in decisions}
    by_step: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_step.setdefault((row["model"], row["layer"], row["batch"], row["mode"]),
                           {})[row["variant"]] = row
    variants = [v for v in VARIANTS if any(v in step for step in by_step.values())]
    print(f"{'model':5} {'layer':18} {'batch':>5} {'mode':13} "
          + " ".join(f"{v + ' ms':>14}" for v in variants)
          + f" {'triton TFLOP/s (%)':>18} {'triton GB/s (%)':>17}  auto")
    for (model, name, batch, mode), step in by_step.items():
        cells = []
        for v in variants:
            row = step.get(v, {})
            cells.append(f"{row['ms']:14.4f}" if "ms" in row else f"{row.get('check', '-'):>14}")
        tri = step.get("triton", {})
        perf = (f"{tri['tflops']:10.1f} ({tri['tflops_pct']:4.1f}%)"
                f"{tri['gbps']:10.0f} ({tri['gbps_pct']:4.1f}%)" if "ms" in tri else "")
        auto = chosen.get((model, name, batch, mode != "eval fwd"), "?")
        print(f"{model:5} {name:18} {batch:5} {mode:13} " + " ".join(cells)
              + f" {perf:>36}  {auto}")


def print_loss_table(rows: list[dict]) -> None:
    print(f"{'loss':20} {'batch':>5} {'mode':8} {'variant':8} {'ms':>10} {'GB/s':>8}")
    for row in rows:
        print(f"{row['op']:20} {row['batch']:5} {row['mode']:8} {row['variant']:8} "
              f"{row['ms']:10.4f} {row['gbps']:8.2f}")


def write_outputs(args, result: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.csv:
        rows = result["conv"] + result["loss"]
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
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--csv", metavar="PATH")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the layer shapes and exit (no GPU needed)")
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run(args.batch)
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "--dry-run lists the layer shapes without one", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    ceilings = measure_ceilings()
    device = torch.cuda.get_device_name()
    print(f"{device}: bf16 matmul {ceilings['bf16_matmul_tflops']} TFLOP/s, "
          f"copy {ceilings['copy_gbps']} GB/s")
    result = {"device": device, "torch": torch.__version__, "ceilings": ceilings, "conv": [],
              "loss": [], "dispatch": []}

    def report(conv_rows: list[dict], decisions: list[dict]) -> None:
        result.update(conv=conv_rows, dispatch=decisions)
        write_outputs(args, result)

    # The losses first: they take seconds, the layers minutes.
    result["loss"] = bench_matching_loss(args.batch)
    print_loss_table(result["loss"])
    conv_rows, decisions = bench_conv(args, ceilings, report)
    print_conv_table(conv_rows, decisions)
    print(f"dispatch decisions recorded in {dispatch.dispatch_file()}")
    write_outputs(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
