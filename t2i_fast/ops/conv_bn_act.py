"""Fused convolution → BatchNorm2d → LeakyReLU for the layers of the ``reed`` and ``dcgan``
presets: 4×4 stride-2 pad-1 convolutions and transposed convolutions, G's first 4×4
transposed convolution (1×1 → 4×4, stride 1, pad 0), 1×1 and 3×3 pad-1 convolutions; any
LeakyReLU slope (0 is ReLU) or none (``slope=None``, for BatchNorms followed by a residual
sum); float32 and bfloat16 (accumulation in float32); NCHW and channels_last.

The kernels, their tiling and what each computes are in ``conv_bn_act_kernels``; this module
launches them (``impl="triton"``: the implicit-GEMM convolution with the batch statistics in
its epilogue, or split-K with them in the reduction; ``impl="cudnn_fused"``: aten's
convolution, then a statistics pass), registers the operators and gives the public
functions. The backward of both impls is the fused BatchNorm/LeakyReLU backward kernels and
aten's ``convolution_backward``; eval folds BatchNorm into the GEMM's epilogue (one kernel
per layer) and has no backward: with autograd recording, ``impl="auto"`` takes the
reference.

Prologue fusion: ``conv_bn_stats`` is a training layer's convolution and batch statistics
only, returning its output z and its BatchNorm as a per-channel (scale, shift); the next
layer's ``conv_bn_act(z, ..., in_scale=, in_shift=, in_slope=)`` applies that BatchNorm and
LeakyReLU while its GEMM loads z, so the normalised activation is never written. Backward
recomputes it (one elementwise pass) for the weight gradient.

``impl="auto"`` takes the PyTorch reference for tensors that are not on a GPU. On a GPU it
looks the layer up in the dispatch table (``t2i_fast.ops.dispatch``) keyed by device, torch
and Triton versions, layer kind and shapes, dtype, layout and train/eval. On a miss it
measures the layer once (``_measure``): the training forward and backward of "unfused"
(cuDNN with the BatchNorm and LeakyReLU in aten ops, compiled by Inductor, as the compiled
step runs an unfused layer), "cudnn_fused" and every candidate tiling (split-K ones for
layers with few output tiles), each checked against "unfused" and timed inside CUDA-graph
replay (medians), and records them; it then runs the fastest fused candidate. Whether a
layer should be fused at all is ``fused_layers.choose_fused_layers``'s question, answered
from the same entry. ``impl="triton"`` takes the fastest measured tiling if there is one,
else a default; ``impl="triton:<tiling>"`` that tiling.

The operators ``torch.ops.t2i_fast.conv_bn_act_train`` (which mutates the running
statistics), ``conv_bn_stats_train`` (likewise), ``conv_bn_act_backward`` and
``conv_bn_act_eval`` are ``torch.library`` custom ops with fake implementations, tied
together for autograd by autograd.Functions, so ``torch.compile(fullgraph=True)`` traces
them without a graph break. They are opaque
custom ops rather than ``triton_op`` (``_common.register_op``; the reason is written where
they are registered).

On a machine without a GPU the kernels run in Triton's interpreter when TRITON_INTERPRET=1
is set before this module is imported (Triton picks compile or interpret when ``@triton.jit``
decorates a function); ``impl="triton"`` or ``"cudnn_fused"`` then work on CPU tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from t2i_fast.ops import dispatch
from t2i_fast.ops._common import INTERPRETED as INTERPRETED  # whether the kernels interpret
from t2i_fast.ops._common import device_refusal, emulate_bf16, register_op, resolve_impl
from t2i_fast.ops.conv_bn_act_kernels import (
    Geometry,
    Tiling,
    bn_act_bwd_dx_kernel,
    bn_act_bwd_finalize_kernel,
    bn_act_bwd_reduce_kernel,
    bn_act_fwd_kernel,
    bn_stats_finalize_kernel,
    bn_stats_partial_kernel,
    candidate_tilings,
    conv_bn_act_fwd_kernel,
    default_tiling,
    elementwise_blocks,
    geometry,
    parse_tiling,
    pow2_clamp,
    splitk_reduce_kernel,
    tiling_name,
)

KINDS = ("conv", "conv_transpose")
IMPLS = ("auto", "triton", "cudnn_fused", "ref")
DTYPES = (torch.float32, torch.bfloat16)

_INT32_MAX = 2**31 - 1


# -- layouts --------------------------------------------------------------------------------
def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _is_channels_last(x) else torch.contiguous_format


def _empty_like_layout(shape, x: torch.Tensor) -> torch.Tensor:
    """A new tensor of x's dtype and device, in x's layout (NCHW or channels_last)."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def _pc_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, pixel) strides of a [B, C, H, W] tensor whose rows are dense
    (stride_h = W·stride_w), as NCHW and channels_last tensors are: pixel h·W + w sits at
    (h·W + w)·stride_w."""
    return t.stride(0), t.stride(1), t.stride(3) if t.shape[3] > 1 else t.stride(2)


def _pc_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t with dense rows, so _pc_strides applies; copied in like's layout only if needed."""
    if t.shape[3] == 1 or t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3):
        return t
    return t.contiguous(memory_format=_memory_format(like))


def _ieee(x: torch.Tensor) -> bool:
    """Exact float32 products, unless torch lets cuDNN convolutions use TF32 too."""
    return x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cudnn.allow_tf32)


