"""Fused convolution → BatchNorm2d → LeakyReLU for the layers of the ``reed`` and ``dcgan``
presets: 4×4 stride-2 pad-1 convolutions and transposed convolutions, G's first 4×4
transposed convolution (1×1 → 4×4, stride 1, pad 0), 1×1 and 3×3 pad-1 convolutions; any
LeakyReLU slope (0 is ReLU) or none (``slope=None``, for BatchNorms followed by a residual
sum); float32 and bfloat16 (accumulation in float32); NCHW and channels_last.

The kernels, their tiling and what each computes are in ``conv_bn_act_kernels``; this module
launches them (``impl="triton"``: the implicit-GEMM convolution with the batch statistics in
its epilogue; ``impl="cudnn_fused"``: aten's convolution, then a statistics pass), registers
the operators and gives the public function. The backward of both impls is the fused
BatchNorm/LeakyReLU backward kernels and aten's ``convolution_backward``; eval folds
BatchNorm into the GEMM's epilogue (one kernel per layer) and has no backward: with autograd
recording, ``impl="auto"`` takes the reference.

``impl="auto"`` takes the PyTorch reference for tensors that are not on a GPU. On a GPU it
looks the layer up in the dispatch table (``t2i_fast.ops.dispatch``) keyed by device, torch
and Triton versions, layer kind and shapes, dtype, layout and train/eval. On a miss it runs
the forward once per candidate GEMM tiling and once through ``cudnn_fused``, checks they
agree, times each (``dispatch.fastest``), and records the fastest: so each layer shape is
measured once and the decision reused. ``impl="triton"`` takes the recorded tiling if there
is one, else a default.

The operators ``torch.ops.t2i_fast.conv_bn_act_train`` (which mutates the running
statistics), ``conv_bn_act_backward`` and ``conv_bn_act_eval`` are ``torch.library``
custom ops with fake implementations, tied together for autograd by an autograd.Function,
so ``torch.compile(fullgraph=True)`` traces them without a graph break. They are opaque
custom ops rather than ``triton_op`` (``_common.register_op``; the reason is written where
they are registered).

On a machine without a GPU the kernels run in Triton's interpreter when TRITON_INTERPRET=1
is set before this module is imported (Triton picks compile or interpret when ``@triton.jit``
decorates a function); ``impl="triton"`` or ``"cudnn_fused"`` then work on CPU tensors.
"""

from __future__ import annotations

