import dataclasses

import pytest
import torch

from t2i_fast.data.alphabet import ALPHABET_SIZE, onehot
from t2i_fast.models import (
    PRESETS,
    Discriminator,
    GANConfig,
    Generator,
    ImageEncoder,
    ImageEncoderConfig,
    ModelConfig,
    TextEncoder,
    TextEncoderConfig,
    preset,
)
from t2i_fast.models.batchnorm_stats import recompute_batchnorm_stats
from t2i_fast.models.config import checkpoint_models, recorded
from t2i_fast.models.coordinates import AddCoordinates
from t2i_fast.models.generator import ProjectTo4x4, ResidualBlock
from t2i_fast.models.resize_conv import NearestResizeConv

L = 201


def _indices(*shape: int) -> torch.Tensor:
    return torch.randint(0, ALPHABET_SIZE + 1, (*shape, L), dtype=torch.uint8)


def _images(b: int, size: int) -> torch.Tensor:
    return torch.rand(b, 3, size, size) * 2 - 1


def _all_grads(module: torch.nn.Module) -> None:
    missing = [n for n, p in module.named_parameters()
               if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not missing, f"no gradient reached {missing}"


def _weighted_sum(out: torch.Tensor) -> torch.Tensor:
    # Random weights: a plain sum of BN-normalised values has an all-zero gradient.
    return (out * torch.randn_like(out)).sum()


@pytest.mark.parametrize("name", list(PRESETS))
def test_output_shapes(name):
    config = preset(name)
    size, e = config.gan.image_size, config.gan.embedding_dim
    text, image = TextEncoder(config.text), ImageEncoder(config.image)
    g, d = Generator(config.gan), Discriminator(config.gan)
    captions = onehot(_indices(3, 2), torch.float32)  # [B=3, k=2, 70, L]
    assert text(captions[:, 0]).shape == (3, e)
    assert text(captions).shape == (3, 2, e)
    emb = text.encode_mean(captions)
    assert emb.shape == (3, e)
    fake = g(torch.randn(3, g.config.z_dim), emb)
    assert fake.shape == (3, 3, size, size)
    assert fake.min() >= -1 and fake.max() <= 1
    assert d(fake, emb).shape == (3,)
    assert image(fake).shape == (3, e)


def test_stages_follow_image_size():
    config = GANConfig(image_size=128, ngf=4, ndf=4, embedding_dim=16, projected_dim=8)
    g, d = Generator(config), Discriminator(config)
    fake = g(torch.randn(2, g.config.z_dim), torch.randn(2, 16))
    assert fake.shape == (2, 3, 128, 128)
    assert d(fake, torch.randn(2, 16)).shape == (2,)
    assert g.stages[0][0].out_channels == 4 * 2**4  # 4×4 map: ngf·2^(n-1), n = 5


def test_reed_widths():
    config = preset("reed").gan
    g, d = Generator(config), Discriminator(config)
    assert [s[0].out_channels for s in g.stages] == [1024, 512, 256, 128]
    assert [s[0].out_channels for s in d.stages] == [64, 128, 256, 512]
    blocks = [m for m in g.modules() if isinstance(m, ResidualBlock)]
    assert [b.body[0].out_channels for b in blocks] == [256, 128]  # ngf·2, ngf
    assert [s[0].out_channels for s in Generator(preset("dcgan").gan).stages] == [
        512, 256, 128, 64]


@pytest.mark.parametrize("name, in_g, in_d", [("reed", 2, 1), ("dcgan", 0, 0), ("small", 2, 1)])
def test_residual_blocks(name, in_g, in_d):
    config = preset(name).gan
    count = lambda m: sum(isinstance(x, ResidualBlock) for x in m.modules())  # noqa: E731
    assert count(Generator(config)) == in_g
    assert count(Discriminator(config)) == in_d


@pytest.mark.parametrize("name", list(PRESETS))
def test_gradients_reach_every_parameter(name):
    config = preset(name)
    text, image = TextEncoder(config.text), ImageEncoder(config.image)
    g, d = Generator(config.gan), Discriminator(config.gan)
    emb = text.encode_mean(_indices(4, 2))
    fake = g(torch.randn(4, g.config.z_dim), emb)
    _weighted_sum(d(fake, emb) + image(fake).sum(dim=1)).backward()
    for module in (text, image, g, d):
        _all_grads(module)


@pytest.mark.parametrize("rnn", ["gru", "lstm", "rnn"])
def test_text_encoder_rnn_kinds(rnn):
    config = TextEncoderConfig(channels=(8, 8), cnn_dim=8, rnn=rnn, rnn_dim=8, embedding_dim=6)
    text = TextEncoder(config)
    assert isinstance(text.rnn, {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM,
                                 "rnn": torch.nn.RNN}[rnn])
    _weighted_sum(text(_indices(3))).backward()
    _all_grads(text)


def test_dcgan_init_statistics():
    g = Generator(preset("reed").gan)
    big = g.stages[0][0].weight  # [228, 1024, 4, 4]: 3.7M weights
    assert abs(big.mean().item()) < 1e-4
    assert big.std().item() == pytest.approx(0.02, rel=0.01)
    bn = g.stages[0][1]  # 1024 scales
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.005)
    assert bn.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.count_nonzero(bn.bias) == 0
    d = Discriminator(preset("reed").gan)
    assert d.stages[3][0].weight.std().item() == pytest.approx(0.02, rel=0.01)
    assert torch.count_nonzero(d.logit.bias) == 0
    assert torch.count_nonzero(d.stages[0][0].bias) == 0


