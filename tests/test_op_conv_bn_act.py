"""The fused conv → BatchNorm → LeakyReLU against its PyTorch reference: outputs, every
gradient and the running statistics, for each layer kind of the presets, odd channel counts
and sizes, float32 and bfloat16, NCHW and channels_last, training and eval; the module, the
compiled graph, the dispatch table, the model walk and the benchmark script's dry run.
Without CUDA the kernels run in Triton's interpreter on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    # Triton chooses between compiling and interpreting when @triton.jit decorates a kernel,
    # i.e. when the module defining it is imported: this must come first. (tests/conftest.py
    # should set it too, for test modules imported before this one.)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
from conftest import load_script  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from t2i_fast.models.config import preset  # noqa: E402
from t2i_fast.models.discriminator import Discriminator  # noqa: E402
from t2i_fast.models.generator import Generator  # noqa: E402
from t2i_fast.ops import conv_bn_act as cba  # noqa: E402
from t2i_fast.ops import dispatch  # noqa: E402
from t2i_fast.ops.fused_layers import ConvBNAct, conv_bn_act_layers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() and not cba.INTERPRETED,
    reason="no CUDA, and t2i_fast.ops.conv_bn_act was imported before TRITON_INTERPRET=1 was "
           "set (tests/conftest.py should set it before any test module imports it)")

# (kind, C_in, C_out, kernel, stride, padding, batch, H, W, slope, bias): every layer type of
# the presets, with odd channel counts and sizes.
LAYERS = {
    "conv4s2": ("conv", 3, 5, 4, 2, 1, 2, 7, 9, 0.2, False),
    "conv3": ("conv", 5, 7, 3, 1, 1, 2, 5, 6, 0.0, True),
    "conv1": ("conv", 7, 3, 1, 1, 0, 3, 4, 3, None, False),
    "conv3-w1": ("conv", 3, 5, 3, 1, 1, 2, 5, 1, 0.2, False),
    "convT4s2": ("conv_transpose", 5, 3, 4, 2, 1, 2, 3, 5, 0.2, True),
    "convT4s1-1x1": ("conv_transpose", 7, 5, 4, 1, 0, 5, 1, 1, None, False),
    "convT4s2-odd": ("conv_transpose", 7, 5, 4, 2, 1, 2, 3, 3, 0.0, False),
}
# A reed generator layer at its real size (batch 64): ReLU after BatchNorm over 1,024
# positions, where bfloat16 rounding flips the ReLU mask of values next to 0 and PyTorch's
# own bfloat16 gradients are 11% of their scale from float32's.
REED_LAYERS = {"reed-1x1-relu": ("conv", 1024, 256, 1, 1, 0, 64, 4, 4, 0.0, False)}
LAYOUTS = ("nchw", "channels_last")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    # Exact float32 products on both sides, and a dispatch table of the test's own.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setenv("T2I_FAST_DISPATCH", str(tmp_path / "dispatch.json"))


def _inputs(name: str, layout: str) -> dict:
    """float32 masters of one layer's tensors (the kernels get them rounded to the dtype)."""
    kind, c_in, c_out, k, stride, padding, batch, h, w, slope, bias = {**LAYERS,
                                                                        **REED_LAYERS}[name]
    wshape = (c_in, c_out, k, k) if kind == "conv_transpose" else (c_out, c_in, k, k)
    x = torch.randn(batch, c_in, h, w, device=DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return {
        "x": x, "weight": torch.randn(wshape, device=DEVICE) / (c_in * k) ** 0.5,
        "bias": torch.randn(c_out, device=DEVICE) if bias else None,
        "bn_weight": 1 + 0.2 * torch.randn(c_out, device=DEVICE),
        "bn_bias": 0.2 * torch.randn(c_out, device=DEVICE),
        "running_mean": 0.1 * torch.randn(c_out, device=DEVICE),
        "running_var": 0.5 + torch.rand(c_out, device=DEVICE),
        "options": {"kind": kind, "stride": stride, "padding": padding, "slope": slope},
    }


def _run(impl: str, inputs: dict, *, dtype=torch.float32, training=True, grad_y=None):
    """{name: tensor} of the layer's output, its gradients (training) and running stats.
    x, weight and bias are cast to dtype; the BatchNorm tensors stay float32."""
    leaves = {}
    for name in ("x", "weight", "bias", "bn_weight", "bn_bias"):
        t = inputs[name]
        if t is not None:
            t = t.to(dtype) if name in ("x", "weight", "bias") else t.clone()
            leaves[name] = t.detach().requires_grad_(training)
    stats = {n: inputs[n].clone() for n in ("running_mean", "running_var")}
    with torch.set_grad_enabled(training):
        y = cba.conv_bn_act(leaves["x"], leaves["weight"], leaves.get("bias"),
                            leaves["bn_weight"], leaves["bn_bias"], **stats,
                            **inputs["options"], training=training, impl=impl)
    out = {"y": y.detach(), **stats}
    if training:
        y.backward(grad_y.to(dtype) if grad_y is not None else torch.ones_like(y))
        out.update({f"d{n}": t.grad for n, t in leaves.items()})
    return out


def _grad_y(inputs: dict, dtype=torch.float32) -> torch.Tensor:
    y = _run("ref", inputs, training=False)["y"]
    return torch.randn_like(y).to(dtype).float()


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", LAYERS)
def test_train_fp32_matches_reference(name, layout):
    inputs = _inputs(name, layout)
    grad_y = _grad_y(inputs)
    expected = _run("ref", inputs, grad_y=grad_y)
    got = _run("triton", inputs, grad_y=grad_y)
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-5, msg=key)
    assert got["y"].is_contiguous(memory_format=torch.channels_last) == (
        layout == "channels_last" and inputs["x"].shape[2:] != (1, 1))


