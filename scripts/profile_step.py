"""Where one GAN-INT-CLS training step spends its time: a torch.profiler trace of
``Trainer.train_step`` after warm-up steps, grouped into kinds of work.

    python scripts/profile_step.py [--data shapes.lmdb] [--preset reed] [--batch-size 64]
                                   [--device auto] [--json out.json] [--trace trace.json]

On a GPU the table is GPU time per kind of kernel (from the trace's kernel, memcpy and memset
events) with the number of kernel launches per step; on the CPU it is the operators' self
CPU time, and launches are "n/a": there the count of ATen operators that compute, innermost
(views and allocations left out; one kernel each on a GPU, run eagerly) stands in for them.
Without ``--data`` a small shapes dataset is written to a temporary folder. The text encoder
is frozen, as ``t2i-fast train`` has it after pretraining and as ``scripts/bench_step.py``
measures the step (its weights do not change the step's work, so an untrained one is
used): the trainer embeds every caption once and the step gathers the loader's caption ids
from that table, so no text encoder runs in it; ``--train-text-encoder`` trains it with D
instead, in the step. Fused layers follow the training default (``auto``: measured, with
the compiled backend on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from t2i_fast.config import VARIANTS, TrainConfig, resolve_device
from t2i_fast.models import PRESETS, TextEncoder, preset
from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.train.loop import Trainer

KINDS = ("conv/gemm", "batchnorm", "elementwise", "reduction", "optimizer", "copy", "other")
# First match wins, so the specific patterns come before the broad ones ("batch_norm" before
# "norm", "multi_tensor_apply" before "elementwise"). Names are CUDA kernel names (cuDNN,
# cuBLAS, CUTLASS, ATen, Triton/Inductor) or, on the CPU, ATen operator names.
_PATTERNS = [
    ("optimizer", r"multi_tensor_apply|_foreach_|fused_adam|adam|optimizer\."),
    ("batchnorm", r"batch_?norm|bn_fw|bn_bw|bn_bp|welford"),
    ("copy", r"memcpy|memset|copy|_to_copy|aten::to$|clone|contiguous|cat\b|catarray|"
             r"nchwtonhwc|nhwctonchw|transpose|permute|stack"),
    ("conv/gemm", r"conv|gemm|xmma|cutlass|cudnn|cublas|wgrad|dgrad|fprop|winograd|"
                  r"implicit|aten::(addmm|mm|bmm|matmul|linear)\b|sm\d+_|_mma"),
    ("reduction", r"reduce|triton_red|triton_per|aten::(sum|mean|max|min|norm|std|var)\b|"
                  r"softmax|_loss|nll|matching_loss|generator_loss"),
    ("elementwise", r"elementwise|triton_poi|vectorized|unrolled|pointwise|leaky|relu|tanh|"
                    r"sigmoid|fill|zero_|lerp|where|upsample|pad|aten::(add|sub|mul|div|neg|"
                    r"exp|log|sqrt|rsqrt|pow|clamp|addc|abs|threshold|rand|normal|uniform)"),
]
_COMPILED = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in _PATTERNS]
_DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
# ATen operators that launch no kernel: views, allocations, metadata, no-op conversions.
_NO_KERNEL = re.compile(
    r"aten::(empty|empty_strided|empty_like|as_strided_?|view|_unsafe_view|_reshape_alias|"
    r"reshape|resize_|resolve_conj|resolve_neg|detach_?|alias|t|transpose|permute|expand|expand_as|"
    r"slice|select|split|split_with_sizes|unbind|chunk|narrow|squeeze_?|unsqueeze_?|unfold|"
    r"flatten|unflatten|lift_fresh|_local_scalar_dense|item|to|contiguous|"
    r"cudnn_is_acceptable|is_nonzero|size|stride|numel)")
# The host's launch calls: fewer than the kernels run when CUDA graphs replay many at once.
_LAUNCH_CALL = re.compile(r"LaunchKernel|LaunchCooperativeKernel|GraphLaunch")


def kind_of(name: str) -> str:
    for kind, pattern in _COMPILED:
        if pattern.search(name):
            return kind
    return "other"


def _thread_self_times(events: list[dict]) -> list[tuple[str, str, float]]:
    events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))  # parents before children
    result = []
    stack: list[list] = []  # open events: [end, name, kind, self time, is an operator]
    for event in [*events, None]:
        while stack and (event is None or stack[-1][0] <= event["ts"]):
            _, name, kind, self_time, is_op = stack.pop()
            if is_op:
                result.append((name, kind, self_time))
        if event is None:
            break
        kind = kind_of(event["name"])
        if stack:
            stack[-1][3] -= event["dur"]
            if stack[-1][2] == "optimizer":
                kind = "optimizer"
        stack.append([event["ts"] + event["dur"], event["name"], kind, float(event["dur"]),
                      event.get("cat") == "cpu_op"])
    return result


def _compute_ops(events: list[dict]) -> int:
    """The ATen operators in ``events`` that compute and hold no other computing operator
    (a convolution that only allocates inside counts; ``conv2d`` around it does not):
    those whose work on a GPU is its own kernel. Views, allocations and other operators
    that launch nothing (``_NO_KERNEL``) are left out."""
    count = 0
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "cpu_op" and event["name"].startswith("aten::"):
            by_thread[(event.get("pid"), event.get("tid"))].append(event)
    for thread in by_thread.values():
        stack: list[list] = []  # open operators: [end, name, holds a computing operator]
        for event in sorted(thread, key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1][0] <= event["ts"]:
                count += _close(stack)
            stack.append([event["ts"] + event["dur"], event["name"], False])
        while stack:
            count += _close(stack)
    return count


def _close(stack: list[list]) -> int:
    """Closes the innermost open operator: 1 if it is an innermost computing one."""
    _, name, holds = stack.pop()
    computes = holds or not _NO_KERNEL.fullmatch(name)
    if stack and computes:
        stack[-1][2] = True
    return int(computes and not holds)


def _cpu_op_times(events: list[dict]) -> list[tuple[str, str, float]]:
    """(name, kind, self time µs) of each CPU operator in ``events`` (operators and user
    annotations): its duration less that of the events directly inside it on its thread.
    Whatever runs inside an optimizer step or a _foreach_ op is optimizer work, although on
    the CPU it is made of plain elementwise operators."""
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for event in events:
        by_thread[(event.get("pid"), event.get("tid"))].append(event)
    return [row for thread in by_thread.values() for row in _thread_self_times(thread)]


def summarize(trace: dict, *, steps: int) -> dict:
    """Per-step time by kind, the heaviest operations and the launch count from a Chrome
    trace written by torch.profiler."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    device = [e for e in events if e.get("cat") in _DEVICE_CATEGORIES]
    if device:
        timed = [(e["name"], kind_of(e["name"]), float(e["dur"])) for e in device]
        launches = sum(e.get("cat") == "kernel" for e in device) / steps
        launch_calls = sum(e.get("cat") in ("cuda_runtime", "cuda_driver")
                           and bool(_LAUNCH_CALL.search(e["name"])) for e in events) / steps
    else:
        timed = _cpu_op_times([e for e in events
                               if e.get("cat") in ("cpu_op", "user_annotation")])
        launches = launch_calls = None
    by_kind = {kind: {"us": 0.0, "calls": 0} for kind in KINDS}
    by_name: dict[tuple[str, str], dict] = {}
    for name, kind, micros in timed:
        by_kind[kind]["us"] += micros
        by_kind[kind]["calls"] += 1
        entry = by_name.setdefault((name, kind),
                                   {"name": name, "kind": kind, "us": 0.0, "calls": 0})
        entry["us"] += micros
        entry["calls"] += 1
    total = sum(v["us"] for v in by_kind.values())
    kinds = {kind: {"us_per_step": round(v["us"] / steps, 1),
                    "share": round(v["us"] / total, 4) if total else 0.0,
                    "calls_per_step": round(v["calls"] / steps, 1)}
             for kind, v in by_kind.items()}
    top = sorted(by_name.values(), key=lambda v: -v["us"])[:15]
    return {
        "time_source": "cuda" if device else "cpu",
        "total_us_per_step": round(total / steps, 1),
        "kernel_launches_per_step": launches,
        "launch_calls_per_step": launch_calls,
        "aten_ops_per_step": round(_compute_ops(events) / steps, 1),
        "kinds": kinds,
        "top_ops": [{"name": v["name"][:160], "kind": v["kind"],
                     "us_per_step": round(v["us"] / steps, 1),
                     "calls_per_step": round(v["calls"] / steps, 1)} for v in top],
    }