# -- launchers ------------------------------------------------------------------------------
def _conv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 g: Geometry, tiling: Tiling, *, stats: bool,
                 bn: tuple[torch.Tensor, ...] | None = None, slope: float | None = None,
                 eps: float = 0.0, prologue: tuple | None = None):
    """The implicit-GEMM convolution into a new tensor in x's layout; with ``stats`` also the
    tile statistics (count [T], sum [C_out, T], M2 [C_out, T]); with ``bn`` = (γ, β, running
    mean, running var) BatchNorm folded into the epilogue, and LeakyReLU when slope is set;
    with ``prologue`` = (scale, shift, slope) the GEMM reads act(x·scale + shift). A split-K
    tiling (training only) sums its shares in a workspace, then splitk_reduce_kernel."""
    out = _empty_like_layout((g.batch, g.c_out, g.out_height, g.out_width), x)
    # [KH, KW, C_in, C_out]: the GEMM reads C_out-contiguous rows of one tap.
    perm = (2, 3, 0, 1) if g.transposed else (2, 3, 1, 0)
    w = weight.permute(perm).contiguous()
    rh, rw = g.class_grid
    tiles_per_class = triton.cdiv(g.class_rows, tiling.block_m)
    split = tiling.split_k
    grid = (g.classes * tiles_per_class, triton.cdiv(g.c_out, tiling.block_n), split)
    # The split-K workspace: the splits' partials one after another along the batch.
    target = out if split == 1 else _empty_like_layout(
        (split * g.batch, g.c_out, g.out_height, g.out_width), x.float())
    k_per_split = triton.cdiv(triton.cdiv(g.c_in, split), tiling.block_k) * tiling.block_k
    if stats and split == 1:
        cnt = x.new_empty(grid[0], dtype=torch.float32)
        psum = x.new_empty((g.c_out, grid[0]), dtype=torch.float32)
        pm2 = torch.empty_like(psum)
    else:
        cnt = psum = pm2 = out  # not read
    gamma, beta, rmean, rvar = bn if bn is not None else (out,) * 4
    in_scale, in_shift, in_slope = prologue if prologue is not None else (w, w, None)
    taps = (g.kh // g.stride, g.kw // g.stride) if g.transposed else (g.kh, g.kw)
    conv_bn_act_fwd_kernel[grid](
        x, w, bias if bias is not None else w, target, gamma, beta, rmean, rvar, cnt, psum,
        pm2, in_scale, in_shift,
        g.batch, g.c_in, g.height, g.width, g.c_out, g.out_height, g.out_width,
        *x.stride(), *target.stride(), rh, rw, tiles_per_class,
        0.0 if slope is None else slope, eps, 0.0 if in_slope is None else in_slope,
        k_per_split, g.batch * target.stride(0),
        KH=g.kh, KW=g.kw, STRIDE=g.stride, PAD=g.padding, TAPS_H=taps[0], TAPS_W=taps[1],
        TRANSPOSED=g.transposed, BATCH_INNER=g.height * g.width == 1,
        HAS_BIAS=bias is not None, STATS=stats, FOLD_BN=bn is not None,
        HAS_ACT=slope is not None, IEEE=_ieee(x), EMULATE_BF16=emulate_bf16(x),
        PROLOGUE=prologue is not None, PROLOGUE_ACT=in_slope is not None, SPLIT_K=split,
        BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    if split == 1:
        return (out, cnt, psum, pm2) if stats else out
    return (out, *_reduce_splits(target, bias, out, split))


def _reduce_splits(ws: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor, split: int):
    """z = the sum of the workspace's splits (+ bias); returns its tile statistics."""
    block_p, block_c = elementwise_blocks(z)
    b, c, h, w = z.shape
    p = b * h * w
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    cnt = z.new_empty(grid[0], dtype=torch.float32)
    psum = z.new_empty((c, grid[0]), dtype=torch.float32)
    pm2 = torch.empty_like(psum)
    splitk_reduce_kernel[grid](
        ws, bias if bias is not None else ws, z, cnt, psum, pm2, p, c, h * w,
        b * ws.stride(0), *_pc_strides(ws), *_pc_strides(z), SPLIT_K=split,
        HAS_BIAS=bias is not None, EMULATE_BF16=emulate_bf16(z), BLOCK_P=block_p,
        BLOCK_C=block_c)
    return cnt, psum, pm2


def _stats_partials(z: torch.Tensor):
    """Tile statistics of z [B, C, H, W] (dense rows), as _conv_triton's."""
    block_p, block_c = elementwise_blocks(z)
    b, c, h, w = z.shape
    p = b * h * w
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    cnt = z.new_empty(grid[0], dtype=torch.float32)
    psum = z.new_empty((c, grid[0]), dtype=torch.float32)
    pm2 = torch.empty_like(psum)
    bn_stats_partial_kernel[grid](z, cnt, psum, pm2, p, c, h * w, *_pc_strides(z),
                                  BLOCK_P=block_p, BLOCK_C=block_c)
    return cnt, psum, pm2


def _finalize_stats(cnt, psum, pm2, running_mean, running_var, momentum: float, eps: float):
    c, t = psum.shape
    mean = psum.new_empty(c)
    invstd = psum.new_empty(c)
    block_c = 4
    bn_stats_finalize_kernel[(triton.cdiv(c, block_c),)](
        cnt, psum, pm2, mean, invstd, running_mean, running_var, c, t, momentum, eps,
        BLOCK_C=block_c, BLOCK_T=pow2_clamp(t, 16, 512))
    return mean, invstd


def _bn_act(z: torch.Tensor, mean, spread, gamma, beta, slope: float | None, eps: float, *,
            from_running: bool) -> torch.Tensor:
    y = torch.empty_like(z)
    block_p, block_c = elementwise_blocks(z)
    b, c, h, w = z.shape
    grid = (triton.cdiv(b * h * w, block_p), triton.cdiv(c, block_c))
    bn_act_fwd_kernel[grid](
        z, y, mean, spread, gamma, beta, b * h * w, c, h * w, *_pc_strides(z),
        *_pc_strides(y), eps, 0.0 if slope is None else slope, FROM_RUNNING=from_running,
        HAS_ACT=slope is not None, EMULATE_BF16=emulate_bf16(y), BLOCK_P=block_p,
        BLOCK_C=block_c)
    return y


def _apply_prologue(x: torch.Tensor, prologue: tuple | None) -> torch.Tensor:
    """act(x·scale + shift) per channel, in x's dtype and layout: the previous layer's
    output as it would have been stored (prologue = (scale [C], shift [C], slope or None))."""
    if prologue is None:
        return x
    scale, shift, slope = prologue
    v = x.float() * scale.float()[:, None, None] + shift.float()[:, None, None]
    if slope is not None:
        v = F.leaky_relu(v, slope)
    return v.to(x.dtype).contiguous(memory_format=_memory_format(x))


def _prologue_backward(da: torch.Tensor, x: torch.Tensor, prologue: tuple):
    """(dx, dscale, dshift) of _apply_prologue given dL/d(its output)."""
    scale, shift, slope = prologue
    d = da.float()
    if slope is not None:
        pre = x.float() * scale.float()[:, None, None] + shift.float()[:, None, None]
        d = torch.where(pre > 0, d, d * slope)
    dx = (d * scale.float()[:, None, None]).to(x.dtype)
    return (dx.contiguous(memory_format=_memory_format(x)),
            (d * x.float()).sum((0, 2, 3)).to(scale.dtype), d.sum((0, 2, 3)).to(shift.dtype))


def _conv_aten(x, weight, bias, g: Geometry, prologue: tuple | None = None) -> torch.Tensor:
    conv = F.conv_transpose2d if g.transposed else F.conv2d
    z = conv(_apply_prologue(x, prologue), weight, bias, stride=g.stride, padding=g.padding)
    # The operators promise x's layout (the fake implementations say so) and the [P, C]
    # passes need dense rows.
    return z.contiguous(memory_format=_memory_format(x))


def _unfused_train_step(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                        grad_y, g: Geometry, slope, momentum, eps):
    """(y, dx, dweight, dγ, dβ): the layer's training forward and backward in aten ops,
    written out rather than through autograd so that it can run anywhere (an op's body
    included); compiled, Inductor fuses the BatchNorm and LeakyReLU of both around cuDNN's
    convolutions, as it does in the compiled step."""
    z = torch.ops.aten.convolution(x, weight, bias, [g.stride] * 2, [g.padding] * 2, [1, 1],
                                   g.transposed, [0, 0], 1)
    zf = z.float()
    n = zf.numel() // zf.shape[1]
    mean = zf.mean((0, 2, 3))
    var = zf.var((0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + eps)
    running_mean.lerp_(mean, momentum)
    running_var.lerp_(var * (n / (n - 1)), momentum)
    xhat = (zf - mean[:, None, None]) * invstd[:, None, None]
    a = xhat * bn_weight[:, None, None] + bn_bias[:, None, None]
    gy = grad_y.float()
    if slope is not None:
        gy = torch.where(a > 0, gy, gy * slope)
        a = torch.where(a > 0, a, a * slope)
    dbeta = gy.sum((0, 2, 3))
    dgamma = (gy * xhat).sum((0, 2, 3))
    dz = (bn_weight * invstd)[:, None, None] * (
        gy - (dbeta[:, None, None] + xhat * dgamma[:, None, None]) / n)
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dz.to(z.dtype), x, weight, None, [g.stride] * 2, [g.padding] * 2, [1, 1], g.transposed,
        [0, 0], 1, [True, True, False])
    return a.to(x.dtype), dx, dw, dgamma, dbeta


# -- the measured dispatch ------------------------------------------------------------------
def _layer_key(x: torch.Tensor, weight: torch.Tensor, g: Geometry, *, training: bool) -> str:
    dtype = str(x.dtype).removeprefix("torch.")
    if x.dtype == torch.float32:
        dtype += "-ieee" if _ieee(x) else "-tf32"
    return dispatch.key(
        x.device, "conv_transpose" if g.transposed else "conv",
        "x " + "x".join(map(str, x.shape)), "w " + "x".join(map(str, weight.shape)),
        f"stride {g.stride} pad {g.padding}", dtype,
        "channels_last" if _is_channels_last(x) else "nchw",
        "train fwd+bwd" if training else "eval fwd", "in-graph")


def _multiprocessors(x: torch.Tensor) -> int:
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return 132  # the interpreter ignores it


def _candidate_tilings(x: torch.Tensor, g: Geometry, *, training: bool) -> list[Tiling]:
    # Eval folds BatchNorm into the GEMM's epilogue, which split-K's partials cannot carry.
    return [t for t in candidate_tilings(g, multiprocessors=_multiprocessors(x))
            if training or t.split_k == 1]


# Distinct shapes one process may measure per compiled function (layers × batch sizes).
_MEASURED_SHAPES = 256


def compiled_for_timing(fn: Callable, *, backend: str | Callable = "inductor") -> Callable:
    """``torch.compile(fn, dynamic=False)`` for a measured candidate, compiled as the step
    compiles it. Every shape measured in a process recompiles the same code, and past
    dynamo's recompile limit (8) a compiled function runs eagerly without an error: the
    eager form would be timed in its place. The limit is raised while it runs."""
    compiled = torch.compile(fn, dynamic=False, backend=backend)

    def call(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=_MEASURED_SHAPES):
            return compiled(*args, **kwargs)
    return call


def _candidates(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, g: Geometry,
                slope, momentum, eps, *, training: bool) -> dict:
    """{name: step} for the measured dispatch: "unfused" (the reference: cuDNN and
    BatchNorm/LeakyReLU in aten ops, compiled by Inductor on a GPU), "cudnn_fused" and
    "triton:<tiling>" for each candidate tiling; names other than "unfused" are ``impl``
    values. Training steps run forward and backward (with a fixed output gradient) and
    return (y, dx, dweight, dγ, dβ), eval steps the output; both leave the running
    statistics as they are (the steps update copies)."""
    scratch = (running_mean.clone(), running_var.clone())
    names = ["cudnn_fused", *(f"triton:{tiling_name(t)}"
                              for t in _candidate_tilings(x, g, training=training))]
    if training:
        y_shape = (g.batch, g.c_out, g.out_height, g.out_width)
        seed = torch.Generator(x.device).manual_seed(0)
        grad_y = torch.randn(y_shape, generator=seed, device=x.device).to(x.dtype)
        grad_y = grad_y.contiguous(memory_format=_memory_format(x))

        def fused(impl: str):
            choice, tiling = _explicit(impl)

            def step():
                y, z, mean, invstd = _train_forward(
                    x, weight, bias, bn_weight, bn_bias, *scratch, g, slope, momentum, eps,
                    choice, tiling)
                return (y, *_backward_body(grad_y, x, weight, bn_weight, bn_bias, z, mean,
                                           invstd, "conv_transpose" if g.transposed else "conv",
                                           g.stride, g.padding, slope))
            return step

        unfused = functools.partial(_unfused_train_step, x, weight, bias, bn_weight, bn_bias,
                                    *scratch, grad_y, g, slope, momentum, eps)
    else:
        def fused(impl: str):
            choice, tiling = _explicit(impl)
            return lambda: (_eval_forward(x, weight, bias, bn_weight, bn_bias, running_mean,
                                          running_var, g, slope, eps, choice, tiling),)

        def unfused():
            y = conv_bn_act_ref(x, weight, bias, bn_weight, bn_bias, running_mean,
                                running_var, kind="conv_transpose" if g.transposed else "conv",
                                stride=g.stride, padding=g.padding, slope=slope,
                                training=False, eps=eps)
            return (y,)
    if x.is_cuda:  # the interpreter's tests time eagerly: Inductor's CPU build takes minutes
        unfused = compiled_for_timing(unfused)
    return {"unfused": unfused, **{name: fused(name) for name in names}}


def parity_tolerance(x: torch.Tensor) -> float:
    """The scaled max error a measured candidate may have against the reference on inputs
    like x: float32 rounding with exact products, else bfloat16's or TF32's."""
    return 1e-4 if _ieee(x) else 3e-2


def _measure(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, g: Geometry,
             slope, momentum, eps, *, training: bool, timer: dispatch.Timer | None) -> dict:
    """The layer's dispatch entry (``dispatch.measured_choice``): recorded, or measured once.
    Each candidate agrees with "unfused" on the forward output (the backward is aten's
    convolution_backward for every fused candidate) and is timed running forward and
    backward at this shape, by default inside CUDA-graph replay."""
    with torch.no_grad():
        return dispatch.measured_choice(
            _layer_key(x, weight, g, training=training),
            lambda: _candidates(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                g, slope, momentum, eps, training=training),
            reference="unfused", tolerance=parity_tolerance(x),
            timer=timer if timer is not None else dispatch.graph_replay_ms)


def fused_choice(entry: dict) -> str:
    """The fastest of the fused op's own candidates in a dispatch entry (an ``impl``)."""
    fused = {name: ms for name, ms in entry["ms"].items() if name != "unfused"}
    return min(fused, key=fused.get) if fused else "cudnn_fused"


def _explicit(impl: str) -> tuple[str, Tiling | None]:
    """("triton", tiling) for "triton:<tiling>", ("cudnn_fused", None) for "cudnn_fused"."""
    if impl == "cudnn_fused":
        return impl, None
    return "triton", parse_tiling(impl.removeprefix("triton:"))


def _resolve(impl: str, x: torch.Tensor, weight: torch.Tensor, g: Geometry, *,
             training: bool, measure) -> tuple[str, Tiling | None]:
    """("triton", tiling) or ("cudnn_fused", None) for an impl other than "ref": explicit
    ones as they say; on the interpreter the default tiling; else the dispatch entry's
    fastest fused candidate ("auto", ``measure()`` on a miss) or fastest Triton tiling
    ("triton"; the default tiling if the layer was never measured)."""
    if impl == "cudnn_fused" or impl.startswith("triton:"):
        return _explicit(impl)
    if not x.is_cuda:  # the interpreter: nothing to measure
        return "triton", default_tiling(g)
    entry = dispatch.dispatch_table().get(_layer_key(x, weight, g, training=training))
    if impl == "auto":
        return _explicit(fused_choice(entry if entry is not None else measure()))
    tilings = {name: ms for name, ms in (entry or {"ms": {}})["ms"].items()
               if name.startswith("triton:")}
    if not tilings:
        return "triton", default_tiling(g)
    return _explicit(min(tilings, key=tilings.get))


# -- operators ------------------------------------------------------------------------------
def _output_shape(x: torch.Tensor, weight: torch.Tensor, kind: str, stride: int,
                  padding: int) -> tuple[int, int, int, int]:
    g = geometry(x, weight, kind, stride, padding)
    return g.batch, g.c_out, g.out_height, g.out_width


def _prologue(in_scale, in_shift, in_slope) -> tuple | None:
    return None if in_scale is None else (in_scale, in_shift, in_slope)


def _conv_with_stats(x, weight, bias, running_mean, running_var, g: Geometry, momentum, eps,
                     impl, tiling, prologue):
    """(z, batch mean, batch 1/σ), updating the running statistics."""
    if impl == "triton":
        z, cnt, psum, pm2 = _conv_triton(x, weight, bias, g, tiling, stats=True,
                                         prologue=prologue)
    else:
        z = _conv_aten(x, weight, bias, g, prologue)
        cnt, psum, pm2 = _stats_partials(z)
    mean, invstd = _finalize_stats(cnt, psum, pm2, running_mean, running_var, momentum, eps)
    return z, mean, invstd


def _train_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                   g: Geometry, slope, momentum, eps, impl, tiling, prologue=None):
    z, mean, invstd = _conv_with_stats(x, weight, bias, running_mean, running_var, g,
                                       momentum, eps, impl, tiling, prologue)
    y = _bn_act(z, mean, invstd, bn_weight, bn_bias, slope, eps, from_running=False)
    return y, z, mean, invstd


def _measure_later(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                   g: Geometry, slope, momentum, eps, *, training: bool):
    """What _resolve calls on a dispatch miss: this layer's measurement."""
    return functools.partial(_measure, x, weight, bias, bn_weight, bn_bias, running_mean,
                             running_var, g, slope, momentum, eps, training=training,
                             timer=None)


def _train_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, kind: str, stride: int, padding: int,
                slope: float | None, momentum: float, eps: float, impl: str,
                in_scale: torch.Tensor | None, in_shift: torch.Tensor | None,
                in_slope: float | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z = the convolution's output, batch mean, batch 1/σ); updates the running stats."""
    g = geometry(x, weight, kind, stride, padding)
    choice, tiling = _resolve(impl, x, weight, g, training=True, measure=_measure_later(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, g, slope, momentum,
        eps, training=True))
    return _train_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, g,
                          slope, momentum, eps, choice, tiling,
                          _prologue(in_scale, in_shift, in_slope))