def test_the_class_head_reads_the_image_alone():
    """D's class logits come from its image features, before the text joins them: another
    text leaves them as they are and changes the match logit; the match logit is the one
    D without the head gives."""
    torch.manual_seed(0)
    config = preset("small").gan
    d = Discriminator(config, num_classes=5).eval()
    images, text = _images(3, 32), torch.randn(3, config.embedding_dim)
    logits, classes = d(images, text, with_classes=True)
    assert logits.shape == (3,) and classes.shape == (3, 5)
    torch.testing.assert_close(d(images, text), logits)
    other_logits, other_classes = d(images, torch.randn(3, config.embedding_dim),
                                    with_classes=True)
    torch.testing.assert_close(other_classes, classes)
    assert not torch.allclose(other_logits, logits)
    with pytest.raises(ValueError, match="no class head"):
        Discriminator(config)(images, text, with_classes=True)


def test_text_changes_discriminator_and_generator_output():
    config = preset("small").gan
    g, d = Generator(config).eval(), Discriminator(config).eval()
    images, emb = _images(4, 32), torch.randn(4, 128)
    z = torch.randn(4, g.config.z_dim)
    # eval mode: BatchNorm works per sample, so only sample i's embedding reaches output i.
    base, swapped = d(images, emb), d(images, emb.flip(0))
    assert ((base - swapped).abs() > 1e-3 * base.abs().max()).all()
    assert ((g(z, emb) - g(z, emb.flip(0))).abs().amax(dim=(1, 2, 3)) > 1e-4).all()
    emb.requires_grad_(True)
    d(images, emb).sum().backward()
    assert (emb.grad.abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("train", [False, True])
def test_channels_last_matches_contiguous(train):
    config = preset("small")
    g, d = Generator(config.gan).train(train), Discriminator(config.gan).train(train)
    image = ImageEncoder(config.image).train(train)
    images, emb, z = _images(4, 32), torch.randn(4, 128), torch.randn(4, 100)
    expected = (d(images, emb), image(images), g(z, emb))
    cl = torch.channels_last
    for m in (g, d, image):
        m.to(memory_format=cl)
    images = images.contiguous(memory_format=cl)
    assert images.is_contiguous(memory_format=cl)
    got = (d(images, emb), image(images), g(z, emb))
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_forward():
    config = preset("small")
    text, image = TextEncoder(config.text), ImageEncoder(config.image)
    g, d = Generator(config.gan), Discriminator(config.gan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = text.encode_mean(_indices(2, 2))
        fake = g(torch.randn(2, g.config.z_dim), emb)
        logits = d(fake.contiguous(memory_format=torch.channels_last), emb)
        features = image(fake)
    assert fake.shape == (2, 3, 32, 32) and logits.shape == (2,) and features.shape == (2, 128)
    for t in (emb, fake, logits, features):
        assert t.dtype == torch.bfloat16 and torch.isfinite(t).all()


def test_text_encoder_inputs_agree():
    text = TextEncoder(preset("small").text)
    idx = _indices(2, 3)  # [B, k, L]
    per_sample = text(idx)
    for caption in (onehot(idx, torch.float32), onehot(idx, torch.uint8)):
        torch.testing.assert_close(text(caption), per_sample)
    flat = text(onehot(idx.reshape(6, L), torch.float32))  # [N, E]
    torch.testing.assert_close(flat.reshape(2, 3, -1), per_sample)
    torch.testing.assert_close(text.encode_mean(idx), per_sample.mean(dim=1))
    with pytest.raises(ValueError, match="k captions"):
        text.encode_mean(idx[:, 0])


def test_text_encoder_averages_hidden_states_over_time():
    text = TextEncoder(preset("small").text)
    kinds = [type(m) for m in text.cnn]
    assert kinds == [torch.nn.Conv1d, torch.nn.ReLU, torch.nn.MaxPool1d] * 3
    assert [m.out_channels for m in text.cnn if isinstance(m, torch.nn.Conv1d)] == [64, 96, 96]
    x = onehot(_indices(2), torch.float32)
    states, _ = text.rnn(text.cnn(x).transpose(1, 2))  # [2, 6, 96]
    assert states.shape == (2, 6, 96)
    torch.testing.assert_close(text(x), text.proj(states.mean(dim=1)))
    assert not torch.allclose(text(x), text.proj(states[:, -1]))


@pytest.mark.parametrize("name", ["reed", "small"])
def test_text_encoder_lengths(name):
    config = preset(name).text
    assert config.output_length(L) == 6  # 201 → 198/66 → 63/21 → 18/6
    assert config.min_length == 66
    assert config.output_length(66) == 1 and config.output_length(65) == 0
    text = TextEncoder(config)
    assert text(torch.zeros(1, ALPHABET_SIZE, 66)).shape == (1, config.embedding_dim)
    with pytest.raises(ValueError, match="shorter"):
        text(torch.zeros(1, ALPHABET_SIZE, 65))
    with pytest.raises(ValueError, match="one-hot"):
        text(torch.zeros(1, 69, L))


def test_preset_and_config_errors():
    with pytest.raises(ValueError, match="'dcgan', 'reed', 'small'"):
        preset("huge")
    with pytest.raises(ValueError, match="power of two"):
        GANConfig(image_size=48)
    with pytest.raises(ValueError, match="power of two"):
        GANConfig(image_size=8)
    with pytest.raises(ValueError, match="rnn"):
        TextEncoderConfig(rnn="transformer")
    with pytest.raises(ValueError, match="embedding_dim"):
        ModelConfig(image=ImageEncoderConfig(embedding_dim=128))
    assert preset("reed").gan == GANConfig()  # the paper's numbers are the defaults
    assert preset("small").gan.image_size == 32


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_project_to_4x4_is_the_transposed_convolution(memory_format):
    """G's first layer as a matrix product: output and both gradients equal those of the
    4×4 transposed convolution with its weight, and the output is channels_last."""
    layer = ProjectTo4x4(7, 5).double().to(memory_format=memory_format)
    x = torch.randn(3, 7, 1, 1, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    want = torch.nn.functional.conv_transpose2d(x, layer.weight)
    torch.testing.assert_close(y, want)
    assert y.shape == (3, 5, 4, 4) and y.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight), grad)
    expected = torch.autograd.grad(want, (x, layer.weight), grad)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="1×1 map"):
        layer(torch.randn(3, 7, 2, 2, dtype=torch.float64))


