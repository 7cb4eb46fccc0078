"""The step engine on the CPU: the compiled backend (Inductor) against the eager one, the
discriminator without its concatenation, the fallback when torch.compile fails, the CLI's
backend options and the step benchmark's dry run.

Inductor compiles are slow on a small machine: one module-scoped fixture trains the compiled
engine once (batch 4, the small preset, 3 steps) and the tests read its results.
"""

import copy
import dataclasses
import json
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from t2i_fast.cli import main
from t2i_fast.data import Loader
from t2i_fast.errors import T2IError
from t2i_fast.losses import hardest_other_class
from t2i_fast.models import Discriminator, Generator, TextEncoder, preset
from t2i_fast.models.config import UPSAMPLES
from t2i_fast.ops.fused_layers import fuse_conv_bn_act
from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.shapes_spec import CLASSES
from t2i_fast.train import TrainConfig
from t2i_fast.train.engine import StepEngine

BATCH, STEPS = 4, 3
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "shapes.lmdb"
    make_shapes(out=path, n=BATCH * STEPS)
    return path


@pytest.fixture(scope="module")
def batches(shapes):
    # 64-px crops of the 76-px images: the engine resizes them to the small preset's 32.
    with Loader(shapes, batch_size=BATCH, seed=0, dtype=torch.float32, layout="nhwc",
                num_threads=1) as loader:
        return list(loader)


class CaptionEmbedding(nn.Module):
    """Stands in for a trained text encoder: a linear map of the one-hot captions, whose
    embeddings differ from caption to caption as a trained char-CNN-RNN's do. An untrained
    one maps every caption to nearly the same vector (the batch spread is 1% of the norm),
    which leaves G's BatchNorm1d over the projected text with a batch variance ≈1e-8 ≪ eps;
    from there Inductor's float32 reductions (ATen's CPU kernels accumulate in double) move
    some of G's gradients by up to 4% (eager float32: 1e-5 from float64), though compiled
    and eager agree to 1e-13 in float64: rounding, not a wrong graph.
    """

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(70 * length, dim)

    def encode_mean(self, captions: torch.Tensor) -> torch.Tensor:
        return self.proj(captions.flatten(-2)).mean(dim=1)  # [B, k, 70, L] → [B, E]


def make_engine(backend: str, *, length: int, dtype=torch.float32, interp_batch: str = "full",
                batch_size: int = BATCH, **config) -> StepEngine:
    settings = TrainConfig(data="-", run="-", preset="small", batch_size=batch_size,
                           train_text_encoder=True, **config)
    torch.manual_seed(0)
    models = preset("small")
    G = Generator(models.gan)
    D = Discriminator(models.gan, num_classes=len(CLASSES) if settings.class_loss else 0)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    text = CaptionEmbedding(length, models.gan.embedding_dim)
    for module in (G, D, G_ema, text):
        module.to(dtype)
    return StepEngine(G=G, D=D, text_encoder=text, G_ema=G_ema, config=settings,
                      device=torch.device("cpu"), noise=torch.Generator().manual_seed(1),
                      backend=backend, precision="fp32", interp_batch=interp_batch)