def _train_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kind, stride,
                padding, slope, momentum, eps, impl, in_scale, in_shift, in_slope):
    shape = _output_shape(x, weight, kind, stride, padding)
    y = _empty_like_layout(shape, x)
    stat = x.new_empty(shape[1], dtype=torch.float32)
    return y, torch.empty_like(y), stat, torch.empty_like(stat)


def _stats_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, kind: str, stride: int, padding: int,
                momentum: float, eps: float, impl: str, in_scale: torch.Tensor | None,
                in_shift: torch.Tensor | None, in_slope: float | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z = the convolution's output, batch mean, batch 1/σ); updates the running stats.
    Dispatched as the layer's conv_bn_act (the same GEMM; γ and β only for a measurement)."""
    g = geometry(x, weight, kind, stride, padding)
    choice, tiling = _resolve(impl, x, weight, g, training=True, measure=_measure_later(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, g, None, momentum,
        eps, training=True))
    return _conv_with_stats(x, weight, bias, running_mean, running_var, g, momentum, eps,
                            choice, tiling, _prologue(in_scale, in_shift, in_slope))


def _stats_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kind, stride,
                padding, momentum, eps, impl, in_scale, in_shift, in_slope):
    shape = _output_shape(x, weight, kind, stride, padding)
    stat = x.new_empty(shape[1], dtype=torch.float32)
    return _empty_like_layout(shape, x), stat, torch.empty_like(stat)


