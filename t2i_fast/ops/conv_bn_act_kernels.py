"""The Triton kernels of ``conv_bn_act`` and how they are tiled.

Training forward, ``impl="triton"`` (three launches after packing the weight):

1. ``conv_bn_act_fwd_kernel``: an implicit-GEMM convolution. Its epilogue writes each tile's
   per-channel count, sum and sum of squared deviations from the tile mean, so the batch
   statistics cost no pass over the output. Transposed convolutions are split into
   stride² sub-pixel classes, each an ordinary GEMM over the kernel taps that reach it.
2. ``bn_stats_finalize_kernel``: merges the tiles' statistics (Chan's parallel formula: no
   cancellation, deterministic), writes the batch mean and 1/σ, and updates the running
   mean and (unbiased) variance in place, as ``nn.BatchNorm2d`` with a float momentum does.
3. ``bn_act_fwd_kernel``: normalisation, affine and LeakyReLU in one pass.

``impl="cudnn_fused"`` runs the convolution in aten (cuDNN) and then the same kernels with a
statistics pass (``bn_stats_partial_kernel``) in place of the GEMM epilogue.

Backward (both impls): ``bn_act_bwd_reduce_kernel`` computes per-tile sums of the gradient
through LeakyReLU and of its product with x̂, ``bn_act_bwd_finalize_kernel`` gives dβ and
dγ, and ``bn_act_bwd_dx_kernel`` the gradient w.r.t. the convolution's output. BatchNorm and
LeakyReLU backward are one fused computation, but a grid-wide reduction separates the sums
from the elementwise pass, hence two kernels and a tiny one between them. The convolution's
input and weight gradients come from aten's ``convolution_backward`` (cuDNN on a GPU), not
from Triton. The convolution bias gets a zero gradient: training BatchNorm subtracts the
batch mean, so the output does not depend on it.

Eval: BatchNorm with the running statistics is folded into the GEMM's epilogue as a
per-channel scale and shift (mathematically the folded weights and bias, without a pass to
make them) followed by LeakyReLU: one kernel per layer. Eval has no backward.

Split-K (a tiling's ``split_k`` > 1), for layers with fewer output tiles than the GPU has
multiprocessors: the GEMM's programs each sum a share of the input channels into a float32
workspace, and ``splitk_reduce_kernel`` adds the shares in a fixed order (deterministic),
adds the bias and takes the tile statistics, in place of the GEMM epilogue.

Prologue fusion: the GEMM can apply the previous layer's BatchNorm (as a per-channel scale
and shift) and LeakyReLU to its input as it loads it, so a chain of layers writes each
convolution's output once and reads it once: the normalised activation is never stored.

Launch configuration: ``geometry`` describes a layer's GEMM, ``candidate_tilings`` the
tilings the measured dispatch times for it (split-K ones for layers with few output tiles),
``default_tiling`` the one used when nothing was measured (and under the interpreter),
``tiling_name``/``parse_tiling`` how impl strings name them, ``elementwise_blocks`` the
blocks of the [P, C] passes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from t2i_fast.ops._common import INTERPRETED, cast_like, dot, store


# -- kernels --------------------------------------------------------------------------------
@triton.jit
def _tile_stats(v, ok):
    """(count, per-column sum, per-column sum of squared deviations from the column mean) of
    v [R, N] over the rows where ok [R]."""
    n = tl.sum(ok.to(tl.float32), axis=0)
    s = tl.sum(tl.where(ok[:, None], v, 0.0), axis=0)  # [N]
    d = tl.where(ok[:, None], v - (s / tl.maximum(n, 1.0))[None, :], 0.0)
    return n, s, tl.sum(d * d, axis=0)


@triton.jit
def conv_bn_act_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr,
        gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr,  # FOLD_BN: BatchNorm on running statistics
        cnt_ptr, sum_ptr, m2_ptr,  # STATS: per-tile statistics, [T], [C_out, T], [C_out, T]
        in_scale_ptr, in_shift_ptr,  # PROLOGUE: per-input-channel affine, [C_in]
        B, C_in, H, W, C_out, OH, OW,
        sxb, sxc, sxh, sxw, sob, soc, soh, sow,
        RH, RW, tiles_per_class, slope, eps, in_slope, k_per_split, split_stride,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
        TAPS_H: tl.constexpr, TAPS_W: tl.constexpr, TRANSPOSED: tl.constexpr,
        BATCH_INNER: tl.constexpr, HAS_BIAS: tl.constexpr, STATS: tl.constexpr,
        FOLD_BN: tl.constexpr, HAS_ACT: tl.constexpr, IEEE: tl.constexpr,
        EMULATE_BF16: tl.constexpr, PROLOGUE: tl.constexpr, PROLOGUE_ACT: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # x [B, C_in, H, W] (any strides); w packed [KH, KW, C_in, C_out] contiguous;
    # out [B, C_out, OH, OW]. PROLOGUE: the GEMM reads act(x·in_scale + in_shift) (the
    # previous layer's BatchNorm and LeakyReLU, applied as its output is loaded, zero padding
    # kept zero), so that activation is never written. SPLIT_K > 1: program (m, n, k) sums
    # input channels [k·k_per_split, (k+1)·k_per_split) only and stores its float32 partial
    # at out + k·split_stride (a workspace, out's layout), without epilogue:
    # splitk_reduce_kernel adds the partials in a fixed order (deterministic), the bias, and
    # takes the statistics. A transposed convolution's outputs fall in STRIDE² classes by
    # (oh + PAD) mod STRIDE: within one, output (i, j) of the class's RH×RW grid takes the
    # taps kh = class_h + STRIDE·t (t < KH / STRIDE; the kernel size is a multiple of the
    # stride), a plain GEMM with no structurally-zero products.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    c_lo = tl.program_id(2) * k_per_split
    c_hi = tl.minimum(c_lo + k_per_split, C_in)
    cls = pid_m // tiles_per_class
    r = (pid_m % tiles_per_class) * BLOCK_M + tl.arange(0, BLOCK_M)  # row in the class
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_out
    npix = RH * RW
    if BATCH_INNER:
        # A 1×1 input reaches each output pixel through one tap: rows that share a pixel
        # share the tap, so the tap loop below skips the other taps for the whole tile.
        b = r % B
        pix = r // B
    else:
        b = r // npix
        pix = r % npix
    i = pix // RW
    j = pix % RW
    row_ok = r < B * npix
    if TRANSPOSED:
        ch = cls // STRIDE
        cw = cls % STRIDE
        # The class's first output row is (ch - PAD) mod STRIDE, kept non-negative.
        oh = (ch + PAD * (STRIDE - 1)) % STRIDE + STRIDE * i
        ow = (cw + PAD * (STRIDE - 1)) % STRIDE + STRIDE * j
        row_ok = row_ok & (oh < OH) & (ow < OW)
        qh = (oh + PAD) // STRIDE
        qw = (ow + PAD) // STRIDE
    else:
        oh = i
        ow = j

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(TAPS_H * TAPS_W):
        th = tap // TAPS_W
        tw = tap % TAPS_W
        if TRANSPOSED:
            kh = ch + STRIDE * th
            kw = cw + STRIDE * tw
            ih = qh - th
            iw = qw - tw
        else:
            kh = th
            kw = tw
            ih = oh * STRIDE - PAD + kh
            iw = ow * STRIDE - PAD + kw
        a_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # Taps that no row of the tile reaches (borders, the 1×1-input layer) cost nothing.
        if tl.max(a_ok.to(tl.int32), axis=0) > 0:
            x_rows = x_ptr + b * sxb + ih * sxh + iw * sxw  # [BLOCK_M]
            w_tap = w_ptr + (kh * KW + kw) * C_in * C_out
            for c0 in range(c_lo, c_hi, BLOCK_K):
                ci = c0 + tl.arange(0, BLOCK_K)
                ci_ok = ci < c_hi
                a_mask = a_ok[:, None] & ci_ok[None, :]
                a = tl.load(x_rows[:, None] + ci[None, :] * sxc, mask=a_mask,
                            other=0.0)  # [M, K]
                if PROLOGUE:
                    s_in = tl.load(in_scale_ptr + ci, mask=ci_ok, other=0.0).to(tl.float32)
                    t_in = tl.load(in_shift_ptr + ci, mask=ci_ok, other=0.0).to(tl.float32)
                    v = a.to(tl.float32) * s_in[None, :] + t_in[None, :]
                    if PROLOGUE_ACT:
                        v = tl.where(v > 0, v, v * in_slope)
                    # Padding is zero in the activation, not act(in_shift).
                    a = cast_like(tl.where(a_mask, v, 0.0), x_ptr, EMULATE_BF16)
                w = tl.load(w_tap + ci[:, None] * C_out + co[None, :],
                            mask=ci_ok[:, None] & co_ok[None, :], other=0.0)  # [K, N]
                acc = dot(a, w, acc, IEEE, EMULATE_BF16)

    if SPLIT_K > 1:
        out = (out_ptr + tl.program_id(2) * split_stride + b[:, None] * sob + co[None, :] * soc
               + (oh * soh + ow * sow)[:, None])
        tl.store(out, acc, mask=row_ok[:, None] & co_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
        if STATS:
            # Taken from the float32 accumulator, before the output is rounded to its dtype.
            T = tl.num_programs(0)
            n, s, m2 = _tile_stats(acc, row_ok)
            tl.store(sum_ptr + co * T + pid_m, s, mask=co_ok)
            tl.store(m2_ptr + co * T + pid_m, m2, mask=co_ok)
            if pid_n == 0:
                tl.store(cnt_ptr + pid_m, n)
        if FOLD_BN:
            gamma = tl.load(gamma_ptr + co, mask=co_ok, other=1.0).to(tl.float32)
            beta = tl.load(beta_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
            rmean = tl.load(rmean_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
            rvar = tl.load(rvar_ptr + co, mask=co_ok, other=1.0).to(tl.float32)
            scale = gamma * tl.rsqrt(rvar + eps)
            acc = acc * scale[None, :] + (beta - rmean * scale)[None, :]
        if HAS_ACT:
            acc = tl.where(acc > 0, acc, acc * slope)
        out = out_ptr + b[:, None] * sob + co[None, :] * soc + (oh * soh + ow * sow)[:, None]
        store(out, acc, row_ok[:, None] & co_ok[None, :], EMULATE_BF16)


@triton.jit
def bn_stats_partial_kernel(z_ptr, cnt_ptr, sum_ptr, m2_ptr, P, C, HW, szb, szc, szp,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # z [B, C, H, W] with h·sh + w·sw = (h·W + w)·sw (NCHW or channels_last), seen as
    # [P = B·H·W, C]; tile statistics in the GEMM epilogue's format.
    pid_p = tl.program_id(0)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    ptrs = z_ptr + (p // HW * szb + p % HW * szp)[:, None] + c[None, :] * szc
    v = tl.load(ptrs, mask=p_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    T = tl.num_programs(0)
    n, s, m2 = _tile_stats(v, p_ok)
    tl.store(sum_ptr + c * T + pid_p, s, mask=c_ok)
    tl.store(m2_ptr + c * T + pid_p, m2, mask=c_ok)
    if tl.program_id(1) == 0:
        tl.store(cnt_ptr + pid_p, n)


@triton.jit
def splitk_reduce_kernel(ws_ptr, bias_ptr, z_ptr, cnt_ptr, sum_ptr, m2_ptr, P, C, HW,
                         split_stride, swb, swc, swp, szb, szc, szp,
                         SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                         EMULATE_BF16: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # z = Σ_k ws[k] (+ bias) over [P, C] views, summed in k's order; tile statistics of the
    # float32 sum in the GEMM epilogue's format.
    pid_p = tl.program_id(0)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    ok = p_ok[:, None] & c_ok[None, :]
    b = p // HW
    hw = p % HW
    ws = ws_ptr + (b * swb + hw * swp)[:, None] + c[None, :] * swc
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for k in range(SPLIT_K):
        acc += tl.load(ws + k * split_stride, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    T = tl.num_programs(0)
    n, s, m2 = _tile_stats(acc, p_ok)
    tl.store(sum_ptr + c * T + pid_p, s, mask=c_ok)
    tl.store(m2_ptr + c * T + pid_p, m2, mask=c_ok)
    if tl.program_id(1) == 0:
        tl.store(cnt_ptr + pid_p, n)
    store(z_ptr + (b * szb + hw * szp)[:, None] + c[None, :] * szc, acc, ok, EMULATE_BF16)


@triton.jit
def bn_stats_finalize_kernel(cnt_ptr, sum_ptr, m2_ptr, mean_ptr, invstd_ptr, rmean_ptr,
                             rvar_ptr, C, T, momentum, eps,
                             BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # Tile statistics [T], [C, T], [C, T] → mean, 1/σ [C] (float32); running stats in place.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n = tl.zeros([BLOCK_T], dtype=tl.float32)
    s = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        n += tl.load(cnt_ptr + t, mask=t_ok, other=0.0)
        s += tl.load(sum_ptr + c[:, None] * T + t[None, :],
                     mask=c_ok[:, None] & t_ok[None, :], other=0.0)
    count = tl.sum(n, axis=0)
    mean = tl.sum(s, axis=1) / count  # [BLOCK_C]
    # Σ over tiles of their own M2 plus n_t·(mean_t − mean)²: no large sums of squares
    # cancelling, whatever the channel's mean.
    m2 = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        ok = c_ok[:, None] & t_ok[None, :]
        n_t = tl.load(cnt_ptr + t, mask=t_ok, other=0.0)
        s_t = tl.load(sum_ptr + c[:, None] * T + t[None, :], mask=ok, other=0.0)
        m2_t = tl.load(m2_ptr + c[:, None] * T + t[None, :], mask=ok, other=0.0)
        d = tl.where(n_t[None, :] > 0, s_t / tl.maximum(n_t, 1.0)[None, :] - mean[:, None], 0.0)
        m2 += m2_t + n_t[None, :] * d * d
    var = tl.sum(m2, axis=1) / count
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(invstd_ptr + c, tl.rsqrt(var + eps), mask=c_ok)
    rmean = tl.load(rmean_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    rvar = tl.load(rvar_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(rmean_ptr + c, (1.0 - momentum) * rmean + momentum * mean, mask=c_ok)
    unbiased = var * (count / (count - 1.0))
    tl.store(rvar_ptr + c, (1.0 - momentum) * rvar + momentum * unbiased, mask=c_ok)


@triton.jit
def bn_act_fwd_kernel(z_ptr, y_ptr, mean_ptr, spread_ptr, gamma_ptr, beta_ptr, P, C, HW,
                      szb, szc, szp, syb, syc, syp, eps, slope,
                      FROM_RUNNING: tl.constexpr, HAS_ACT: tl.constexpr,
                      EMULATE_BF16: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # y = act((z − mean)·γ/σ + β) over [P, C] views of z and y; spread is 1/σ, or with
    # FROM_RUNNING the running variance.
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = (p < P)[:, None] & c_ok[None, :]
    b = p // HW
    hw = p % HW
    z = tl.load(z_ptr + (b * szb + hw * szp)[:, None] + c[None, :] * szc, mask=ok,
                other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    spread = tl.load(spread_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
    if FROM_RUNNING:
        spread = tl.rsqrt(spread + eps)
    scale = tl.load(gamma_ptr + c, mask=c_ok, other=1.0).to(tl.float32) * spread
    shift = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32) - mean * scale
    y = z * scale[None, :] + shift[None, :]
    if HAS_ACT:
        y = tl.where(y > 0, y, y * slope)
    store(y_ptr + (b * syb + hw * syp)[:, None] + c[None, :] * syc, y, ok, EMULATE_BF16)


@triton.jit
def _bn_act_grads(g_ptr, z_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, p, c, P, C, HW,
                  sgb, sgc, sgp, szb, szc, szp, slope, HAS_ACT: tl.constexpr):
    """(dL/d(BN output) through LeakyReLU, x̂, validity) on a [BLOCK_P, BLOCK_C] tile."""
    c_ok = c < C
    ok = (p < P)[:, None] & c_ok[None, :]
    b = p // HW
    hw = p % HW
    g = tl.load(g_ptr + (b * sgb + hw * sgp)[:, None] + c[None, :] * sgc, mask=ok,
                other=0.0).to(tl.float32)
    z = tl.load(z_ptr + (b * szb + hw * szp)[:, None] + c[None, :] * szc, mask=ok,
                other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
    xhat = (z - mean[None, :]) * invstd[None, :]
    if HAS_ACT:
        gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        a = xhat * gamma[None, :] + beta[None, :]
        g = tl.where(a > 0, g, g * slope)
    return g, xhat, ok


@triton.jit
def bn_act_bwd_reduce_kernel(g_ptr, z_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                             part_ptr, P, C, HW, sgb, sgc, sgp, szb, szc, szp, slope,
                             HAS_ACT: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # part [2, C, T]: the tile's Σ dL/da and Σ dL/da·x̂ per channel (a = BN output).
    pid_p = tl.program_id(0)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ga, xhat, ok = _bn_act_grads(g_ptr, z_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, p,
                                 c, P, C, HW, sgb, sgc, sgp, szb, szc, szp, slope, HAS_ACT)
    T = tl.num_programs(0)
    c_ok = c < C
    tl.store(part_ptr + c * T + pid_p, tl.sum(ga, axis=0), mask=c_ok)
    tl.store(part_ptr + (C + c) * T + pid_p, tl.sum(tl.where(ok, ga * xhat, 0.0), axis=0),
             mask=c_ok)


@triton.jit
def bn_act_bwd_finalize_kernel(part_ptr, dbeta_ptr, dgamma_ptr, C, T,
                               BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # part [2, C, T] → dβ, dγ [C] (float32).
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sb = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    sg = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = c_ok[:, None] & (t < T)[None, :]
        sb += tl.load(part_ptr + c[:, None] * T + t[None, :], mask=ok, other=0.0)
        sg += tl.load(part_ptr + (C + c)[:, None] * T + t[None, :], mask=ok, other=0.0)
    tl.store(dbeta_ptr + c, tl.sum(sb, axis=1), mask=c_ok)
    tl.store(dgamma_ptr + c, tl.sum(sg, axis=1), mask=c_ok)


@triton.jit
def bn_act_bwd_dx_kernel(g_ptr, z_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                         dbeta_ptr, dgamma_ptr, dz_ptr, P, C, HW, inv_count,
                         sgb, sgc, sgp, szb, szc, szp, sdb, sdc, sdp, slope,
                         HAS_ACT: tl.constexpr, EMULATE_BF16: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dL/dz = γ/σ · (dL/da − (dβ + x̂·dγ)/P), written in z's dtype.
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ga, xhat, ok = _bn_act_grads(g_ptr, z_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, p,
                                 c, P, C, HW, sgb, sgc, sgp, szb, szc, szp, slope, HAS_ACT)
    c_ok = c < C
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
    dbeta = tl.load(dbeta_ptr + c, mask=c_ok, other=0.0)
    dgamma = tl.load(dgamma_ptr + c, mask=c_ok, other=0.0)
    dz = (gamma * invstd)[None, :] * (
        ga - (dbeta[None, :] + xhat * dgamma[None, :]) * inv_count)
    b = p // HW
    hw = p % HW
    store(dz_ptr + (b * sdb + hw * sdp)[:, None] + c[None, :] * sdc, dz, ok, EMULATE_BF16)


# -- geometry and launch configuration -----------------------------------------------------
class Geometry(NamedTuple):
    batch: int
    c_in: int
    height: int
    width: int
    c_out: int
    kh: int
    kw: int
    out_height: int
    out_width: int
    stride: int
    padding: int
    transposed: bool

    @property
    def classes(self) -> int:
        """Sub-pixel classes of the GEMM: stride² for a transposed convolution."""
        return self.stride**2 if self.transposed else 1

    @property
    def class_grid(self) -> tuple[int, int]:
        """The largest class's output grid (all of the output for a convolution)."""
        if not self.transposed:
            return self.out_height, self.out_width
        return triton.cdiv(self.out_height, self.stride), triton.cdiv(self.out_width, self.stride)

    @property
    def class_rows(self) -> int:
        rh, rw = self.class_grid
        return self.batch * rh * rw


