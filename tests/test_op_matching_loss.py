"""The fused GAN-CLS / GAN-INT losses against t2i_fast.losses: values, gradients, dtypes,
extreme logits, and tracing by torch.compile. Without CUDA the kernels run in Triton's
interpreter on the CPU."""

import json
import os

import torch

if not torch.cuda.is_available():
    # Triton chooses between compiling and interpreting when @triton.jit decorates a kernel,
    # i.e. when the module defining it is imported: this must come first. (tests/conftest.py
    # should set it too, for test modules imported before this one.)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from t2i_fast.ops import matching_loss as ml  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = (1, 2, 7, 64, 1000, 4099)  # 4099: several blocks of ml.BLOCK, with a ragged tail
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _logits(n: int, count: int, *, dtype=torch.float32, scale: float = 3.0):
    return [(torch.randn(n, device=DEVICE) * scale).to(dtype).requires_grad_()
            for _ in range(count)]


def _loss_and_grads(fn, logits):
    """(loss, the gradients w.r.t. each logit tensor) of fn(*logits), by autograd."""
    leaves = [x.detach().clone().requires_grad_() for x in logits]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def _d_fns(matching_aware: bool):
    def fused(rr, rw, fr):
        return ml.discriminator_loss_fused(rr, rw, fr, matching_aware=matching_aware,
                                           impl="triton")

    def ref(rr, rw, fr):
        return ml.discriminator_loss_ref(rr, rw, fr, matching_aware=matching_aware)

    return fused, ref


def _g_fns(interp_weight: float | None):
    def fused(fr, fi):
        return ml.generator_loss_fused(fr, None if interp_weight is None else fi,
                                       interp_weight=interp_weight or 1.0, impl="triton")

    def ref(fr, fi):
        return ml.generator_loss_ref(fr, None if interp_weight is None else fi,
                                     interp_weight=interp_weight or 1.0)

    return fused, ref


VARIANTS = [pytest.param(_d_fns(True), 3, id="D-cls"), pytest.param(_d_fns(False), 3, id="D-gan"),
            pytest.param(_g_fns(0.7), 2, id="G-int"), pytest.param(_g_fns(None), 2, id="G")]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(("fns", "count"), VARIANTS)
def test_fp32_matches_reference(fns, count, n):
    fused, ref = fns
    logits = _logits(n, count)
    loss, grads = _loss_and_grads(fused, logits)
    want_loss, want_grads = _loss_and_grads(ref, logits)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=3e-6, atol=1e-6)
    for got, want in zip(grads, want_grads, strict=True):
        if want is None:
            assert got is None
        else:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("n", (7, 1000, 4099))
@pytest.mark.parametrize(("fns", "count"), VARIANTS)
def test_bf16_error_is_within_torchs(fns, count, n):
    """bf16 logits: the loss is fp32 and as exact as the fp32 reference's; each gradient, in
    bf16, is at most twice as far from the fp32 reference's as PyTorch's own bf16 one."""
    fused, ref = fns
    logits = _logits(n, count, dtype=torch.bfloat16)
    loss, grads = _loss_and_grads(fused, logits)
    _, torch_grads = _loss_and_grads(ref, logits)
    want_loss, want_grads = _loss_and_grads(ref, [x.float() for x in logits])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=3e-6, atol=1e-6)
    for got, by_torch, want in zip(grads, torch_grads, want_grads, strict=True):
        if want is None:
            assert got is None
            continue
        assert got.dtype == torch.bfloat16
        ours = (got.float() - want).abs().max()
        # No less than half a bf16 step at the largest gradient: with few logits PyTorch's
        # roundings can all happen to be small.
        theirs = max((by_torch.float() - want).abs().max(), 2**-9 * want.abs().max())
        assert ours <= 2 * theirs, (ours, theirs)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize(("fns", "count"), VARIANTS)
