"""G's layered layout (t2i_fast.models.layered): what each part of z may change."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from t2i_fast.models import GANConfig, Generator, preset
from t2i_fast.models.config import BACKGROUND_CONES, LAYERED_MIN_Z_DIM, checkpoint_models
from t2i_fast.models.grouped_batchnorm import group_sizes, grouped
from t2i_fast.models.layered import CODE, MASK_BIAS, Background, background_code, shifted
from t2i_fast.models.resize_conv import NearestResizeConv
from t2i_fast.train.style import backgrounds_mirrored


def _layered(**changes) -> Generator:
    gan = dataclasses.replace(preset("small").gan, layout="layered", z_dim=LAYERED_MIN_Z_DIM,
                              **changes)
    return Generator(gan).double().eval()


def _force_mask(G: Generator, value: float) -> None:
    """Every pixel foreground (value > 0) or background (value < 0), whatever G computes."""
    last = G.to_rgb[-1]
    with torch.no_grad():
        last = last.conv if isinstance(last, NearestResizeConv) else last
        last.weight[:, 3].zero_()  # a transposed convolution's: [C_in, C_out, k, k]
        last.bias[3] = value


def _with_cone(z: torch.Tensor, cones: list[int]) -> torch.Tensor:
    """z with its background code's largest value at the given cones, the rest of it new."""
    z = z.clone()
    code = -torch.rand(len(z), BACKGROUND_CONES, dtype=z.dtype)
    code[torch.arange(len(z)), cones] = 1 + torch.rand(len(z), dtype=z.dtype)
    z[:, CODE] = code
    return z


def test_the_background_code_is_the_cone_of_the_largest_value():
    z = torch.randn(6, 12)
    code = background_code(z)
    assert code.shape == (6, BACKGROUND_CONES) and (code.sum(1) == 1).all()
    assert (code.argmax(1) == z[:, 1:9].argmax(1)).all()


def test_a_layered_generator_draws_its_background_from_the_code_alone():
    G = _layered()
    _force_mask(G, -60.0)  # all background
    z, text = torch.randn(4, LAYERED_MIN_Z_DIM, dtype=torch.float64), torch.randn(4, 128).double()
    cones = [0, 3, 3, 7]
    image = G(_with_cone(z, cones), text)
    assert image.shape == (4, 3, 32, 32) and image.abs().max() <= 1
    # Other noise, other text, the same cones: the same backgrounds.
    again = G(_with_cone(torch.randn_like(z), cones), torch.randn_like(text))
    torch.testing.assert_close(again, image)
    # Another cone, another background.
    other = G(_with_cone(z, [1, 3, 4, 7]), text)
    assert not torch.allclose(other[0], image[0]) and not torch.allclose(other[2], image[2])
    torch.testing.assert_close(other[[1, 3]], image[[1, 3]])


def test_a_layered_generator_moves_its_foreground_by_the_last_two_noise_dimensions():
    G = _layered()
    _force_mask(G, 60.0)  # all foreground
    with torch.no_grad():
        G.shift.weight.copy_(torch.eye(2) * 10)  # tanh saturates: offset ±MAX_SHIFT
    z, text = torch.randn(2, LAYERED_MIN_Z_DIM, dtype=torch.float64), torch.randn(2, 128).double()
    z[:, -2:] = 0
    still = G(z, text)
    # The foreground is the caption's: the rest of z changes nothing it draws.
    other = _with_cone(torch.randn_like(z), [2, 5])
    other[:, -2:] = 0
    torch.testing.assert_close(G(other, text), still)
    assert not torch.allclose(G(z, torch.randn_like(text)), still)
    moved = z.clone()
    moved[:, -2] = 5.0  # right by MAX_SHIFT of the half-width
    right = G(moved, text)
    assert not torch.allclose(right, still)
    offset = torch.tensor([[0.8, 0.0]] * 2, dtype=torch.float64)  # 12.8 of 32 pixels
    # Where the foreground came from outside the background shows; elsewhere it is moved.
    torch.testing.assert_close(right[..., 14:], shifted(still, offset)[..., 14:])


