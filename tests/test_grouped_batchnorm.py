"""BatchNorm with statistics per group (t2i_fast/models/grouped_batchnorm.py): one call over
concatenated batches against one call per batch, for single layers and for G and D, to
float32 rounding in outputs, gradients and running statistics."""

import copy

import pytest
import torch
from torch import nn

from t2i_fast.models import Discriminator, Generator, preset
from t2i_fast.models.grouped_batchnorm import groupable, grouped, grouped_batch_norm
from t2i_fast.train.distributed import World, sync_batchnorm


def weights(shape: tuple[int, ...]) -> torch.Tensor:
    """Fixed, uneven weights for the gradient of a sum: every output matters differently."""
    return torch.linspace(-1, 1, torch.Size(shape).numel()).view(shape)


def run_both(one: nn.Module, inputs: list[tuple[torch.Tensor, ...]], *, call_grouped,
             call_each, steps: int = 2):
    """``steps`` training calls of ``one`` (grouped) and of a copy (one call per group):
    outputs, input and parameter gradients, and buffers of each."""
    one.zero_grad(set_to_none=True)
    separate = copy.deepcopy(one)
    results = []
    for model, call in ((one, call_grouped), (separate, call_each)):
        outs, grads = [], []
        for _ in range(steps):
            args = [[t.clone().requires_grad_() for t in group] for group in inputs]
            out = call(model, args)
            (out * weights(out.shape)).sum().backward()
            outs.append(out.detach())
            grads += [t.grad for group in args for t in group]
        grads += [p.grad for p in model.parameters()]
        results.append((outs, grads, [b.clone() for b in model.buffers()]))
    return results


def assert_same(grouped_result, separate_result) -> None:
    """Equal to float32 rounding: gradients are sums over the batch whose terms cancel, so
    their tolerance is relative to the largest element of each."""
    for a, b in zip(grouped_result[0], separate_result[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grouped_result[1], separate_result[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    for a, b in zip(grouped_result[2], separate_result[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # num_batches_tracked exactly


LAYERS = {
    "1d": (lambda: nn.BatchNorm1d(5), (6, 5)),
    "2d": (lambda: nn.BatchNorm2d(5), (6, 5, 3, 4)),
    "2d channels_last": (lambda: nn.BatchNorm2d(5), (6, 5, 3, 4)),
    "cumulative": (lambda: nn.BatchNorm2d(5, momentum=None), (6, 5, 3, 4)),
}


@pytest.fixture(params=["eager", "traced"])
def tracing(request, monkeypatch):
    """Both ways of grouped_batch_norm: eager, and as torch.compile traces it (one call
    over the groups side by side), run here without compiling."""
    if request.param == "traced":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


@pytest.mark.parametrize("sizes", [(6, 6, 6), (6, 6), (6, 3)])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_layer_equals_one_call_per_group(kind, sizes, tracing):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    bn = make()
    with torch.no_grad():  # not the default affine parameters and statistics
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    inputs = []
    for i, n in enumerate(sizes):  # each group its own mean and spread
        x = torch.randn(n, *shape[1:]) * (i + 1) + i
        if kind == "2d channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        inputs.append((x,))
    one, each = run_both(
        bn, inputs,
        call_grouped=lambda m, args: grouped_batch_norm(
            m, torch.cat([a for (a,) in args]), sizes if len(set(sizes)) > 1 else len(sizes)),
        call_each=lambda m, args: torch.cat([m(a) for (a,) in args]))
    assert_same(one, each)
    assert int(bn.num_batches_tracked) == 2 * len(sizes)


def test_channels_last_stays_channels_last(tracing):
    bn = nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    y = grouped_batch_norm(bn, x, 3)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def test_eval_mode_and_one_group_are_the_layer_itself():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-1, 1)
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(grouped_batch_norm(bn, x, (4,)), copy.deepcopy(bn)(x))
    bn.eval()
    assert torch.equal(grouped_batch_norm(bn, x, 2), bn(x))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_generator_and_discriminator_equal_one_call_per_group(memory_format, tracing):
    """G over (fake, interpolated) and D over (real/right, real/wrong, fake/right) as one
    call each: outputs, gradients of every input and parameter, and BatchNorm statistics
    equal those of separate calls, over two steps; the state-dict keys are unchanged."""
    torch.manual_seed(0)
    config = preset("small").gan
    G = Generator(config).to(memory_format=memory_format)
    D = Discriminator(config).to(memory_format=memory_format)
    keys = (list(G.state_dict()), list(D.state_dict()))
    n = 4

    def call_grouped(model, args):
        sizes = tuple(len(group[0]) for group in args)
        return model(*(torch.cat(parts) for parts in zip(*args, strict=True)), groups=sizes)

    def call_each(model, args):
        return torch.cat([model(*group) for group in args])

    for half in (False, True):  # GAN-INT's interpolated batch full or half the size
        z = [torch.randn(n, config.z_dim), torch.randn(n // 2 if half else n, config.z_dim)]
        text = [torch.randn(len(t), config.embedding_dim) for t in z]
        assert_same(*run_both(G, list(zip(z, text, strict=True)), call_grouped=call_grouped,
                              call_each=call_each))
    images = [torch.randn(n, 3, 32, 32).contiguous(memory_format=memory_format) * (i + 1)
              for i in range(3)]
    text = torch.randn(n, config.embedding_dim)
    assert_same(*run_both(D, [(x, text) for x in images], call_grouped=call_grouped,
                          call_each=call_each))
    assert (list(G.state_dict()), list(D.state_dict())) == keys


def test_synchronised_batchnorm_does_not_group():
    """SyncBatchNorm computes its statistics its own way: the engine makes one call per
    group for such networks, and a grouped call refuses rather than mixing groups."""
    D = Discriminator(preset("small").gan)
    assert groupable(D)
    synced = sync_batchnorm(D, World(device=torch.device("cpu")))
    assert not groupable(synced)
    layer = next(m for m in synced.modules() if type(m).__name__ == "_CPUSyncBatchNorm")
    with pytest.raises(TypeError, match="does not take statistics per group"):
        grouped(layer, torch.randn(4, layer.num_features, 2, 2), 2)