@needs_kernels
@pytest.mark.parametrize("name", ["conv4s2", "conv1", "convT4s2", "convT4s1-1x1"])
def test_train_cudnn_fused_matches_reference(name):
    inputs = _inputs(name, "channels_last" if name == "conv4s2" else "nchw")
    grad_y = _grad_y(inputs)
    expected = _run("ref", inputs, grad_y=grad_y)
    got = _run("cudnn_fused", inputs, grad_y=grad_y)
    for key, want in expected.items():
        torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-5, msg=key)


def _assert_bf16_within_torchs(got: dict, torch_bf16: dict, exact: dict) -> None:
    """Each tensor's error against the float32 computation is at most 3× PyTorch's own
    bfloat16 error, plus a quarter of a bfloat16 step at the tensor's scale."""
    for key, want in exact.items():
        want = want.float()
        scale = want.abs().max().item()
        ours = (got[key].float() - want).abs().max().item()
        theirs = (torch_bf16[key].float() - want).abs().max().item()
        assert ours <= 3 * theirs + 2**-10 * scale, (key, ours, theirs, scale)


@needs_kernels
@pytest.mark.parametrize(("name", "layout"), [*((name, layout) for name in LAYERS
                                                for layout in LAYOUTS),
                                              *((name, "nchw") for name in REED_LAYERS)])
def test_train_bf16_error_is_within_torchs(name, layout):
    inputs = _inputs(name, layout)
    for key in ("x", "weight", "bias"):  # the float32 reference sees the same rounded values
        if inputs[key] is not None:
            inputs[key] = inputs[key].bfloat16().float()
    grad_y = _grad_y(inputs, torch.bfloat16)
    exact = _run("ref", inputs, grad_y=grad_y)
    torch_bf16 = _run("ref", inputs, dtype=torch.bfloat16, grad_y=grad_y)
    got = _run("triton", inputs, dtype=torch.bfloat16, grad_y=grad_y)
    assert got["y"].dtype == got["dx"].dtype == got["dweight"].dtype == torch.bfloat16
    _assert_bf16_within_torchs(got, torch_bf16, exact)