def print_table(summary: dict, *, file=None) -> None:
    source = "GPU" if summary["time_source"] == "cuda" else "CPU self"
    print(f"{'kind':<12} {source + ' µs/step':>16} {'share':>7} {'calls/step':>11}", file=file)
    for kind, v in summary["kinds"].items():
        print(f"{kind:<12} {v['us_per_step']:>16.1f} {v['share']:>7.1%} "
              f"{v['calls_per_step']:>11.1f}", file=file)
    print(f"{'total':<12} {summary['total_us_per_step']:>16.1f}", file=file)
    launches, calls = summary["kernel_launches_per_step"], summary["launch_calls_per_step"]
    print("kernel launches per step: " + ("n/a (CPU)" if launches is None else
          f"{launches:.0f} kernels run, {calls:.0f} launch calls from the host"), file=file)
    print(f"ATen operators per step: {summary['aten_ops_per_step']:.0f} (those that compute, "
          "innermost)", file=file)
    print("heaviest operations:", file=file)
    for v in summary["top_ops"][:10]:
        print(f"  {v['us_per_step']:>10.1f} µs  {v['calls_per_step']:>6.1f}x  {v['kind']:<11} "
              f"{v['name'][:90]}", file=file)


def _batches(trainer: Trainer):
    while True:  # across epochs: a small dataset may hold fewer batches than the run needs
        yield from trainer.loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(trainer: Trainer, args: argparse.Namespace, device: torch.device):
    """Warm-up steps, then (seconds of the timed steps, the profiler of the profiled ones)."""
    batches = _batches(trainer)
    for _ in range(args.warmup):
        trainer.train_step(next(batches))
    # Timed without the profiler's overhead; each batch is ready (and synchronised) before
    # its step, so that neither the timing nor the trace holds loading.
    seconds = 0.0
    for _ in range(args.time_steps):
        batch = next(batches)
        _sync(device)
        start = time.perf_counter()
        trainer.train_step(batch)
        _sync(device)
        seconds += time.perf_counter() - start
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    ready = [next(batches) for _ in range(args.steps)]
    _sync(device)
    with profile(activities=activities) as prof:
        for batch in ready:
            trainer.train_step(batch)
        _sync(device)
    return seconds, prof