def _backward_body(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   bn_weight: torch.Tensor, bn_bias: torch.Tensor, z: torch.Tensor,
                   mean: torch.Tensor, invstd: torch.Tensor, kind: str, stride: int,
                   padding: int, slope: float | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dγ, dβ) of the training forward (x: the convolution's input)."""
    grad_y = _pc_view(grad_y, z)
    block_p, block_c = elementwise_blocks(z)
    b, c, h, w = z.shape
    p = b * h * w
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    part = z.new_empty((2, c, grid[0]), dtype=torch.float32)
    strides = (*_pc_strides(grad_y), *_pc_strides(z))
    has_act = slope is not None
    slope = 0.0 if slope is None else slope
    bn_act_bwd_reduce_kernel[grid](grad_y, z, mean, invstd, bn_weight, bn_bias, part, p, c,
                                   h * w, *strides, slope, HAS_ACT=has_act,
                                   BLOCK_P=block_p, BLOCK_C=block_c)
    dbeta = mean.new_empty(c)
    dgamma = mean.new_empty(c)
    bn_act_bwd_finalize_kernel[(triton.cdiv(c, 4),)](
        part, dbeta, dgamma, c, grid[0], BLOCK_C=4, BLOCK_T=pow2_clamp(grid[0], 16, 512))
    dz = torch.empty_like(z)
    bn_act_bwd_dx_kernel[grid](grad_y, z, mean, invstd, bn_weight, bn_bias, dbeta, dgamma,
                               dz, p, c, h * w, 1.0 / p, *strides, *_pc_strides(dz), slope,
                               HAS_ACT=has_act, EMULATE_BF16=emulate_bf16(dz),
                               BLOCK_P=block_p, BLOCK_C=block_c)
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dz, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], kind == "conv_transpose",
        [0, 0], 1, [True, True, False])
    return (dx.contiguous(memory_format=_memory_format(x)), dw.contiguous(),
            dgamma.to(bn_weight.dtype), dbeta.to(bn_bias.dtype))


