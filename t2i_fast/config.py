"""The training configuration: the one source of its defaults for the Python API and the
command line alike (the preset and its schedule resolved when it is made, the backend and
precision for the device it trains on), written as JSON into every run directory."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from t2i_fast.atomic import write_text_atomically
from t2i_fast.errors import ConfigError, T2IError
from t2i_fast.models import PRESETS
from t2i_fast.models.config import (
    G_CHOICES,
    LAYERED_MIN_Z_DIM,
    ModelConfig,
    check_choice,
    preset,
)

VARIANTS = ("gan", "cls", "int", "int-cls")
BACKENDS = ("auto", "eager", "compiled")
PRECISIONS = ("auto", "fp32", "bf16")
FUSED_LAYERS = ("auto", "on", "off")
INTERP_BATCHES = ("full", "half")
# GAN-CLS's mismatched pair: a real image of another class with the right text (Reed's code),
# the real image with another sample's text (the paper's Algorithm 1), or with the batch's
# most similar text of another class (a hard negative).
MISMATCHES = ("image", "text", "hard")


class FieldError(ConfigError):
    """A configuration field of the wrong type or out of its range; the command line shows it
    as the option of the same name. ``related`` are the other fields ``problem`` names."""

    def __init__(self, field: str, problem: str, *, related: tuple[str, ...] = ()):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem
        self.related = related


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number",
               str: "a string", type(None): "null"}


def _fits(value: object, option: object) -> bool:
    if option is float:  # an integer is a number too; NaN and infinities are none
        return type(value) in (int, float) and math.isfinite(value)
    if option is int:
        return type(value) is int  # not bool, which Python counts as an int
    return isinstance(option, type) and isinstance(value, option)


def check_types(config: object) -> None:
    """Every field of dataclass ``config`` against its annotation (int, float, str, bool, or
    one of them or None): what a hand-edited config.json, or a caller, may get wrong."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if not any(_fits(value, option) for option in options):
            wanted = " or ".join(_TYPE_NAMES.get(o, getattr(o, "__name__", str(o)))
                                 for o in options)
            raise FieldError(field.name, f"must be {wanted}, got {value!r}")


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU; a CUDA device must be there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise FieldError("device", f"{name!r} is not a device ({exc})") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FieldError("device", f"{name!r}: no CUDA device is available here (torch "
                                       f"{torch.__version__})")
        if device.index is not None and device.index >= count:
            raise FieldError("device", f"{name!r}: there are only {count} CUDA devices")
    return device


def resolve_preset(name: str, device: str) -> str:
    """``auto`` is ``reed`` when ``device`` (auto or cuda) is a GPU that is here, else the
    CPU-sized ``small``."""
    if name != "auto":
        return name
    return "reed" if torch.cuda.is_available() and device in ("auto", "cuda") else "small"


# How the text pretraining pairs images with captions: "class" is DS-SJE, the paper's (an
# image against the other classes' captions, text features averaged over the class); with
# "instance" each image is its own class, so the text features keep what tells the images of
# one class apart (the shapes dataset's classes are colour and shape, not size).
MATCHES = ("class", "instance")


@dataclass(frozen=True)
class Schedule:
    """How a preset trains when not told: GAN epochs, the epochs and matching of the DS-SJE
    text pretraining that comes first, D's learning rate as a multiple of G's, the weight
    of the auxiliary class loss in D's loss (0: none) and in G's (None: D's), how G's
    first layer spreads its inputs over the 4×4 map (``GANConfig.first_layer``), how G
    composes its image (``GANConfig.layout``), z's width and the weight of the mode-seeking
    term in G's loss."""

    epochs: int
    pretrain_epochs: int
    pretrain_match: str
    d_lr_scale: float
    class_loss: float
    g_class_loss: float | None
    g_first_layer: str
    g_layout: str
    g_z_dim: int
    mode_seeking: float


