"""t2i_fast.ops.fused_layers: fusing a model's conv → BatchNorm2d (→ activation) layers by
module, not by patching forwards. The kernels' numerics are tests/test_op_conv_bn_act.py's."""

import copy
import json

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from t2i_fast.ops import conv_bn_act, dispatch, fused_layers
from t2i_fast.ops.fused_layers import (
    ConvBNAct,
    FusedSequential,
    choose_fused_layers,
    conv_bn_act_chains,
    conv_bn_act_layers,
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


def _fake_timer(calls: list, chain_winner: str = "layers"):
    """Triton wins the 3×3 layer by its median (not by its mean: one slow outlier), the
    unfused step wins the 1×1 layer; ``chain_winner`` ("layers" or "chained") wins the
    chain of the two."""
    def timer(key, name, step):
        calls.append((key, name))
        if "conv_bn_act chain" in key:
            return [1.0, 1.0, 1.0] if name == chain_winner else [3.0, 3.0, 3.0]
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
    # The two layers are a chain, measured as one: chaining lost, so neither is chained.
    (chain,) = evidence["chains"]
    assert chain["layers"] == ["body.0", "body.3"] and not chain["chained"]
    assert chain["ms"] == {"layers": 1.0, "chained": 3.0} and "in-graph" in chain["key"]
    assert "unchained fused,unfused" in chain["key"] and net.body.chained == frozenset()
    # Every candidate of each layer and of the chain timed exactly once.
    assert sorted(calls) == sorted({(layer["key"], name) for layer in (first, second, chain)
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
    assert evidence["chains"][0]["key"].endswith(
        "unchained fused,fused | train fwd+bwd | in-graph")
    names, evidence = choose_fused_layers(_Chain(), x, mode="on")  # no timer: unmeasured
    assert names == ["body.0", "body.3"] and "CUDA" in evidence["unmeasured"]
    assert evidence["chains"] == [{"layers": ["body.0", "body.3"], "chained": True}]
    net = _Chain()

    def no_timing(*_):
        pytest.fail("off measures nothing")
    assert choose_fused_layers(net, x, mode="off", timer=no_timing) == (
        [], {"mode": "off", "layers": {}})
    assert not isinstance(net.body, FusedSequential)
    with pytest.raises(ValueError, match="mode must be"):
        choose_fused_layers(net, x, mode="yes")


def test_auto_chains_a_run_where_chaining_wins_in_graph(_own_table):
    torch.manual_seed(0)
    net, x = _Chain(), torch.randn(2, 3, 5, 5)
    reference = copy.deepcopy(net)
    calls = []
    names, evidence = choose_fused_layers(net, x, mode="auto",
                                          timer=_fake_timer(calls, chain_winner="chained"))
    # The 1×1 layer lost alone, but chained to the 3×3 one the pair wins: both fused.
    assert names == ["body.0", "body.3"] and net.body.chained == frozenset({0})
    (chain,) = evidence["chains"]
    assert chain["chained"] and chain["winner"] == "chained"
    assert all(evidence["layers"][name]["chained"] for name in names)
    json.loads(json.dumps(evidence))
    for model in (net, reference):
        model(x).sum().backward()
    for a, b in zip(net.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    # Recorded: another model takes the same decision without timing anything.
    def no_timing(*_):
        pytest.fail("measured again")
    again = _Chain()
    assert choose_fused_layers(again, x, mode="auto", timer=no_timing)[0] == names
    assert again.body.chained == frozenset({0})


# -- chained layers: the first layer's BatchNorm and activation in the next one's prologue --
class _Chained(nn.Module):
    """A run of three layers (odd channels; the middle one without activation, the last
    transposed) read one from the next, then a layer that reads something else."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 5, 3, 1, 1), nn.BatchNorm2d(5), nn.LeakyReLU(0.2),
            nn.Conv2d(5, 7, 1, bias=False), nn.BatchNorm2d(7),
            nn.ConvTranspose2d(7, 3, 4, 2, 1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
            nn.Identity(), nn.Conv2d(3, 5, 1, bias=False), nn.BatchNorm2d(5))

    def forward(self, x):
        return self.body(x)


def _fused(net: nn.Module, x: torch.Tensor, *, chained: bool, impl: str = "triton") -> list:
    return fuse_conv_bn_act(net, x, impl=impl, wanted=lambda *_: True,
                            chain=lambda *_: chained)


def _assert_same_step(got: dict, want: dict) -> None:
    """Each tensor of ``_train_step`` against the plain model's, float32. A convolution's bias
    before a BatchNorm in training mode has an exactly zero gradient; what both compute is
    rounding of a sum over the batch at the scale of the weight's gradient, so it is compared
    at that scale (on an AVX2-only AMD EPYC the two differed by 1.2e-5 where that weight's
    gradient reached 92)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        atol = 1e-5
        if key.endswith(".bias") and key[:-5] + ".weight" in want:
            atol = max(atol, 1e-6 * want[key[:-5] + ".weight"].abs().max().item())
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=atol, msg=key)


def _train_step(model: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, *,
                autocast: bool = False, forward=None) -> dict:
    """{name: tensor} of the output, the input's and every parameter's gradient and every
    buffer after one training step of ``model`` run by ``forward`` (default: itself)."""
    model.train()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = (model if forward is None else forward)(x)
    y.backward(grad_y.to(y.dtype))
    return {"y": y.detach(), "dx": x.grad, **{f"d{n}": p.grad for n, p in
                                              model.named_parameters()},
            **dict(model.named_buffers())}


def test_chains_follow_the_activation_into_the_next_convolution():
    net, x = _Chained(), torch.randn(2, 3, 5, 4)
    follows = {layer.name: layer.follows for layer in conv_bn_act_layers(net, x)}
    assert follows == {"body.0": None, "body.3": "body.0", "body.5": "body.3",
                       "body.9": None}
    assert [[la.name for la in c] for c in conv_bn_act_chains(
        conv_bn_act_layers(net, x))] == [["body.0", "body.3", "body.5"]]

    class Scaled(nn.Sequential):  # the activation's output is not what the next conv reads
        def forward(self, x):
            return self[4](self[3](self[2](self[1](self[0](x))) * 2))
    scaled = nn.Module()
    scaled.body = Scaled(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                         nn.BatchNorm2d(4))
    scaled.forward = lambda x: scaled.body(x)
    assert [layer.follows for layer in conv_bn_act_layers(scaled, x)] == [None, None]
    with pytest.raises(ValueError, match="must be fused layers"):
        FusedSequential(*_Chained().body, chained=[0])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_chained_layers_train_exactly_as_unchained_ones(layout, monkeypatch):
    torch.manual_seed(0)
    net = _Chained()
    x = torch.randn(2, 3, 5, 4)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    reference, unchained = copy.deepcopy(net), copy.deepcopy(net)
    modules = list(net.body)
    assert _fused(net, x, chained=True) == ["body.0", "body.3", "body.5", "body.9"]
    assert _fused(unchained, x, chained=False) == ["body.0", "body.3", "body.5", "body.9"]
    assert net.body.chained == frozenset({0, 3}) and unchained.body.chained == frozenset()
    # The module tree, parameters, buffers and state dict are the plain model's.
    assert list(net.body) == modules and list(net.state_dict()) == list(reference.state_dict())
    stats_calls = []
    stats = fused_layers.conv_bn_stats
    monkeypatch.setattr(fused_layers, "conv_bn_stats",
                        lambda *a, **k: stats_calls.append(1) or stats(*a, **k))
    grad_y = torch.randn(2, 5, 10, 8)
    want = _train_step(reference, x, grad_y)
    for model, links in ((net, 2), (unchained, 0)):
        stats_calls.clear()
        got = _train_step(model, x, grad_y)
        assert len(stats_calls) == links
        _assert_same_step(got, want)
    # Eval runs the modules one by one (chains included): the plain model's output.
    calls = _counted(monkeypatch)
    stats_calls.clear()
    for model in (net, reference):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x))
    assert not calls and not stats_calls


def test_chained_bf16_error_is_within_torchs():
    """Under bfloat16 autocast, as the engine trains: each tensor's error against the float32
    computation at most 3× PyTorch's own (the plain modules under autocast), plus 2⁻⁵ of the
    tensor's scale. PyTorch's own error on the CPU depends on the processor's kernels: on an
    AVX2-only AMD EPYC (2026-12-06) it was 0.094 at dx (scale 9.5) where the chain, which
    stores its intermediates in bfloat16 between layers, erred by 0.47 (2⁻⁴·³ of the scale;
    4.6× PyTorch's at BatchNorm 1's bias), and the earlier floor of 2⁻¹⁰ failed there."""
    torch.manual_seed(0)
    net = _Chained()
    with torch.no_grad():  # the float32 reference computes with the bf16 run's weights
        for conv in (m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))):
            conv.weight.copy_(conv.weight.bfloat16().float())
    x = torch.randn(2, 3, 5, 4).bfloat16()
    grad_y = torch.randn(2, 5, 10, 8).bfloat16()
    reference = copy.deepcopy(net)
    exact = _train_step(copy.deepcopy(net), x.float(), grad_y.float())
    theirs = _train_step(reference, x, grad_y, autocast=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # finding the layers runs the model
        _fused(net, x, chained=True)
    assert net.body.chained == frozenset({0, 3})
    ours = _train_step(net, x, grad_y, autocast=True)
    assert ours["y"].dtype == ours["dx"].dtype == torch.bfloat16
    for key, want in exact.items():
        want = want.float()
        scale = want.abs().max().item()
        error = (ours[key].float() - want).abs().max().item()
        allowed = 3 * (theirs[key].float() - want).abs().max().item() + 2**-5 * scale
        assert error <= allowed, (key, error, allowed)


def test_a_chained_model_copies_and_compiles_whole():
    torch.manual_seed(0)
    net, x = _Chained(), torch.randn(2, 3, 5, 4)
    reference = copy.deepcopy(net)
    _fused(net, x, chained=True)
    copied = copy.deepcopy(net)
    assert copied.body.chained == net.body.chained
    assert all(copied.body.fused[i].conv is copied.body[i] for i in copied.body.fused)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(copied, backend=counter, fullgraph=True)
    grad_y = torch.randn(2, 5, 10, 8)
    want = _train_step(reference, x, grad_y)
    got = _train_step(copied, x, grad_y, forward=compiled)
    _assert_same_step(got, want)
    copied.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 2  # training and eval, each one whole graph


def test_reeds_chains_are_its_residual_blocks():
    from t2i_fast.models.config import preset
    from t2i_fast.models.discriminator import Discriminator
    from t2i_fast.models.generator import Generator

    gan = preset("reed").gan
    with torch.device("meta"):
        text = torch.empty(2, gan.embedding_dim)
        g = conv_bn_act_layers(Generator(gan).eval(), torch.empty(2, gan.z_dim), text)
        d = conv_bn_act_layers(Discriminator(gan).eval(),
                               torch.empty(2, 3, gan.image_size, gan.image_size), text)
    chains = [[layer.name for layer in chain] for chain in conv_bn_act_chains(g + d)]
    assert chains == [[f"stages.{s}.2.body.{i}" for i in (0, 3, 6)] for s in (0, 1, 3)]