def _text_encoder(name: str, folder: Path) -> Path:
    """An untrained text encoder of preset ``name`` saved as pretrain-text saves one."""
    torch.manual_seed(0)
    config = preset(name).text
    path = folder / "text_encoder.pt"
    torch.save({"text_encoder": TextEncoder(config).state_dict(),
                "text_config": dataclasses.asdict(config), "preset": name}, path)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="dataset (default: shapes in a temp folder)")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--variant", default="int-cls", choices=VARIANTS)
    parser.add_argument("--backend", help="the training configuration's (default: its own)")
    parser.add_argument("--precision", help="the training configuration's (default: its own)")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="train the text encoder with D (default: frozen)")
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled steps first")
    parser.add_argument("--steps", type=int, default=1, help="profiled steps (averaged)")
    parser.add_argument("--time-steps", type=int, default=5,
                        help="unprofiled steps timed after the warm-up (0: none)")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--trace", type=Path, help="write the Chrome trace here")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps) < 1 or min(args.warmup, args.time_steps) < 0:
        parser.error("need --batch-size and --steps >= 1, --warmup and --time-steps >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="profile_step_") as scratch:
        scratch = Path(scratch)
        data = args.data
        if data is None:
            data = scratch / "shapes.lmdb"
            make_shapes(out=data, n=max(4 * args.batch_size, 64))
        chosen = {k: v for k, v in (("backend", args.backend), ("precision", args.precision))
                  if v is not None}
        if not args.train_text_encoder:
            chosen["text_encoder"] = str(_text_encoder(args.preset, scratch))
        config = TrainConfig(data=str(data), run=str(scratch / "run"), preset=args.preset,
                             variant=args.variant, batch_size=args.batch_size,
                             device=str(device), **chosen)
        trainer = Trainer(config)
        with trainer.loader:  # its threads stop before the dataset's folder goes
            seconds, prof = _run(trainer, args, device)
        trace_path = args.trace or scratch / "trace.json"
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "preset": args.preset, "variant": args.variant,
        "batch_size": args.batch_size, "steps_profiled": args.steps,
        "config": {k: getattr(config, k) for k in ("backend", "precision") if hasattr(config, k)},
        "fused_layers": trainer.engine.kernel_evidence["fused_layers"]["mode"],
        "text_encoder": "trained with D" if config.joint_text_encoder
        else "frozen (cached caption table)",
        "step_ms": round(1000 * seconds / args.time_steps, 3) if args.time_steps else None,
        **summarize(trace, steps=args.steps),
    }
    timed = summary["step_ms"]
    print(f"{args.preset} preset, {args.variant}, text encoder {summary['text_encoder']}, "
          f"batch {args.batch_size} on {summary['device']}"
          + ("" if timed is None else f": {timed:.2f} ms a step unprofiled"))
    print_table(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
