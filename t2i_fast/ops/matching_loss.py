"""The GAN-CLS / GAN-INT objectives of ``t2i_fast.losses`` as single Triton launches.

Each loss is one kernel that reads the logit vectors once and writes both the loss and its
gradient w.r.t. every logit (unscaled, fp32). Backward then only multiplies that buffer by
the incoming gradient: no second pass over the logits, no reduction in backward. One program
walks the batch block by block, so the sum is always taken in the same order (deterministic)
and any batch size works; GAN batches are small enough that one program is not the bottleneck
and a second launch to combine partial sums would cost more than it saves.

The operators are registered as ``torch.ops.t2i_fast.discriminator_loss`` and
``torch.ops.t2i_fast.generator_loss``, traceable (``_common.register_op``: ``triton_op``s on a
GPU), so ``torch.compile(fullgraph=True)`` traces them and Inductor sees the kernels. Nothing
reads a value back to the host.

``choose_matching_loss`` says whether the kernels beat the plain losses compiled into the
step, timed inside CUDA-graph replay as the captured step runs them: keep them only then.

On a machine without a GPU the kernels run in Triton's interpreter when TRITON_INTERPRET=1 is
set before this module is imported: Triton decides between compiling and interpreting when
``@triton.jit`` decorates a function, i.e. at this module's import, not at launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from t2i_fast.losses import discriminator_loss, generator_loss
from t2i_fast.ops import dispatch
from t2i_fast.ops._common import device_refusal, launcher, register_op, resolve_impl

BLOCK = 1024
IMPLS = ("auto", "triton", "ref")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _log1p(t):
    # log(1 + t) for t in [0, 1]. 1 + t alone rounds tiny t away (softplus of a very negative
    # logit would become 0); scaling log(u) by t / (u - 1) cancels exactly that rounding.
    # (libdevice's log1p would do, but Triton's interpreter cannot run libdevice calls.)
    u = 1.0 + t
    d = u - 1.0
    return tl.where(d == 0.0, t, tl.log(u) * (t / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _softplus_sum(x_ptr, grad_ptr, n, scale, NEGATE: tl.constexpr, BLOCK: tl.constexpr):
    """scale · Σ softplus(s·x) over the n logits at x_ptr, s = -1 if NEGATE else 1, in fp32:
    -log σ(x) (label "real") with NEGATE, -log(1 - σ(x)) (label "fake") without. Stores
    scale · d/dx of it, fp32, at grad_ptr [n]."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if NEGATE:
            z = -z
        e = tl.exp(-tl.abs(z))  # in (0, 1]: cannot overflow, whatever the logit
        acc += tl.where(mask, tl.maximum(z, 0.0) + _log1p(e), 0.0)
        grad = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) * scale  # σ(z) = softplus'(z)
        if NEGATE:
            grad = -grad
        tl.store(grad_ptr + offsets, grad, mask=mask)
    return tl.sum(acc, axis=0) * scale


@triton.jit
def _matching_loss_fwd_kernel(real_right_ptr, real_wrong_ptr, fake_right_ptr, loss_ptr,
                              grad_ptr, n, HAS_WRONG: tl.constexpr, BLOCK: tl.constexpr):
    # GAN-CLS: -log σ(rr) + ½(-log(1 - σ(rw)) - log(1 - σ(fr))); plain GAN (no wrong
    # logits): -log σ(rr) - log(1 - σ(fr)); batch means. grad_ptr holds one row of n per input.
    inv_n = 1.0 / n
    total = _softplus_sum(real_right_ptr, grad_ptr, n, inv_n, True, BLOCK)
    if HAS_WRONG:
        total += _softplus_sum(real_wrong_ptr, grad_ptr + n, n, 0.5 * inv_n, False, BLOCK)
        total += _softplus_sum(fake_right_ptr, grad_ptr + 2 * n, n, 0.5 * inv_n, False, BLOCK)
    else:
        total += _softplus_sum(fake_right_ptr, grad_ptr + n, n, inv_n, False, BLOCK)
    tl.store(loss_ptr, total)