def _backward_fake(grad_y, x, weight, bn_weight, bn_bias, z, mean, invstd, kind, stride,
                   padding, slope):
    return (_empty_like_layout(x.shape, x), weight.new_empty(weight.shape),
            torch.empty_like(bn_weight), torch.empty_like(bn_bias))


def _eval_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                  g: Geometry, slope, eps, impl, tiling, prologue=None):
    if impl == "triton":
        return _conv_triton(x, weight, bias, g, tiling, stats=False,
                            bn=(bn_weight, bn_bias, running_mean, running_var), slope=slope,
                            eps=eps, prologue=prologue)
    z = _conv_aten(x, weight, bias, g, prologue)
    return _bn_act(z, running_mean, running_var, bn_weight, bn_bias, slope, eps,
                   from_running=True)


def _eval_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
               running_var: torch.Tensor, kind: str, stride: int, padding: int,
               slope: float | None, eps: float, impl: str, in_scale: torch.Tensor | None,
               in_shift: torch.Tensor | None, in_slope: float | None) -> torch.Tensor:
    g = geometry(x, weight, kind, stride, padding)
    choice, tiling = _resolve(impl, x, weight, g, training=False, measure=_measure_later(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, g, slope, 0.0, eps,
        training=False))
    return _eval_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, g,
                         slope, eps, choice, tiling, _prologue(in_scale, in_shift, in_slope))


