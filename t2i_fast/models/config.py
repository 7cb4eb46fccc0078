"""Typed model configurations and the named presets.

``preset("reed")`` is the paper: Reed et al.'s 64×64 GAN-CLS networks and the 1024-d
char-CNN-RNN text embedding, with the bottleneck residual blocks of Reed's code (the paper's
text does not describe them). ``"dcgan"`` drops the residual blocks and uses the DCGAN widths
(64). ``"small"`` is a 32×32 model with narrow layers for CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from t2i_fast.data.alphabet import ALPHABET_SIZE

RNN_KINDS = ("gru", "lstm", "rnn")
# The layered layout's z: z₀ (not read: the single layout's per-cell input), then
# BACKGROUND_CONES dimensions whose largest names the background, the two of the shift last
# (t2i_fast.models.layered).
BACKGROUND_CONES = 8
LAYERED_MIN_Z_DIM = 1 + BACKGROUND_CONES + 2
# How G's first layer spreads its inputs over the 4×4 map (GANConfig.first_layer).
FIRST_LAYERS = ("per-cell", "uniform")
# How G doubles the resolution (GANConfig.upsample).
UPSAMPLES = ("transposed", "nearest", "bilinear")
# Which networks see CoordConv's coordinate channels (CoordConv: GANConfig.coordinates).
COORDINATES = ("none", "generator", "both")
# How G composes its image (GANConfig.layout).
LAYOUTS = ("single", "layered")
# The widths z may have (GANConfig.z_dim).
Z_DIMS = range(1, 4097)
# G's settings a training run chooses (TrainConfig's g_<name>) and a checkpoint records.
G_CHOICES = {"first_layer": FIRST_LAYERS, "upsample": UPSAMPLES, "coordinates": COORDINATES,
             "layout": LAYOUTS, "z_dim": Z_DIMS}


def check_choice(name: str, value: object) -> None:
    """ValueError unless ``value`` is one of G_CHOICES[name]."""
    choices = G_CHOICES[name]
    width = isinstance(choices, range)
    # A width is an int: 11.0 and True are in range(1, ...) too.
    if (width and type(value) is not int) or value not in choices:
        allowed = (f"an integer in [{choices.start}, {choices.stop - 1}]" if width
                   else f"one of {choices}")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Reed's char-CNN-RNN (CVPR 2016): three Conv1d + ReLU + MaxPool stages, a recurrent
    layer whose hidden states are averaged over time, a linear map to ``embedding_dim``."""

    channels: tuple[int, int] = (384, 512)  # the first two convolutions' widths
    cnn_dim: int = 256  # the third convolution's width: the recurrent layer's input
    kernel_size: int = 4
    pool_size: int = 3
    rnn: str = "gru"
    rnn_dim: int = 256
    embedding_dim: int = 1024
    alphabet_size: int = ALPHABET_SIZE

    def __post_init__(self) -> None:
        if self.rnn not in RNN_KINDS:
            raise ValueError(f"rnn must be one of {RNN_KINDS}, got {self.rnn!r}")
        _check_positive(self, "cnn_dim", "kernel_size", "pool_size", "rnn_dim",
                        "embedding_dim", "alphabet_size")
        if len(self.channels) != 2 or min(self.channels) < 1:
            raise ValueError(f"channels must be two positive widths, got {self.channels}")

    def output_length(self, length: int) -> int:
        """Time steps the recurrent layer sees for captions of ``length`` characters (0 when
        too short): each stage is a valid convolution, then a pooling of stride = size."""
        for _ in range(3):
            length = max(length - self.kernel_size + 1, 0) // self.pool_size
        return length

    @property
    def min_length(self) -> int:
        """The shortest caption length that leaves at least one time step."""
        length = 1
        for _ in range(3):
            length = length * self.pool_size + self.kernel_size - 1
        return length


@dataclass(frozen=True)
class ImageEncoderConfig:
    """The image side of the joint embedding: stride-2 Conv + BN + LeakyReLU blocks, global
    average pooling, a linear map to ``embedding_dim``."""

    channels: tuple[int, ...] = (64, 128, 256, 512)
    embedding_dim: int = 1024

    def __post_init__(self) -> None:
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be positive widths, got {self.channels}")
        _check_positive(self, "embedding_dim")


