"""``StepEngine``: one training step of Reed et al.'s GAN (Algorithm 1: a D update, then a G
update; then the moving average of G's weights).

One step function for every backend. Its parts are functions of the networks: G's forward
(the fake images and, for GAN-INT, those of the interpolated embeddings), D's forward and
loss on (real, right), (real, wrong), (fake, right), G's loss (D on both fake batches), and
the moving average. Each network runs once per part: its evaluations in a part are one call
over the concatenated batches, with BatchNorm statistics taken per group
(``t2i_fast.models.grouped_batchnorm``) so that the result is that of separate calls. Where
the networks' BatchNorm cannot group (SyncBatchNorm under ``--sync-bn``, the fused layers'
own BatchNorm) the part calls the network once per group instead.

φ(t): with a frozen text encoder the trainer embeds every caption once
(``t2i_fast.train.caption_table``) and the step takes the loader's caption ids, gathering and
averaging their rows of that ``caption_table``: no GRU and no one-hot captions in the step. A
text encoder trained with D runs in the step, outside the parts (Dynamo does not trace its GRU).

``backend="eager"`` runs the parts as they are, in float32 (or bfloat16 autocast when
asked), the noise drawn from the given generator: a resumed run is bit-identical to an
uninterrupted one. ``backend="compiled"`` runs the same step with:

- each part under ``torch.compile(fullgraph=True)``: backward goes through AOTAutograd's
  compiled graphs, and the moving average is one fused update of all of G's weights;
- channels_last parameters and images, bfloat16 autocast (``precision="bf16"``; the losses
  are taken in float32), fused Adam, and the GAN-CLS/GAN-INT losses that
  ``choose_matching_loss`` measures faster in CUDA-graph replay (the fused Triton kernels or
  the plain losses compiled with the rest; the plain ones where nothing can be timed);
- with ``fused_layers`` "auto" or "on" (CUDA), the conv → BatchNorm → LeakyReLU layers that
  ``choose_fused_layers`` picks (auto: those whose fused form is faster in CUDA-graph replay;
  on: all it takes) become single ``conv_bn_act`` calls, chained where that wins; elsewhere
  Inductor fuses BatchNorm and the activation around cuDNN's convolution as usual. Both
  choices are made when the engine is made, before anything is compiled or captured, and
  their evidence is ``kernel_evidence``;
- on CUDA, the whole step (both updates, the noise, the moving average) in one CUDA graph:
  the batch is copied into static buffers and the graph replayed. Nothing in a step waits
  for the GPU: the learning rate and the average's weight are device tensors written before
  the replay, BatchNorm statistics are updated in place, and the metrics stay on the device
  (``MetricsReader`` brings them back asynchronously).

Stock PyTorch does fail to compile some parts now and then (torch 2.11's channels_last
backward of the discriminator's old concatenation was one), so each part is tried once, on
the first step, forward and backward, with the BatchNorm statistics (and the average)
put back afterwards; a part that fails is reported in one warning line and runs eagerly from
then on. The CUDA graph capture falls back the same way, to compiled parts launched one by
one.

With ``r1`` (the R1 penalty, Mescheder et al., 2018), the last step of every ``r1_every``
adds γ/2 · r1_every times the penalty to D's loss (lazy, as StyleGAN2 takes it). Its D part
runs eagerly, the part's own function (AOTAutograd does not differentiate a backward again),
and that step runs outside the CUDA graph: the compiled parts launched one by one.

On CUDA the compiled engine draws the noise from the device's default generator (inside the
graph), so a resumed run repeats the schedule exactly (data, learning rates, steps) but not
every bit of the noise; on the CPU both backends draw it from the same CPU generator.

GAN-INT mixes each caption's embedding with another's over the whole batch; with
``interp_batch="half"`` (as Reed's code does) G's loss sees only the first half of those.

Under torch.distributed (``world``), each part that trains weights (the generator forward,
the discriminator step, and the text encoder when it trains) is one DistributedDataParallel
module: D's three evaluations are one DDP forward, and the G update's D is not under DDP and
is frozen. Buffers are not broadcast (per-GPU BatchNorm, or SyncBatchNorm made by the
trainer). With CUDA graphs the gradients' all-reduce is captured in the graph, after the
warm-up that DDP needs (``DDP_WARMUP_STEPS``).
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from t2i_fast.config import TrainConfig
from t2i_fast.losses import (
    class_loss,
    discriminator_loss,
    generator_loss,
    hardest_other_class,
    interpolate_embeddings,
    mode_seeking_loss,
)
from t2i_fast.models.grouped_batchnorm import groupable
from t2i_fast.train.caption_table import mean_embedding
from t2i_fast.train.distributed import World

# Steps run without a graph before the capture: by then every part is compiled, Adam's
# state exists and cuDNN/cuBLAS have made their workspaces, none of which may happen while
# a graph is being captured.
WARMUP_STEPS = 3
# Under DDP: its reducer records timings in its first 10 iterations, which a capture must not
# contain (torch.cuda's notes on graphs ask for 11 warm-up iterations).
DDP_WARMUP_STEPS = 11


class _Part(nn.Module):
    """One piece of the step: ``fn`` and, once tried under the compiled backend, what runs
    in its place. A module holding the networks ``fn`` trains, so that DDP can wrap it: one
    DDP forward per backward, however many times ``fn`` calls them."""

    def __init__(self, name: str, fn: Callable, **networks: nn.Module):
        super().__init__()
        self.name = name
        self.fn = fn
        self.impl: Callable | None = None  # torch.compile(fn) if it worked, else fn
        self.compiled = False
        for key, network in networks.items():
            self.add_module(key, network)

    def forward(self, *args, **options):
        """``fn(*args)`` as compiled; with ``options``, ``fn`` itself (the D step's R1
        penalty differentiates a backward again, which AOTAutograd does not do). One part
        either way: under DDP, one wrapper arms D's gradient hooks."""
        if options:
            return self.fn(*args, **options)
        return (self.impl or self.fn)(*args)