def _eval_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kind, stride,
               padding, slope, eps, impl, in_scale, in_shift, in_slope):
    return _empty_like_layout(_output_shape(x, weight, kind, stride, padding), x)


# Opaque custom ops, not triton_ops as matching_loss's: a triton_op's body is traced with fake
# tensors, and these bodies look up, and at a shape's first call measure, the dispatch (file
# I/O, timing real tensors); and a mutating op (the running statistics) cannot carry
# register_autograd, hence _ConvBNActTrain and _ConvBNStats.
register_op("conv_bn_act_train", _train_body, _train_fake,
            mutates_args=("running_mean", "running_var"), traceable=False)
register_op("conv_bn_stats_train", _stats_body, _stats_fake,
            mutates_args=("running_mean", "running_var"), traceable=False)
register_op("conv_bn_act_backward", _backward_body, _backward_fake, traceable=False)
register_op("conv_bn_act_eval", _eval_body, _eval_fake, traceable=False)


def _input_grads(dx_in: torch.Tensor, x: torch.Tensor, prologue: tuple | None):
    """(dx, d in_scale, d in_shift) from dL/d(the convolution's input)."""
    if prologue is None:
        return dx_in, None, None
    return _prologue_backward(dx_in, x, prologue)


class _ConvBNActTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kind,
                stride, padding, slope, momentum, eps, impl, in_scale, in_shift, in_slope):
        y, z, mean, invstd = torch.ops.t2i_fast.conv_bn_act_train(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kind, stride,
            padding, slope, momentum, eps, impl, in_scale, in_shift, in_slope)
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, z, mean, invstd, in_scale,
                              in_shift)
        ctx.options = (kind, stride, padding, slope)
        ctx.has_bias = bias is not None
        ctx.in_slope = in_slope
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bn_weight, bn_bias, z, mean, invstd, in_scale, in_shift = ctx.saved_tensors
        prologue = _prologue(in_scale, in_shift, ctx.in_slope)
        # With a prologue the weight gradient needs the activation the GEMM read: made
        # again here (one elementwise pass) instead of stored by the forward.
        dx_in, dw, dgamma, dbeta = torch.ops.t2i_fast.conv_bn_act_backward(
            grad_y, _apply_prologue(x, prologue), weight, bn_weight, bn_bias, z, mean, invstd,
            *ctx.options)
        dx, dscale, dshift = _input_grads(dx_in, x, prologue)
        # Training BatchNorm subtracts the batch mean: the output does not depend on the bias.
        dbias = dw.new_zeros(z.shape[1]) if ctx.has_bias else None
        return dx, dw, dbias, dgamma, dbeta, *([None] * 9), dscale, dshift, None


class _ConvBNStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kind,
                stride, padding, momentum, eps, impl, in_scale, in_shift, in_slope):
        z, mean, invstd = torch.ops.t2i_fast.conv_bn_stats_train(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kind, stride,
            padding, momentum, eps, impl, in_scale, in_shift, in_slope)
        ctx.save_for_backward(x, weight, z, mean, invstd, in_scale, in_shift)
        ctx.options = (kind, stride, padding)
        ctx.has_bias = bias is not None
        ctx.in_slope = in_slope
        return z, mean, invstd

    @staticmethod
    def backward(ctx, dz, dmean, dinvstd):
        x, weight, z, mean, invstd, in_scale, in_shift = ctx.saved_tensors
        kind, stride, padding = ctx.options
        prologue = _prologue(in_scale, in_shift, ctx.in_slope)
        n = z.numel() // z.shape[1]
        # mean = Σz/n and 1/σ = (Σ(z − mean)²/n + eps)^-½ give each z a share of their
        # gradients: 1/n, and −(z − mean)/σ³/n.
        c = (slice(None), None, None)
        dz = (dz.float() + (dmean / n)[c]
              - (dinvstd * invstd**3 / n)[c] * (z.float() - mean[c])).to(z.dtype)
        dx_in, dw, _ = torch.ops.aten.convolution_backward(
            dz, _apply_prologue(x, prologue), weight, None, [stride] * 2, [padding] * 2,
            [1, 1], kind == "conv_transpose", [0, 0], 1, [True, True, False])
        dx, dscale, dshift = _input_grads(dx_in.contiguous(
            memory_format=_memory_format(x)), x, prologue)
        dbias = dz.float().sum((0, 2, 3)).to(weight.dtype) if ctx.has_bias else None
        return dx, dw, dbias, *([None] * 10), dscale, dshift, None