def test_a_uniform_first_layer_varies_over_its_cells_by_its_first_inputs_alone():
    """With cell_inputs k, the inputs after the first k weigh their weights' mean over the
    cells at every cell: the same map as a transposed convolution whose weight is that mean
    for them, gradients included; the cells differ only through the first k inputs."""
    layer = ProjectTo4x4(7, 5, cell_inputs=1).double()
    x = torch.randn(3, 7, 1, 1, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    w = layer.weight
    mixed = torch.cat([w[:1], w[1:].mean(dim=(2, 3), keepdim=True).expand_as(w[1:])])
    want = torch.nn.functional.conv_transpose2d(x, mixed)
    torch.testing.assert_close(y, want)
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, w), grad),
                    torch.autograd.grad(want, (x, w), grad), strict=True):
        torch.testing.assert_close(a, b)
    cells = lambda out: out.flatten(2)  # noqa: E731  [B, C, 16]
    without_first = layer(torch.cat([torch.zeros(3, 1, 1, 1, dtype=torch.float64),
                                     x[:, 1:].detach()], dim=1))
    torch.testing.assert_close(cells(without_first),
                               cells(without_first)[..., :1].expand(-1, -1, 16))
    assert not torch.allclose(cells(y), cells(y)[..., :1].expand(-1, -1, 16))
    per_cell = ProjectTo4x4(7, 5).double()
    per_cell.load_state_dict(layer.state_dict())  # the same tensors, another map
    assert not torch.allclose(per_cell(x), y)
    with pytest.raises(ValueError, match=r"cell_inputs must be in \[0, 7\], got 8"):
        ProjectTo4x4(7, 5, cell_inputs=8)