def state(engine: StepEngine) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the four networks, in float64."""
    return {f"{part}.{k}": v.double().clone()
            for part in ("G", "D", "text_encoder", "G_ema")
            for k, v in getattr(engine, part).state_dict().items() if v.is_floating_point()}


def train(backend: str, batches, *, dtype=torch.float32) -> dict:
    # The small preset's step with its class loss, at one learning rate: D's 4 times larger
    # steps amplify float32 rounding past the 1% that tells the backends' losses apart by
    # the third step (d_fake 8% off; the parameters still within the bounds below).
    engine = make_engine(backend, length=batches[0].captions.shape[-1], dtype=dtype,
                         d_lr_scale=1.0)
    result = {"engine": engine, "init": state(engine), "losses": [], "states": []}
    for i, batch in enumerate(batches):
        if dtype != torch.float32:
            batch = dataclasses.replace(batch, images=batch.images.to(dtype),
                                        wrong_images=batch.wrong_images.to(dtype),
                                        captions=batch.captions.to(dtype))
        result["losses"].append({k: v.item() for k, v in engine.step(batch, step=i).items()})
        result["states"].append(state(engine))
    return result


@pytest.fixture(scope="module")
def runs(batches):
    """3 steps each: eager float64 (the reference), eager float32, compiled float32."""
    found = {"eager64": train("eager", batches, dtype=torch.float64),
             "eager": train("eager", batches)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found["compiled"] = train("compiled", batches)
    found["warnings"] = [str(w.message) for w in caught
                         if str(w.message).startswith(("torch.compile failed", "CUDA graph"))]
    return found


def deviation(run: dict, reference: dict, step: int, parts: tuple[str, ...] = ("",)) -> float:
    """‖θ - θ_ref‖ / ‖θ_ref - θ_0‖ after ``step`` + 1 steps, over every float parameter and
    BatchNorm statistic (of the networks named by ``parts``): the distance from the reference
    relative to how far training has moved. Adam's first update is ±lr for any gradient not
    near 0, so single weights whose gradient is near 0 may differ by 2·lr: elementwise
    tolerances would have to be as large as the update."""
    now, ref, init = run["states"][step], reference["states"][step], reference["init"]
    keys = [k for k in ref if k.startswith(parts)]
    apart = sum(float((now[k] - ref[k]).square().sum()) for k in keys)
    moved = sum(float((ref[k] - init[k]).square().sum()) for k in keys)
    return (apart / moved) ** 0.5


def test_first_step_matches_eager(runs):
    """Same math, other kernels: the first step's losses (the initial networks' forward)
    agree to float32 rounding. The parameters after it agree to 1% of the update: Adam's
    first step is ±lr wherever a gradient is not exactly 0, so the few weights whose gradient
    is rounding noise may move by 2·lr the other way (0.3% measured with one thread); a wrong
    graph moves them by the whole update."""
    first, compiled = runs["eager"]["losses"][0], runs["compiled"]["losses"][0]
    assert first.keys() == compiled.keys() == {"d_loss", "g_loss", "d_real", "d_fake",
                                               "d_wrong", "mode_seeking_ratio",
                                               "class_real_acc", "class_fake_acc"}
    for key in first:
        assert compiled[key] == pytest.approx(first[key], rel=1e-5), key
    assert deviation(runs["compiled"], runs["eager"], 0) < 1e-2
    assert deviation(runs["eager"], runs["eager64"], 0) < 1e-2  # the scale of rounding


def test_compiled_is_as_accurate_as_eager(runs):
    """Over 3 steps float32 rounding grows: Adam divides each gradient by its own running
    size, so a rounding-level change in a tiny gradient changes that weight's step by O(lr),
    and the GAN's two networks feed such changes back to each other. By the third step eager
    float32 itself is several percent of the update away from float64; the compiled engine
    must stay as close to float64 as eager float32 does (within a factor 3) and its losses
    within 1% of eager's."""
    for step in range(STEPS):
        eager = deviation(runs["eager"], runs["eager64"], step)
        compiled = deviation(runs["compiled"], runs["eager64"], step)
        assert compiled < 3 * eager + 1e-4, (step, compiled, eager)
        for key, value in runs["eager"]["losses"][step].items():
            assert runs["compiled"]["losses"][step][key] == pytest.approx(value, rel=1e-2), \
                (step, key)