@dataclass(frozen=True)
class GANConfig:
    """Generator and discriminator. The number of up/down-sampling stages follows from
    ``image_size``: both networks work at 4×4 at their narrow end and double/halve the
    resolution per stage, halving/doubling the width (``ngf·2^k`` … ``ngf``)."""

    image_size: int = 64
    ngf: int = 128
    ndf: int = 64
    z_dim: int = 100
    embedding_dim: int = 1024
    projected_dim: int = 128  # the text embedding's width after the projection in G and D
    residual: bool = True
    # G's first layer maps [z, φ(t)] to the 4×4 map. per-cell (the paper): every input has
    # weights of its own at each cell. uniform: only z's first dimension does; the other
    # noise dimensions and the text weigh the same at every cell, so the 4×4 map is one
    # vector everywhere plus z₀ times a learned pattern. With per-cell weights every noise
    # dimension draws a 4×4 pattern of its own, and on the shapes dataset the noise mostly
    # redrew a blob texture behind a shape that stayed in place; uniform, it moves the shape
    # (docs/results.md, "A uniform first layer").
    first_layer: str = "per-cell"
    # How each stage doubles the resolution: transposed, a 4×4 stride-2 transposed
    # convolution (the paper); nearest or bilinear, that ×2 resize then a 3×3 convolution
    # (Odena et al., 2016), with which the noise moved the shape's place on some runs
    # (docs/results.md, "G's upsampling as an option").
    upsample: str = "transposed"
    # CoordConv (Liu et al., 2018; t2i_fast.models.coordinates): x and y as two more input
    # channels of each of G's doubling layers (generator), and of D's first convolution too
    # (both); none: the paper's networks. With both and nearest upsampling the noise moved the
    # shape's place past the style study's position target on every seed tried
    # (docs/results.md, "CoordConv in G and D").
    coordinates: str = "none"
    # single (the paper): G's last layer makes the image. layered (LR-GAN, Yang et al.,
    # 2017; t2i_fast.models.layered): it makes a foreground and a mask instead, from the
    # caption alone, moved by a shift that z's last two dimensions set, over a background
    # that a small network draws from z's background code alone (the cone of z₁…z₈ its
    # largest value is in), so that G's noise sets a shape's place and its background's kind
    # along a few directions of z each (docs/results.md, "A layered generator whose noise
    # sets only the background's kind and the shape's place").
    layout: str = "single"

    def __post_init__(self) -> None:
        for name in G_CHOICES:
            check_choice(name, getattr(self, name))
        if self.layout == "layered" and self.z_dim < LAYERED_MIN_Z_DIM:
            raise ValueError(f"the layered layout reads its background code from z₁…z₈ and "
                             f"its shift from z's last two: z_dim must be at least "
                             f"{LAYERED_MIN_Z_DIM}, got {self.z_dim}")
        size = self.image_size
        # 16 is the smallest size where every residual block sits after a BatchNorm stage.
        if size < 16 or size & (size - 1):
            raise ValueError(f"image_size must be a power of two >= 16, got {size}")
        _check_positive(self, "ngf", "ndf", "embedding_dim", "projected_dim")

    @property
    def num_stages(self) -> int:
        """Up-sampling stages of G (= down-sampling stages of D) between 4×4 and the image."""
        return self.image_size.bit_length() - 3


@dataclass(frozen=True)
class ModelConfig:
    """The text encoder, image encoder and GAN of one model; their embedding_dim agree."""

    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    gan: GANConfig = field(default_factory=GANConfig)

    def __post_init__(self) -> None:
        dims = {"text": self.text.embedding_dim, "image": self.image.embedding_dim,
                "gan": self.gan.embedding_dim}
        if len(set(dims.values())) != 1:
            raise ValueError(f"embedding_dim must agree across the configs, got {dims}")


PRESETS: dict[str, ModelConfig] = {
    "reed": ModelConfig(),
    "dcgan": ModelConfig(gan=GANConfig(ngf=64, ndf=64, residual=False)),
    "small": ModelConfig(
        text=TextEncoderConfig(channels=(64, 96), cnn_dim=96, rnn_dim=96, embedding_dim=128),
        image=ImageEncoderConfig(channels=(32, 64, 96, 128), embedding_dim=128),
        gan=GANConfig(image_size=32, ngf=32, ndf=32, embedding_dim=128),
    ),
}


def recorded(model_config: object) -> object:
    """A checkpoint's ``model_config`` with the GAN settings added since it was made filled in
    with their defaults, which are what those checkpoints' networks did (a setting is added
    with the paper's behaviour as its default: G's first layer per-cell); anything that is
    not such a dict comes back as it is, for the caller's check to refuse."""
    if isinstance(model_config, dict) and isinstance(model_config.get("gan"), dict):
        defaults = {f.name: f.default for f in fields(GANConfig)}
        return {**model_config, "gan": {**defaults, **model_config["gan"]}}
    return model_config


def checkpoint_models(state: dict) -> ModelConfig:
    """The networks a training checkpoint ``state`` holds: its preset's, with G's choices
    (G_CHOICES) as the checkpoint records them. ValueError for a preset or choice that is
    none."""
    made = recorded(state.get("model_config"))
    gan = made.get("gan") if isinstance(made, dict) else None
    if not isinstance(gan, dict):  # a checkpoint that records no networks: its preset's
        return preset(state["preset"])
    for name in G_CHOICES:  # before preset(), which reads None as its default
        check_choice(name, gan[name])
    return preset(state["preset"], **{name: gan[name] for name in G_CHOICES})


def preset(name: str, **choices: str | None) -> ModelConfig:
    """The named configuration: one of ``PRESETS`` ("reed", "dcgan", "small"); with a
    setting of G_CHOICES given (``first_layer="uniform"``, ``upsample="nearest"``, ...), the
    GAN's that one (``GANConfig`` checks it); None: the preset's."""
    unknown = sorted(set(choices) - set(G_CHOICES))
    if unknown:
        raise TypeError(f"preset() takes the settings {sorted(G_CHOICES)}, got {unknown}")
    try:
        models = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    chosen = {setting: value for setting, value in choices.items() if value is not None}
    return replace(models, gan=replace(models.gan, **chosen)) if chosen else models