def test_the_generator_builds_its_first_layer_as_configured():
    gan = preset("small").gan
    assert Generator(gan).stages[0][0].cell_inputs is None
    uniform = Generator(dataclasses.replace(gan, first_layer="uniform"))
    assert uniform.stages[0][0].cell_inputs == 1
    # The same tensors as the paper's layer: a checkpoint's shapes do not tell them apart.
    assert {k: v.shape for k, v in uniform.state_dict().items()} == \
        {k: v.shape for k, v in Generator(gan).state_dict().items()}
    with pytest.raises(ValueError, match="first_layer must be one of"):
        dataclasses.replace(gan, first_layer="diagonal")


def test_a_nearest_resize_convolution_is_one_transposed_convolution():
    """Output and every gradient equal a ×2 nearest resize then the 3×3 convolution, odd
    sizes included."""
    layer = NearestResizeConv(5, 4, bias=True).double()
    torch.nn.init.normal_(layer.conv.bias)
    x = torch.randn(2, 5, 3, 7, dtype=torch.float64, requires_grad=True)
    y = layer(x)  # [2, 4, 6, 14]
    want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2),
                                      layer.conv.weight, layer.conv.bias, padding=1)
    assert y.shape == (2, 4, 6, 14)
    torch.testing.assert_close(y, want)
    grad = torch.randn_like(y)
    inputs = (x, layer.conv.weight, layer.conv.bias)
    for a, b in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(want, inputs, grad),
                    strict=True):
        torch.testing.assert_close(a, b)
    assert layer.kernel().shape == (5, 4, 4, 4)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_a_resize_generator_doubles_by_resizing_then_a_3x3_convolution(mode):
    """Each stage after the 4×4 map, and the RGB layer, compute conv3×3(resize×2(x)) before
    the stage's BatchNorm; the 4×4 map keeps the paper's layer."""
    gan = dataclasses.replace(preset("small").gan, upsample=mode)
    g = Generator(gan).double()
    x = torch.randn(3, g.stages[0][1].num_features, 4, 4, dtype=torch.float64)
    stage = list(g.stages[1])
    before_bn = stage[:[isinstance(m, torch.nn.BatchNorm2d) for m in stage].index(True)]
    conv = next(m for m in g.stages[1].modules() if isinstance(m, torch.nn.Conv2d))
    want = torch.nn.functional.conv2d(
        torch.nn.functional.interpolate(x, scale_factor=2, mode=mode), conv.weight, padding=1)
    torch.testing.assert_close(torch.nn.Sequential(*before_bn)(x), want)  # [3, C/2, 8, 8]
    rgb = next(m for m in g.to_rgb.modules() if isinstance(m, torch.nn.Conv2d))
    assert rgb.kernel_size == (3, 3) and rgb.bias is not None and rgb.out_channels == 3
    assert isinstance(g.stages[0][0], ProjectTo4x4)
    images = g(torch.randn(2, gan.z_dim, dtype=torch.float64),
               torch.randn(2, gan.embedding_dim, dtype=torch.float64))
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    paper = Generator(preset("small").gan)
    assert all(isinstance(m, torch.nn.ConvTranspose2d)
               for m in (paper.stages[1][0], paper.stages[2][0], paper.to_rgb[0]))
    with pytest.raises(ValueError, match="upsample must be one of"):
        dataclasses.replace(gan, upsample="pixel-shuffle")