def test_compiled_discriminator_backward_in_channels_last(runs):
    """torch 2.11's trap: the compiled discriminator's backward in channels_last. Here every
    part compiles (no fallback), on channels_last weights, and the first D update (made from
    that backward, with the text encoder's gradient through it) matches eager."""
    engine = runs["compiled"]["engine"]
    assert runs["warnings"] == []
    assert engine.compiled_parts == {"generator forward": True, "discriminator step": True,
                                     "generator step": True, "moving average": True}
    weight = engine.D.stages[1][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    assert deviation(runs["compiled"], runs["eager"], 0, ("D.", "text_encoder.")) < 1e-2


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_the_moving_average_is_one_lerp_of_every_weight(runs, backend):
    """Each step's average is G_ema + w·(G - G_ema) over all of G's weights, with the step's
    weight w, to the bit: the compiled engine's one compiled update and eager's one foreach
    call compute what a foreach lerp of the step's tensors computes."""
    run = runs[backend]
    names = [k.removeprefix("G_ema.") for k in run["init"] if k.startswith("G_ema.")
             and k.removeprefix("G_ema.") in dict(run["engine"].G_ema.named_parameters())]
    previous = run["init"]
    for step, now in enumerate(run["states"]):
        weight = 1 - min(run["engine"].config.ema_decay, 1 - 4 / (4 + step))
        want = [previous[f"G_ema.{k}"].float() for k in names]
        torch._foreach_lerp_(want, [now[f"G.{k}"].float() for k in names], weight)
        for name, value in zip(names, want, strict=True):
            assert torch.equal(now[f"G_ema.{name}"].float(), value), (step, name)
        previous = now


class CallCount:
    """The batch sizes of each call of a network."""

    def __init__(self, network: nn.Module):
        self.sizes: list[int] = []
        network.register_forward_pre_hook(lambda module, args: self.sizes.append(len(args[0])))


@pytest.mark.parametrize("interp_batch", ["full", "half"])
def test_each_network_runs_once_a_part_as_separate_calls_would(batches, interp_batch):
    """GAN-INT-CLS: G runs once (fake and interpolated together), D once in the D update
    (real/right, real/wrong, fake/right) and once in the G update (interpolated and fake),
    BatchNorm statistics taken per group: the first step's losses and G's statistics equal
    those of one call per group to float32 rounding, and the weights after it agree as
    eager's with float64 (test_first_step_matches_eager says why not closer). With
    interp_batch="half", GAN-INT's batch is half the size."""
    length = batches[0].captions.shape[-1]
    engines = [make_engine("eager", length=length, interp_batch=interp_batch, mode_seeking=0.0)
               for _ in range(2)]
    engines[1].grouped = False
    calls = [(CallCount(e.G), CallCount(e.D)) for e in engines]
    init = state(engines[1])
    got, want = (e.step(batches[0], step=0) for e in engines)
    for key in want:
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-5), key
    b, m = BATCH, BATCH // 2 if interp_batch == "half" else BATCH
    assert calls[0][0].sizes == [b + m] and calls[0][1].sizes == [3 * b, m + b]
    assert calls[1][0].sizes == [b, m] and calls[1][1].sizes == [b, b, b, m, b]
    grouped, separate = ({"init": init, "states": [state(e)]} for e in engines)
    assert deviation(grouped, separate, 0) < 1e-2
    for (name, a), b_ in zip(engines[0].G.named_buffers(), engines[1].G.buffers(),
                             strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6, msg=name)


def test_the_mode_seeking_pair_is_one_more_group_of_the_generator(batches):
    """With the mode-seeking term, G's one call holds the fake batch, GAN-INT's and the pair
    (the first half's embeddings with new noise), each with its own BatchNorm statistics: the
    first step's losses, the term's ratio and the weights after it are those of separate
    calls; the ratio is that of the images the pair's noise makes."""
    length = batches[0].captions.shape[-1]
    engines = [make_engine("eager", length=length, mode_seeking=1.0) for _ in range(2)]
    engines[1].grouped = False
    calls = [CallCount(e.G) for e in engines]
    init = state(engines[1])
    got, want = (e.step(batches[0], step=0) for e in engines)
    assert 0 < want["mode_seeking_ratio"].item()
    for key in want:
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-5), key
    assert calls[0].sizes == [BATCH + BATCH + BATCH // 2]
    assert calls[1].sizes == [BATCH, BATCH, BATCH // 2]
    grouped, separate = ({"init": init, "states": [state(e)]} for e in engines)
    assert deviation(grouped, separate, 0) < 1e-2
    # Off, the loss is the paper's: the same D update, and G's loss without the term.
    plain = make_engine("eager", length=length, mode_seeking=0.0).step(batches[0], step=0)
    assert "mode_seeking_ratio" not in plain
    assert plain["d_loss"].item() == pytest.approx(want["d_loss"].item(), rel=1e-5)
    assert plain["g_loss"].item() < want["g_loss"].item()


def test_the_papers_mismatched_pair_is_the_real_image_with_another_text(batches):
    """--mismatch text: D's update scores each real image with the next sample's embedding
    (the batch rolled by one), not the loader's wrong image with the right one."""
    length = batches[0].captions.shape[-1]
    engine = make_engine("eager", length=length, mismatch="text")
    inputs = []
    engine.D.register_forward_pre_hook(lambda module, args: inputs.append(args))
    engine.step(batches[0], step=0)
    images, text = inputs[0]  # the D update's one call: right, mismatched, fake
    real, again, _ = images.split(BATCH)
    right, wrong, right_again = text.split(BATCH)
    torch.testing.assert_close(again, real)
    torch.testing.assert_close(wrong, right.roll(1, dims=0))
    torch.testing.assert_close(right_again, right)
    assert not torch.equal(wrong, right)


def test_the_hard_mismatch_is_the_most_similar_text_of_another_class():
    text = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.6], [0.0, 1.0]])
    classes = torch.tensor([0, 0, 1, 2])
    # Row 1 is the most similar to row 0 but of its class: row 2 is the hardest other class.
    torch.testing.assert_close(hardest_other_class(text, classes), text[[2, 2, 1, 2]])
    alone = torch.tensor([3, 3, 3, 3])  # no other class in the batch: the next sample's
    torch.testing.assert_close(hardest_other_class(text, alone), text[[1, 2, 3, 0]])


