"""``t2i-fast train`` and ``t2i-fast pretrain-text``: each option is a field of TrainConfig
(PretrainConfig), its default the field's, and the config resolves the rest."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import click
from click.core import ParameterSource

from t2i_fast.cli.data import BUILT_IN, ensure_built_in
from t2i_fast.config import (
    BACKENDS,
    FUSED_LAYERS,
    INTERP_BATCHES,
    MATCHES,
    MISMATCHES,
    PAPER_SCHEDULE,
    PRECISIONS,
    SMALL_SCHEDULE,
    resolve_preset,
)
from t2i_fast.errors import T2IError
from t2i_fast.models import PRESETS
from t2i_fast.models.config import (
    COORDINATES,
    FIRST_LAYERS,
    LAYERED_MIN_Z_DIM,
    LAYOUTS,
    UPSAMPLES,
    Z_DIMS,
)
from t2i_fast.run import Run, TextEncoderFolder
from t2i_fast.train import VARIANTS, TrainConfig, train
from t2i_fast.train.distributed import World, process_group
from t2i_fast.train.pretrain_text import PretrainConfig, pretrain_text
from t2i_fast.train.signals import TrainingStopped

_RESUMABLE = {"resume", "epochs", "max_steps", "tensorboard"}


def _defaults(config: type) -> dict[str, object]:
    return {field.name: field.default for field in dataclasses.fields(config)}


_TRAIN = _defaults(TrainConfig)
_PRETRAIN = _defaults(PretrainConfig)


_DATA = click.option("--data", type=click.Path(path_type=Path), default=BUILT_IN,
                     help="Dataset; the built-in shapes dataset is made here if absent.")


def _preset(default: str, help: str):
    return click.option("--preset", type=click.Choice(["auto", *sorted(PRESETS)]),
                        default=default, help=help)


def _next_run(root: Path, variant: str, preset: str) -> Path:
    taken = [int(p.name[:5]) for p in root.glob("[0-9][0-9][0-9][0-9][0-9]-*")] if root.exists() \
        else []
    return root / f"{max(taken, default=-1) + 1:05d}-{variant}-{preset}"


@contextlib.contextmanager
def _stopped(ctx: click.Context, run: Path, world: World) -> Iterator[None]:
    """A run stopped by a signal: one line saying how to continue it, and the status of a
    process ended by that signal (a job scheduler's requeue logic reads it)."""
    try:
        yield
    except TrainingStopped as stopped:
        if world.main:
            click.echo(f"{run}: {stopped}; continue with: t2i-fast train --resume {run}",
                       err=True)
        ctx.exit(stopped.exit_code)


@click.command(name="train")
@_DATA
@click.option("--run", type=click.Path(path_type=Path), default=None,
              help="Run folder to create  [default: runs/NNNNN-VARIANT-PRESET]")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue this run from where it stopped: exactly from its last "
                   "checkpoint, or the unfinished stage again (text pretraining, GAN "
                   "training before its first checkpoint).")
@_preset(_TRAIN["preset"], "Model sizes: auto is reed on a GPU, small on the CPU.")
@click.option("--variant", type=click.Choice(VARIANTS), default=_TRAIN["variant"])
@click.option("--batch-size", type=click.IntRange(min=2), default=_TRAIN["batch_size"],
              help="The global batch: under torchrun each process takes its share.")
@click.option("--epochs", type=click.IntRange(min=1), default=_TRAIN["epochs"],
              help=f"[default: {PAPER_SCHEDULE.epochs} (the paper); "
                   f"{SMALL_SCHEDULE.epochs} with the small preset]")
@click.option("--max-steps", type=click.IntRange(min=1), default=_TRAIN["max_steps"],
              help="Stop after this many steps, or at the end of --epochs if that comes "
                   "first (training says so when it does).")
@click.option("--lr", type=float, default=_TRAIN["lr"])
@click.option("--beta1", type=float, default=_TRAIN["beta1"])
@click.option("--lr-halve-every", type=click.IntRange(min=1), default=_TRAIN["lr_halve_every"],
              help="Epochs.")
@click.option("--captions-per-sample", type=click.IntRange(1, 255),
              default=_TRAIN["captions_per_sample"], help="Caption embeddings averaged per image.")