class _MirroredCoordinates(AddCoordinates):
    def forward(self, x):
        out = super().forward(x)
        return torch.cat([out[:, :-2], -out[:, -2:]], dim=1)


def test_the_coordinate_channels_say_where_each_pixel_is():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out = AddCoordinates()(x)  # [2, 5, 4, 5]
    assert out.shape == (2, 5, 4, 5) and out.dtype == torch.float64
    assert torch.equal(out[:, :3], x)
    across = torch.linspace(-1, 1, 5, dtype=torch.float64)
    down = torch.linspace(-1, 1, 4, dtype=torch.float64)
    assert torch.equal(out[:, 3], across.expand(2, 4, 5))  # x: left to right, every row
    assert torch.equal(out[:, 4], down[:, None].expand(2, 4, 5))  # y: top to bottom


@pytest.mark.parametrize("coordinates", ["generator", "both"])
def test_coordconv_gives_each_doubling_layer_and_ds_first_the_coordinates(coordinates):
    """G's doubling layers (not the 4×4 map's, whose input is 1×1) read their input and the
    coordinates; D's first convolution does too with ``both``. The coordinates drive the
    images: the same weights fed other coordinates draw other images."""
    gan = dataclasses.replace(preset("small").gan, coordinates=coordinates)
    torch.manual_seed(0)
    g, d = Generator(gan).double(), Discriminator(gan, num_classes=3).double()
    doubling = [g.stages[1], g.stages[2], g.to_rgb]
    assert all(isinstance(layers[0], AddCoordinates) for layers in doubling)
    assert [layers[1].in_channels for layers in doubling] == [128 + 2, 64 + 2, 32 + 2]
    assert not any(isinstance(m, AddCoordinates) for m in g.stages[0].modules())
    first = d.stages[0]
    assert isinstance(first[0], AddCoordinates) == (coordinates == "both")
    assert next(m for m in first if isinstance(m, torch.nn.Conv2d)).in_channels == \
        (5 if coordinates == "both" else 3)
    z = torch.randn(4, gan.z_dim, dtype=torch.float64)
    text = torch.randn(4, gan.embedding_dim, dtype=torch.float64)
    images = g(z, text)
    assert images.shape == (4, 3, 32, 32) and images.abs().max() <= 1
    logits, classes = d(images, text, with_classes=True)
    assert logits.shape == (4,) and classes.shape == (4, 3)
    for layers in doubling:  # the same weights, told each pixel is where its mirror is
        layers[0] = _MirroredCoordinates()
    assert (g(z, text) - images).abs().max() > 1e-3
    plain = Generator(preset("small").gan)
    assert not any(isinstance(m, AddCoordinates) for m in plain.modules())
    with pytest.raises(ValueError, match="coordinates must be one of"):
        dataclasses.replace(gan, coordinates="polar")