def test_the_hard_mismatch_reaches_d_with_the_batchs_classes(batches):
    length = batches[0].captions.shape[-1]
    engine = make_engine("eager", length=length, mismatch="hard")
    inputs = []
    engine.D.register_forward_pre_hook(lambda module, args: inputs.append(args))
    engine.step(batches[0], step=0)
    images, text = inputs[0]
    right, wrong, _ = text.split(BATCH)
    torch.testing.assert_close(wrong, hardest_other_class(right, batches[0].class_ids))
    torch.testing.assert_close(images.split(BATCH)[1], images.split(BATCH)[0])


def test_the_class_loss_names_the_real_images_for_d_and_the_captions_classes_for_g(batches):
    """TAC-GAN's term: D's loss adds λ times the cross entropy of its class logits of the real
    images (the right and the wrong ones) against their classes; G's adds its own λ times
    that of its images against the classes of the records whose captions drew them. Two
    engines alike but for the λs take the same first D and G losses apart by exactly the
    difference in each λ times those cross entropies."""
    length = batches[0].captions.shape[-1]
    engines = [make_engine("eager", length=length, class_loss=d_weight, g_class_loss=g_weight,
                           mode_seeking=0.0, variant="cls")
               for d_weight, g_weight in ((1.0, 1.0), (3.0, 5.0))]
    batch = batches[0]
    images = F.adaptive_avg_pool2d(batch.images, 32)
    wrong = F.adaptive_avg_pool2d(batch.wrong_images, 32)
    text = engines[0].text_encoder.encode_mean(batch.captions).detach()
    fake = engines[0].G(torch.randn(BATCH, 100), text).detach()
    classes, wrong_classes = batch.class_ids, batch.wrong_class_ids
    d_losses = [e._discriminator_step(images, wrong, text, fake, classes, wrong_classes)
                for e in engines]
    g_losses = [e._generator_step(fake, text, None, None, None, None, None, classes)
                for e in engines]
    D = engines[0].D
    named_real = F.cross_entropy(torch.cat([D(images, text, with_classes=True)[1],
                                            D(wrong, text, with_classes=True)[1]]),
                                 torch.cat([classes, wrong_classes]))
    named_fake = F.cross_entropy(D(fake, text, with_classes=True)[1], classes)
    assert named_real.item() > 0 and named_fake.item() > 0
    (d_one, scores), (d_three, _) = d_losses
    assert (d_three - d_one).item() == pytest.approx(2 * named_real.item(), rel=1e-5)
    (g_one, metrics), (g_three, _) = g_losses
    assert (g_three - g_one).item() == pytest.approx(4 * named_fake.item(), rel=1e-5)
    for accuracy, rows in ((scores["class_real_acc"], 2 * BATCH),
                           (metrics["class_fake_acc"], BATCH)):
        assert 0 <= accuracy.item() <= 1
        assert accuracy.item() * rows == pytest.approx(round(accuracy.item() * rows))
    # The whole step trains the class head in D's update, and reports both accuracies.
    head = engines[0].D.classify.weight.detach().clone()
    out = engines[0].step(batch, step=0)
    assert {"class_real_acc", "class_fake_acc"} <= out.keys()
    assert not torch.equal(head, engines[0].D.classify.weight)
    # With the real image as the mismatched pair's image there is no wrong image to name.
    text_pairs = make_engine("eager", length=length, class_loss=1.0, mismatch="text")
    assert text_pairs._inputs(batch)[3] is batch.class_ids
    assert text_pairs._inputs(batch)[4] is None and engines[0]._inputs(batch)[4] is not None