import warnings

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
    pow2_clamp,
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
                 eps: float = 0.0):
    """The implicit-GEMM convolution into a new tensor in x's layout; with ``stats`` also the
    tile statistics (count [T], sum [C_out, T], M2 [C_out, T]); with ``bn`` = (γ, β, running
    mean, running var) BatchNorm folded into the epilogue, and LeakyReLU when slope is set."""
    out = _empty_like_layout((g.batch, g.c_out, g.out_height, g.out_width), x)
    # [KH, KW, C_in, C_out]: the GEMM reads C_out-contiguous rows of one tap.
    perm = (2, 3, 0, 1) if g.transposed else (2, 3, 1, 0)
    w = weight.permute(perm).contiguous()
    rh, rw = g.class_grid
    tiles_per_class = triton.cdiv(g.class_rows, tiling.block_m)
    grid = (g.classes * tiles_per_class, triton.cdiv(g.c_out, tiling.block_n))
    if stats:
        cnt = x.new_empty(grid[0], dtype=torch.float32)
        psum = x.new_empty((g.c_out, grid[0]), dtype=torch.float32)
        pm2 = torch.empty_like(psum)
    else:
        cnt = psum = pm2 = out  # not read
    gamma, beta, rmean, rvar = bn if bn is not None else (out,) * 4
    taps = (g.kh // g.stride, g.kw // g.stride) if g.transposed else (g.kh, g.kw)
    conv_bn_act_fwd_kernel[grid](
        x, w, bias if bias is not None else w, out, gamma, beta, rmean, rvar, cnt, psum, pm2,
        g.batch, g.c_in, g.height, g.width, g.c_out, g.out_height, g.out_width,
        *x.stride(), *out.stride(), rh, rw, tiles_per_class,
        0.0 if slope is None else slope, eps,
        KH=g.kh, KW=g.kw, STRIDE=g.stride, PAD=g.padding, TAPS_H=taps[0], TAPS_W=taps[1],
        TRANSPOSED=g.transposed, BATCH_INNER=g.height * g.width == 1,
        HAS_BIAS=bias is not None, STATS=stats, FOLD_BN=bn is not None,
        HAS_ACT=slope is not None, IEEE=_ieee(x), EMULATE_BF16=emulate_bf16(x),
        BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_K=tiling.block_k,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    return (out, cnt, psum, pm2) if stats else out


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


def _conv_aten(x, weight, bias, g: Geometry) -> torch.Tensor:
    conv = F.conv_transpose2d if g.transposed else F.conv2d
    z = conv(x, weight, bias, stride=g.stride, padding=g.padding)
    # The operators promise x's layout (the fake implementations say so) and the [P, C]
    # passes need dense rows.
    return z.contiguous(memory_format=_memory_format(x))


# -- the measured dispatch ------------------------------------------------------------------
def _layer_key(x: torch.Tensor, weight: torch.Tensor, g: Geometry, *, training: bool) -> str:
    dtype = str(x.dtype).removeprefix("torch.")
    if x.dtype == torch.float32:
        dtype += "-ieee" if _ieee(x) else "-tf32"
    return dispatch.key(
        x.device, "conv_transpose" if g.transposed else "conv",
        "x " + "x".join(map(str, x.shape)), "w " + "x".join(map(str, weight.shape)),
        f"stride {g.stride} pad {g.padding}", dtype,
        "channels_last" if _is_channels_last(x) else "nchw", "train" if training else "eval")


def _measure(run, g: Geometry, x: torch.Tensor) -> dict:
    """Time run(impl, tiling) → output for cudnn_fused and each candidate tiling (forward
    only: the backward is the same code for both) and pick the fastest that agrees."""
    tilings = {"triton " + "/".join(map(str, t)): t  # BM/BN/BK/warps/stages
               for t in candidate_tilings(g)}
    best, ms, disagreed = dispatch.fastest(
        lambda name: run("cudnn_fused", None) if name == "cudnn_fused"
        else run("triton", tilings[name]),
        list(tilings), reference="cudnn_fused", tolerance=1e-4 if _ieee(x) else 3e-2)
    entry = {"impl": "cudnn_fused", "tiling": None, "ms": ms, "timed": "forward"}
    if best != "cudnn_fused":
        entry.update(impl="triton", tiling=list(tilings[best]))
    if disagreed:
        entry["disagreed"] = disagreed
        warnings.warn(f"Triton conv_bn_act disagreed with cuDNN (scaled max error "
                      f"{disagreed}); those tilings are not used", stacklevel=2)
    return entry


def _resolve(impl: str, x: torch.Tensor, weight: torch.Tensor, g: Geometry, *,
             training: bool, run) -> tuple[str, Tiling | None]:
    """("triton", tiling) or ("cudnn_fused", None) for impl in auto/triton/cudnn_fused;
    ``run`` is the layer's _runner, for a measurement."""
    if impl == "cudnn_fused":
        return impl, None
    if not x.is_cuda:  # the interpreter: nothing to measure
        return "triton", default_tiling(g)
    key = _layer_key(x, weight, g, training=training)
    entry = dispatch.dispatch_table().get(key)
    if impl == "auto" and entry is None:
        entry = _measure(run, g, x)
        dispatch.record(key, entry)
    if impl == "auto" and entry["impl"] == "cudnn_fused":
        return "cudnn_fused", None
    tiling = entry.get("tiling") if entry is not None else None
    return "triton", Tiling(*tiling) if tiling else default_tiling(g)


def _runner(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, g: Geometry,
            slope, momentum, eps, *, training: bool):
    """run(impl, tiling) → the layer's output. Training runs update copies of the running
    statistics, made at the first run: measuring leaves no trace."""
    if not training:
        return lambda impl, tiling: _eval_forward(x, weight, bias, bn_weight, bn_bias,
                                                  running_mean, running_var, g, slope, eps,
                                                  impl, tiling)
    scratch = []

    def run(impl, tiling):
        if not scratch:
            scratch.extend((running_mean.clone(), running_var.clone()))
        return _train_forward(x, weight, bias, bn_weight, bn_bias, *scratch, g, slope,
                              momentum, eps, impl, tiling)[0]

    return run


# -- operators ------------------------------------------------------------------------------
def _output_shape(x: torch.Tensor, weight: torch.Tensor, kind: str, stride: int,
                  padding: int) -> tuple[int, int, int, int]:
    g = geometry(x, weight, kind, stride, padding)
    return g.batch, g.c_out, g.out_height, g.out_width


def _train_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                   g: Geometry, slope, momentum, eps, impl, tiling):
    if impl == "triton":
        z, cnt, psum, pm2 = _conv_triton(x, weight, bias, g, tiling, stats=True)
    else:
        z = _conv_aten(x, weight, bias, g)
        cnt, psum, pm2 = _stats_partials(z)
    mean, invstd = _finalize_stats(cnt, psum, pm2, running_mean, running_var, momentum, eps)
    y = _bn_act(z, mean, invstd, bn_weight, bn_bias, slope, eps, from_running=False)
    return y, z, mean, invstd


def _train_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, kind: str, stride: int, padding: int,
                slope: float | None, momentum: float, eps: float, impl: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z = the convolution's output, batch mean, batch 1/σ); updates the running stats."""
    g = geometry(x, weight, kind, stride, padding)
    run = _runner(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, g, slope,
                  momentum, eps, training=True)
    choice, tiling = _resolve(impl, x, weight, g, training=True, run=run)
    return _train_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, g,
                          slope, momentum, eps, choice, tiling)