@triton.jit
def _generator_loss_fwd_kernel(fake_right_ptr, fake_interp_ptr, loss_ptr, grad_ptr, n_right,
                               n_interp, interp_weight, HAS_INTERP: tl.constexpr,
                               BLOCK: tl.constexpr):
    # mean(-log σ(fr)) + interp_weight · mean(-log σ(fi)); grad_ptr: [n_right + n_interp].
    total = _softplus_sum(fake_right_ptr, grad_ptr, n_right, 1.0 / n_right, True, BLOCK)
    if HAS_INTERP:
        total += _softplus_sum(fake_interp_ptr, grad_ptr + n_right, n_interp,
                               interp_weight / n_interp, True, BLOCK)
    tl.store(loss_ptr, total)


# -- operators ------------------------------------------------------------------------------
def _discriminator_outputs(real_right: torch.Tensor, real_wrong: torch.Tensor | None,
                           fake_right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [], d loss / d logits [T, B] fp32), T = 3 with the wrong logits, else 2."""
    rows = 3 if real_wrong is not None else 2
    return (real_right.new_empty((), dtype=torch.float32),
            real_right.new_empty((rows, real_right.shape[0]), dtype=torch.float32))


def _discriminator_loss_body(real_right: torch.Tensor, real_wrong: torch.Tensor | None,
                             fake_right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The logits are contiguous [B].
    loss, grads = _discriminator_outputs(real_right, real_wrong, fake_right)
    launcher(_matching_loss_fwd_kernel)[(1,)](
        real_right, real_wrong if real_wrong is not None else real_right, fake_right, loss,
        grads, real_right.shape[0], HAS_WRONG=real_wrong is not None, BLOCK=BLOCK)
    return loss, grads


def _generator_outputs(fake_right: torch.Tensor, fake_interp: torch.Tensor | None,
                       interp_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [], d loss / d logits [B_right + B_interp] fp32)."""
    n = fake_right.shape[0] + (fake_interp.shape[0] if fake_interp is not None else 0)
    return (fake_right.new_empty((), dtype=torch.float32),
            fake_right.new_empty((n,), dtype=torch.float32))