class StepEngine:
    """Performs training steps on the given networks and builds their optimizers
    (``opt_d`` over D, and the text encoder when trained with it; ``opt_g`` over G).

    ``step(batch, step=i)`` returns the step's metrics as 0-d device tensors; with CUDA
    graphs they are the graph's static outputs, overwritten by the next step, so read them
    (or start reading them, ``MetricsReader``) before calling ``step`` again.
    """

    def __init__(self, *, G: nn.Module, D: nn.Module, text_encoder: nn.Module,
                 G_ema: nn.Module | None, config: TrainConfig, device: torch.device,
                 noise: torch.Generator, backend: str, precision: str,
                 graphs: bool | None = None, fused_layers: str = "off",
                 world: World | None = None, interp_batch: str = "full",
                 caption_table: torch.Tensor | None = None, fusion_timer=None):
        if backend not in ("eager", "compiled"):
            raise ValueError(f"backend must be 'eager' or 'compiled', got {backend!r}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if interp_batch not in ("full", "half"):
            raise ValueError(f"interp_batch must be 'full' or 'half', got {interp_batch!r}")
        compiled = backend == "compiled"
        cuda = device.type == "cuda"
        if graphs and not (compiled and cuda):
            raise ValueError("CUDA graphs need the compiled backend on a CUDA device")
        if fused_layers not in ("auto", "on", "off"):
            raise ValueError(f"fused_layers must be 'auto', 'on' or 'off', got {fused_layers!r}")
        # fusion_timer replaces the CUDA-graph timing of both kernel choices (tests: it lets
        # the CPU choose fused layers, which run PyTorch's reference there).
        if fused_layers != "off" and not (compiled and cuda) and fusion_timer is None:
            raise ValueError("fused_layers needs the compiled backend on a CUDA device")
        if caption_table is not None and config.joint_text_encoder:
            raise ValueError("a caption table needs a frozen text encoder: one trained with D "
                             "changes every caption's embedding each step")
        self.config = config
        self.G, self.D, self.text_encoder, self.G_ema = G, D, text_encoder, G_ema
        self.device = device
        self.world = world if world is not None else World(device=device)
        if (interp_batch == "half" and config.interpolate
                and config.batch_size // self.world.size < 4):
            raise ValueError("interp_batch='half' needs at least 4 samples per process: "
                             "BatchNorm needs 2 interpolated ones")
        if config.mode_seeking and config.batch_size // self.world.size < 4:
            raise ValueError("the mode-seeking term needs at least 4 samples per process: "
                             "BatchNorm needs 2 images drawn again")
        self.compile = compiled  # whether the parts are compiled
        self.precision = precision
        self.graphs = compiled and cuda if graphs is None else graphs
        self.interp_batch = interp_batch
        # Each network's evaluations in a part are one call, unless its BatchNorm layers
        # take the statistics their own way (SyncBatchNorm; the fused layers' BatchNorm).
        self.grouped = fused_layers == "off" and groupable(G) and groupable(D)
        self.z_dim = G.config.z_dim
        self.image_size = G.config.image_size
        if compiled:
            for module in (G, D, G_ema):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        # None: the device's default generator, which a CUDA graph draws from.
        self._noise_source = None if compiled and cuda else noise
        if config.class_loss and getattr(D, "classify", None) is None:
            raise ValueError("the class loss needs a discriminator with a class head "
                             "(num_classes)")
        self._class_option = {"with_classes": True} if config.class_loss else {}
        # With Reed's mismatched pair D sees two real images a sample: it names both.
        self._names_wrong_images = bool(config.class_loss and config.matching_aware
                                        and config.mismatch == "image")
        # Under a graph the learning rates must be read from memory the graph knows.
        self._lr = {name: torch.tensor(config.lr * scale, device=device)
                    for name, scale in (("D", config.d_lr_scale), ("G", 1.0))} \
            if self.graphs else None
        self._adam_flags = {"fused": True, "capturable": self.graphs} if compiled else {}
        betas = (config.beta1, config.beta2)
        d_params = list(D.parameters())
        if config.joint_text_encoder:
            d_params += list(text_encoder.parameters())  # φ learns from D's judgement
        self.opt_d = torch.optim.Adam(d_params, lr=self._lr_of("D", config.lr), betas=betas,
                                      **self._adam_flags)
        self.opt_g = torch.optim.Adam(G.parameters(), lr=self._lr_of("G", config.lr),
                                      betas=betas, **self._adam_flags)
        # The average's weight: a device tensor for compiled parts (a float argument would
        # recompile at each new value, and a graph reads it from memory), else a float.
        self._ema_weight = torch.zeros((), device=device) if compiled else None
        self.caption_table = caption_table  # [n_captions, E], or None: encode in the step
        n = config.batch_size // self.world.size
        self.fused: list[str] = []  # the fused layers' names
        self.kernel_evidence = {"fused_layers": self._fuse_layers(n, fused_layers,
                                                                  fusion_timer)}
        if compiled:
            loss, self.kernel_evidence["matching_loss"] = _choose_losses(
                n, config=config, device=device, precision=precision, timer=fusion_timer)
        else:
            loss = "reference"
            self.kernel_evidence["matching_loss"] = {
                "choice": loss, "refused": "the eager backend runs the plain losses"}
        self._d_loss, self._g_loss = _losses(loss)
        parts = [_Part("generator forward", self._generate, G=G),
                 _Part("discriminator step", self._discriminator_step, D=D),
                 # D is frozen for G's loss: the gradient reaches G through the generator
                 # forward.
                 _Part("generator step", self._generator_step)]
        if G_ema is not None:
            parts.append(_Part("moving average", self._average))
        self._parts = {part.name: part for part in parts}
        # Under DDP, the forward of each part that trains weights averages their gradients
        # across ranks; the text encoder trains through the discriminator step's backward.
        self._calls = {part.name: self.world.wrap(part) if any(part.children()) else part
                       for part in parts}
        self._encode = text_encoder.encode_mean
        if config.joint_text_encoder and self.world.distributed:
            self._encode = self.world.wrap(_Part("text encoder", text_encoder.encode_mean,
                                                 text_encoder=text_encoder))
        self._static: tuple[torch.Tensor | None, ...] | None = None  # the graph's inputs
        self._graph: torch.cuda.CUDAGraph | None = None
        self._outputs: dict[str, torch.Tensor] | None = None  # the graph's output buffers
        self._uncaptured = 0

    # -- what the trainer sets ---------------------------------------------------------------
    def _lr_of(self, name: str, lr: float) -> torch.Tensor | float:
        """The learning rate of ``name``'s optimizer (D or G) when G's is ``lr``: D's is
        ``d_lr_scale`` times it. Under a graph, the tensor it reads (set to that value)."""
        value = lr * (self.config.d_lr_scale if name == "D" else 1.0)
        if self._lr is None:
            return value
        return self._lr[name].fill_(value)

    def set_lr(self, lr: float) -> None:
        """G's learning rate ``lr``, D's ``d_lr_scale`` times it."""
        for name, opt in (("D", self.opt_d), ("G", self.opt_g)):
            value = self._lr_of(name, lr)
            for group in opt.param_groups:
                # Under a graph the group's tensor is this one again even after a
                # load_state_dict put the checkpoint's value there: the graph reads its memory.
                group["lr"] = value

    def after_load(self) -> None:
        """Makes optimizers loaded from a checkpoint (maybe of the other backend) this
        backend's again: its Adam flags, and each step count where Adam expects it."""
        for opt in (self.opt_d, self.opt_g):
            on_device = bool(self._adam_flags)
            for group in opt.param_groups:
                group.update({"fused": None, "capturable": False, **self._adam_flags})
                for p in group["params"]:
                    state = opt.state.get(p, {})
                    if "step" in state:
                        state["step"] = state["step"].to(
                            p.device if on_device else torch.device("cpu"), torch.float32)

    @property
    def compiled_parts(self) -> dict[str, bool]:
        """Each compiled part's name → whether it runs compiled (False: fell back)."""
        if not self.compile:
            return {}
        return {name: part.compiled for name, part in self._parts.items()}

    # -- one step ----------------------------------------------------------------------------
    def step(self, batch, *, step: int) -> dict[str, torch.Tensor]:
        """One D and one G update on ``batch``, the ``step``-th of the run (from 0). On
        every ``r1_every``-th step (counting from 1) D's loss takes the R1 penalty too: that
        step runs outside the CUDA graph, its D part eagerly."""
        # The average spans the last quarter of the steps so far, up to the decay's span, so
        # that the untrained start fades out of it within a short run too.
        weight = 1 - min(self.config.ema_decay, 1 - 4 / (4 + step))
        if self._ema_weight is not None:
            weight = self._ema_weight.fill_(weight)
        # The last of every r1_every steps: with r1_every dividing log_every, the logged ones.
        r1 = bool(self.config.r1) and (step + 1) % self.config.r1_every == 0
        if self.graphs and not r1:
            return self._graph_step(batch)
        layout = torch.channels_last if self.compile else torch.preserve_format
        images, wrong, *rest = self._inputs(batch)
        images, wrong = (t.to(self.device, non_blocking=True, memory_format=layout)
                         for t in (images, wrong))
        rest = (t if t is None else t.to(self.device, non_blocking=True) for t in rest)
        return self._updates(images, wrong, *rest, weight, r1=r1)

    def _inputs(self, batch) -> tuple[torch.Tensor | None, ...]:
        """What a step reads of ``batch``, in ``_updates``'s order: images, wrong images,
        captions, the class ids where the hard mismatched pairs or the class loss need them,
        and the wrong images' where the class loss takes them (else None)."""
        config = self.config
        wanted = config.mismatch == "hard" or config.class_loss
        classes = batch.class_ids if wanted else None
        wrong_classes = batch.wrong_class_ids if self._names_wrong_images else None
        return batch.images, batch.wrong_images, batch.captions, classes, wrong_classes

    def _autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        # No cast cache: cached bf16 copies of the weights would outlive the D update inside
        # one autocast region, and a graph must redo the casts each replay.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _noise(self, n: int) -> torch.Tensor:
        """Noise for this rank's ``n`` samples: its rows of the global batch's."""
        source = self._noise_source
        z = torch.randn(n * self.world.size, self.z_dim, generator=source,
                        device=self.device if source is None else source.device)
        return self.world.take(z).to(self.device, non_blocking=True)

    def _updates(self, images: torch.Tensor, wrong: torch.Tensor, captions: torch.Tensor,
                 classes: torch.Tensor | None, wrong_classes: torch.Tensor | None,
                 ema_weight: torch.Tensor | float, *, r1: bool = False
                 ) -> dict[str, torch.Tensor]:
        """The D update (with the R1 penalty where ``r1``), the G update, then G's average
        (by ``ema_weight``). ``captions``:
        the loader's caption ids with a caption table, else its captions; ``classes``: the
        samples' class ids, which the hard mismatched pairs and the class loss need;
        ``wrong_classes``: the wrong images', which the class loss names too."""
        config = self.config
        n = images.shape[0]
        n_mixed = n // 2 if self.interp_batch == "half" else n
        with self._autocast():
            if self.caption_table is not None:
                text = mean_embedding(self.caption_table, captions)  # ids [B, k] → [B, E]
            else:
                with torch.set_grad_enabled(config.joint_text_encoder):
                    text = self._encode(captions)  # [B, E]
            fixed = text.detach()
            # GAN-INT's generator batch is made here with the other: G does not change in
            # the D update, and one generator forward per step is what DDP expects.
            mixed = self._mix(fixed)[:n_mixed] if config.interpolate else None
            z = self._noise(n)
            z_mixed = self._noise(n_mixed) if config.interpolate else None
            # The mode-seeking pair: the first half's captions again, with other noise.
            z_pair = self._noise(n // 2) if config.mode_seeking else None
            fake, interp, pair = self._run("generator forward", z, fixed, z_mixed, mixed,
                                           z_pair)
            # Lazy R1 (StyleGAN2): γ/2 · r1_every on one step in r1_every.
            options = {"r1_weight": config.r1 / 2 * config.r1_every} if r1 else {}
            d_loss, scores = self._run("discriminator step", images, wrong, text,
                                       fake.detach(), classes, wrong_classes, **options)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()

        # G's loss needs no gradient for D's weights: D's grads are not computed at all (and
        # under DDP, D's gradient hooks must not fire outside its own forward's backward).
        self.D.requires_grad_(False)
        try:
            with self._autocast():
                g_loss, g_metrics = self._run("generator step", fake, fixed, interp, mixed,
                                              z, pair, z_pair, classes)
            self.opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
        finally:
            self.D.requires_grad_(True)
        self.opt_g.step()
        if self.G_ema is not None:
            self._run("moving average", ema_weight)
        # D's scores come after d_loss: on an R1 step they hold d_loss without the penalty.
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), **scores, **g_metrics}

    def _mix(self, text: torch.Tensor) -> torch.Tensor:
        """GAN-INT's interpolated embeddings, mixed across the global batch (this rank's
        rows): as one process with the global batch mixes them."""
        whole = self.world.gather(text)
        return self.world.take(interpolate_embeddings(whole, beta=self.config.interp_beta))

    # -- the parts ----------------------------------------------------------------------------
    def _each(self, network: nn.Module, images: tuple[torch.Tensor, ...],
              text: tuple[torch.Tensor, ...], **options) -> tuple:
        """``network`` on each pair (images[i], text[i]): one call over the concatenated
        batches with BatchNorm statistics per group, or one call per group. Where the network
        returns a tuple (D ``with_classes``), each group's entry is a tuple too."""
        if not self.grouped or len(images) == 1:
            return tuple(network(x, t, **options) for x, t in zip(images, text, strict=True))
        sizes = tuple(len(x) for x in images)
        out = network(torch.cat(images), torch.cat(text), groups=sizes, **options)
        if isinstance(out, tuple):
            return tuple(zip(*(o.split(sizes) for o in out), strict=True))
        return out.split(sizes)

    def _generate(self, z: torch.Tensor, text: torch.Tensor, z_mixed: torch.Tensor | None,
                  mixed: torch.Tensor | None, z_pair: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The fake images [B, 3, S, S]; with GAN-INT, those of the mixed embeddings; with the
        mode-seeking term, those of the first len(z_pair) embeddings with noise ``z_pair``."""
        noise, embeddings = [z], [text]
        if mixed is not None:
            noise.append(z_mixed), embeddings.append(mixed)
        if z_pair is not None:
            noise.append(z_pair), embeddings.append(text[:len(z_pair)])
        if len(noise) == 1:
            return self.G(z, text), None, None
        images = list(self._each(self.G, tuple(noise), tuple(embeddings)))
        fake = images.pop(0)
        interp = images.pop(0) if mixed is not None else None
        return fake, interp, images.pop(0) if z_pair is not None else None

    def _discriminator_step(self, images: torch.Tensor, wrong: torch.Tensor,
                            text: torch.Tensor, fake: torch.Tensor,
                            classes: torch.Tensor | None, wrong_classes: torch.Tensor | None,
                            r1_weight: float = 0.0
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D's loss (the D update's) and D's mean scores, which carry no gradient. With the
        class loss, D's class logits of the real images against ``classes``, and of the wrong
        images against ``wrong_classes`` where given (twice the labelled images a step).
        With ``r1_weight``, that times the R1 penalty: the squared norm of the gradient of
        D's score of each real image with its text, with respect to the image (as D sees it,
        at its resolution), averaged over the batch; its value is the metric ``r1``."""
        config = self.config
        if images.shape[-1] != self.image_size:
            images = F.adaptive_avg_pool2d(images, self.image_size)  # = interpolate "area"
            wrong = F.adaptive_avg_pool2d(wrong, self.image_size)
        if r1_weight:
            images = images.detach().requires_grad_(True)
        if config.matching_aware and config.mismatch in ("text", "hard"):
            # The paper's mismatched pair: each real image with another sample's text.
            other = text.roll(1, dims=0) if config.mismatch == "text" \
                else hardest_other_class(text, classes)
            batches, texts = (images, images, fake), (text, other, text)
        elif config.matching_aware:
            batches, texts = (images, wrong, fake), (text, text, text)
        else:
            batches, texts = (images, fake), (text, text)
        with_classes = bool(config.class_loss)
        outputs = self._each(self.D, batches, texts, **self._class_option)
        if with_classes:  # the real images come first, the wrong ones next
            if wrong_classes is not None:
                class_logits = torch.cat([outputs[0][1], outputs[1][1]])  # [2B, K]
                classes = torch.cat([classes, wrong_classes])
            else:
                class_logits = outputs[0][1]  # [B, K]
            outputs = tuple(o[0] for o in outputs)
        real_right, *middle, fake_right = outputs  # [B] each
        real_wrong = middle[0] if middle else None
        loss = self._d_loss(real_right, real_wrong, fake_right,
                            matching_aware=config.matching_aware)
        scores = {"d_real": torch.sigmoid(real_right.detach().float()).mean(),
                  "d_fake": torch.sigmoid(fake_right.detach().float()).mean()}
        if real_wrong is not None:
            scores["d_wrong"] = torch.sigmoid(real_wrong.detach().float()).mean()
        if with_classes:
            named, scores["class_real_acc"] = class_loss(class_logits, classes)
            loss = loss + config.class_loss * named
        if r1_weight:
            # create_graph: D's update descends the penalty too.
            grad, = torch.autograd.grad(real_right.sum(), images, create_graph=True)
            # At least float32 (bfloat16 under autocast), float64 where the networks are.
            grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
            penalty = grad.square().sum(dim=(1, 2, 3)).mean()
            # The logged d_loss stays that of the other steps, without the penalty.
            scores["d_loss"], scores["r1"] = loss.detach(), penalty.detach()
            loss = loss + r1_weight * penalty
        return loss, scores

    def _generator_step(self, fake: torch.Tensor, text: torch.Tensor,
                        interp: torch.Tensor | None, mixed: torch.Tensor | None,
                        z: torch.Tensor, pair: torch.Tensor | None, z_pair: torch.Tensor | None,
                        classes: torch.Tensor | None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """G's loss (the G update's): D on ``fake`` and, with GAN-INT, on ``interp``, the
        images of the ``mixed`` embeddings; with the class loss, D's class logits of ``fake``
        against ``classes``, the class of each caption's record (a mixed embedding has none);
        with the mode-seeking term, ``pair`` (noise ``z_pair``) held apart from the first
        images of ``fake``. And G's metrics."""
        config = self.config
        with_classes = bool(config.class_loss)
        # The interpolated batch first: D's running statistics follow its calls' order.
        batches, texts = ((fake,), (text,)) if interp is None else ((interp, fake), (mixed, text))
        outputs = self._each(self.D, batches, texts, **self._class_option)
        if with_classes:
            outputs, class_logits = tuple(o[0] for o in outputs), outputs[-1][1]
        *interp_logits, fake_logits = outputs
        loss = self._g_loss(fake_logits, interp_logits[0] if interp_logits else None,
                            interp_weight=config.interp_weight)
        metrics = {}
        if with_classes:
            named, metrics["class_fake_acc"] = class_loss(class_logits, classes)
            loss = loss + config.g_class_loss * named
        if pair is None:
            return loss, metrics
        m = len(pair)
        # Under DDP the ratio is the global batch's; DDP's mean of the ranks' gradients of
        # this one loss is then the gradient one process would take.
        seeking, ratio = mode_seeking_loss(fake[:m], pair, z[:m], z_pair,
                                           across=self.world.sum if self.world.distributed
                                           else None)
        return loss + config.mode_seeking * seeking, {**metrics, "mode_seeking_ratio": ratio}

    @torch.no_grad()
    def _average(self, weight: torch.Tensor | float) -> None:
        """G_ema += weight·(G - G_ema), all weights in one foreach update. Weights only: the
        trainer gives the average BatchNorm statistics of its own weights before it samples
        (G's would not fit it: t2i_fast/models/batchnorm_stats.py)."""
        average = list(self.G_ema.parameters())
        weights = [weight] * len(average) if torch.is_tensor(weight) else weight
        torch._foreach_lerp_(average, list(self.G.parameters()), weights)

    def _run(self, name: str, *args, **options):
        part = self._parts[name]
        if self.compile and part.impl is None:
            self._try_compile(part, args)
        return self._calls[name](*args, **options)

    def _try_compile(self, part: _Part, args: tuple) -> None:
        """Compiles ``part`` and runs it forward and backward once on copies of ``args``;
        on any failure the part stays eager. The BatchNorm statistics and the average the
        trial moved are put back, so the step itself is the first to count. The trial calls
        the part directly, not through DDP, whose gradient hooks it must not arm."""
        kept = [*self.G.buffers(), *self.D.buffers(),
                *(self.G_ema.parameters() if self.G_ema is not None else ())]
        saved = [t.clone() for t in kept]
        trial = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
                 for a in args]
        try:
            compiled = torch.compile(part.fn, fullgraph=True, dynamic=False)
            out = compiled(*trial)
            outputs = [o for o in (out if isinstance(out, tuple) else (out,))
                       if torch.is_tensor(o) and o.requires_grad]
            if outputs:
                wanted = [t for t in (*trial, *self.G.parameters(), *self.D.parameters())
                          if torch.is_tensor(t) and t.requires_grad]
                torch.autograd.grad(sum(o.float().sum() for o in outputs), wanted,
                                    allow_unused=True)
        except Exception as exc:  # whatever Dynamo, AOTAutograd or Inductor raise
            lines = [line for line in str(exc).splitlines() if line.strip()]
            reason = f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
            warnings.warn(f"torch.compile failed for the {part.name} ({reason}); that part "
                          f"runs eagerly", RuntimeWarning, stacklevel=2)
            part.impl, part.compiled = part.fn, False
        else:
            part.impl, part.compiled = compiled, True
        finally:
            for tensor, value in zip(kept, saved, strict=True):
                # Through .data: the values are those an eager part may have saved for its
                # backward, and copying through the tensor itself would mark them changed.
                tensor.data.copy_(value)

    # -- CUDA graphs ---------------------------------------------------------------------------
    def _graph_step(self, batch) -> dict[str, torch.Tensor]:
        inputs = self._inputs(batch)
        if self._static is None:
            # The images channels_last, as the compiled parts take them.
            layouts = (torch.channels_last, torch.channels_last, *[torch.contiguous_format] * 3)
            self._static = tuple(
                None if t is None else torch.empty(t.shape, dtype=t.dtype, device=self.device,
                                                   memory_format=layout)
                for t, layout in zip(inputs, layouts, strict=True))
        for buffer, value in zip(self._static, inputs, strict=True):
            if buffer is not None:
                buffer.copy_(value, non_blocking=True)
        if self._graph is not None:
            self._graph.replay()
            return self._outputs
        current = torch.cuda.current_stream(self.device)
        if self._uncaptured < (DDP_WARMUP_STEPS if self.world.distributed else WARMUP_STEPS):
            self._uncaptured += 1
            # Lazy initialisations happen on a side stream, as the capture itself will.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                out = self._updates(*self._static, self._ema_weight)
            current.wait_stream(side)
            return out
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self._updates(*self._static, self._ema_weight)
        except Exception as exc:  # an operation that cannot be captured
            lines = [line for line in str(exc).splitlines() if line.strip()]
            warnings.warn(f"CUDA graph capture of the step failed ({type(exc).__name__}: "
                          f"{lines[0][:200] if lines else ''}); stepping without a graph",
                          RuntimeWarning, stacklevel=2)
            self.graphs = False
            return self._updates(*self._static, self._ema_weight)
        # Capturing ran nothing: the replay is this step.
        self._graph, self._outputs = graph, outputs
        graph.replay()
        return outputs

    def _fuse_layers(self, n: int, mode: str, timer) -> dict:
        """Fuses G's and D's layers as ``choose_fused_layers`` decides for ``mode``, measured
        on inputs of batch ``n`` as the step gives them (layout, autocast); the evidence."""
        evidence: dict = {"mode": mode}
        if mode == "off":
            return evidence
        from t2i_fast.ops.fused_layers import choose_fused_layers

        layout = torch.channels_last if self.compile else torch.contiguous_format
        z = torch.randn(n, self.z_dim, device=self.device)
        text = torch.randn(n, self.G.config.embedding_dim, device=self.device)
        images = torch.randn(n, 3, self.image_size, self.image_size, device=self.device
                             ).contiguous(memory_format=layout)
        with self._autocast():
            for name, network, inputs in (("G", self.G, (z, text)),
                                          ("D", self.D, (images, text))):
                if name == "D" and self.config.r1:
                    evidence[name] = {"refused": "the R1 penalty differentiates D's "
                                                 "backward, which the fused kernels do not"}
                    continue
                names, evidence[name] = choose_fused_layers(network, *inputs, mode=mode,
                                                            timer=timer)
                self.fused += [f"{name}.{layer}" for layer in names]
        evidence["fused"] = list(self.fused)
        return evidence


def _choose_losses(n: int, *, config: TrainConfig, device: torch.device, precision: str,
                   timer) -> tuple[str, dict]:
    """The GAN-CLS/GAN-INT losses the compiled step runs at batch ``n``: "triton" (the fused
    kernels) or "reference" (the plain ones), as ``choose_matching_loss`` measures them."""
    try:
        from t2i_fast.ops.matching_loss import choose_matching_loss
    except ImportError as exc:  # no Triton
        return "reference", {"choice": "reference", "refused": f"{exc}"}
    return choose_matching_loss(
        batch_size=n, device=device,
        dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        matching_aware=config.matching_aware,
        interp_weight=config.interp_weight if config.interpolate else None, timer=timer)


def _losses(choice: str) -> tuple[Callable, Callable]:
    """The D and G losses of ``choice``: "triton", the fused kernels, or "reference"."""
    if choice == "reference":
        return discriminator_loss, generator_loss
    from t2i_fast.ops.matching_loss import discriminator_loss_fused, generator_loss_fused

    return discriminator_loss_fused, generator_loss_fused


class MetricsReader:
    """Brings step metrics (0-d device tensors) back to the host without waiting for the
    GPU: ``submit`` starts one copy into pinned memory; ``collect`` returns what has arrived,
    in order, or everything when ``wait``."""

    def __init__(self):
        self._pending: collections.deque = collections.deque()

    def submit(self, tag, values: dict[str, torch.Tensor]) -> None:
        names = list(values)
        stacked = torch.stack([values[k].float() for k in names])  # [M]
        event = None
        if stacked.is_cuda:
            host = torch.empty(stacked.shape, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = stacked
        self._pending.append((tag, names, host, event))

    def collect(self, *, wait: bool = False) -> list[tuple[object, dict[str, float]]]:
        done = []
        while self._pending:
            tag, names, host, event = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self._pending.popleft()
            done.append((tag, dict(zip(names, host.tolist(), strict=True))))
        return done