def _train_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kind, stride,
                padding, slope, momentum, eps, impl):
    shape = _output_shape(x, weight, kind, stride, padding)
    y = _empty_like_layout(shape, x)
    stat = x.new_empty(shape[1], dtype=torch.float32)
    return y, torch.empty_like(y), stat, torch.empty_like(stat)


def _backward_body(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   bn_weight: torch.Tensor, bn_bias: torch.Tensor, z: torch.Tensor,
                   mean: torch.Tensor, invstd: torch.Tensor, kind: str, stride: int,
                   padding: int, slope: float | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dγ, dβ) of the training forward."""
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
                  g: Geometry, slope, eps, impl, tiling):
    if impl == "triton":
        return _conv_triton(x, weight, bias, g, tiling, stats=False,
                            bn=(bn_weight, bn_bias, running_mean, running_var), slope=slope,
                            eps=eps)
    z = _conv_aten(x, weight, bias, g)
    return _bn_act(z, running_mean, running_var, bn_weight, bn_bias, slope, eps,
                   from_running=True)


def _eval_body(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
               running_var: torch.Tensor, kind: str, stride: int, padding: int,
               slope: float | None, eps: float, impl: str) -> torch.Tensor:
    g = geometry(x, weight, kind, stride, padding)
    run = _runner(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, g, slope,
                  0.0, eps, training=False)
    choice, tiling = _resolve(impl, x, weight, g, training=False, run=run)
    return run(choice, tiling)


def _eval_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kind, stride,
               padding, slope, eps, impl):
    return _empty_like_layout(_output_shape(x, weight, kind, stride, padding), x)


# Opaque custom ops, not triton_ops as matching_loss's: a triton_op's body is traced with fake
# tensors, and these bodies look up, and at a shape's first call measure, the dispatch (file
# I/O, timing real tensors); and a mutating op (the running statistics) cannot carry
# register_autograd, hence _ConvBNActTrain.
register_op("conv_bn_act_train", _train_body, _train_fake,
            mutates_args=("running_mean", "running_var"), traceable=False)
register_op("conv_bn_act_backward", _backward_body, _backward_fake, traceable=False)
register_op("conv_bn_act_eval", _eval_body, _eval_fake, traceable=False)


class _ConvBNActTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kind,
                stride, padding, slope, momentum, eps, impl):
        y, z, mean, invstd = torch.ops.t2i_fast.conv_bn_act_train(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kind, stride,
            padding, slope, momentum, eps, impl)
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, z, mean, invstd)
        ctx.options = (kind, stride, padding, slope)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bn_weight, bn_bias, z, mean, invstd = ctx.saved_tensors
        dx, dw, dgamma, dbeta = torch.ops.t2i_fast.conv_bn_act_backward(
            grad_y, x, weight, bn_weight, bn_bias, z, mean, invstd, *ctx.options)
        # Training BatchNorm subtracts the batch mean: the output does not depend on the bias.
        dbias = dw.new_zeros(z.shape[1]) if ctx.has_bias else None
        return dx, dw, dbias, dgamma, dbeta, *([None] * 9)


# -- public API -----------------------------------------------------------------------------
def conv_bn_act_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                    running_var: torch.Tensor, *, kind: str, stride: int, padding: int,
                    slope: float | None, training: bool, momentum: float = 0.1,
                    eps: float = 1e-5) -> torch.Tensor:
    """The layer in plain PyTorch: conv (or transposed conv), ``F.batch_norm`` (which updates
    the running statistics in training), LeakyReLU with ``slope`` (None: identity)."""
    conv = F.conv_transpose2d if kind == "conv_transpose" else F.conv2d
    z = conv(x, weight, bias, stride=stride, padding=padding)
    y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training=training,
                     momentum=momentum, eps=eps)
    return y if slope is None else F.leaky_relu(y, slope)


def _refusal(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *, kind, stride,
             padding, training) -> str | None:
    """Why the kernels cannot take this call, or None if they can."""
    tensors = [t for t in (x, weight, bias, bn_weight, bn_bias, running_mean, running_var)
               if t is not None]
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


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, *, kind: str, stride: int, padding: int,
                slope: float | None, training: bool, momentum: float = 0.1, eps: float = 1e-5,
                impl: str = "auto") -> torch.Tensor:
    """act(BatchNorm(conv(x))) as ``conv_bn_act_ref``, on the fused kernels.

    x [B, C_in, H, W] (NCHW or channels_last; the output follows x's layout); weight as
    ``nn.Conv2d`` ([C_out, C_in, k, k]) or ``nn.ConvTranspose2d`` ([C_in, C_out, k, k]) per
    ``kind`` ("conv" or "conv_transpose"); square stride and padding, no dilation, groups or
    output padding; ``slope`` the LeakyReLU slope (0: ReLU, None: no activation).
    ``training``: batch statistics, updating the running ones in place (float ``momentum``);
    else the running statistics. ``impl``: "ref" (PyTorch), "triton", "cudnn_fused" (aten
    convolution + the fused BatchNorm/LeakyReLU kernels), or "auto": the reference for
    tensors not on a GPU, else the measured choice for this layer shape (see the module's
    docstring).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if training and momentum is None:
        raise ValueError("momentum=None (a cumulative average) is not supported")
    args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var)
    options = {"kind": kind, "stride": stride, "padding": padding}
    impl = resolve_impl(impl, IMPLS, x, lambda: _refusal(*args, **options, training=training))
    if impl == "ref":
        return conv_bn_act_ref(*args, **options, slope=slope, training=training,
                               momentum=momentum, eps=eps)
    slope = None if slope is None else float(slope)
    if training:
        return _ConvBNActTrain.apply(*args, kind, stride, padding, slope, float(momentum),
                                     float(eps), impl)
    return torch.ops.t2i_fast.conv_bn_act_eval(*args, kind, stride, padding, slope,
                                               float(eps), impl)


def measure_dispatch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                     running_mean: torch.Tensor, running_var: torch.Tensor, *, kind: str,
                     stride: int, padding: int, slope: float | None, training: bool,
                     momentum: float = 0.1, eps: float = 1e-5) -> dict:
    """Measure this layer on its GPU as ``impl="auto"`` does the first time it meets a shape,
    record the decision in the dispatch table (replacing an earlier one) and return it, with
    its table key under "key". The running statistics are left as they are."""
    args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var)
    with torch.no_grad():
        refusal = _refusal(*args, kind=kind, stride=stride, padding=padding, training=training)
        if refusal is None and not x.is_cuda:
            refusal = "measuring needs CUDA tensors"
        if refusal is not None:
            raise ValueError(f"cannot measure this layer: {refusal}")
        g = geometry(x, weight, kind, stride, padding)
        key = _layer_key(x, weight, g, training=training)
        entry = _measure(_runner(*args, g, None if slope is None else float(slope),
                                 float(momentum), float(eps), training=training), g, x)
    dispatch.record(key, entry)
    return {"key": key, **entry}
