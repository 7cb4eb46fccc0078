"""``t2i-fast train``: builds a TrainConfig from the options and runs it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from t2i_fast.cli.data import BUILT_IN, ensure_built_in
from t2i_fast.config import (
    BACKENDS,
    PRECISIONS,
    resolve_backend,
    resolve_device,
    resolve_precision,
)
from t2i_fast.errors import T2IError
from t2i_fast.models import PRESETS
from t2i_fast.run import Run, TextEncoderFolder
from t2i_fast.train import VARIANTS, TrainConfig, train
from t2i_fast.train.distributed import World, process_group
from t2i_fast.train.pretrain_text import PretrainConfig, pretrain_text
from t2i_fast.train.signals import TrainingStopped

CPU_EPOCHS = 10  # the small preset on 2 cores: about six minutes on the built-in dataset
_RESUMABLE = {"resume", "epochs", "max_steps"}


_DATA = click.option("--data", type=click.Path(path_type=Path), default=BUILT_IN,
                     help="Dataset; the built-in shapes dataset is made here if absent.")


def _preset(help: str):
    return click.option("--preset", type=click.Choice(["auto", *sorted(PRESETS)]),
                        default="auto", help=help)


def _auto_preset(name: str, device: str) -> str:
    if name != "auto":
        return name
    return "reed" if torch.cuda.is_available() and device in ("auto", "cuda") else "small"


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
@_preset("Model sizes: auto is reed on a GPU, small on the CPU.")
@click.option("--variant", type=click.Choice(VARIANTS), default="int-cls")
@click.option("--batch-size", type=click.IntRange(min=2), default=64,
              help="The global batch: under torchrun each process takes its share.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help=f"[default: 600 (the paper); {CPU_EPOCHS} with the small preset]")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many steps, or at the end of --epochs if that comes "
                   "first (training says so when it does).")
@click.option("--lr", type=float, default=2e-4)
@click.option("--beta1", type=float, default=0.5)
@click.option("--lr-halve-every", type=click.IntRange(min=1), default=100, help="Epochs.")
@click.option("--captions-per-sample", type=click.IntRange(1, 255), default=4,
              help="Caption embeddings averaged per image.")
@click.option("--interp-beta", type=float, default=0.5, help="GAN-INT's β.")
@click.option("--interp-weight", type=float, default=1.0, help="GAN-INT's loss weight.")
@click.option("--ema-decay", type=float, default=0.999,
              help="Samples come from a moving average of G's weights with this decay "
                   "(0: from G itself).")
@click.option("--text-encoder", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A 'pretrain-text' checkpoint, frozen unless --train-text-encoder; "
                   "without one, DS-SJE pretraining runs first into RUN/text.")
@click.option("--pretrain-epochs", type=click.IntRange(min=1), default=None,
              help="Epochs of that pretraining  [default: 20; 8 with the small preset]")
@click.option("--train-text-encoder", is_flag=True,
              help="Update the text encoder with D (from scratch without --text-encoder).")
@click.option("--seed", type=click.IntRange(min=0), default=0)
@click.option("--sample-every", type=click.IntRange(min=1), default=200, help="Steps.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, help="Steps.")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=3)
@click.option("--log-every", type=click.IntRange(min=1), default=20, help="Steps.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
@click.option("--loader-threads", type=click.IntRange(min=1), default=None)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="compiled: torch.compile, CUDA graphs, fused kernels; auto is compiled on "
                   "a GPU and eager on the CPU.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="bf16: bfloat16 autocast (losses in float32); auto is bf16 for the compiled "
                   "backend on a GPU, fp32 otherwise.")
@click.option("--sync-bn", is_flag=True,
              help="Under torchrun: BatchNorm statistics over the global batch "
                   "(SyncBatchNorm) rather than over each GPU's share (the default, per-GPU "
                   "BatchNorm). See docs/distributed.md.")
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
                           f"--epochs and --max-steps may change ({sorted(given - _RESUMABLE)} "
                           "given)")
        config = Run(resume).config()
        # The folder given is the run, wherever it was made from.
        changes = {k: options[k] for k in ("epochs", "max_steps") if k in given}
        config = dataclasses.replace(config, run=str(resume), **changes)
        with process_group(config.device) as world, _stopped(ctx, Path(resume), world):
            run = train(config=config, resume=True, world=world)
        if world.main:
            click.echo(f"{run}: resumed and finished")
        return
    options["preset"] = _auto_preset(options["preset"], options["device"])
    device = resolve_device(options["device"])
    # config.json records what ran, not "auto".
    options["backend"] = resolve_backend(options["backend"], device)
    options["precision"] = resolve_precision(options["precision"], options["backend"], device)
    small = options["preset"] == "small"
    if options["epochs"] is None:
        options["epochs"] = CPU_EPOCHS if small else 600
    if options["pretrain_epochs"] is None:
        options["pretrain_epochs"] = 8 if small else 20
    with process_group(options["device"]) as world:
        if options["run"] is None:  # rank 0 chooses it for all
            options["run"] = world.main_first(
                lambda: _next_run(Path("runs"), options["variant"], options["preset"]))
        world.main_first(lambda: ensure_built_in(options["data"]))
        options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
        with _stopped(ctx, Path(options["run"]), world):
            run = train(config=TrainConfig(**options), world=world)
    if world.main:
        folder = Run(run)
        click.echo(f"{run}: done; samples in {folder.samples_dir}, metrics in "
                   f"{folder.metrics_file}")


@click.command(name="pretrain-text")
@_DATA
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder to create: text_encoder.pt, metrics, evaluation.")
@_preset("Encoder sizes (must match the GAN's preset later).")
@click.option("--epochs", type=click.IntRange(min=1), default=10)
@click.option("--batch-size", type=click.IntRange(min=2), default=64)
@click.option("--lr", type=float, default=1e-3)
@click.option("--holdout", type=float, default=0.25,
              help="Share of classes held out for zero-shot evaluation (without --eval-data).")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="Evaluate on this class-disjoint dataset (e.g. CUB's test split) instead.")
@click.option("--image-backbone", default=None,
              help="A torchvision network (resnet50, googlenet, ...) as the image encoder, "
                   "with --backbone-weights; needs torchvision.  [default: a small CNN "
                   "trained from scratch]")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A local state-dict file for --image-backbone (nothing is downloaded).")
@click.option("--seed", type=click.IntRange(min=0), default=0)
@click.option("--device", default="auto")
def pretrain_text_command(**options) -> None:
    """Pretrain the char-CNN-RNN text encoder with DS-SJE; report zero-shot accuracy."""
    options["preset"] = _auto_preset(options["preset"], options["device"])
    ensure_built_in(options["data"])
    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    checkpoint = pretrain_text(config=PretrainConfig(**options))
    evaluation = TextEncoderFolder(checkpoint.parent).read_evaluation()
    for key, value in evaluation.items():
        click.echo(f"{key:<16}{value:.3f}" if isinstance(value, float) else f"{key:<16}{value}")
    click.echo(f"{checkpoint}: pass it to 't2i-fast train --text-encoder'")
