"""What the Triton ops share: whether their kernels run in Triton's interpreter, the choice
between kernels and reference (``impl``), the refusals every op makes, the interpreter's
bfloat16 work-arounds, and how an op is registered with ``torch.library``.

Triton decides between compiling and interpreting when ``@triton.jit`` decorates a function,
i.e. when the module defining it is imported: TRITON_INTERPRET=1 must be set before any
``t2i_fast.ops`` module with kernels is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """acc + a @ b in float32; IEEE: exact float32 products (no TF32)."""
    if EMULATE_BF16:
        # Triton 3.9's interpreter multiplies bfloat16 bit patterns as integers; products of
        # bfloat16 values are exact in float32, so upcasting gives the tensor-core result.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _round_bf16(v):
    """float32 v rounded to the nearest bfloat16 (ties to even), kept in float32."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def store(ptrs, v, mask, ROUND_BF16: tl.constexpr):
    """Stores float32 v in the pointers' dtype."""
    if ROUND_BF16:
        # Triton 3.9's interpreter truncates float32 → bfloat16 where GPUs round to nearest
        # even: round here so that the interpreter's results are the GPU's.
        v = _round_bf16(v)
    tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def cast_like(v, ptr, ROUND_BF16: tl.constexpr):
    """float32 v as a value of ptr's dtype, as ``dot`` takes it: with ROUND_BF16 (the
    interpreter, whose casts truncate) rounded to bfloat16 but kept in float32, which
    ``dot``'s EMULATE_BF16 multiplies exactly as a GPU multiplies the bfloat16 value."""
    if ROUND_BF16:
        return _round_bf16(v)
    return v.to(ptr.dtype.element_ty)


# With TRITON_INTERPRET=1, @triton.jit made interpreter functions rather than JIT ones.
INTERPRETED = not isinstance(store, JITFunction)


def emulate_bf16(t: torch.Tensor) -> bool:
    """Whether kernels on t must work around the interpreter's bfloat16 arithmetic
    (``dot``'s EMULATE_BF16, ``store``'s ROUND_BF16)."""
    return INTERPRETED and t.dtype == torch.bfloat16


def device_refusal(tensors: Sequence[torch.Tensor], *, op: str) -> str | None:
    """Why kernels cannot run on these tensors' device(s), or None if they can; ``op`` names
    the module (``t2i_fast.ops.<op>``) that must be imported after TRITON_INTERPRET=1."""
    if not (all(t.is_cuda for t in tensors) or INTERPRETED):
        return (f"they need CUDA tensors, or TRITON_INTERPRET=1 set before "
                f"t2i_fast.ops.{op} is imported")
    if len({t.device for t in tensors}) > 1:
        return "the tensors must share one device"
    return None


def resolve_impl(impl: str, impls: Sequence[str], x: torch.Tensor,
                 refusal: Callable[[], str | None]) -> str:
    """"ref", or the kernels' ``impl``. An explicit kernel impl that ``refusal()`` refuses
    is a ValueError; "auto" takes the reference for a refused call and for tensors not on a
    GPU (the interpreter is for tests, not for use)."""
    if impl not in impls:
        raise ValueError(f"impl must be one of {tuple(impls)}, got {impl!r}")
    if impl == "ref":
        return impl
    reason = refusal()
    if impl == "auto":
        return impl if reason is None and x.is_cuda else "ref"
    if reason is not None:
        raise ValueError(f"impl={impl!r}: {reason}")
    return impl


def launcher(kernel):
    """``kernel`` as a ``triton_op``'s body launches it: through ``wrap_triton``, which makes
    the launch traceable by torch.compile. An interpreted kernel cannot be traced (it reads
    data pointers), so under the interpreter it is launched as it is."""
    return kernel if INTERPRETED else torch.library.wrap_triton(kernel)


def register_op(name: str, body: Callable, fake: Callable, *,
                mutates_args: Sequence[str] = (), traceable: bool):
    """The operator ``torch.ops.t2i_fast.<name>`` running ``body`` (whose annotations give
    the schema), for ``torch.compile(fullgraph=True)`` to trace without a graph break.

    ``traceable``: a ``triton_op``, whose body torch.compile traces with fake tensors so that
    Inductor sees the kernels it launches through ``launcher``; the body must then do nothing
    but compute shapes and launch. Otherwise, and always under the interpreter, an opaque
    ``custom_op`` whose output shapes come from ``fake``."""
    qualified = f"t2i_fast::{name}"
    if traceable and not INTERPRETED:
        return torch.library.triton_op(qualified, body, mutates_args=tuple(mutates_args))
    op = torch.library.custom_op(qualified, body, mutates_args=tuple(mutates_args))
    op.register_fake(fake)
    return op