# -- public API -----------------------------------------------------------------------------
def conv_bn_act_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                    running_var: torch.Tensor, *, kind: str, stride: int, padding: int,
                    slope: float | None, training: bool, momentum: float = 0.1,
                    eps: float = 1e-5, in_scale: torch.Tensor | None = None,
                    in_shift: torch.Tensor | None = None,
                    in_slope: float | None = None) -> torch.Tensor:
    """The layer in plain PyTorch: the prologue act(x·in_scale + in_shift) if given (in x's
    dtype), conv (or transposed conv), ``F.batch_norm`` (which updates the running
    statistics in training), LeakyReLU with ``slope`` (None: identity)."""
    conv = F.conv_transpose2d if kind == "conv_transpose" else F.conv2d
    z = conv(_apply_prologue(x, _prologue(in_scale, in_shift, in_slope)), weight, bias,
             stride=stride, padding=padding)
    y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training=training,
                     momentum=momentum, eps=eps)
    return y if slope is None else F.leaky_relu(y, slope)


def _refusal(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *, kind, stride,
             padding, training, in_scale=None, in_shift=None) -> str | None:
    """Why the kernels cannot take this call, or None if they can."""
    tensors = [t for t in (x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                           in_scale, in_shift) if t is not None]
    refusal = device_refusal(tensors, op="conv_bn_act")
    if refusal is not None:
        return refusal
    if x.dtype not in DTYPES or weight.dtype != x.dtype or (bias is not None
                                                            and bias.dtype != x.dtype):
        return f"x, weight and bias must share one dtype of {DTYPES}"
    if x.dim() != 4 or weight.dim() != 4:
        return "x and weight must be 4-d"
    c_in = weight.shape[0] if kind == "conv_transpose" else weight.shape[1]
    if x.shape[1] != c_in:
        return f"x has {x.shape[1]} channels, the weight takes {c_in} (groups are not supported)"
    g = geometry(x, weight, kind, stride, padding)
    if g.transposed and (g.kh % stride or g.kw % stride):
        return "a transposed convolution's kernel size must be a multiple of its stride"
    if min(g.out_height, g.out_width) < 1:
        return "the output would be empty"
    if max(x.numel(), g.batch * g.c_out * g.out_height * g.out_width) > _INT32_MAX:
        return "the kernels index with 32-bit offsets"
    if training and g.batch * g.out_height * g.out_width < 2:
        return "training BatchNorm needs more than one value per channel"
    if not training and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "the eval kernels have no backward (use torch.no_grad() or impl='ref')"
    return None


def _check_prologue(x: torch.Tensor, in_scale, in_shift) -> None:
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift come together (the prologue's affine)")
    if in_scale is not None and not (in_scale.shape == in_shift.shape == (x.shape[1],)):
        raise ValueError(f"in_scale and in_shift must be [C_in] = [{x.shape[1]}], got "
                         f"{tuple(in_scale.shape)} and {tuple(in_shift.shape)}")


def _check_impl(impl: str, *, training: bool) -> str:
    """impl's family for resolve_impl: "triton" for "triton:<tiling>" (checked here)."""
    if not impl.startswith("triton:"):
        return impl
    if parse_tiling(impl.removeprefix("triton:")).split_k > 1 and not training:
        raise ValueError(f"impl={impl!r}: split-K is for training (eval folds BatchNorm into "
                         f"the GEMM's epilogue)")
    return "triton"


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, *, kind: str, stride: int, padding: int,
                slope: float | None, training: bool, momentum: float = 0.1, eps: float = 1e-5,
                impl: str = "auto", in_scale: torch.Tensor | None = None,
                in_shift: torch.Tensor | None = None,
                in_slope: float | None = None) -> torch.Tensor:
    """act(BatchNorm(conv(x))) as ``conv_bn_act_ref``, on the fused kernels.

    x [B, C_in, H, W] (NCHW or channels_last; the output follows x's layout); weight as
    ``nn.Conv2d`` ([C_out, C_in, k, k]) or ``nn.ConvTranspose2d`` ([C_in, C_out, k, k]) per
    ``kind`` ("conv" or "conv_transpose"); square stride and padding, no dilation, groups or
    output padding; ``slope`` the LeakyReLU slope (0: ReLU, None: no activation).
    ``training``: batch statistics, updating the running ones in place (float ``momentum``);
    else the running statistics. ``impl``: "ref" (PyTorch), "triton" (the fastest tiling
    measured for this layer, else a default), "triton:<tiling>" (one tiling, as
    ``tiling_name`` names it; split-K ones in training only), "cudnn_fused" (aten
    convolution + the fused BatchNorm/LeakyReLU kernels), or "auto": the reference for
    tensors not on a GPU, else the fused candidate measured fastest for this layer shape
    (see the module's docstring).

    Prologue fusion: with ``in_scale`` and ``in_shift`` ([C_in]) the convolution's input is
    act(x·in_scale + in_shift) (LeakyReLU ``in_slope``, None: none), applied by the GEMM as
    it loads x: x is the previous layer's convolution output and (in_scale, in_shift) its
    BatchNorm, as ``conv_bn_stats`` returns them. Gradients flow to x, in_scale and
    in_shift (and so on to the previous layer's γ, β and batch statistics).
    """
    if training and momentum is None:
        raise ValueError("momentum=None (a cumulative average) is not supported")
    args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var)
    options = {"kind": kind, "stride": stride, "padding": padding}
    prologue = {"in_scale": in_scale, "in_shift": in_shift}
    family = _family(args, options, prologue, impl, training=training)
    in_slope = None if in_slope is None else float(in_slope)
    if family == "ref":
        return conv_bn_act_ref(*args, **options, slope=slope, training=training,
                               momentum=momentum, eps=eps, **prologue, in_slope=in_slope)
    slope = None if slope is None else float(slope)
    if training:
        return _ConvBNActTrain.apply(*args, kind, stride, padding, slope, float(momentum),
                                     float(eps), impl, in_scale, in_shift, in_slope)
    return torch.ops.t2i_fast.conv_bn_act_eval(*args, kind, stride, padding, slope,
                                               float(eps), impl, in_scale, in_shift,
                                               in_slope)