def test_the_class_loss_needs_a_class_head():
    torch.manual_seed(0)
    models = preset("small")
    config = TrainConfig(data="-", run="-", preset="small", batch_size=BATCH, class_loss=1.0)
    with pytest.raises(ValueError, match="the class loss needs a discriminator with a class"):
        StepEngine(G=Generator(models.gan), D=Discriminator(models.gan),
                   text_encoder=TextEncoder(models.text), G_ema=None, config=config,
                   device=torch.device("cpu"), noise=torch.Generator(), backend="eager",
                   precision="fp32")


def r1_gradient(D: Discriminator, text_encoder: nn.Module, batch, weight: float) -> list:
    """The gradient over D's parameters of ``weight`` times the R1 penalty, by hand: D's
    score of each real image (at D's resolution) with its caption, differentiated with
    respect to the image, its squared norm averaged over the batch."""
    D = copy.deepcopy(D)
    images = F.adaptive_avg_pool2d(batch.images.double(), 32).requires_grad_(True)
    text = text_encoder.encode_mean(batch.captions.double())
    score = D(images, text, with_classes=True)[0]  # [B]
    grad, = torch.autograd.grad(score.sum(), images, create_graph=True)
    penalty = grad.square().sum(dim=(1, 2, 3)).mean()
    params = list(D.parameters())
    # The class head has no part in the score: no gradient.
    grads = torch.autograd.grad(weight * penalty, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach()
            for p, g in zip(params, grads, strict=True)]


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_r1_adds_gammas_penalty_to_d_on_every_kth_step(batches, backend, monkeypatch):
    """--r1 γ --r1-every 2, in float64: on step 0 D's update is the plain one; on step 1
    (the second of two) D's gradient is the plain one plus γ/2 · 2 times the gradient of the
    R1 penalty taken by hand, the logged d_loss is the plain one and r1 the penalty. The
    compiled backend (torch.compile a no-op here: Inductor's own run is the GPU check's)
    takes the R1 step through the part's eager function."""
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    length = batches[0].captions.shape[-1]
    gamma = 0.5
    plain = make_engine("eager", length=length, dtype=torch.float64)
    r1 = make_engine(backend, length=length, dtype=torch.float64, r1=gamma, r1_every=2)
    as64 = [dataclasses.replace(b, images=b.images.double(), wrong_images=b.wrong_images.double(),
                                captions=b.captions.double()) for b in batches[:2]]
    for step, batch in enumerate(as64):
        want = r1_gradient(r1.D, r1.text_encoder, batch, gamma / 2 * 2) if step else None
        got, base = r1.step(batch, step=step), plain.step(batch, step=step)
        assert ("r1" in got) == bool(step)
        assert got["d_loss"].item() == pytest.approx(base["d_loss"].item(), rel=1e-10)
        for i, (a, b) in enumerate(zip(r1.D.parameters(), plain.D.parameters(), strict=True)):
            extra = a.grad - b.grad
            if step:
                torch.testing.assert_close(extra, want[i], rtol=1e-7, atol=1e-12)
            else:
                assert torch.equal(extra, torch.zeros_like(extra))
    penalty = got["r1"].item()
    assert penalty > 0 and any(float(g.abs().max()) > 1e-8 for g in want)


def test_r1_needs_a_positive_interval():
    with pytest.raises(T2IError, match="r1_every must be at least 1"):
        TrainConfig(data="d", run="r", r1=1.0, r1_every=0)
    with pytest.raises(T2IError, match="r1 must be at least 0"):
        TrainConfig(data="d", run="r", r1=-1.0)