# The paper's 600 epochs, one learning rate and no class loss for its networks. The CPU-sized
# preset trains a short job instead, whose text encoder must also tell the sizes apart, and
# whose D must learn to see shapes within it: a faster D (the two time-scale update rule of
# Heusel et al., 2017) with a class loss (TAC-GAN, Dash et al., 2017), which together moved
# G's shape score from chance (0.28) to 0.62-0.73 over three seeds of the main job (README).
# Its G's first layer is uniform over the 4×4 map but for one noise dimension, and the class
# loss weighs 1 in G's loss: with the paper's per-cell weights, or with G's weight at D's 10,
# the noise drew a blob texture behind a shape it seldom moved, and a style encoder trained
# on G's images could not tell the real images' backgrounds apart (docs/results.md, "A
# uniform first layer"). 15 GAN epochs, not 10: shape gains with them (0.57 → 0.60 and
# 0.68 → 0.72 on two seeds), and the main command still takes under 10 minutes. Its G is
# layered with a z of 11 and a mode-seeking weight of 2: with the single layout, G's noise
# set the background or the shape's place, not both, and a style encoder trained on G's
# images read one of the two on real images; with these, and train-style's mirrored
# backgrounds, it reads both on the main command's three seeds (docs/results.md, "A style
# encoder that sees G's backgrounds mirrored, and the layered layout as the default").
PAPER_SCHEDULE = Schedule(epochs=600, pretrain_epochs=20, pretrain_match="class",
                          d_lr_scale=1.0, class_loss=0.0, g_class_loss=None,
                          g_first_layer="per-cell", g_layout="single", g_z_dim=100,
                          mode_seeking=1.0)
SMALL_SCHEDULE = Schedule(epochs=15, pretrain_epochs=16, pretrain_match="instance",
                          d_lr_scale=4.0, class_loss=10.0, g_class_loss=1.0,
                          g_first_layer="uniform", g_layout="layered", g_z_dim=11,
                          mode_seeking=2.0)


_SCHEDULED = tuple(field.name for field in dataclasses.fields(Schedule))