@click.option("--interp-beta", type=float, default=_TRAIN["interp_beta"], help="GAN-INT's β.")
@click.option("--interp-weight", type=float, default=_TRAIN["interp_weight"],
              help="GAN-INT's loss weight.")
@click.option("--mismatch", type=click.Choice(MISMATCHES), default=_TRAIN["mismatch"],
              help="GAN-CLS's mismatched pair: a real image of another class with the right "
                   "text (image, Reed's code), the real image with another sample's text "
                   "(text, the paper's Algorithm 1) or with the batch's most similar text of "
                   "another class (hard).")
@click.option("--mode-seeking", type=float, default=_TRAIN["mode_seeking"],
              help="Weight of the mode-seeking term (Mao et al., CVPR 2019) in G's loss: half "
                   "the batch's captions drawn again with new noise, their images pushed apart "
                   f"(0: off)  [default: {PAPER_SCHEDULE.mode_seeking:g}; "
                   f"{SMALL_SCHEDULE.mode_seeking:g} with the small preset]")
@click.option("--d-lr-scale", type=float, default=_TRAIN["d_lr_scale"],
              help=f"D's learning rate as a multiple of --lr (G's)  [default: "
                   f"{PAPER_SCHEDULE.d_lr_scale:g} (the paper); {SMALL_SCHEDULE.d_lr_scale:g} "
                   f"with the small preset]")
@click.option("--class-loss", type=float, default=_TRAIN["class_loss"],
              help=f"Weight of the auxiliary class loss (TAC-GAN): D names each real image's "
                   f"class, G is pushed to draw its caption's; off on a dataset of one class  "
                   f"[default: {PAPER_SCHEDULE.class_loss:g} (off, the paper); "
                   f"{SMALL_SCHEDULE.class_loss:g} with the small preset]")
@click.option("--g-class-loss", type=float, default=_TRAIN["g_class_loss"],
              help=f"The class loss's weight in G's loss, where --class-loss weighs D's; "
                   f"lower lets the noise move the shape more, at a cost in shape  [default: "
                   f"--class-loss; {SMALL_SCHEDULE.g_class_loss:g} with the small preset]")
@click.option("--g-first-layer", type=click.Choice(FIRST_LAYERS),
              default=_TRAIN["g_first_layer"],
              help=f"G's first layer: per-cell weights for every input over the 4×4 map (the "
                   f"paper), or the same weights at every cell for all but z's first "
                   f"dimension (uniform), with which the noise moves the shape more  "
                   f"[default: {PAPER_SCHEDULE.g_first_layer} (the paper); "
                   f"{SMALL_SCHEDULE.g_first_layer} with the small preset]")
@click.option("--g-upsample", type=click.Choice(UPSAMPLES), default=_TRAIN["g_upsample"],
              help="How G doubles the resolution: a stride-2 transposed convolution (the "
                   "paper), or a nearest or bilinear resize then a 3×3 convolution, with "
                   "which the noise moved the shape's place on some runs "
                   "(docs/results.md).")
@click.option("--coord-conv", "g_coordinates", type=click.Choice(COORDINATES),
              default=_TRAIN["g_coordinates"],
              help="CoordConv (Liu et al., 2018): x and y as two more input channels of G's "
                   "doubling layers (generator), and of D's first convolution too (both); "
                   "with both and --g-upsample nearest the noise moved the shape's place "
                   "past the style study's position target, at a cost in its background "
                   "half (docs/results.md).")
@click.option("--g-layout", type=click.Choice(LAYOUTS), default=_TRAIN["g_layout"],
              help=f"How G composes its image: its last layer makes it (single, the paper), or "
                   f"makes a foreground and a mask from the caption alone, which z's last two "
                   f"dimensions move over a background drawn from z's background code alone "
                   f"(layered, LR-GAN), with which a style encoder reads both position and "
                   f"background back (docs/results.md)  [default: {PAPER_SCHEDULE.g_layout} "
                   f"(the paper); {SMALL_SCHEDULE.g_layout} with the small preset]")
@click.option("--g-z-dim", type=click.IntRange(Z_DIMS.start, Z_DIMS.stop - 1),
              default=_TRAIN["g_z_dim"],
              help=f"The noise's width; the layered layout needs at least "
                   f"{LAYERED_MIN_Z_DIM}  [default: {PAPER_SCHEDULE.g_z_dim} (the paper); "
                   f"{SMALL_SCHEDULE.g_z_dim} with the small preset]")
