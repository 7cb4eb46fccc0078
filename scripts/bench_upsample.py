"""G's training pass (forward and backward) with each way of doubling the resolution,
side by side in one run: the paper's transposed convolutions, the resize-convolution as a
user would write it in ``torch.nn`` (``nn.Upsample`` then ``nn.Conv2d``: the stock), and
ours (``NearestResizeConv``: the same numbers as one transposed convolution).

The stock and ours have the same weights, and their images and gradients are checked equal
before anything is timed. Times are medians: CUDA events (``triton.testing.do_bench``) on
a GPU, wall clock on the CPU. Printed ratios are against the paper's layer, measured in the
same run; on a GPU the compiled (torch.compile) forms are timed too. Each row's FLOP/s is
its own counted work (torch's FlopCounterMode: the stock's 3×3 convolutions at twice the
resolution do 36 multiply-adds an input pixel where the 4×4 transposed ones do 16) over its
time; on a GPU, also as a share of this card's fp32 matmul rate, measured in the same run.

    python scripts/bench_upsample.py [--preset small] [--batch 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from t2i_fast.bench.timing import cuda_ms, matmul_tflops, wall_ms
from t2i_fast.models.config import preset
from t2i_fast.models.generator import Generator
from t2i_fast.models.resize_conv import NearestResizeConv


def stock_copy(generator: Generator) -> Generator:
    """A copy of ``generator`` with each NearestResizeConv as nn.Upsample + its nn.Conv2d:
    the same weights, the stock layers."""
    stock = copy.deepcopy(generator)
    for name, module in list(stock.named_modules()):
        if isinstance(module, NearestResizeConv):
            parent, _, child = name.rpartition(".")
            setattr(stock.get_submodule(parent), child,
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), module.conv))
    return stock


def time_ms(fn, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        return cuda_ms(fn, warmup=10)
    return wall_ms(fn, reps=reps, warmup=1)


def counted_flop(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=20, help="CPU repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    gan = preset(args.preset).gan
    paper = Generator(gan).to(device)
    ours = Generator(dataclasses.replace(gan, upsample="nearest")).to(device)
    stock = stock_copy(ours)
    z = torch.randn(args.batch, gan.z_dim, device=device)
    text = torch.randn(args.batch, gan.embedding_dim, device=device)

    def grads(model: nn.Module) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(z, text).square().mean().backward()
        return [p.grad for p in model.parameters()]

    with torch.no_grad():
        torch.testing.assert_close(ours(z, text), stock(z, text), rtol=1e-4, atol=1e-5)
    for a, b in zip(grads(ours), grads(stock), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)

    models = {"transposed (paper)": paper, "nearest, stock": stock, "nearest, ours": ours}
    if device.type == "cuda":
        models |= {f"{name}, compiled": torch.compile(model) for name, model in
                   list(models.items())}
    results, flop = {}, {}
    for name, model in models.items():
        step = lambda model=model: model(z, text).square().mean().backward()  # noqa: E731
        # A compiled row does its eager twin's work.
        flop[name] = flop.get(name.removesuffix(", compiled")) or counted_flop(step)
        results[name] = time_ms(step, device, args.reps)
    ceiling = matmul_tflops(torch.float32) if device.type == "cuda" else None
    base = results["transposed (paper)"]
    print(f"G forward + backward, preset {args.preset}, batch {args.batch}, {device}"
          + (f"; fp32 matmul {ceiling:.1f} TFLOP/s" if ceiling else ""))
    for name, ms in results.items():
        tflops = flop[name] / ms / 1e9
        share = f" ({100 * tflops / ceiling:4.1f}% of fp32 matmul)" if ceiling else ""
        print(f"  {name:32s} {ms:8.2f} ms   {ms / base:5.2f}× the paper's layer   "
              f"{flop[name] / 1e9:6.2f} GFLOP at {tflops:7.3f} TFLOP/s{share}")
    print(f"  ours in {results['nearest, ours'] / results['nearest, stock']:.2f}× the stock's time")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"preset": args.preset, "batch": args.batch, "device": str(device),
                       "ms": results, "flop": flop, "fp32_matmul_tflops": ceiling}, out, indent=1)


if __name__ == "__main__":
    main()