def schedule(preset: str) -> Schedule:
    return SMALL_SCHEDULE if preset == "small" else PAPER_SCHEDULE


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` is the compiled engine on a GPU and the eager reference on the CPU, where
    Inductor's compile time outweighs what it saves on short runs."""
    if name == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return name


def resolve_precision(name: str, backend: str, device: torch.device) -> str:
    """``auto`` is bfloat16 autocast for the compiled engine on a GPU, float32 otherwise."""
    if name == "auto":
        return "bf16" if backend == "compiled" and device.type == "cuda" else "fp32"
    return name


def resolve_fused_layers(name: str, backend: str, device: torch.device) -> str:
    """``auto`` is the fused conv → BatchNorm → LeakyReLU layers where measured in-graph
    timing picks them, with the compiled backend on a GPU, and off elsewhere: the Triton
    kernels need CUDA, and their choice is timed in CUDA-graph replay. ``on`` elsewhere is a
    FieldError."""
    gpu_compiled = backend == "compiled" and device.type == "cuda"
    if name == "auto":
        return "auto" if gpu_compiled else "off"
    if name == "on" and not gpu_compiled:
        raise FieldError("fused_layers", f"'on' needs the compiled backend on a CUDA device "
                                         f"(this run: the {backend} backend on {device.type})")
    return name


def fused_layers_reason(mode: str, backend: str, device: torch.device) -> str:
    """Why a run's resolved ``fused_layers`` is ``mode``, for its evidence file."""
    if mode == "auto":
        return "auto: each layer measured in CUDA-graph replay, fused where that is faster"
    if mode == "on":
        return "on: every layer the fused op takes"
    if backend == "compiled" and device.type == "cuda":
        return "off: asked for"
    return (f"off: fused layers need the compiled backend on a CUDA device (this run: the "
            f"{backend} backend on {device.type})")


# Settings added after runs were made: a run's config.json without one trained as given here
# (read as the default instead, it would resume as another training than it began).
_BEFORE_RECORDED = {"pretrain_match": "class", "mode_seeking": 0.0, "d_lr_scale": 1.0,
                    "class_loss": 0.0, "g_first_layer": "per-cell", "r1": 0.0,
                    "g_layout": "single", "g_z_dim": 100}


@dataclass(frozen=True)
class TrainConfig:
    """What a training run does; the Python API and ``t2i-fast train`` share these defaults.
    When the config is made, ``preset`` auto becomes reed on a GPU and small on the CPU
    (``resolve_preset``) and None ``epochs`` and ``pretrain_epochs`` the preset's
    (``schedule``); changing ``preset`` of a made config (``dataclasses.replace``) keeps the
    schedule it resolved. ``backend``, ``precision`` and ``fused_layers`` auto follow the
    device the run trains on (``on_device``), and its config.json records what they became."""

    data: str
    run: str
    preset: str = "auto"
    variant: str = "int-cls"
    batch_size: int = 64
    epochs: int | None = None  # None: the preset's schedule
    max_steps: int | None = None  # stop early (smoke runs, benchmarks)
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lr_halve_every: int = 100  # epochs
    captions_per_sample: int = 4  # k caption embeddings averaged per image
    interp_beta: float = 0.5
    interp_weight: float = 1.0
    ema_decay: float = 0.999  # samples come from this moving average of G's weights; 0: off
    text_encoder: str | None = None  # a pretrain-text checkpoint; None pretrains one first
    train_text_encoder: bool = False  # update it with D (from scratch without text_encoder)
    pretrain_epochs: int | None = None  # None: the preset's schedule
    pretrain_match: str | None = None  # class or instance (MATCHES); None: the preset's
    seed: int = 0
    sample_every: int = 200  # steps
    checkpoint_every: int = 500  # steps
    keep_checkpoints: int = 3
    log_every: int = 20  # steps
    device: str = "auto"
    loader_threads: int | None = None
    backend: str = "auto"  # eager, compiled, or auto (compiled on a GPU)
    precision: str = "auto"  # fp32, bf16, or auto (bf16 for compiled on a GPU)
    sync_bn: bool = False  # under torchrun: BatchNorm over the global batch, not each GPU's
    tensorboard: bool = False  # TensorBoard events too, in RUN/tensorboard/
    # auto, on, off: Triton conv → BatchNorm → LeakyReLU layers (auto: where measured faster,
    # with the compiled backend on a GPU; off elsewhere)
    fused_layers: str = "auto"
    interp_batch: str = "full"  # GAN-INT mixes the full batch, or half of it (Reed's code)
    # λ of the mode-seeking term (Mao et al., CVPR 2019) in G's loss; 0: off (the paper's
    # loss); None: the preset's. G draws half the batch's captions again with new noise and
    # is pushed to keep the two images apart: without it G learns to ignore its noise.
    mode_seeking: float | None = None
    mismatch: str = "image"  # GAN-CLS's mismatched pair: a wrong image, a wrong text, or "hard"
    d_lr_scale: float | None = None  # D's learning rate over G's (lr); None: the preset's
    # λ of the auxiliary class loss (TAC-GAN): D also names the class of each real image, G is
    # pushed to draw the class its caption's record has. 0: off; None: the preset's. Off on a
    # dataset of one class.
    class_loss: float | None = None
    # Its λ in G's loss, where it is on; None: the preset's, else class_loss's. Lower, G's
    # noise moves the shape more and shape suffers (docs/results.md, "The position groups").
    g_class_loss: float | None = None
    # G's first layer (FIRST_LAYERS): per-cell (the paper) or uniform but for z₀ over the
    # 4×4 map; None: the preset's.
    g_first_layer: str | None = None
    # How G composes its image (LAYOUTS): single (the paper), or layered, the caption's
    # foreground moved by the noise over a background drawn from the noise
    # (t2i_fast.models.layered); None: the preset's.
    g_layout: str | None = None
    # z's width (the paper's 100); None: the preset's.
    g_z_dim: int | None = None
    # How G doubles the resolution (UPSAMPLES): transposed convolutions (the paper), or a
    # nearest or bilinear resize then a 3×3 convolution (docs/results.md, "G's upsampling
    # as an option").
    g_upsample: str = "transposed"
    # CoordConv's coordinate channels (COORDINATES): none (the paper), in G's doubling layers
    # (generator), or there and in D's first convolution (both) (docs/results.md,
    # "CoordConv in G and D").
    g_coordinates: str = "none"
    # γ of the R1 penalty (Mescheder et al., 2018) in D's loss: γ/2 times the squared norm of
    # the gradient of D's score of each real image with its caption, taken lazily (every
    # r1_every-th step, times r1_every, as StyleGAN2 does). 0: off (the paper's loss).
    r1: float = 0.0
    r1_every: int = 4

    def __post_init__(self) -> None:
        check_types(self)
        self._resolve()
        for name, choices in (("variant", VARIANTS), ("preset", tuple(sorted(PRESETS))),
                              ("backend", BACKENDS), ("precision", PRECISIONS),
                              ("fused_layers", FUSED_LAYERS),
                              ("interp_batch", INTERP_BATCHES),
                              ("pretrain_match", MATCHES), ("mismatch", MISMATCHES)):
            if getattr(self, name) not in choices:
                raise FieldError(name, f"must be one of {choices}, got {getattr(self, name)!r}")
        for name in G_CHOICES:
            try:
                check_choice(name, getattr(self, f"g_{name}"))
            except ValueError as exc:
                raise FieldError(f"g_{name}", str(exc).removeprefix(f"{name} ")) from None
        if self.g_layout == "layered" and self.g_z_dim < LAYERED_MIN_Z_DIM:
            raise FieldError("g_z_dim", f"must be at least {LAYERED_MIN_Z_DIM} with g_layout "
                             f"layered (its background code is z₁…z₈, its shift z's last "
                             f"two), got {self.g_z_dim}", related=("g_layout",))
        if self.lr <= 0:
            raise FieldError("lr", f"must be positive, got {self.lr}")
        for name in ("beta1", "beta2", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise FieldError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.interp_beta <= 1:
            raise FieldError("interp_beta", f"must be in [0, 1], got {self.interp_beta}")
        if self.d_lr_scale <= 0:
            raise FieldError("d_lr_scale", f"must be positive, got {self.d_lr_scale}")
        for name in ("interp_weight", "mode_seeking", "class_loss", "g_class_loss", "r1"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be at least 0, got {getattr(self, name)}")
        if self.seed < 0:
            raise FieldError("seed", f"must be at least 0, got {self.seed}")
        for name in ("batch_size", "epochs", "max_steps", "lr_halve_every",
                     "captions_per_sample", "pretrain_epochs", "sample_every",
                     "checkpoint_every", "keep_checkpoints", "log_every", "loader_threads",
                     "r1_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FieldError(name, f"must be at least 1, got {value}")

    def _resolve(self) -> None:
        def resolve(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # the dataclass is frozen once made

        resolve("preset", resolve_preset(self.preset, self.device))
        if self.preset in PRESETS:  # else the check of choices names it
            for name in _SCHEDULED:
                if getattr(self, name) is None:
                    resolve(name, getattr(schedule(self.preset), name))
            if self.g_class_loss is None:
                resolve("g_class_loss", self.class_loss)

    def on_device(self, device: torch.device) -> TrainConfig:
        """This config with ``backend``, ``precision`` and ``fused_layers`` auto resolved for
        ``device``; FieldError for fused layers ``on`` where they cannot run."""
        backend = resolve_backend(self.backend, device)
        return dataclasses.replace(
            self, backend=backend, precision=resolve_precision(self.precision, backend, device),
            fused_layers=resolve_fused_layers(self.fused_layers, backend, device))

    def models(self) -> ModelConfig:
        """The networks this run trains: its preset's, with its choices of G."""
        return preset(self.preset, **{name: getattr(self, f"g_{name}") for name in G_CHOICES})

    @property
    def matching_aware(self) -> bool:
        return self.variant in ("cls", "int-cls")

    @property
    def interpolate(self) -> bool:
        return self.variant in ("int", "int-cls")

    @property
    def joint_text_encoder(self) -> bool:
        return self.train_text_encoder or self.text_encoder is None

    def save(self, path: Path) -> None:
        """Whole or not at all: a kill leaves the previous config.json, never part of one."""
        write_text_atomically(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """A run's config.json, each field checked against its type and range."""
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise T2IError(f"{path}: cannot read the run's configuration: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: not a run's configuration (a JSON object of settings)")
        fields = dataclasses.fields(cls)
        unknown = sorted(set(values) - {f.name for f in fields})
        if unknown:
            raise ConfigError(f"{path}: unknown settings {unknown} (made by another version?)")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING
                   and f.name not in values]
        if missing:
            raise ConfigError(f"{path}: settings {missing} missing")
        for name in _SCHEDULED:
            # None is "the preset's" only when a config is made; a run records the value.
            if name in values and values[name] is None:
                raise ConfigError(f"{path}: {name} must be set, got None: a run records "
                                  "the value it trained with")
        try:
            # Without g_class_loss (made before it was its own setting) G's weight is the
            # class loss's, as those runs trained.
            values = {**_BEFORE_RECORDED, **values}
            values.setdefault("g_class_loss", values["class_loss"])
            return cls(**values)
        except FieldError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