def _generator_loss_body(fake_right: torch.Tensor, fake_interp: torch.Tensor | None,
                         interp_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    # The logits are contiguous [B_right] and [B_interp].
    loss, grads = _generator_outputs(fake_right, fake_interp, interp_weight)
    n_right = fake_right.shape[0]
    launcher(_generator_loss_fwd_kernel)[(1,)](
        fake_right, fake_interp if fake_interp is not None else fake_right, loss, grads,
        n_right, grads.shape[0] - n_right, interp_weight, HAS_INTERP=fake_interp is not None,
        BLOCK=BLOCK)
    return loss, grads


# The bodies only size their outputs and launch one kernel: torch.compile may trace them.
_discriminator_loss_op = register_op("discriminator_loss", _discriminator_loss_body,
                                     _discriminator_outputs, traceable=True)
_generator_loss_op = register_op("generator_loss", _generator_loss_body, _generator_outputs,
                                 traceable=True)


def _save_grads(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.dtype = inputs[0].dtype
    ctx.n_first = inputs[0].shape[0]
    ctx.has_second = inputs[1] is not None


def _scaled_grads(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
    (grads,) = ctx.saved_tensors
    return (grads * grad_loss).to(ctx.dtype)


def _discriminator_loss_backward(ctx, grad_loss, _):
    rows = _scaled_grads(ctx, grad_loss).unbind(0)  # [B] each
    return rows if ctx.has_second else (rows[0], None, rows[1])


def _generator_loss_backward(ctx, grad_loss, _):
    grads = _scaled_grads(ctx, grad_loss)  # [B_right + B_interp]
    if not ctx.has_second:
        return grads, None, None
    return grads[:ctx.n_first], grads[ctx.n_first:], None


_discriminator_loss_op.register_autograd(_discriminator_loss_backward,
                                         setup_context=_save_grads)
_generator_loss_op.register_autograd(_generator_loss_backward, setup_context=_save_grads)


# -- public API -----------------------------------------------------------------------------
def discriminator_loss_ref(real_right: torch.Tensor, real_wrong: torch.Tensor | None,
                           fake_right: torch.Tensor, *, matching_aware: bool = True
                           ) -> torch.Tensor:
    return discriminator_loss(real_right, real_wrong, fake_right, matching_aware=matching_aware)


def generator_loss_ref(fake_right: torch.Tensor, fake_interp: torch.Tensor | None = None, *,
                       interp_weight: float = 1.0) -> torch.Tensor:
    return generator_loss(fake_right, fake_interp, interp_weight=interp_weight)


def _refusal(logits: list[torch.Tensor], *, same_shape: bool) -> str | None:
    """Why the kernels cannot take these logits, or None if they can."""
    refusal = device_refusal(logits, op="matching_loss")
    if refusal is not None:
        return refusal
    if len({x.dtype for x in logits}) > 1:
        return "the logits must share one dtype"
    if logits[0].dtype not in DTYPES:
        return f"the logits must be one of {DTYPES}, got {logits[0].dtype}"
    if same_shape and len({x.shape for x in logits}) > 1:
        return f"the logits differ in shape: {[tuple(x.shape) for x in logits]}"
    if any(x.numel() == 0 for x in logits):
        return "the loss of an empty batch is undefined"
    return None


def _use_triton(impl: str, logits: list[torch.Tensor], *, same_shape: bool) -> bool:
    return resolve_impl(impl, IMPLS, logits[0],
                        lambda: _refusal(logits, same_shape=same_shape)) != "ref"


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).contiguous()  # [B]; the kernels index logits as flat arrays


def discriminator_loss_fused(real_right: torch.Tensor, real_wrong: torch.Tensor | None,
                             fake_right: torch.Tensor, *, matching_aware: bool = True,
                             impl: str = "auto") -> torch.Tensor:
    """``t2i_fast.losses.discriminator_loss`` (fp32 scalar) in one kernel; gradients come
    back in the logits' dtype. ``impl``: "triton", "ref" (PyTorch), or "auto": Triton for
    CUDA tensors it can take, the reference otherwise. Plain GAN (not ``matching_aware``) ignores
    ``real_wrong``."""
    logits = [real_right, fake_right]
    if matching_aware:
        if real_wrong is None:
            raise ValueError("the matching-aware loss needs the (real, wrong text) logits")
        logits.insert(1, real_wrong)
    if not _use_triton(impl, logits, same_shape=True):
        return discriminator_loss_ref(real_right, real_wrong, fake_right,
                                      matching_aware=matching_aware)
    wrong = _flat(real_wrong) if matching_aware else None
    return torch.ops.t2i_fast.discriminator_loss(_flat(real_right), wrong, _flat(fake_right))[0]


def generator_loss_fused(fake_right: torch.Tensor, fake_interp: torch.Tensor | None = None, *,
                         interp_weight: float = 1.0, impl: str = "auto") -> torch.Tensor:
    """``t2i_fast.losses.generator_loss`` (fp32 scalar) in one kernel; gradients come back in
    the logits' dtype. ``impl`` as for ``discriminator_loss_fused``."""
    logits = [fake_right] if fake_interp is None else [fake_right, fake_interp]
    if not _use_triton(impl, logits, same_shape=False):
        return generator_loss_ref(fake_right, fake_interp, interp_weight=interp_weight)
    interp = _flat(fake_interp) if fake_interp is not None else None
    return torch.ops.t2i_fast.generator_loss(_flat(fake_right), interp,
                                             float(interp_weight))[0]


# -- keeping the kernels only where they win --------------------------------------------------
LOSS_CHOICES = ("triton", "reference")


def _loss_candidates(batch_size: int, device: torch.device, dtype: torch.dtype, *,
                     matching_aware: bool, interp_weight: float | None) -> dict:
    """{"reference": step, "triton": step}: one training step's losses (D's, then G's, as
    the step computes them), forward and backward, on fixed logits of the step's batch; each
    returns (D's loss + G's, the logits' gradients...). The reference is compiled on a GPU
    (the compiled step compiles it): the interpreter's tests time it eagerly."""
    seed = torch.Generator(device).manual_seed(0)
    logits = [(3 * torch.randn(batch_size, generator=seed, device=device)).to(dtype)
              .requires_grad_() for _ in range(5)]
    real_right, real_wrong, fake_right, fake_for_g, fake_interp = logits
    wrong = real_wrong if matching_aware else None
    interp = fake_interp if interp_weight is not None else None
    weight = 1.0 if interp_weight is None else float(interp_weight)
    used = [x for x in (real_right, wrong, fake_right, fake_for_g, interp) if x is not None]

    def losses_ref():
        return (discriminator_loss_ref(real_right, wrong, fake_right,
                                       matching_aware=matching_aware)
                + generator_loss_ref(fake_for_g, interp, interp_weight=weight))

    def losses_triton():
        return (discriminator_loss_fused(real_right, wrong, fake_right,
                                         matching_aware=matching_aware, impl="triton")
                + generator_loss_fused(fake_for_g, interp, interp_weight=weight, impl="triton"))

    reference = torch.compile(losses_ref, dynamic=False) if device.type == "cuda" else losses_ref

    def step(losses):
        def run():
            with torch.enable_grad():
                loss = losses()
                return (loss.detach(), *torch.autograd.grad(loss, used))
        return run

    return {"reference": step(reference), "triton": step(losses_triton)}


def choose_matching_loss(*, batch_size: int, device: torch.device | str,
                         dtype: torch.dtype = torch.float32, matching_aware: bool = True,
                         interp_weight: float | None = 1.0,
                         timer: dispatch.Timer | None = None) -> tuple[str, dict]:
    """Whether the step should use the fused loss kernels ("triton") or the plain losses of
    ``t2i_fast.losses`` ("reference", which the compiled step compiles with the rest): the
    one whose D and G losses, forward and backward at ``batch_size`` (``interp_weight``:
    GAN-INT's interpolated term, None without it), run faster inside CUDA-graph replay,
    measured once per card, versions, batch, dtype and variant (``dispatch.measured_choice``,
    medians; ``timer`` replaces the CUDA-graph timing, for tests). Returns (the choice, the
    evidence: the dispatch entry with its "key" and "choice", JSON-serialisable). Without
    CUDA and a timer nothing can be timed: "reference", with the reason under "refused"."""
    device = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    refusal = device_refusal([torch.empty(0, device=device)], op="matching_loss")
    if refusal is None and device.type != "cuda" and timer is None:
        refusal = "timing in CUDA-graph replay needs CUDA"
    if refusal is not None:
        return "reference", {"choice": "reference", "refused": refusal}
    key = dispatch.key(device, "matching_loss", f"batch {batch_size}",
                       str(dtype).removeprefix("torch."),
                       "gan-cls" if matching_aware else "gan",
                       "no interp" if interp_weight is None else f"interp {interp_weight:g}",
                       "fwd+bwd", "in-graph")
    entry = dispatch.measured_choice(
        key, lambda: _loss_candidates(batch_size, device, dtype, matching_aware=matching_aware,
                                      interp_weight=interp_weight),
        reference="reference", tolerance=1e-4 if dtype == torch.float32 else 1e-2,
        timer=timer if timer is not None else dispatch.graph_replay_ms)
    return entry["winner"], {"key": key, **entry, "choice": entry["winner"]}