@needs_kernels
@pytest.mark.parametrize("impl", ["triton", "cudnn_fused"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", LAYERS)
def test_eval_matches_reference(name, layout, impl):
    inputs = _inputs(name, layout)
    for key in ("x", "weight", "bias"):
        if inputs[key] is not None:
            inputs[key] = inputs[key].bfloat16().float()
    exact = _run("ref", inputs, training=False)
    got = _run(impl, inputs, training=False)
    for key, want in exact.items():
        torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-5, msg=key)
    torch_bf16 = _run("ref", inputs, dtype=torch.bfloat16, training=False)
    got = _run(impl, inputs, dtype=torch.bfloat16, training=False)
    _assert_bf16_within_torchs(got, torch_bf16, exact)


@needs_kernels
def test_large_channel_means_keep_the_variance():
    # Sums of squares in float32 would lose a variance of ~1 under a mean of 3000.
    inputs = _inputs("conv3", "nchw")
    inputs["bias"] = torch.full_like(inputs["bias"], 3000.0)
    expected = _run("ref", inputs)
    got = _run("triton", inputs)
    torch.testing.assert_close(got["running_var"], expected["running_var"], rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(got["y"], expected["y"], rtol=1e-3, atol=1e-3)


@needs_kernels
def test_any_grad_layout():
    # y.sum() hands back an expanded (stride-0) gradient, a permute a non-dense one.
    inputs = _inputs("convT4s2", "nchw")
    for loss in (lambda y: y.sum(), lambda y: (y.permute(0, 1, 3, 2) * 2).sum()):
        grads = []
        for impl in ("ref", "triton"):
            x = inputs["x"].clone().requires_grad_()
            y = cba.conv_bn_act(x, inputs["weight"], inputs["bias"], inputs["bn_weight"],
                                inputs["bn_bias"], inputs["running_mean"].clone(),
                                inputs["running_var"].clone(), **inputs["options"],
                                training=True, impl=impl)
            loss(y).backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


@needs_kernels
def test_module_from_modules_shares_state():
    conv = nn.ConvTranspose2d(5, 3, 4, 2, 1, bias=False).to(DEVICE)
    bn = nn.BatchNorm2d(3).to(DEVICE)
    eager = nn.Sequential(conv, bn, nn.LeakyReLU(0.2))
    fused = ConvBNAct.from_modules(conv, bn, 0.2, impl="triton")
    assert fused.conv is conv and fused.bn is bn
    assert [p is q for p, q in zip(fused.parameters(), eager.parameters(), strict=True)] == [
        True] * 3
    x = torch.randn(2, 5, 3, 3, device=DEVICE)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    expected = eager(x)
    expected_state = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.load_state_dict(state)
    got = fused(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for key, value in expected_state.items():
        torch.testing.assert_close(bn.state_dict()[key], value, msg=key)
    eager.eval()
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-5)


def test_module_constructor_and_checks():
    layer = ConvBNAct("conv", 4, 6, 3, stride=1, padding=1, slope=None, momentum=0.3)
    assert isinstance(layer.conv, nn.Conv2d) and layer.conv.bias is None
    assert layer.bn.momentum == 0.3 and layer.slope is None
    assert "kind=conv" in repr(layer)
    with pytest.raises(ValueError, match="output_padding"):
        ConvBNAct.from_modules(nn.ConvTranspose2d(2, 2, 4, 2, 1, output_padding=1),
                               nn.BatchNorm2d(2), 0.2)
    with pytest.raises(ValueError, match="momentum"):
        ConvBNAct.from_modules(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2, momentum=None), 0.2)
    with pytest.raises(ValueError, match="square"):
        ConvBNAct.from_modules(nn.Conv2d(2, 2, 3, stride=(1, 2)), nn.BatchNorm2d(2), 0.2)
    with pytest.raises(TypeError):
        ConvBNAct.from_modules(nn.Conv2d(2, 2, 3), nn.BatchNorm1d(2), 0.2)


@needs_kernels
def test_compile_fullgraph():
    def layer():
        torch.manual_seed(1)
        return ConvBNAct("conv_transpose", 5, 3, 4, stride=2, padding=1, slope=0.2,
                         impl="triton").to(DEVICE)

    eager, compiled_layer = layer(), layer()
    counter = CompileCounterWithBackend("aot_eager" if DEVICE == "cpu" else "inductor")
    compiled = torch.compile(compiled_layer, backend=counter, fullgraph=True)
    x = torch.randn(2, 5, 3, 4, device=DEVICE)
    for _ in range(2):  # the second step reuses the graph
        grads = []
        for net in (eager, compiled):
            leaf = x.clone().requires_grad_()
            net(leaf).square().sum().backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1
    for (name, a), b in zip(eager.state_dict().items(), compiled_layer.state_dict().values(),
                            strict=True):  # the running statistics and batch count too
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(eager.named_parameters(), compiled_layer.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    eager.eval()
    compiled_layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 2  # eval: a second graph, still whole


def test_operators_are_registered():
    for name in ("conv_bn_act_train", "conv_bn_stats_train", "conv_bn_act_backward",
                 "conv_bn_act_eval"):
        assert hasattr(torch.ops.t2i_fast, name)
    inputs = _inputs("conv4s2", "nchw")
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        args = [mode.from_tensor(inputs[k]) if inputs[k] is not None else None
                for k in ("x", "weight", "bias", "bn_weight", "bn_bias", "running_mean",
                          "running_var")]
        y, z, mean, invstd = torch.ops.t2i_fast.conv_bn_act_train(
            *args, "conv", 2, 1, 0.2, 0.1, 1e-5, "triton", None, None, None)
        scale = mode.from_tensor(torch.ones(3))
        z2, mean2, _ = torch.ops.t2i_fast.conv_bn_stats_train(
            *args, "conv", 2, 1, 0.1, 1e-5, "triton", scale, scale, 0.2)
    assert y.shape == z.shape == z2.shape == (2, 5, 3, 4)
    assert mean.shape == invstd.shape == mean2.shape == (5,)


@needs_kernels
def test_impl_choice(monkeypatch):
    inputs = _inputs("conv3", "nchw")
    args = [inputs[k] for k in ("x", "weight", "bias", "bn_weight", "bn_bias", "running_mean",
                                "running_var")]
    calls = []
    reference = cba.conv_bn_act_ref
    monkeypatch.setattr(cba, "conv_bn_act_ref", lambda *a, **k: calls.append(1) or
                        reference(*a, **k))
    options = dict(inputs["options"], training=True)
    cba.conv_bn_act(*args, **options, impl="auto")
    assert len(calls) == (0 if DEVICE == "cuda" else 1)  # CPU tensors take the reference
    cba.conv_bn_act(*args, **options, impl="ref")
    assert len(calls) == (1 if DEVICE == "cuda" else 2)
    # Eval kernels have no backward: auto takes the reference when autograd records.
    x = args[0].clone().requires_grad_()
    cba.conv_bn_act(x, *args[1:], **dict(options, training=False), impl="auto")
    assert len(calls) == (2 if DEVICE == "cuda" else 3)
    with pytest.raises(ValueError, match="no backward"):
        cba.conv_bn_act(x, *args[1:], **dict(options, training=False), impl="triton")
    with pytest.raises(ValueError, match="dtype"):
        cba.conv_bn_act(args[0].half(), args[1].half(), None, *args[3:], **options,
                        impl="triton")
    with pytest.raises(ValueError, match="impl"):
        cba.conv_bn_act(*args, **options, impl="cudnn")
    with pytest.raises(ValueError, match="kind"):
        cba.conv_bn_act(*args, **dict(options, kind="deconv"))
    with pytest.raises(ValueError, match="more than one value"):
        cba.conv_bn_act(args[0][:1, :, :1, :1], *args[1:], **options, impl="triton")
    weight = torch.randn(5, 3, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of its stride"):
        cba.conv_bn_act(args[0], weight, None, *args[3:],
                        **dict(options, kind="conv_transpose", stride=2), impl="triton")


def test_dispatch_table_is_recorded_and_merged(tmp_path, monkeypatch):
    path = tmp_path / "dispatch.json"
    monkeypatch.setenv("T2I_FAST_DISPATCH", str(path))
    assert dispatch.dispatch_file() == path and dispatch.dispatch_table() == {}
    entry = {"impl": "triton", "tiling": [64, 64, 32, 4, 4], "ms": {"cudnn_fused": 1.0}}
    dispatch.record("layer a", entry)
    # Another process records meanwhile; a fresh process reads both.
    other = json.loads(path.read_text())
    other["layer b"] = {"impl": "cudnn_fused", "tiling": None, "ms": {}}
    path.write_text(json.dumps(other))
    dispatch.record("layer c", entry)
    monkeypatch.setattr(dispatch, "_TABLES", {})
    assert set(dispatch.dispatch_table()) == {"layer a", "layer b", "layer c"}
    assert dispatch.dispatch_table()["layer a"] == entry
    path.write_text("{not json")
    monkeypatch.setattr(dispatch, "_TABLES", {})
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert dispatch.dispatch_table() == {}


@cuda_only
def test_auto_measures_once_and_reuses(monkeypatch):
    inputs = _inputs("conv4s2", "channels_last")
    first = _run("auto", inputs)
    table = dispatch.dispatch_table()
    assert len(table) == 1
    (entry,) = table.values()
    assert {"unfused", "cudnn_fused"} <= entry["ms"].keys() and entry["winner"] in entry["ms"]
    assert entry["timer"] == "graph_replay_ms"
    monkeypatch.setattr(cba, "_measure", lambda *a, **k: pytest.fail("measured twice"))
    again = _run("auto", inputs)
    torch.testing.assert_close(again["y"], first["y"])
    monkeypatch.setattr(dispatch, "_TABLES", {})  # a new process reads the file
    _run("auto", inputs)


def _reed_layers():
    gan = preset("reed").gan
    with torch.device("meta"):
        g, d = Generator(gan), Discriminator(gan)
        z = torch.empty(2, gan.z_dim)
        text = torch.empty(2, gan.embedding_dim)
        g_layers = conv_bn_act_layers(g.eval(), z, text)
        d_layers = conv_bn_act_layers(d.eval(), torch.empty(2, 3, 64, 64), text)
    return g_layers, d_layers


def test_model_layers():
    g_layers, d_layers = _reed_layers()
    as_tuples = [(la.kind, la.in_channels, la.out_channels, la.kernel_size, la.stride,
                  la.padding, la.height, la.width, la.slope) for la in g_layers]
    assert as_tuples == [
        ("conv_transpose", 228, 1024, 4, 1, 0, 1, 1, None),  # a residual block follows
        ("conv", 1024, 256, 1, 1, 0, 4, 4, 0.0),
        ("conv", 256, 256, 3, 1, 1, 4, 4, 0.0),
        ("conv", 256, 1024, 3, 1, 1, 4, 4, None),  # the residual sum follows
        ("conv_transpose", 1024, 512, 4, 2, 1, 4, 4, None),
        ("conv", 512, 128, 1, 1, 0, 8, 8, 0.0),
        ("conv", 128, 128, 3, 1, 1, 8, 8, 0.0),
        ("conv", 128, 512, 3, 1, 1, 8, 8, None),
        ("conv_transpose", 512, 256, 4, 2, 1, 8, 8, 0.0),
        ("conv_transpose", 256, 128, 4, 2, 1, 16, 16, 0.0),
    ]
    assert g_layers[0].name == "stages.0.0"
    # The joint 1×1 convolution adds a per-sample text term before its BatchNorm: not a
    # conv → BatchNorm layer.
    assert [(la.kind, la.in_channels, la.height, la.slope) for la in d_layers] == [
        ("conv", 64, 32, 0.2), ("conv", 128, 16, 0.2), ("conv", 256, 8, None),
        ("conv", 512, 4, 0.2), ("conv", 128, 4, 0.2), ("conv", 128, 4, None)]
    assert d_layers[0].name == "stages.1.0"


@needs_kernels
@pytest.mark.parametrize("name", ["reed", "dcgan"])
def test_every_preset_layer_is_accepted(name):
    gan = preset(name).gan
    with torch.device("meta"):
        layers = conv_bn_act_layers(Generator(gan).eval(), torch.empty(2, gan.z_dim),
                                    torch.empty(2, gan.embedding_dim))
        layers += conv_bn_act_layers(Discriminator(gan).eval(),
                                     torch.empty(2, 3, gan.image_size, gan.image_size),
                                     torch.empty(2, gan.embedding_dim))
    for la in layers:
        x = torch.empty(2, la.in_channels, la.height, la.width, dtype=torch.bfloat16,
                        device=DEVICE)
        shape = (la.in_channels, la.out_channels) if la.kind == "conv_transpose" else (
            la.out_channels, la.in_channels)
        w = torch.empty(*shape, la.kernel_size, la.kernel_size, dtype=torch.bfloat16,
                        device=DEVICE)
        stat = torch.empty(la.out_channels, device=DEVICE)
        assert cba._refusal(x, w, None, stat, stat, stat, stat, kind=la.kind,
                            stride=la.stride, padding=la.padding, training=True) is None


@pytest.fixture(scope="module")
def bench_script():
    return load_script("bench_kernels")


def test_bench_dry_run_lists_the_layers_and_runs_a_tiny_one(bench_script, capsys,
                                                           tmp_path):
    out_json = tmp_path / "bench.json"
    assert bench_script.main(["--dry-run", "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.splitlines()
    g_layers, d_layers = _reed_layers()
    for batch in (64, 256):
        for model, layers in (("G", g_layers), ("D", d_layers)):
            for la in layers:
                assert any(line.split()[:3] == [model, la.name, str(batch)] for line in lines), (
                    model, la.name, batch)
        for name in ("G stages.0.2.body.0+3+6", "G stages.1.2.body.0+3+6",
                     "D stages.3.2.body.0+3+6"):  # the residual blocks' chains
            assert f"{name} {batch} chain of 3 layers" in lines
    # The tiny layer went through the whole pipeline in the interpreter: every variant
    # checked and timed per call, its dispatch measured, the loss choice made.
    result = json.loads(out_json.read_text())
    timed = {(row["variant"], row["mode"]) for row in result["conv"] if "ms" in row}
    assert timed == {(v, m) for v in bench_script.VARIANTS if v != "compile"
                     for m in bench_script.MODES}
    assert all(row["check"] == "ok" for row in result["conv"])
    decision, chain_decision = result["dispatch"]
    assert decision["winner"] in decision["ms"] and "triton:32/16/16/4/1/k2" in decision["ms"]
    assert result["matching_loss"][0]["choice"] in ("triton", "reference")
    assert any(line.startswith("dry ") and "fwd+bwd" in line for line in lines)
    # The tiny chain timed as one row per variant, mode and timing, checked against eager,
    # with choose_fused_layers' in-graph decision on it.
    assert {(row["layer"], row["variant"], row["mode"]) for row in result["chain"]
            if "ms" in row and row["check"] == "ok"} == {
        ("dry.0+3", v, m) for v in bench_script.CHAIN_VARIANTS if v != "compile"
        for m in bench_script.MODES}
    assert chain_decision["layer"] == "dry.0+3" and "conv_bn_act chain" in chain_decision["key"]
    assert set(chain_decision["ms"]) == {"layers", "chained"}
    assert chain_decision["chained"] == (chain_decision["winner"] == "chained")
    assert set(chain_decision["layer_winners"]) == {"dry.0", "dry.3"}
    assert any(line.split()[:2] == ["dry", "dry.0+3"] for line in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_refuses_without_cuda(bench_script, capsys):
    assert bench_script.main(["--batch", "64"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "CUDA" in err


def test_bench_report_writes_json_and_csv(bench_script, tmp_path, capsys):
    # The report of a GPU run, from made-up timings: the printing and files work on CPU.
    (model, layer), *_ = bench_script.reed_layers()
    rows = [{"op": "conv_bn_act", "model": model, "layer": layer.name, "batch": 64,
             "mode": mode, "timing": timing, "variant": variant, "check": "ok", "ms": 0.5,
             "tflops": 100.0, "gbps": 900.0, "tflops_pct": 10.0, "gbps_pct": 30.0}
            for mode in bench_script.MODES for timing in bench_script.TIMINGS
            for variant in bench_script.VARIANTS]
    decisions = [{"model": model, "layer": layer.name, "batch": 64, "key": "k | in-graph",
                  "winner": "triton:64/64/64/4/4/k4", "impl": "triton:64/64/64/4/4/k4"}]
    loss = [{"op": "generator_loss", "batch": 64, "mode": "fwd", "variant": "fused",
             "ms": 0.01, "gbps": 0.1}]
    choices = [{"batch": 64, "choice": "reference", "ms": {"reference": 0.01, "triton": 0.02}}]
    bench_script.print_conv_table(rows, decisions)
    bench_script.print_loss_table(loss, choices)
    out = capsys.readouterr().out
    assert layer.name in out and "generator_loss" in out and "k4" in out and "graph" in out
    assert "batch 64: reference losses" in out
    args = argparse.Namespace(json=str(tmp_path / "r.json"), csv=str(tmp_path / "r.csv"))
    bench_script.write_outputs(args, {"conv": rows, "loss": loss, "dispatch": decisions})
    assert json.loads((tmp_path / "r.json").read_text())["dispatch"] == decisions
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert len(lines) == 1 + len(rows) + len(loss) and lines[0].startswith("op,model,layer")


def test_bench_step_summary(bench_script, tmp_path, capsys):
    """bench_step's engine rows with fused layers off / auto / on, each against off."""
    rows = [{"preset": "reed", "batch_size": 64, "backend": backend, "images_per_s": rate}
            for backend, rate in (("eager", 1000.0), ("engine", 10000.0),
                                  ("engine-fused-auto", 12000.0),
                                  ("engine-fused-on", 9000.0))]
    rows.append({"preset": "reed", "batch_size": 256, "backend": "engine",
                 "images_per_s": 20000.0})
    path = tmp_path / "step.json"
    path.write_text(json.dumps({"rows": rows}))
    summary = bench_script.step_summary(path)
    got = {(r["batch_size"], r["backend"]): r["vs_off"] for r in summary}
    assert got == {(64, "engine"): 1.0, (64, "engine-fused-auto"): 1.2,
                   (64, "engine-fused-on"): 0.9, (256, "engine"): 1.0,
                   (256, "engine-fused-auto"): None, (256, "engine-fused-on"): None}
    bench_script.print_step_summary(summary)
    assert "engine-fused-auto" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):  # run() reports it and goes on without it
        bench_script.step_summary(tmp_path / "missing.json")


# -- split-K, prologue fusion and the tilings chosen per shape -------------------------------
# Layers with enough input channels for 16-channel K-blocks to split three ways.
SPLIT_LAYERS = {
    "conv3-split": ("conv", 40, 5, 3, 1, 1, 2, 3, 5, 0.2, True),
    "convT4s2-split": ("conv_transpose", 36, 3, 4, 2, 1, 2, 3, 3, 0.0, False),
}
SPLIT_IMPL = "triton:16/16/16/4/1/k3"


@needs_kernels
@pytest.mark.parametrize(("name", "layout"), [("conv3-split", "nchw"),
                                              ("convT4s2-split", "channels_last")])
def test_split_k_matches_reference(name, layout, monkeypatch):
    monkeypatch.setitem(LAYERS, name, SPLIT_LAYERS[name])
    inputs = _inputs(name, layout)
    for key in ("x", "weight", "bias"):  # the float32 reference sees the bf16 run's values
        if inputs[key] is not None:
            inputs[key] = inputs[key].bfloat16().float()
    grad_y = _grad_y(inputs, torch.bfloat16)
    expected = _run("ref", inputs, grad_y=grad_y)
    got = _run(SPLIT_IMPL, inputs, grad_y=grad_y)
    for key, want in expected.items():
        torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-5, msg=key)
    again = _run(SPLIT_IMPL, inputs, grad_y=grad_y)
    assert all(torch.equal(again[k], got[k]) for k in got)  # a fixed order of the splits
    torch_bf16 = _run("ref", inputs, dtype=torch.bfloat16, grad_y=grad_y)
    got = _run(SPLIT_IMPL, inputs, dtype=torch.bfloat16, grad_y=grad_y)
    assert got["y"].dtype == torch.bfloat16
    _assert_bf16_within_torchs(got, torch_bf16, expected)


def _prologue_inputs(c_in: int) -> dict:
    scale = 1 + 0.3 * torch.randn(c_in, device=DEVICE)
    return {"in_scale": scale, "in_shift": 0.5 * torch.randn(c_in, device=DEVICE)}


def _run_prologue(impl: str, inputs: dict, prologue: dict, *, dtype=torch.float32,
                  grad_y=None, training=True) -> dict:
    """_run with the prologue's scale and shift as leaves too (their gradients: d...)."""
    leaves = {k: v.clone().requires_grad_(training) for k, v in prologue.items()
              if k != "in_slope"}
    tensors = {k: (v.to(dtype) if k in ("x", "weight", "bias") else v.clone())
               .detach().requires_grad_(training and k not in ("running_mean", "running_var"))
               for k, v in inputs.items() if k != "options" and v is not None}
    with torch.set_grad_enabled(training):
        y = cba.conv_bn_act(tensors["x"], tensors["weight"], tensors.get("bias"),
                            tensors["bn_weight"], tensors["bn_bias"], tensors["running_mean"],
                            tensors["running_var"], **inputs["options"], training=training,
                            impl=impl, **leaves, in_slope=prologue["in_slope"])
    out = {"y": y.detach(), "running_mean": tensors["running_mean"],
           "running_var": tensors["running_var"]}
    if training:
        y.backward(grad_y.to(dtype))
        out.update({f"d{k}": t.grad for k, t in {**tensors, **leaves}.items()
                    if t.grad is not None})
    return out


@needs_kernels
@pytest.mark.parametrize(("name", "layout", "in_slope"), [("conv4s2", "nchw", 0.2),
                                                          ("convT4s2", "channels_last", 0.0),
                                                          ("conv1", "nchw", None)])
def test_prologue_matches_reference(name, layout, in_slope):
    inputs = _inputs(name, layout)
    inputs["x"] = inputs["x"].bfloat16().float()
    inputs["weight"] = inputs["weight"].bfloat16().float()
    prologue = {**_prologue_inputs(inputs["x"].shape[1]), "in_slope": in_slope}
    grad_y = _grad_y(inputs, torch.bfloat16)
    exact = _run_prologue("ref", inputs, prologue, grad_y=grad_y)
    assert {"din_scale", "din_shift", "dx", "dweight", "dbn_weight"} <= exact.keys()
    for impl in ("triton", "cudnn_fused"):
        got = _run_prologue(impl, inputs, prologue, grad_y=grad_y)
        assert got.keys() == exact.keys()
        for key, want in exact.items():
            torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-5, msg=(impl, key))
    torch_bf16 = _run_prologue("ref", inputs, prologue, dtype=torch.bfloat16, grad_y=grad_y)
    got = _run_prologue("triton", inputs, prologue, dtype=torch.bfloat16, grad_y=grad_y)
    _assert_bf16_within_torchs(got, torch_bf16, exact)
    with torch.no_grad():  # eval: the prologue in the eval GEMM too
        want = _run_prologue("ref", inputs, prologue, training=False)
        got = _run_prologue("triton", inputs, prologue, training=False)
    torch.testing.assert_close(got["y"], want["y"], rtol=1e-4, atol=1e-5)


def _chain(impl: str, tensors: dict, grad_y: torch.Tensor, *, dtype) -> dict:
    """conv3 → BN → LeakyReLU(0.2) → conv4s2 → BN → ReLU: through conv_bn_stats and the
    second layer's prologue with ``impl``, or (impl "layers") two reference layers."""
    leaves = {k: (v.to(dtype) if k in ("x", "w1", "w2") else v).clone().requires_grad_()
              for k, v in tensors.items() if not k.startswith("r")}
    stats = {k: v.clone() for k, v in tensors.items() if k.startswith("r")}
    first = {"kind": "conv", "stride": 1, "padding": 1}
    second = {"kind": "conv", "stride": 2, "padding": 1, "slope": 0.0, "training": True}
    x, w1, w2, g1, b1, g2, b2 = (leaves[k] for k in ("x", "w1", "w2", "g1", "b1", "g2", "b2"))
    if impl == "layers":
        y1 = cba.conv_bn_act_ref(x, w1, None, g1, b1, stats["rm1"], stats["rv1"], **first,
                                 slope=0.2, training=True)
        y = cba.conv_bn_act_ref(y1, w2, None, g2, b2, stats["rm2"], stats["rv2"], **second)
    else:
        z, scale, shift = cba.conv_bn_stats(x, w1, None, g1, b1, stats["rm1"], stats["rv1"],
                                            **first, impl=impl)
        assert z.dtype == dtype and scale.shape == (w1.shape[0],)
        y = cba.conv_bn_act(z, w2, None, g2, b2, stats["rm2"], stats["rv2"], **second,
                            impl=impl, in_scale=scale, in_shift=shift, in_slope=0.2)
    y.backward(grad_y.to(dtype))
    return {"y": y.detach(), **stats, **{f"d{k}": v.grad for k, v in leaves.items()}}


@needs_kernels
def test_stats_then_prologue_chain_matches_two_layers():
    """conv_bn_stats → conv_bn_act with its prologue: the two reference layers' outputs,
    running statistics and every gradient, the first layer's BatchNorm parameters'
    included (they reach the loss only through the second layer's prologue)."""
    tensors = {"x": torch.randn(2, 3, 6, 5, device=DEVICE).bfloat16().float(),
               "w1": (torch.randn(6, 3, 3, 3, device=DEVICE) / 5).bfloat16().float(),
               "w2": (torch.randn(4, 6, 4, 4, device=DEVICE) / 10).bfloat16().float(),
               "g1": 1 + 0.2 * torch.randn(6, device=DEVICE),
               "b1": 0.2 * torch.randn(6, device=DEVICE),
               "g2": 1 + 0.2 * torch.randn(4, device=DEVICE),
               "b2": 0.2 * torch.randn(4, device=DEVICE),
               "rm1": torch.zeros(6, device=DEVICE), "rv1": torch.ones(6, device=DEVICE),
               "rm2": torch.zeros(4, device=DEVICE), "rv2": torch.ones(4, device=DEVICE)}
    grad_y = torch.randn(2, 4, 3, 2, device=DEVICE).bfloat16().float()
    exact = _chain("layers", tensors, grad_y, dtype=torch.float32)
    for impl in ("triton", "cudnn_fused", "ref"):  # "ref": conv_bn_stats' own reference
        got = _chain(impl, tensors, grad_y, dtype=torch.float32)
        for key, want in exact.items():
            torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-5, msg=(impl, key))
    torch_bf16 = _chain("layers", tensors, grad_y, dtype=torch.bfloat16)
    got = _chain("triton", tensors, grad_y, dtype=torch.bfloat16)
    _assert_bf16_within_torchs(got, torch_bf16, exact)


def test_tilings_are_chosen_per_shape(monkeypatch):
    """Split-K candidates exactly for layers with fewer output tiles than multiprocessors
    (reed's 4×4 layers at batch 64), none for large ones; names round-trip."""
    from t2i_fast.ops import conv_bn_act_kernels as kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)  # the GPU's candidates
    x = torch.empty(64, 1024, 4, 4)
    small = kernels.geometry(x, torch.empty(256, 1024, 1, 1), "conv", 1, 0)
    splits = {t.split_k for t in kernels.candidate_tilings(small, multiprocessors=132)}
    assert splits == {1, 2, 4, 8}
    large = kernels.geometry(torch.empty(64, 64, 32, 32), torch.empty(128, 64, 4, 4), "conv",
                             2, 1)
    assert {t.split_k for t in kernels.candidate_tilings(large, multiprocessors=132)} == {1}
    assert {t.split_k for t in kernels.candidate_tilings(small, multiprocessors=16)} == {1}
    for t in kernels.candidate_tilings(small):
        assert kernels.parse_tiling(kernels.tiling_name(t)) == t
    for bad in ("64/64", "64/64/48/4/3", "a/b/c/d/e", "64/64/64/4/3/x2"):
        with pytest.raises(ValueError, match="not a tiling"):
            kernels.parse_tiling(bad)


@needs_kernels
def test_impl_strings_and_prologue_checks():
    inputs = _inputs("conv3", "nchw")
    args = [inputs[k] for k in ("x", "weight", "bias", "bn_weight", "bn_bias", "running_mean",
                                "running_var")]
    options = dict(inputs["options"])
    with pytest.raises(ValueError, match="split-K is for training"):
        with torch.no_grad():
            cba.conv_bn_act(*args, **options, training=False, impl="triton:16/16/16/4/1/k2")
    with pytest.raises(ValueError, match="not a tiling"):
        cba.conv_bn_act(*args, **options, training=True, impl="triton:16/16")
    with pytest.raises(ValueError, match="come together"):
        cba.conv_bn_act(*args, **options, training=True, in_scale=torch.ones(5))
    with pytest.raises(ValueError, match=r"\[C_in\]"):
        cba.conv_bn_act(*args, **options, training=True, in_scale=torch.ones(4),
                        in_shift=torch.ones(4))


def test_measured_compiles_do_not_fall_back_to_eager_past_dynamos_limit():
    """Each layer shape a process measures recompiles the same candidate: past dynamo's
    limit of 8 a plain torch.compile would run (and be timed) eagerly."""
    counter = CompileCounterWithBackend("eager")
    layers = [nn.Sequential(nn.Conv2d(3, c, 1), nn.BatchNorm2d(c), nn.ReLU())
              for c in range(2, 14)]
    for layer in layers:
        x = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(cba.compiled_for_timing(layer, backend=counter)(x),
                                   layer(x))
    assert counter.frame_count == len(layers) > torch._dynamo.config.recompile_limit