@pytest.mark.parametrize("setting, chosen, other, paper, forged", [
    ("upsample", "nearest", "bilinear", "transposed", ("bicubic", None)),
    ("coordinates", "both", "generator", "none", ("polar", 1)),
    ("layout", "layered", "single", "single", ("stacked", None)),
])
def test_a_checkpoint_names_its_gan_setting_and_old_ones_read_as_the_papers(
        setting, chosen, other, paper, forged):
    small = preset("small")
    recorded_choice = {"preset": "small", "model_config": dataclasses.asdict(
        dataclasses.replace(small, gan=dataclasses.replace(small.gan, **{setting: chosen})))}
    assert getattr(checkpoint_models(recorded_choice).gan, setting) == chosen
    assert getattr(preset("small", **{setting: other}).gan, setting) == other
    old = dataclasses.asdict(small)
    del old["gan"][setting]  # made before the setting
    assert getattr(checkpoint_models({"preset": "small", "model_config": old}).gan,
                   setting) == paper
    made = dataclasses.asdict(small)
    for value in forged:
        made["gan"][setting] = value
        with pytest.raises(ValueError, match=f"{setting} must be one of"):
            checkpoint_models({"preset": "small", "model_config": made})


def test_a_checkpoint_names_its_first_layer_and_old_ones_read_as_per_cell():
    small = preset("small")
    recorded_uniform = {"preset": "small", "model_config": dataclasses.asdict(
        dataclasses.replace(small, gan=dataclasses.replace(small.gan, first_layer="uniform")))}
    assert checkpoint_models(recorded_uniform).gan.first_layer == "uniform"
    old = dataclasses.asdict(small)
    del old["gan"]["first_layer"]  # made before the setting
    assert checkpoint_models({"preset": "small", "model_config": old}) == small
    assert recorded(old) == dataclasses.asdict(small)
    assert checkpoint_models({"preset": "small"}) == small
    forged = dataclasses.asdict(small)
    forged["gan"]["first_layer"] = "everywhere"
    with pytest.raises(ValueError, match="first_layer must be one of"):
        checkpoint_models({"preset": "small", "model_config": forged})
    forged["gan"]["first_layer"] = None  # not "the preset's": a forged value
    with pytest.raises(ValueError, match="first_layer must be one of"):
        checkpoint_models({"preset": "small", "model_config": forged})
    assert recorded("not a dict") == "not a dict"


def test_recomputed_batchnorm_stats_average_the_batches():
    """The running mean is the mean of the batches' means, the running variance the mean of
    their unbiased variances; weights, momentum, mode and batch count are left alone, and
    the statistics are written into the same tensors."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.3))
    model.eval()
    bn = model[1]
    mean_before, count = bn.running_mean, bn.num_batches_tracked.clone()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    batches = [(torch.randn(5, 3, 2, 3) * (i + 1),) for i in range(3)]
    recompute_batchnorm_stats(model, batches)
    with torch.no_grad():
        features = [model[0](x) for (x,) in batches]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in features])
    variances = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1) for f in features])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.running_mean is mean_before and bn.momentum == 0.3 and not model.training
    assert torch.equal(bn.num_batches_tracked, count)
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v)
    with pytest.raises(ValueError, match="at least one batch"):
        recompute_batchnorm_stats(model, [])
    torch.testing.assert_close(bn.running_mean, means.mean(0))  # untouched by the refusal