def test_extreme_logits_stay_finite(fns, count, dtype):
    fused, ref = fns
    values = torch.tensor([-80.0, 80.0, -1e4, 1e4, 0.0, -30.0, 30.0], device=DEVICE)
    logits = [values.roll(i).to(dtype).requires_grad_() for i in range(count)]
    loss, grads = _loss_and_grads(fused, logits)
    want_loss, want_grads = _loss_and_grads(ref, [x.float() for x in logits])
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    for got, want in zip(grads, want_grads, strict=True):
        if want is not None:
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-6)


def test_tiny_losses_keep_their_precision():
    """softplus of a very negative logit is about e^x, not 0: 1 + e^x alone would lose it."""
    fr = torch.full((5,), 30.0, device=DEVICE)  # -log σ(30) ≈ 9.4e-14
    loss = ml.generator_loss_fused(fr, impl="triton")
    torch.testing.assert_close(loss, ml.generator_loss_ref(fr), rtol=1e-5, atol=0)


def test_shapes_strides_and_determinism():
    """[B, 1] or strided logits work (gradients keep each input's shape), and the same
    input gives bit-identical results."""
    base = torch.randn(3, 2 * 513, device=DEVICE)
    rr, rw, fr = base[0, ::2, None], base[1, ::2, None], base[2, ::2, None]  # [513, 1]
    logits = [x.clone().requires_grad_() for x in (rr, rw, fr)]
    first = _loss_and_grads(ml.discriminator_loss_fused, logits)
    again = _loss_and_grads(ml.discriminator_loss_fused, logits)
    want = _loss_and_grads(ml.discriminator_loss_ref, logits)
    torch.testing.assert_close(first[0], want[0], rtol=3e-6, atol=1e-6)
    for a, b, w in zip(first[1], again[1], want[1], strict=True):
        assert a.shape == (513, 1)
        assert torch.equal(a, b)
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-9)
    assert torch.equal(first[0], again[0])


def test_grad_output_scales_the_gradients():
    logits = _logits(33, 3)
    ours = [x.detach().clone().requires_grad_() for x in logits]
    theirs = [x.detach().clone().requires_grad_() for x in logits]
    (-2.5 * ml.discriminator_loss_fused(*ours, impl="triton")).backward()
    (-2.5 * ml.discriminator_loss_ref(*theirs)).backward()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)


def test_impl_choice():
    logits = _logits(4, 3)
    assert "t2i_fast" in type(ml.discriminator_loss_fused(*logits, impl="triton").grad_fn).__name__
    auto = type(ml.generator_loss_fused(logits[0]).grad_fn).__name__
    assert ("t2i_fast" in auto) == (DEVICE == "cuda")  # "auto" on CPU tensors: the reference
    assert "t2i_fast" not in type(ml.generator_loss_fused(logits[0], impl="ref").grad_fn).__name__
    double = ml.generator_loss_fused(logits[0].double())  # no kernel for float64: the reference
    assert "t2i_fast" not in type(double.grad_fn).__name__
    with pytest.raises(ValueError, match="impl must be"):
        ml.generator_loss_fused(logits[0], impl="cuda")
    with pytest.raises(ValueError, match="wrong text"):
        ml.discriminator_loss_fused(logits[0], None, logits[2], impl="triton")
    with pytest.raises(ValueError, match="differ in shape"):
        ml.discriminator_loss_fused(logits[0], logits[1][:3], logits[2], impl="triton")
    with pytest.raises(ValueError, match="one dtype"):
        ml.discriminator_loss_fused(logits[0], logits[1].bfloat16(),
                                    logits[2], impl="triton")