@click.option("--r1", type=click.FloatRange(min=0), default=_TRAIN["r1"],
              help="γ of the R1 penalty (Mescheder et al., 2018) on D's gradient at the real "
                   "images, which raised the background half of the style study on every run "
                   "it was tried on (docs/results.md; 0: off, the paper's loss).")
@click.option("--r1-every", type=click.IntRange(min=1), default=_TRAIN["r1_every"],
              help="Take the R1 penalty every this many steps, weighted by it (lazy, as "
                   "StyleGAN2).")
@click.option("--ema-decay", type=float, default=_TRAIN["ema_decay"],
              help="Samples come from a moving average of G's weights with this decay "
                   "(0: from G itself).")
@click.option("--text-encoder", type=click.Path(exists=True, dir_okay=False),
              default=_TRAIN["text_encoder"],
              help="A 'pretrain-text' checkpoint, frozen unless --train-text-encoder; "
                   "without one, DS-SJE pretraining runs first into RUN/text.")
@click.option("--pretrain-epochs", type=click.IntRange(min=1), default=_TRAIN["pretrain_epochs"],
              help=f"Epochs of that pretraining  [default: {PAPER_SCHEDULE.pretrain_epochs}; "
                   f"{SMALL_SCHEDULE.pretrain_epochs} with the small preset]")
@click.option("--pretrain-match", type=click.Choice(MATCHES), default=_TRAIN["pretrain_match"],
              help=f"How that pretraining pairs images with captions: class (DS-SJE) or "
                   f"instance (each image its own class)  [default: "
                   f"{PAPER_SCHEDULE.pretrain_match}; {SMALL_SCHEDULE.pretrain_match} with the "
                   f"small preset]")
@click.option("--train-text-encoder", is_flag=True,
              help="Update the text encoder with D (from scratch without --text-encoder).")
@click.option("--seed", type=click.IntRange(min=0), default=_TRAIN["seed"])
@click.option("--sample-every", type=click.IntRange(min=1), default=_TRAIN["sample_every"],
              help="Steps.")
@click.option("--checkpoint-every", type=click.IntRange(min=1),
              default=_TRAIN["checkpoint_every"], help="Steps.")
@click.option("--keep-checkpoints", type=click.IntRange(min=1),
              default=_TRAIN["keep_checkpoints"])
@click.option("--log-every", type=click.IntRange(min=1), default=_TRAIN["log_every"],
              help="Steps.")
@click.option("--device", default=_TRAIN["device"], help="auto, cpu, cuda, cuda:1, ...")
@click.option("--loader-threads", type=click.IntRange(min=1), default=_TRAIN["loader_threads"])
@click.option("--backend", type=click.Choice(BACKENDS), default=_TRAIN["backend"],
              help="compiled: torch.compile, CUDA graphs, fused kernels; auto is compiled on "
                   "a GPU and eager on the CPU.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=_TRAIN["precision"],
              help="bf16: bfloat16 autocast (losses in float32); auto is bf16 for the compiled "
                   "backend on a GPU, fp32 otherwise.")
@click.option("--fused-layers", type=click.Choice(FUSED_LAYERS), default=_TRAIN["fused_layers"],
              help="Triton conv → BatchNorm → LeakyReLU layers: auto fuses those measured "
                   "faster inside the captured step (compiled backend on a GPU; off "
                   "elsewhere), on every layer the op takes (compiled backend on a GPU only), "
                   "off none. The choice and its timings go to RUN/fused_layers.json.")
@click.option("--interp-batch", type=click.Choice(INTERP_BATCHES),
              default=_TRAIN["interp_batch"],
              help="GAN-INT's interpolated batch: the full batch, or half of it as Reed's "
                   "code does.")
@click.option("--sync-bn", is_flag=True,
              help="Under torchrun: BatchNorm statistics over the global batch "
                   "(SyncBatchNorm) rather than over each GPU's share (the default, per-GPU "
                   "BatchNorm). See docs/distributed.md.")
@click.option("--tensorboard", is_flag=True,
              help="Write the metrics and sample grids as TensorBoard events too, in "
                   "RUN/tensorboard/ (with the run's own text pretraining's in "
                   "RUN/text/tensorboard/): view with 'tensorboard --logdir runs/'. Needs "
                   "pip install 't2i-fast[tensorboard]'. May be turned on with --resume.")
