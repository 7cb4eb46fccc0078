"""The training loop: one discriminator and one generator update per batch (Reed et al.,
ICML 2016, Algorithm 1), with the GAN-CLS and GAN-INT terms by variant. Under torchrun every
process runs it on its share of each batch (``distributed``); rank 0 alone writes."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import click
import torch

from t2i_fast.atomic import raise_if_disk_full, write_text_atomically
from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.config import (
    TrainConfig,
    fused_layers_reason,
    resolve_backend,
    resolve_fused_layers,
    resolve_precision,
)
from t2i_fast.data import Dataset, Loader
from t2i_fast.data.alphabet import encode
from t2i_fast.errors import T2IError
from t2i_fast.models import Discriminator, Generator, TextEncoder
from t2i_fast.models.batchnorm_stats import recompute_batchnorm_stats
from t2i_fast.models.config import recorded
from t2i_fast.pictures import image_grid, line_plot
from t2i_fast.run import Run
from t2i_fast.train.caption_table import embed_all_captions, mean_embedding
from t2i_fast.train.distributed import (
    World,
    letting_go,
    process_group,
    single,
    sync_batchnorm,
)
from t2i_fast.train.engine import MetricsReader, StepEngine
from t2i_fast.train.pretrain_text import PretrainConfig, pretrain_text
from t2i_fast.train.signals import StopSignals, TrainingStopped, stop_signals
from t2i_fast.train.tensorboard import EventLog, require_tensorboard

SAMPLE_ROWS, SAMPLE_COLUMNS = 6, 8
# Batches of training-like inputs over which G's average gets its own BatchNorm statistics
# before it samples or is saved (t2i_fast/models/batchnorm_stats.py says why).
CALIBRATION_BATCHES = 8


class Trainer:
    def __init__(self, config: TrainConfig, *, world: World | None = None):
        self.config = config
        self.world = world if world is not None else single(config.device)
        self.run = Run(config.run)
        self.device = self.world.device
        self.models = config.models()
        gan = self.models.gan
        # The epoch's order sharded by rank: rank r's batch b holds samples r, r + w, ... of
        # the global batch b, so the loader's position means the same on any number of ranks.
        # A frozen encoder's embeddings are computed once (caption_table): the loader then
        # gives each sample's caption ids, not its characters.
        self.loader = Loader(config.data, batch_size=self.world.split_batch(config.batch_size),
                             seed=config.seed, captions_per_sample=config.captions_per_sample,
                             caption_format="onehot" if config.joint_text_encoder else "ids",
                             dtype=torch.float32, layout="nhwc",
                             rank=self.world.rank, world_size=self.world.size,
                             num_threads=config.loader_threads,
                             device=self.device if self.device.type == "cuda" else None)
        torch.manual_seed(config.seed)
        self.G = Generator(gan).to(self.device)
        num_classes = len(self.loader.meta["classes"]) if config.class_loss else 0
        self.D = Discriminator(gan, num_classes=num_classes).to(self.device)
        # Sampling from an average of G's recent weights smooths out the step-to-step swings
        # of GAN training; the updates themselves are the paper's.
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False) \
            if config.ema_decay else None
        if config.sync_bn and self.world.size > 1:
            self.G = sync_batchnorm(self.G, self.world)
            self.D = sync_batchnorm(self.D, self.world)
        self.text_encoder = TextEncoder(self.models.text).to(self.device)
        if config.text_encoder is not None:
            self._load_text_encoder(Path(config.text_encoder))
        self.text_encoder.requires_grad_(config.joint_text_encoder)
        self.caption_table = None if config.joint_text_encoder else self._caption_table()
        self.noise = torch.Generator(device="cpu").manual_seed(config.seed + 1)
        backend = resolve_backend(config.backend, self.device)
        fused_layers = resolve_fused_layers(config.fused_layers, backend, self.device)
        self.engine = StepEngine(
            G=self.G, D=self.D, text_encoder=self.text_encoder, G_ema=self.G_ema,
            config=config, device=self.device, noise=self.noise, backend=backend,
            precision=resolve_precision(config.precision, backend, self.device),
            world=self.world, fused_layers=fused_layers, interp_batch=config.interp_batch,
            caption_table=self.caption_table)
        self.fusion_evidence = {"reason": fused_layers_reason(fused_layers, backend, self.device),
                                **self.engine.kernel_evidence}
        self.opt_d, self.opt_g = self.engine.opt_d, self.engine.opt_g
        self.step = 0
        self.history: list[dict] = []
        self._fixed = self._sample_inputs() if self.world.main else None
        self._calibration = self._calibration_inputs() \
            if self.world.main and self.G_ema is not None else None
        self._calibrated_at: int | None = None  # the step G_ema's statistics were made at

    # -- state ------------------------------------------------------------------------------
    def _caption_table(self) -> torch.Tensor:
        """Every caption's embedding by the frozen encoder, [n_captions, E] on the device:
        derived from the dataset and the encoder, so never saved, made again on resume. Each
        process makes its own (no collective: on a GPU it takes seconds, less than sending
        it)."""
        table = embed_all_captions(dataset_path=self.config.data, text_encoder=self.text_encoder,
                                   device=self.device,
                                   show_progress=None if self.world.main else False)
        if len(table) != self.loader.num_captions:
            raise T2IError(f"{self.config.data}: {len(table)} captions embedded but the loader "
                           f"numbers {self.loader.num_captions}")
        return table

    def _embed(self, captions: torch.Tensor) -> torch.Tensor:
        """φ(t) [B, E] of caption ids [B, k] (with the caption table) or characters [B, k, L],
        by the text encoder in eval mode, outside training."""
        if self.caption_table is not None:
            return mean_embedding(self.caption_table, captions.to(self.device))
        was_training = self.text_encoder.training
        self.text_encoder.eval()
        try:
            return self.text_encoder.encode_mean(captions.to(self.device))
        finally:
            self.text_encoder.train(was_training)

    def _load_text_encoder(self, path: Path) -> None:
        state = load_checkpoint(path)
        if state.get("text_config") != dataclasses.asdict(self.models.text):
            raise T2IError(f"{path}: text encoder of another architecture than preset "
                           f"{self.config.preset!r}")
        self.text_encoder.load_state_dict(state["text_encoder"])

    def state(self) -> dict:
        """What a checkpoint keeps, taken on rank 0: every rank has the same weights,
        optimizer states and random states (all draw the global batch's noise); only per-GPU
        BatchNorm statistics differ between ranks, and rank 0's are kept."""
        return {
            "step": self.step, "loader": self.loader.state_dict(),
            "model_config": dataclasses.asdict(self.models), "preset": self.config.preset,
            "G": self.G.state_dict(), "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict() if self.G_ema is not None else None,
            "text_encoder": self.text_encoder.state_dict(),
            "text_config": dataclasses.asdict(self.models.text),
            "doc_length": self.loader.meta["doc_length"],  # what sampling encodes captions at
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "noise": self.noise.get_state(), "torch_rng": torch.get_rng_state(),
            # The compiled engine draws its noise there on a GPU.
            "cuda_rng": torch.cuda.get_rng_state(self.device)
            if self.device.type == "cuda" else None,
        }

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        if recorded(state.get("model_config")) != dataclasses.asdict(self.models):
            raise T2IError(f"{path}: checkpoint of another architecture (preset "
                           f"{state.get('preset')!r}) than this run's {self.config.preset!r}")
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        if self.G_ema is not None:
            self.G_ema.load_state_dict(state["G_ema"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.engine.after_load()
        self.noise.set_state(state["noise"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.loader.load_state_dict(state["loader"])
        self.step = state["step"]

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """One D and one G update (and G's average): metrics as 0-d device tensors."""
        return self.engine.step(batch, step=self.step)

    def _set_lr(self, epoch: int) -> float:
        lr = self.config.lr * 0.5 ** (epoch // self.config.lr_halve_every)
        self.engine.set_lr(lr)
        return lr

    # -- pictures ---------------------------------------------------------------------------
    def _sample_inputs(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Fixed captions, each its record's first (the first record of each of the first
        classes; the first records in a dataset without classes), as caption ids [rows, 1]
        with the caption table, else characters [rows, 1, L]; and fixed noise [cols, Z]."""
        with Dataset(self.config.data) as ds:
            one_class = len(ds.classes) == 1
            firsts: dict[int, tuple[int, int]] = {}  # row key → (record, its first caption id)
            first_id = 0
            for i in range(len(ds)):
                record = ds.record(i)
                firsts.setdefault(i if one_class else record.class_id, (i, first_id))
                first_id += len(record.char_indices)
                if len(firsts) == SAMPLE_ROWS:
                    break
            chosen = list(firsts.values())
            captions = [ds[i].captions[0] for i, _ in chosen]
            doc_length = ds.meta["doc_length"]
        ids = [first for _, first in chosen]
        while len(captions) < SAMPLE_ROWS:
            captions.append(captions[len(captions) % len(chosen)])
            ids.append(ids[len(ids) % len(chosen)])
        if self.caption_table is not None:
            inputs = torch.tensor(ids)[:, None]
        else:
            inputs = torch.stack([torch.from_numpy(encode(c, doc_length)) for c in captions])
            inputs = inputs[:, None]
        noise = torch.Generator().manual_seed(self.config.seed + 2)
        z = torch.randn(SAMPLE_COLUMNS, self.models.gan.z_dim, generator=noise)
        return inputs, z, captions

    def _calibration_inputs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(captions, noise [b, Z]) batches as training draws them, fixed for the run: the
        loader's first batches at another seed (caption ids [b, k] with the caption table,
        else characters [b, k, L]), and noise of their own."""
        batches = []
        with Loader(self.config.data, batch_size=self.loader.batch_size,
                    seed=self.config.seed + 3,
                    caption_format="indices" if self.caption_table is None else "ids",
                    captions_per_sample=self.config.captions_per_sample,
                    num_threads=1) as loader:
            for batch in loader:
                batches.append(batch.captions)
                if len(batches) == CALIBRATION_BATCHES:
                    break
        noise = torch.Generator().manual_seed(self.config.seed + 4)
        return [(captions, torch.randn(len(captions), self.models.gan.z_dim, generator=noise))
                for captions in batches]

    @torch.no_grad()
    def calibrate_average(self) -> None:
        """Gives G's moving average the BatchNorm statistics of its own weights (the engine
        leaves it G's) before it samples or is saved; once a step."""
        if self.G_ema is None or self._calibrated_at == self.step:
            return
        inputs = [(z.to(self.device), self._embed(captions)) for captions, z in self._calibration]
        recompute_batchnorm_stats(self.G_ema, inputs)
        self._calibrated_at = self.step

    @torch.no_grad()
    def write_samples(self) -> Path:
        inputs, z, captions = self._fixed
        self.calibrate_average()
        generator = self.G_ema if self.G_ema is not None else self.G
        was_training = generator.training
        generator.eval()
        text = self._embed(inputs).repeat_interleave(SAMPLE_COLUMNS, 0)  # [rows·cols, E]
        images = generator(z.repeat(SAMPLE_ROWS, 1).to(self.device), text)
        generator.train(was_training)
        self.run.samples_dir.mkdir(exist_ok=True)
        grid = image_grid(images, rows=SAMPLE_ROWS, row_labels=captions, scale=2)
        path = self.run.sample_grid_path(self.step)
        grid.save(path)
        grid.save(self.run.latest_samples)
        return path

    def write_curves(self) -> None:
        series: dict[str, list[tuple[float, float]]] = {}
        for row in self.history:
            for key in ("d_loss", "g_loss"):
                if key in row:
                    series.setdefault(key, []).append((row["step"], row[key]))
        line_plot(series, title=f"{self.config.variant} on {Path(self.config.data).name}",
                  x_label="step").save(self.run.loss_curves)

    # -- the run ----------------------------------------------------------------------------
    def total_steps(self) -> int:
        total = self.config.epochs * len(self.loader)
        return min(total, self.config.max_steps) if self.config.max_steps else total

    def fit(self, *, stop: StopSignals | None = None) -> None:
        """Trains to ``total_steps()``; when ``stop`` receives a signal, stops at a step
        boundary with a checkpoint and raises TrainingStopped."""
        total = self.total_steps()
        stop = stop if stop is not None else StopSignals()
        if self.world.main:
            self._say_where_it_stops(total)
        with contextlib.ExitStack() as stack:
            stack.enter_context(stop.deferred())
            log = _Log(self, stack, total=total)
            while self.step < total:
                epoch = self.loader.epoch
                lr = self._set_lr(epoch)
                for batch in self.loader:
                    values = self.train_step(batch)
                    self.step += 1
                    log.count(len(batch) * self.world.size)
                    logged = self._due(self.config.log_every, total)
                    if logged:
                        log.submit(values, epoch=epoch, lr=lr)
                    # At the last step the run is complete: it ends as if no signal came.
                    signum = self._stop_signal(stop, logged=logged) if self.step < total else 0
                    sample = self.world.main and not signum \
                        and self._due(self.config.sample_every, total)
                    keep = self.world.main and (bool(signum)
                                                or self._due(self.config.checkpoint_every, total))
                    # The curves and each checkpoint's metrics.jsonl hold every row so far.
                    log.write(wait=sample or keep)
                    if sample:
                        log.samples(self.write_samples())
                        self.write_curves()
                    if signum:
                        self._stop_with_checkpoint(signum)
                    if keep:
                        self._save()
                    if self.step >= total:
                        break

    def _due(self, every: int, total: int) -> bool:
        """Whether the step just taken is one of every ``every``, or the last."""
        return self.step % every == 0 or self.step == total

    def _stop_with_checkpoint(self, signum: int) -> None:
        # The others wait for rank 0's checkpoint: under torchrun, a process that ends first
        # gets the rest killed.
        self.world.main_first(self._save)
        raise TrainingStopped(signum, step=self.step)

    def _save(self) -> None:
        self.calibrate_average()
        self.run.save_checkpoint(self.step, self.state(), keep=self.config.keep_checkpoints)

    def _stop_signal(self, stop: StopSignals, *, logged: bool) -> int:
        """The signal to stop on at this step boundary, or 0. Processes under torchrun take
        signals at different moments: they agree at logged steps, which they all reach."""
        if not self.world.distributed:
            return stop.received or 0
        return self.world.largest(stop.received or 0) if logged else 0

    def _say_where_it_stops(self, total: int) -> None:
        config, per_epoch = self.config, len(self.loader)
        if config.max_steps and config.max_steps > total:
            click.echo(f"{self.run.root}: training stops at step {total}, the end of --epochs "
                       f"{config.epochs} ({per_epoch} steps each), before --max-steps "
                       f"{config.max_steps}; pass --epochs "
                       f"{-(-config.max_steps // per_epoch)} to reach it", err=True)
        if self.step >= total:
            click.echo(f"{self.run.root}: already at step {self.step} of {total}; nothing to train "
                       "(raise --epochs or --max-steps to train on)", err=True)


class _Log:
    """The progress bar and the logged steps' metrics: averaged over the processes, brought
    back from the device without waiting for it (waiting at each logged step would drain its
    queue), and written by rank 0 to metrics.jsonl and the trainer's history, and with
    ``tensorboard`` as events, with the sample grids."""

    def __init__(self, trainer: Trainer, stack: contextlib.ExitStack, *, total: int):
        self.trainer = trainer
        self.reader = MetricsReader()
        self.tick, self.images = time.perf_counter(), 0
        self.rate = ""
        self.events: EventLog | None = None
        if trainer.world.main:
            self.file = stack.enter_context(trainer.run.metrics_writer())
            if trainer.config.tensorboard:
                # Events of an earlier session there go on to the checkpoint resumed from; the
                # steps after it, logged again now, replace theirs.
                resumed = trainer.run.tensorboard.exists()
                self.events = stack.enter_context(EventLog(
                    trainer.run.tensorboard, purge_step=trainer.step + 1 if resumed else None))
            self.bar = stack.enter_context(click.progressbar(
                length=total, label="training", file=sys.stderr,
                item_show_func=lambda _: self.rate))
            self.bar.update(trainer.step)

    def count(self, images: int) -> None:
        """One step done, of ``images`` images over all processes."""
        self.images += images
        if self.trainer.world.main:
            self.bar.update(1)

    def submit(self, values: dict[str, torch.Tensor], *, epoch: int, lr: float) -> None:
        """Starts bringing back this step's metrics; every process takes part."""
        values = self.trainer.world.mean(values)
        rate = round(self.images / (time.perf_counter() - self.tick), 1)
        self.tick, self.images = time.perf_counter(), 0
        self.rate = f"{rate:.0f} img/s"
        if self.trainer.world.main:
            self.reader.submit(({"step": self.trainer.step, "epoch": epoch, "lr": lr}, rate),
                               values)

    def write(self, *, wait: bool) -> None:
        """Writes the rows that have arrived, or all of them when ``wait``."""
        for (head, rate), read in self.reader.collect(wait=wait):
            row = {**head, **{k: round(v, 5) for k, v in read.items()}, "images_per_s": rate}
            self.trainer.history.append(row)
            self.file.write(row)
            if self.events is not None:
                self.events.scalars(row, step_key="step")
        if wait and self.events is not None:  # before a checkpoint: the events up to it
            self.events.flush()

    def samples(self, path: Path) -> None:
        """The sample grid just saved at ``path``, into the events too."""
        if self.events is not None:
            self.events.image("samples", path, step=self.trainer.step)


def train(*, config: TrainConfig, resume: bool = False, world: World | None = None) -> Path:
    """Train into ``config.run`` (a new folder), or continue it (``resume``) from the stage
    it reached: text pretraining (started again unless finished) or GAN training (exactly,
    from the last checkpoint, or from the start without one), as this process of ``world``
    (by default torchrun's, else a single process).

    Resuming with other ``epochs`` or ``max_steps`` rewrites config.json with them. A first
    SIGTERM or SIGINT stops the GAN training at the next step boundary with a checkpoint
    (before it, at once), raising TrainingStopped."""
    if world is None:
        with process_group(config.device) as world:
            return train(config=config, resume=resume, world=world)
    world.split_batch(config.batch_size)  # before anything is made
    if config.tensorboard:
        require_tensorboard()
    run = Path(config.run)
    with letting_go(world), stop_signals() as stop:
        try:
            _train(config, resume=resume, world=world, stop=stop)
        except Exception as exc:  # the run's files and the pretraining's share the disk
            raise_if_disk_full(exc, run)
            raise
    return run


def _train(config: TrainConfig, *, resume: bool, world: World, stop: StopSignals) -> None:
    run = Run(config.run)
    # config.json records what ran, not "auto".
    config = world.main_first(lambda: _open(config.on_device(world.device), resume=resume))
    try:
        trainer = Trainer(config, world=world)
    except Exception:
        if world.main and not resume:
            shutil.rmtree(run.root, ignore_errors=True)  # nothing half-made is left
        raise
    if world.main:
        write_text_atomically(run.fusion_evidence,
                              json.dumps(trainer.fusion_evidence, indent=2) + "\n")
    checkpoint = run.latest_checkpoint() if resume else None
    if checkpoint is not None:
        trainer.restore(checkpoint)
    if world.main and resume:
        trainer.history = run.trim_metrics(trainer.step)
    trainer.fit(stop=stop)


def _open(config: TrainConfig, *, resume: bool) -> TrainConfig:
    """Makes the run folder and writes its config.json first, or opens the folder of a run
    to resume and rewrites its config.json when ``config`` differs; then pretrains the text
    encoder there unless that is done or not wanted. A failure on a new run leaves no
    folder; an interruption leaves one to resume. Returns the run's configuration."""
    run = Run(config.run)
    if resume:
        if not run.is_run():
            raise T2IError(f"{run.root}: not a run folder (no {run.config_file.name})")
        run.remove_partial_checkpoints()
        if run.config() != config:
            run.save_config(config)
    else:
        if run.root.exists():
            raise T2IError(f"{run.root}: run folder exists (pass --resume {run.root} to "
                           "continue it, or choose another --run)")
        with Dataset(config.data) as ds:  # a bad dataset fails before the run folder exists
            if config.class_loss and len(ds.classes) < 2:
                click.echo(f"{config.data}: one class, nothing for the class loss to tell "
                           "apart: it is off", err=True)
                config = dataclasses.replace(config, class_loss=0.0)
        run.root.mkdir(parents=True)
    try:
        if not resume:
            run.save_config(config)
        return _pretrain(config)
    except Exception:
        if not resume:
            shutil.rmtree(run.root, ignore_errors=True)  # nothing half-made is left
        raise


def _pretrain(config: TrainConfig) -> TrainConfig:
    """Pretrains the run's own text encoder into RUN/text when the run needs one and has
    none: a finished pretraining (its text_encoder.pt, written last) is kept, an unfinished
    one is started again. Returns the config naming the encoder, saved."""
    if config.text_encoder is not None or config.train_text_encoder:
        return config
    run = Run(config.run)
    if not run.text.finished():
        shutil.rmtree(run.text.root, ignore_errors=True)
        pretrain_text(config=PretrainConfig(
            data=config.data, out=str(run.text.root), preset=config.preset,
            # G must render every class: the encoder sees them all (pretrain-text alone
            # holds classes out to measure zero-shot accuracy).
            holdout_share=0.0, epochs=config.pretrain_epochs, match=config.pretrain_match,
            batch_size=config.batch_size,
            seed=config.seed, device=config.device, tensorboard=config.tensorboard))
    config = dataclasses.replace(config, text_encoder=str(run.text.encoder))
    run.save_config(config)
    return config