def _family(args: tuple, options: dict, prologue: dict, impl: str, *, training: bool) -> str:
    """The checks both public entry points make, then the implementation family ``impl``
    resolves to for these tensors ("ref" or a fused one)."""
    if options["kind"] not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {options['kind']!r}")
    _check_prologue(args[0], prologue["in_scale"], prologue["in_shift"])
    return resolve_impl(_check_impl(impl, training=training), IMPLS, args[0],
                        lambda: _refusal(*args, **options, training=training, **prologue))


def _batch_affine(bn_weight, bn_bias, mean, invstd) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn_weight * invstd
    return scale, bn_bias - mean * scale


def conv_bn_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                  running_var: torch.Tensor, *, kind: str, stride: int, padding: int,
                  momentum: float = 0.1, eps: float = 1e-5, impl: str = "auto",
                  in_scale: torch.Tensor | None = None, in_shift: torch.Tensor | None = None,
                  in_slope: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first half of a training layer whose BatchNorm and activation the next layer
    applies as its prologue: (z, scale, shift) with z the convolution's output (of x, or of
    x's prologue as in ``conv_bn_act``) and scale = γ/σ, shift = β − mean·γ/σ ([C_out],
    float32) of z's batch statistics, which update the running ones. So
    ``conv_bn_act(z, ..., in_scale=scale, in_shift=shift, in_slope=slope)`` is the next
    layer applied to ``conv_bn_act(x, ..., slope=slope)``, without that activation ever
    written. Differentiable in every tensor; ``impl`` as ``conv_bn_act``'s (the same
    dispatch entry: the layer's GEMM is the same)."""
    args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var)
    options = {"kind": kind, "stride": stride, "padding": padding}
    prologue = {"in_scale": in_scale, "in_shift": in_shift}
    family = _family(args, options, prologue, impl, training=True)
    in_slope = None if in_slope is None else float(in_slope)
    if family == "ref":
        conv = F.conv_transpose2d if kind == "conv_transpose" else F.conv2d
        z = conv(_apply_prologue(x, _prologue(in_scale, in_shift, in_slope)), weight, bias,
                 stride=stride, padding=padding)
        zf = z.float()
        n = zf.numel() // zf.shape[1]
        mean = zf.mean((0, 2, 3))
        var = zf.var((0, 2, 3), correction=0)
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (n / (n - 1))).to(running_var.dtype), momentum)
        return z, *_batch_affine(bn_weight, bn_bias, mean, torch.rsqrt(var + eps))
    z, mean, invstd = _ConvBNStats.apply(*args, kind, stride, padding, float(momentum),
                                         float(eps), impl, in_scale, in_shift, in_slope)
    return z, *_batch_affine(bn_weight, bn_bias, mean, invstd)


def measure_dispatch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                     running_mean: torch.Tensor, running_var: torch.Tensor, *, kind: str,
                     stride: int, padding: int, slope: float | None, training: bool,
                     momentum: float = 0.1, eps: float = 1e-5,
                     timer: dispatch.Timer | None = None) -> dict:
    """This layer's dispatch entry, as ``impl="auto"`` finds it: recorded, or measured once
    (by ``timer``, default ``dispatch.graph_replay_ms``, which needs CUDA) and recorded.
    Returns the entry with its table key under "key" and the fused op's choice under
    "impl". The running statistics are left as they are."""
    args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var)
    refusal = _refusal(*args, kind=kind, stride=stride, padding=padding, training=training)
    if refusal is None and not x.is_cuda and timer is None:
        refusal = "timing in CUDA-graph replay needs CUDA tensors"
    if refusal is not None:
        raise ValueError(f"cannot measure this layer: {refusal}")
    g = geometry(x, weight, kind, stride, padding)
    entry = _measure(*args, g, None if slope is None else float(slope), float(momentum),
                     float(eps), training=training, timer=timer)
    return {"key": _layer_key(x, weight, g, training=training), **entry,
            "impl": fused_choice(entry)}