def test_train_style_mirrors_the_chosen_rows_backgrounds_and_nothing_else():
    """backgrounds_mirrored, with which train-style draws G's images: the background of the
    rows chosen mirrored left-right, the shape and the other rows as G draws them, and G
    itself again once the context ends."""
    G = _layered()
    z, text = torch.randn(6, LAYERED_MIN_Z_DIM, dtype=torch.float64), torch.randn(6, 128).double()
    rows = torch.tensor([True, False, True, False, False, True])
    plain = G(z, text)
    with backgrounds_mirrored(G, rows):
        mirrored = G(z, text)
    torch.testing.assert_close(mirrored[~rows], plain[~rows])
    assert not torch.allclose(mirrored[rows], plain[rows])
    torch.testing.assert_close(G(z, text), plain)
    _force_mask(G, -60.0)  # all background: the chosen rows' pictures mirrored
    background = G(z, text)
    with backgrounds_mirrored(G, rows):
        torch.testing.assert_close(G(z, text)[rows], background[rows].flip(-1))
    _force_mask(G, 60.0)  # all foreground, unmoved (no edge of background): as it was
    z[:, -2:] = 0
    foreground = G(z, text)
    with backgrounds_mirrored(G, rows):
        torch.testing.assert_close(G(z, text), foreground)


def test_shifting_by_whole_pixels_moves_the_layer_and_brings_zeros_in():
    layer = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    # 0.25 of the half-width of 16 pixels: 2 pixels right; -0.5: 4 pixels up.
    out = shifted(layer, torch.tensor([[0.25, 0.0], [0.0, -0.5]], dtype=torch.float64))
    torch.testing.assert_close(out[0, :, :, 2:], layer[0, :, :, :-2])
    assert (out[0, :, :, :2] == 0).all()
    torch.testing.assert_close(out[1, :, :-4], layer[1, :, 4:])
    assert (out[1, :, -4:] == 0).all()


def _assert_alike(mine: nn.Module, mine_out: torch.Tensor, theirs: nn.Module,
                  theirs_out: torch.Tensor, *, outputs: float, grads: tuple[float, float],
                  buffers: float) -> None:
    """Two copies of a network and their outputs: the outputs, the parameters' gradients of
    one random weighting of them (rtol, atol) and the buffers agree."""
    weights = torch.randn_like(mine_out)
    (mine_out * weights).sum().backward()
    (theirs_out * weights).sum().backward()
    torch.testing.assert_close(mine_out, theirs_out, rtol=outputs, atol=outputs)
    for (name, p), q in zip(mine.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=grads[0], atol=grads[1], msg=name)
    for (name, b), c in zip(mine.named_buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=buffers, atol=buffers, msg=name)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("groups", [1, 2, (40, 24)])
def test_the_background_runs_once_per_code_as_it_would_on_every_sample(groups, momentum):
    """The table of codes with counted BatchNorm against the same layers run on each sample
    (groups of their own statistics as Generator passes them): outputs, every gradient and
    the running statistics agree to float64 rounding, in training and in eval mode, with
    BatchNorm's moving average and with the cumulative one that recompute_batchnorm_stats
    sets."""
    table = Background(4).double()
    for bn in table:
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.momentum = momentum
            bn.num_batches_tracked.fill_(3)  # so that the cumulative average is not a copy
    every = copy.deepcopy(table)
    z = torch.randn(64, LAYERED_MIN_Z_DIM, dtype=torch.float64)
    z = _with_cone(z, [3] * 9 + torch.randint(BACKGROUND_CONES, (55,)).tolist())
    z[-1, CODE] = torch.arange(BACKGROUND_CONES, dtype=z.dtype)  # a cone held once only
    code = background_code(z)
    _assert_alike(table, table(code, groups=groups),
                  every, grouped(nn.Sequential(*every), code, groups),
                  outputs=1e-12, grads=(1e-9, 1e-12), buffers=1e-12)
    assert table[1].num_batches_tracked.item() == 3 + len(group_sizes(groups, 64))
    table.eval(), every.eval()
    torch.testing.assert_close(table(code), every(code), rtol=1e-12, atol=1e-12)