@pytest.mark.parametrize("variant", ("D-cls", "D-gan", "G-int", "G"))
def test_operator_registration(variant):
    """Schema, fake (meta) implementation and autograd registration, as torch checks them."""
    a, b, c = (torch.randn(9, device=DEVICE, requires_grad=True) for _ in range(3))
    op, args = {
        "D-cls": (torch.ops.t2i_fast.discriminator_loss, (a, b, c)),
        "D-gan": (torch.ops.t2i_fast.discriminator_loss, (a, None, c)),
        "G-int": (torch.ops.t2i_fast.generator_loss, (a, b, 0.5)),
        "G": (torch.ops.t2i_fast.generator_loss, (a, None, 1.0)),
    }[variant]
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    """One graph, no break: the operators read nothing back to the host (an .item() or a
    data-dependent shape would break the graph, which fullgraph turns into an error)."""
    def step(rr, rw, fr, fi):
        d = ml.discriminator_loss_fused(rr, rw, fr, impl="triton")
        g = ml.generator_loss_fused(fr, fi, interp_weight=0.5, impl="triton")
        return d + 2 * g

    counter = CompileCounterWithBackend("aot_eager" if DEVICE == "cpu" else "inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    logits = _logits(37, 4)
    loss, grads = _loss_and_grads(compiled, logits)
    want_loss, want_grads = _loss_and_grads(step, logits)
    assert counter.frame_count == 1
    code = counter.graphs[0].code
    assert "t2i_fast.discriminator_loss" in code and "t2i_fast.generator_loss" in code
    torch.testing.assert_close(loss, want_loss, rtol=3e-6, atol=1e-6)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


@cuda_only
def test_no_host_sync_on_cuda():
    logits = _logits(300, 3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ml.discriminator_loss_fused(*logits).backward()
        ml.generator_loss_fused(logits[2], logits[1]).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- keeping the kernels only where they win in the captured step --------------------------
@pytest.fixture
def _own_table(tmp_path, monkeypatch):
    from t2i_fast.ops import dispatch

    monkeypatch.setenv("T2I_FAST_DISPATCH", str(tmp_path / "dispatch.json"))
    monkeypatch.setattr(dispatch, "_TABLES", {})


@pytest.mark.parametrize("triton_ms", ([0.5, 9.0, 0.5], [1.5, 0.1, 1.5]))
def test_choose_matching_loss_keeps_the_faster(_own_table, triton_ms):
    """By the medians of the injected timer's samples; measured once per key: a second
    call, here or in another process, times nothing."""
    from t2i_fast.ops import dispatch

    timed = []

    def timer(key, name, step):
        timed.append(name)
        loss, *grads = step()  # the steps run: the kernels' results are checked and sized
        # GAN-CLS with GAN-INT: five logit vectors; plain GAN: three.
        assert len(grads) == (5 if "gan-cls" in key else 3) and loss.shape == ()
        return triton_ms if name == "triton" else [1.0, 1.0, 1.0]

    choice, evidence = ml.choose_matching_loss(batch_size=6, device=DEVICE, timer=timer,
                                               interp_weight=0.5)
    assert choice == ("triton" if triton_ms[0] < 1 else "reference")
    assert sorted(timed) == ["reference", "triton"]
    assert evidence["choice"] == choice and evidence["ms"]["triton"] == triton_ms[0]
    assert "batch 6" in evidence["key"] and "interp 0.5" in evidence["key"]
    json.dumps(evidence)

    def no_timing(*_):
        pytest.fail("measured again")
    assert ml.choose_matching_loss(batch_size=6, device=DEVICE, timer=no_timing,
                                   interp_weight=0.5) == (choice, evidence)
    dispatch._TABLES.clear()
    assert ml.choose_matching_loss(batch_size=6, device=DEVICE, timer=no_timing,
                                   interp_weight=0.5)[0] == choice
    # Another batch size or variant is another measurement.
    ml.choose_matching_loss(batch_size=7, device=DEVICE, timer=timer, matching_aware=False,
                            interp_weight=None)
    assert len(timed) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_choose_matching_loss_refuses_to_guess_without_cuda(_own_table):
    choice, evidence = ml.choose_matching_loss(batch_size=64, device="cpu")
    assert choice == "reference" and "CUDA" in evidence["refused"]
    with pytest.raises(ValueError, match="batch_size"):
        ml.choose_matching_loss(batch_size=0, device="cpu")