def test_d_learns_at_its_own_rate(batches):
    """d_lr_scale: D's optimizer steps at that multiple of G's learning rate, also after the
    trainer sets a new one (the halving)."""
    engine = make_engine("eager", length=batches[0].captions.shape[-1], d_lr_scale=4.0)
    assert engine.opt_d.param_groups[0]["lr"] == pytest.approx(4 * engine.config.lr)
    assert engine.opt_g.param_groups[0]["lr"] == pytest.approx(engine.config.lr)
    engine.set_lr(1e-4)
    assert [g["lr"] for g in engine.opt_d.param_groups] == [pytest.approx(4e-4)]
    assert [g["lr"] for g in engine.opt_g.param_groups] == [pytest.approx(1e-4)]


def test_mode_seeking_needs_four_samples():
    with pytest.raises(ValueError, match="mode-seeking term needs at least 4 samples"):
        make_engine("eager", length=201, mode_seeking=1.0, batch_size=2)


def test_half_interpolation_needs_four_samples():
    with pytest.raises(ValueError, match="interp_batch='half' needs at least 4 samples"):
        make_engine("eager", length=201, interp_batch="half", batch_size=2)


def concat_forward(D: Discriminator, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The paper's form: the projected text replicated over the grid, concatenated, mixed by
    the 1×1 convolution."""
    x = D.stages(images)  # [B, C, 4, 4]
    h = D.project(text)[:, :, None, None].expand(-1, -1, *x.shape[-2:])  # [B, P, 4, 4]
    return D.logit(D.joint(torch.cat([x, h], dim=1))).flatten()  # [B]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_discriminator_without_concatenation_equals_the_concat_form(memory_format, float64):
    # float64: float32's roundings of the split and the concatenated convolution differ by
    # processor (oneDNN's AVX-512 kernels left gradients near zero 3e-6 apart).
    torch.manual_seed(0)
    D = Discriminator(preset("small").gan).to(memory_format=memory_format)
    reference = copy.deepcopy(D)
    images = torch.randn(6, 3, 32, 32).contiguous(memory_format=memory_format)
    text = torch.randn(6, 128)
    outputs, grads = [], []
    for model, forward in ((D, Discriminator.forward), (reference, concat_forward)):
        x, t = images.clone().requires_grad_(), text.clone().requires_grad_()
        logits = forward(model, x, t)
        (logits * torch.linspace(-1, 1, 6)).sum().backward()
        outputs.append(logits)
        grads.append([x.grad, t.grad, *(p.grad for p in model.parameters())])
    torch.testing.assert_close(outputs[0], outputs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(D.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(a, b)  # the same BatchNorm statistics
    assert D.state_dict().keys() == reference.state_dict().keys()


def test_fused_layers_keep_the_networks(monkeypatch, float64):
    """The wiring of fused_layers (the Triton kernels themselves need a GPU): with the
    PyTorch reference in their place, fused networks keep their parameters, state-dict keys,
    outputs, gradients and BatchNorm statistics; finding the layers moves no statistic. In
    float64: G's first layer is a matrix product unfused and a transposed convolution fused,
    whose float32 roundings differ by more than assert_close's float32 tolerance."""
    from t2i_fast.ops import conv_bn_act

    calls = []
    reference_layer = conv_bn_act.conv_bn_act_ref
    monkeypatch.setattr(conv_bn_act, "conv_bn_act_ref",
                        lambda *args, **kw: calls.append(1) or reference_layer(*args, **kw))
    torch.manual_seed(0)
    config = preset("small").gan
    text = torch.randn(4, config.embedding_dim)
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    noise = torch.randn(4, config.z_dim)
    # G with each upsampling: a resize's 3×3 convolution is fused like the paper's
    # transposed one; the nearest layer, one transposed convolution of its own, is not.
    # Each case: the network, its inputs, its fused layers outside the residual blocks.
    stage_convs = {"transposed": {"stages.0.0", "stages.1.0", "stages.2.0"},
                   "nearest": {"stages.0.0"},
                   "bilinear": {"stages.0.0", "stages.1.1", "stages.2.1"}}
    # With CoordConv each doubling convolution comes one child later, after the coordinates,
    # and still fuses with its BatchNorm; D's first, with no BatchNorm, is never fused.
    coordinates = dataclasses.replace(config, coordinates="both")
    cases = (*((Generator(dataclasses.replace(config, upsample=mode)), (noise, text),
                stage_convs[mode]) for mode in UPSAMPLES),
             (Generator(coordinates), (noise, text), {"stages.0.0", "stages.1.1", "stages.2.1"}),
             *((Discriminator(gan).to(memory_format=torch.channels_last), (images, text),
                {"stages.1.0", "stages.2.0"}) for gan in (config, coordinates)))
    for model, inputs, fused_stages in cases:
        reference = copy.deepcopy(model)
        keys = list(model.state_dict())
        # Each layer is offered with the input its convolution saw.
        names = fuse_conv_bn_act(model, *inputs, impl="ref",
                                 wanted=lambda conv, bn, slope, x: x.shape[1] == conv.in_channels)
        assert {name for name in names if ".body." not in name} == fused_stages
        assert len(names) >= 4 and list(model.state_dict()) == keys
        for a, b in zip(model.buffers(), reference.buffers(), strict=True):
            assert torch.equal(a, b)
        outputs = []
        calls.clear()
        for network in (model, reference):
            out = network(*inputs)
            (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            outputs.append(out)
        assert len(calls) == len(names)  # each fused layer is one conv_bn_act call
        torch.testing.assert_close(outputs[0], outputs[1])
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad)
        for a, b in zip(model.buffers(), reference.buffers(), strict=True):
            torch.testing.assert_close(a, b)


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("expected size 32==32, stride 1==512 at dim=1 "
                             "(convolution_backward)\nmore detail")


def test_a_part_that_fails_to_compile_runs_eagerly(batches, monkeypatch):
    """torch.compile stubbed: the D step "compiles" but fails in its first backward, after
    its forward moved the BatchNorm statistics; the others come back uncompiled. One warning
    line names the part, and the step is eager's (the trial's statistics were undone)."""
    def fake_compile(fn, **options):
        if fn.__name__ != "_discriminator_step":
            return fn

        def broken(*args):
            loss, scores = fn(*args)
            return _FailingBackward.apply(loss), scores
        return broken

    monkeypatch.setattr(torch, "compile", fake_compile)
    length = batches[0].captions.shape[-1]
    eager = make_engine("eager", length=length)
    engine = make_engine("compiled", length=length)
    with pytest.warns(RuntimeWarning) as caught:
        got = engine.step(batches[0], step=0)
    messages = [str(w.message) for w in caught
                if str(w.message).startswith("torch.compile failed")]
    assert messages == ["torch.compile failed for the discriminator step (AssertionError: "
                        "expected size 32==32, stride 1==512 at dim=1 (convolution_backward)); "
                        "that part runs eagerly"]
    assert engine.compiled_parts == {"generator forward": True, "discriminator step": False,
                                     "generator step": True, "moving average": True}
    want = eager.step(batches[0], step=0)
    for key in want:
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-5), key
    # Had the trial's statistics stayed, they would be 3 momentum updates off and the batch
    # counts 1 ahead; the G step's D forward uses D after fused vs plain Adam (2·lr apart on
    # weights with a near-0 gradient), hence 1e-3.
    for a, b in zip(engine.D.buffers(), eager.D.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        engine.step(batches[1], step=1)
    assert not [w for w in later if str(w.message).startswith("torch.compile failed")]


def test_backend_and_precision_options(shapes, tmp_path):
    bad = CliRunner().invoke(main, ["train", "--data", str(shapes), "--backend", "jit"])
    assert bad.exit_code == 2 and "Invalid value for '--backend'" in bad.output
    with pytest.raises(T2IError, match="precision must be one of"):
        TrainConfig(data="-", run="-", precision="fp16")
    run = tmp_path / "run"
    ok = CliRunner().invoke(main, ["train", "--data", str(shapes), "--run", str(run),
                                   "--max-steps", "1", "--batch-size", "4", "--preset",
                                   "small", "--train-text-encoder"])
    assert ok.exit_code == 0, ok.output
    settings = json.loads((run / "config.json").read_text())
    assert (settings["backend"], settings["precision"]) == ("eager", "fp32")  # auto, CPU
    # A configuration written before these settings existed loads with their defaults.
    del settings["backend"], settings["precision"]
    (run / "config.json").write_text(json.dumps(settings))
    loaded = TrainConfig.load(run / "config.json")
    assert (loaded.backend, loaded.precision) == ("auto", "auto")
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--backend [auto|eager|compiled]" in help_text and "default: auto" in help_text


def test_bench_step_dry_run(capsys, monkeypatch, tmp_path):
    # With the text encoder trained, the engine's compiled parts are those the fixture
    # compiled (same shapes and settings): Inductor's cache makes its first step take seconds.
    monkeypatch.setattr(sys, "argv", ["bench_step.py", "--dry-run", "--train-text-encoder",
                                      "--json", str(tmp_path / "bench.json")])
    runpy.run_path(str(ROOT / "scripts" / "bench_step.py"), run_name="__main__")
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    assert result["dry_run"] is True and result["batch_sizes"] == [4]
    assert "dry run: CPU, compiled stock rows through aot_eager" in out
    stock = ["eager-fp32", "eager-bf16", "stock-compile-ro", "stock-compile",
             "stock-compile-ro-cl"]
    names = [*stock, "project-eager", "engine", "engine-fused-auto", "engine-fused-on",
             "engine-r1"]
    rows = {row["row"]: row for row in result["rows"]}
    assert sorted(rows) == sorted(names) and len(result["rows"]) == len(names)
    # The fused rows need CUDA: on the CPU each is a row with the engine's own refusal, named
    # as scripts/bench_kernels.py --step-json reads the engine's rows.
    for name, mode in (("engine-fused-auto", "auto"), ("engine-fused-on", "on")):
        row = rows.pop(name)
        assert row["error"] == ("ValueError: fused_layers needs the compiled backend on a "
                                "CUDA device")
        assert (row["backend"], row["preset"], row["fused_layers"]) == (name, "small", mode)
    assert (rows["engine"]["backend"], rows["engine"]["fused_layers"]) == ("engine", "off")
    for row in rows.values():
        assert "error" not in row and row["loss_check"] is True, row
        assert 0 < row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
        assert row["kernels_per_step"] is None  # counted on a GPU only
        assert {"layout", "dtype", "compiler", "adam", "text"} <= set(row)
    assert rows["stock-compile-ro-cl"]["layout"] == "channels_last"
    assert rows["stock-compile"]["layout"] == rows["eager-fp32"]["layout"] == "NCHW"
    assert rows["eager-bf16"]["dtype"] == "bf16 autocast"
    assert all(rows[name]["compiler"] == "aot_eager (dry run)"
               for name in ("stock-compile-ro", "stock-compile", "stock-compile-ro-cl"))
    assert all(rows["engine"]["compiled_parts"].values())
    # With --r1 the same compiled parts (R1's steps take the D part's eager function).
    assert rows["engine-r1"]["compiled_parts"] == rows["engine"]["compiled_parts"]
    assert (rows["engine-r1"]["r1"], rows["engine"]["r1"]) == (1.0, 0.0)
    assert rows["engine"]["loader_ratio"] > 0
    # The plain step computes the project's: the same first losses in float32.
    assert rows["project-eager"]["first_losses"] == pytest.approx(
        rows["eager-fp32"]["first_losses"], rel=0.01)
    rates = result["images_per_s"]["4"]
    assert rates == {name: rows[name]["images_per_s"] if name in rows else None
                     for name in names}
    best = max(stock, key=rates.get)
    assert result["best_stock"] == {"4": best}
    assert result["engine_over_stock"] == {"4": round(rates["engine"] / rates[best], 3)}
    assert result["fused_over_engine"] == {"4": {"engine-fused-auto": None,
                                                 "engine-fused-on": None}}
    assert result["r1_over_engine"] == {"4": round(rates["engine-r1"] / rates["engine"], 3)}
    assert result["project_eager_over_plain_eager"] == {
        "4": round(rates["project-eager"] / rates["eager-fp32"], 3)}
    assert result["flops_per_step"]["4"] > 0 and result["matmul_tflops"] > 0
    assert result["kernel_floor_us"] is None