@click.pass_context
def train_command(ctx: click.Context, **options) -> None:
    """Train a text-to-image GAN (GAN, GAN-CLS, GAN-INT or GAN-INT-CLS); under torchrun, on
    every process with DistributedDataParallel (docs/distributed.md)."""
    resume = options.pop("resume")
    if resume is not None:
        given = {name for name in options
                 if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
        if given - _RESUMABLE:
            raise T2IError(f"--resume takes its settings from {Run(resume).config_file}; only "
                           "--epochs and --max-steps may change, and --tensorboard be added "
                           f"({sorted(given - _RESUMABLE)} given)")
        config = Run(resume).config()
        # The folder given is the run, wherever it was made from.
        changes = {k: options[k] for k in given}  # of _RESUMABLE, as checked
        config = dataclasses.replace(config, run=str(resume), **changes)
        with process_group(config.device) as world, _stopped(ctx, Path(resume), world):
            run = train(config=config, resume=True, world=world)
        if world.main:
            click.echo(f"{run}: resumed and finished")
        return
    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    with process_group(options["device"]) as world:
        if options["run"] is None:  # rank 0 chooses it for all
            preset = resolve_preset(options["preset"], options["device"])
            options["run"] = str(world.main_first(
                lambda: _next_run(Path("runs"), options["variant"], preset)))
        config = TrainConfig(**options)
        world.main_first(lambda: ensure_built_in(config.data))
        with _stopped(ctx, Path(config.run), world):
            run = train(config=config, world=world)
    if world.main:
        folder = Run(run)
        click.echo(f"{run}: done; samples in {folder.samples_dir}, metrics in "
                   f"{folder.metrics_file}")


@click.command(name="pretrain-text")
@_DATA
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder to create: text_encoder.pt, metrics, evaluation.")
@_preset(_PRETRAIN["preset"], "Encoder sizes (must match the GAN's preset later).")
@click.option("--epochs", type=click.IntRange(min=1), default=_PRETRAIN["epochs"])
@click.option("--batch-size", type=click.IntRange(min=2), default=_PRETRAIN["batch_size"])
@click.option("--lr", type=float, default=_PRETRAIN["lr"])
@click.option("--holdout-share", type=float, default=_PRETRAIN["holdout_share"],
              help="Share of classes held out for zero-shot evaluation (without --eval-data).")
@click.option("--match", type=click.Choice(MATCHES), default=_PRETRAIN["match"],
              help="class: DS-SJE (the paper), each image against the other classes' "
                   "captions; instance: against the other images' captions.")
@click.option("--eval-data", type=click.Path(path_type=Path), default=_PRETRAIN["eval_data"],
              help="Evaluate on this class-disjoint dataset (e.g. CUB's test split) instead.")
@click.option("--image-backbone", default=_PRETRAIN["image_backbone"],
              help="A torchvision network (resnet50, googlenet, ...) as the image encoder, "
                   "with --backbone-weights; needs torchvision.  [default: a small CNN "
                   "trained from scratch]")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False),
              default=_PRETRAIN["backbone_weights"],
              help="A local state-dict file for --image-backbone (nothing is downloaded).")
@click.option("--seed", type=click.IntRange(min=0), default=_PRETRAIN["seed"])
@click.option("--device", default=_PRETRAIN["device"])
@click.option("--tensorboard", is_flag=True,
              help="Write each epoch's metrics as TensorBoard events too, in OUT/tensorboard/. "
                   "Needs pip install 't2i-fast[tensorboard]'.")
def pretrain_text_command(**options) -> None:
    """Pretrain the char-CNN-RNN text encoder with DS-SJE; report zero-shot accuracy."""
    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    config = PretrainConfig(**options)
    ensure_built_in(config.data)
    checkpoint = pretrain_text(config=config)
    evaluation = TextEncoderFolder(checkpoint.parent).read_evaluation()
    for key, value in evaluation.items():
        click.echo(f"{key:<16}{value:.3f}" if isinstance(value, float) else f"{key:<16}{value}")
    click.echo(f"{checkpoint}: pass it to 't2i-fast train --text-encoder'")