class _OwnStatistics(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm computing its statistics its own way, as SyncBatchNorm and --sync-bn's CPU
    version do (here, the plain way): grouping takes no such layer."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        pass


def test_a_background_with_its_own_statistics_runs_on_every_sample():
    """With BatchNorm layers that are not plain (--sync-bn), the background calls them on
    every sample's code, where their statistics are what they are made for."""
    table = Background(3).double()
    for i, bn in enumerate(table):
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            own = _OwnStatistics(bn.num_features).double()
            own.load_state_dict(bn.state_dict())
            table[i] = own
    every = copy.deepcopy(table)
    rows = []  # what each of the table's BatchNorm calls normalises
    for bn in table:
        if isinstance(bn, _OwnStatistics):
            bn.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    code = background_code(_with_cone(torch.randn(64, LAYERED_MIN_Z_DIM, dtype=torch.float64),
                                      torch.randint(BACKGROUND_CONES, (64,)).tolist()))
    _assert_alike(table, table(code, groups=2), every,
                  torch.cat([nn.Sequential(*every)(part) for part in code.split(32)]),
                  outputs=1e-12, grads=(1e-9, 1e-12), buffers=1e-12)
    assert rows == [32] * 2 * 3  # each group's samples, not its 8 codes; 3 layers


def test_a_layered_generator_starts_mostly_background_and_every_part_learns():
    G = _layered().train()
    last = G.to_rgb[-1]
    assert last.bias[3].item() == MASK_BIAS and last.weight.shape[:2] == (32, 4)
    z, text = torch.randn(8, LAYERED_MIN_Z_DIM, dtype=torch.float64), torch.randn(8, 128).double()
    (G(z, text) * torch.randn(8, 3, 32, 32, dtype=torch.float64)).sum().backward()
    missing = [n for n, p in G.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_the_layered_layout_needs_room_in_z_and_checkpoints_record_both_settings():
    with pytest.raises(ValueError, match=f"z_dim must be at least {LAYERED_MIN_Z_DIM}"):
        GANConfig(layout="layered", z_dim=LAYERED_MIN_Z_DIM - 1)
    with pytest.raises(ValueError, match="layout must be one of"):
        GANConfig(layout="stacked")
    for width in (0, 5000, True, "11", 11.0):
        with pytest.raises(ValueError, match=r"z_dim must be an integer in \[1, 4096\]"):
            GANConfig(z_dim=width)
    small = preset("small")
    state = {"preset": "small", "model_config": dataclasses.asdict(dataclasses.replace(
        small, gan=dataclasses.replace(small.gan, layout="layered", z_dim=11)))}
    gan = checkpoint_models(state).gan
    assert (gan.layout, gan.z_dim) == ("layered", 11)
    old = dataclasses.asdict(small)
    del old["gan"]["layout"]  # made before the setting: the paper's
    assert checkpoint_models({"preset": "small", "model_config": old}).gan.layout == "single"
    state["model_config"]["gan"]["z_dim"] = "11"
    with pytest.raises(ValueError, match="z_dim must be an integer"):
        checkpoint_models(state)


def test_a_layered_generator_compiles_whole_and_matches_eager():
    """torch.compile (Inductor, as the compiled backend runs G) traces the layered layout in
    one graph, the background's table and counted BatchNorm included: the same images,
    gradients and running statistics as eager, to float32 rounding, with groups."""
    eager = dataclasses.replace(preset("small").gan, layout="layered", z_dim=LAYERED_MIN_Z_DIM)
    G = Generator(eager).train()
    twin = copy.deepcopy(G)
    compiled = torch.compile(twin, fullgraph=True)
    z, text = torch.randn(16, LAYERED_MIN_Z_DIM), torch.randn(16, 128)
    _assert_alike(twin, compiled(z, text, groups=2), G, G(z, text, groups=2),
                  outputs=1e-5, grads=(1e-3, 1e-4), buffers=1e-5)