def geometry(x: torch.Tensor, weight: torch.Tensor, kind: str, stride: int,
             padding: int) -> Geometry:
    b, c_in, h, w = x.shape
    transposed = kind == "conv_transpose"
    c_out = weight.shape[1] if transposed else weight.shape[0]
    kh, kw = weight.shape[2:]
    if transposed:
        oh, ow = (h - 1) * stride - 2 * padding + kh, (w - 1) * stride - 2 * padding + kw
    else:
        oh, ow = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    return Geometry(b, c_in, h, w, c_out, kh, kw, oh, ow, stride, padding, transposed)


class Tiling(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1  # > 1: split-K over the input channels, then splitk_reduce_kernel


def tiling_name(t: Tiling) -> str:
    """"BM/BN/BK/warps/stages", with "/kS" for S-way split-K: how impl strings and the
    dispatch table name a tiling."""
    name = "/".join(map(str, t[:5]))
    return name + f"/k{t.split_k}" if t.split_k > 1 else name


def parse_tiling(name: str) -> Tiling:
    """The tiling ``tiling_name`` gave ``name``; ValueError for anything else."""
    fields = name.split("/")
    try:
        split = int(fields.pop()[1:]) if len(fields) == 6 and fields[-1][:1] == "k" else 1
        t = Tiling(*map(int, fields), split_k=split)
    except (TypeError, ValueError):
        raise ValueError(f"not a tiling: {name!r} (BM/BN/BK/warps/stages[/kS])") from None
    if min(t) < 1 or any(v & (v - 1) for v in t[:3]):
        raise ValueError(f"not a tiling: {name!r} (blocks are powers of two, all fields >= 1)")
    return t


# Candidates for the per-layer measurement on a GPU; shared memory per stage is
# (BM + BN)·BK elements.
GPU_TILINGS = (
    Tiling(128, 128, 64, 8, 3),
    Tiling(128, 128, 32, 8, 4),
    Tiling(128, 64, 64, 4, 3),
    Tiling(64, 128, 64, 4, 3),
    Tiling(64, 64, 64, 4, 4),
    Tiling(64, 64, 32, 4, 4),
)
# Split-K, for layers with fewer output tiles than the GPU has multiprocessors (the 4×4 and
# 8×8 layers: a few dozen tiles of ~1,000 K-steps each leave most of an H100 idle), on the
# small tilings only: their many tiles times the splits fill the GPU.
SPLIT_K_TILINGS = (Tiling(64, 64, 64, 4, 4), Tiling(64, 64, 32, 4, 4))
SPLITS = (2, 4, 8)
_INT32_MAX = 2**31 - 1


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _fits(tiling: Tiling, g: Geometry) -> bool:
    # tl.dot needs every block dimension >= 16; larger blocks than the problem only add masks.
    return (tiling.block_n <= pow2_clamp(g.c_out, 16, 1 << 30)
            and tiling.block_m <= pow2_clamp(g.class_rows, 16, 1 << 30)
            and tiling.block_k <= pow2_clamp(g.c_in, 16, 1 << 30))


def output_tiles(g: Geometry, t: Tiling) -> int:
    return g.classes * triton.cdiv(g.class_rows, t.block_m) * triton.cdiv(g.c_out, t.block_n)


def split_fits(g: Geometry, t: Tiling) -> bool:
    """Whether each split gets at least two K-blocks and the workspace (splits × output,
    float32) has 32-bit offsets."""
    k_blocks = triton.cdiv(g.c_in, t.block_k)
    workspace = t.split_k * g.batch * g.c_out * g.out_height * g.out_width
    return k_blocks >= 2 * t.split_k and workspace <= _INT32_MAX


def candidate_tilings(g: Geometry, *, multiprocessors: int = 132) -> list[Tiling]:
    """The tilings the measured dispatch times for this layer: the GPU tilings that fit, and
    split-K ones where the layer has fewer output tiles than ``multiprocessors``. Under the
    interpreter: the default tiling and, where it fits, a 2-way split of it with 16-channel
    K-blocks (the paths the CPU tests exercise)."""
    if INTERPRETED:
        base = default_tiling(g)
        split = base._replace(block_k=16, split_k=2)
        return [base, split] if split_fits(g, split) else [base]
    fitting = [t for t in GPU_TILINGS if _fits(t, g)] or [default_tiling(g)]
    split = [t._replace(split_k=s) for t in SPLIT_K_TILINGS if _fits(t, g)
             and output_tiles(g, t) < multiprocessors for s in SPLITS]
    return fitting + [t for t in split if split_fits(g, t)]


def default_tiling(g: Geometry) -> Tiling:
    """The tiling when nothing was measured: the interpreter's (small blocks, few programs to
    run one at a time in Python), or a middling GPU one."""
    if INTERPRETED:
        return Tiling(pow2_clamp(g.class_rows, 16, 64), pow2_clamp(g.c_out, 16, 64),
                      pow2_clamp(g.c_in, 16, 64), 4, 1)
    return Tiling(pow2_clamp(g.class_rows, 16, 128), pow2_clamp(g.c_out, 16, 64),
                  pow2_clamp(g.c_in, 16, 32), 4, 3)


def elementwise_blocks(z: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) for the [P, C] passes: long along the contiguous dimension."""
    c = z.shape[1]
    if z.stride(1) == 1:  # channels_last
        block_c = pow2_clamp(c, 4, 64)
        return 4096 // block_c, block_c
    p = z.shape[0] * z.shape[2] * z.shape[3]
    return pow2_clamp(p, 16, 256), pow2_clamp(c, 4, 16)
