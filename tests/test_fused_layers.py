"""t2i_fast.ops.fused_layers: fusing a model's conv → BatchNorm2d (→ activation) layers by
module, not by patching forwards. The kernels' numerics are tests/test_op_conv_bn_act.py's."""

import copy
import json

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from t2i_fast.ops import conv_bn_act, dispatch
from t2i_fast.ops.fused_layers import (
    ConvBNAct,
    FusedSequential,
    choose_fused_layers,
    fuse_conv_bn_act,
)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
            nn.Conv2d(4, 4, 3, 1, 1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        return self.body(x)


def _counted(monkeypatch) -> list:
    calls = []
    reference = conv_bn_act.conv_bn_act_ref
    monkeypatch.setattr(conv_bn_act, "conv_bn_act_ref",
                        lambda *a, **k: calls.append(1) or reference(*a, **k))
    return calls


def test_fusing_swaps_the_sequential_and_patches_no_module(monkeypatch):
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(2, 3, 5, 5)
    reference = copy.deepcopy(net)
    modules = list(net.body)
    names = fuse_conv_bn_act(net, x, impl="ref", wanted=lambda *_: True)
    # The reflect-padded convolution is one the op does not take: it stays unfused.
    assert names == ["body.0", "body.6"]
    assert isinstance(net.body, FusedSequential) and list(net.body) == modules
    assert not [m for m in net.modules() if "forward" in vars(m)]
    assert list(net.state_dict()) == list(reference.state_dict())
    calls = _counted(monkeypatch)
    for model in (net, reference):
        model.train()
        out = model(x)
        out.sum().backward()
    assert len(calls) == 2
    for a, b in zip(net.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    # Eval runs the modules one by one; a copy keeps the fused layers on its own modules.
    copied = copy.deepcopy(net)
    for model in (net, reference):
        model.eval()
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x))
    assert not calls
    copied.train()
    assert copied.body.fused[0].conv is copied.body[0]
    copied(x)
    assert len(calls) == 2


def test_a_model_that_is_the_sequential_is_refused():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="wrap it"):
        fuse_conv_bn_act(seq, torch.randn(2, 3, 5, 5), impl="ref", wanted=lambda *_: True)


def test_the_layer_takes_weights_in_another_dtype():
    # Under bfloat16 autocast a layer's input is bfloat16 and its weights float32; autocast
    # does not cast for the op, the layer does.
    torch.manual_seed(0)
    layer = ConvBNAct("conv", 3, 4, 3, padding=1, impl="ref")
    layer.conv.double()
    x = torch.randn(2, 3, 5, 5)
    expected = ConvBNAct.from_modules(copy.deepcopy(layer.conv).float(),
                                      copy.deepcopy(layer.bn).float(), 0.2, impl="ref")(x)
    got = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_a_fused_model_compiles_whole():
    # The engine compiles G and D with fullgraph=True: the fused Sequential must not break it.
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(2, 3, 5, 5)
    reference = copy.deepcopy(net)
    fuse_conv_bn_act(net, x, impl="ref", wanted=lambda *_: True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-5)
    net.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 2  # training and eval, each one whole graph


# -- choosing the layers by in-graph timing (an injected timer: no CUDA graphs on the CPU) --
class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
            nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.body(x)


def _fake_timer(calls: list):
    """Triton wins the 3×3 layer by its median (not by its mean: one slow outlier), the
    unfused step wins the 1×1 layer."""
    def timer(key, name, step):
        calls.append((key, name))
        if "w 4x3x3x3" in key:
            return [9.0, 1.0, 1.0] if name.startswith("triton:") else [2.0, 2.0, 2.0]
        return [1.0, 1.0, 1.0] if name == "unfused" else [2.0, 2.0, 2.0]
    return timer


@pytest.fixture
def _own_table(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_FAST_DISPATCH", str(tmp_path / "dispatch.json"))
    monkeypatch.setattr(dispatch, "_TABLES", {})


def test_auto_fuses_the_layers_whose_in_graph_timing_wins(_own_table, monkeypatch):
    torch.manual_seed(0)
    net, x = _Chain(), torch.randn(2, 3, 5, 5)
    reference = copy.deepcopy(net)
    calls = []
    names, evidence = choose_fused_layers(net, x, mode="auto", timer=_fake_timer(calls))
    assert names == ["body.0"]
    json.loads(json.dumps(evidence))  # written into the run folder as it is
    first, second = evidence["layers"]["body.0"], evidence["layers"]["body.3"]
    assert first["fused"] and not second["fused"] and second["winner"] == "unfused"
    assert first["winner"].startswith("triton:") and first["impl"] == first["winner"]
    assert first["ms"][first["winner"]] == 1.0 and first["ms"]["unfused"] == 2.0  # medians
    assert {"unfused", "cudnn_fused"} <= set(first["ms"]) and "in-graph" in first["key"]
    # Every candidate of each layer timed exactly once.
    assert sorted(calls) == sorted({(layer["key"], name) for layer in (first, second)
                                    for name in layer["ms"]})
    # The fused model trains as the unfused one (auto on CPU tensors: the reference).
    for model in (net, reference):
        model(x).sum().backward()
    for a, b in zip(net.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)

    # Cached: another model, and another process reading the file, measure nothing.
    def no_timing(*_):
        pytest.fail("measured again")
    again, evidence_again = choose_fused_layers(_Chain(), x, mode="auto", timer=no_timing)
    assert again == names and evidence_again["layers"]["body.0"]["ms"] == first["ms"]
    monkeypatch.setattr(dispatch, "_TABLES", {})
    assert choose_fused_layers(_Chain(), x, mode="auto", timer=no_timing)[0] == names
    # Without CUDA and without a timer, auto refuses to guess.
    names, evidence = choose_fused_layers(_Chain(), x, mode="auto")
    assert names == [] and "CUDA" in evidence["refused"] and evidence["layers"] == {}


def test_on_fuses_every_layer_and_off_none(_own_table):
    x = torch.randn(2, 3, 5, 5)
    calls = []
    names, evidence = choose_fused_layers(_Chain(), x, mode="on", timer=_fake_timer(calls))
    assert names == ["body.0", "body.3"]
    assert evidence["layers"]["body.3"]["winner"] == "unfused"  # fused all the same
    assert all(layer["fused"] for layer in evidence["layers"].values())
    names, evidence = choose_fused_layers(_Chain(), x, mode="on")  # no timer: unmeasured
    assert names == ["body.0", "body.3"] and "CUDA" in evidence["unmeasured"]
    net = _Chain()

    def no_timing(*_):
        pytest.fail("off measures nothing")
    assert choose_fused_layers(net, x, mode="off", timer=no_timing) == (
        [], {"mode": "off", "layers": {}})
    assert not isinstance(net.body, FusedSequential)
    with pytest.raises(ValueError, match="mode must be"):
        choose_fused_layers(net, x, mode="yes")
