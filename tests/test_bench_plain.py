"""The step benchmark's plain-PyTorch yardstick (t2i_fast/bench/plain.py) computes the
project's networks and objective: with the project's weights copied in, the same outputs in
train and eval mode, the same BatchNorm statistics, and the same training steps as the
project's eager engine."""

import dataclasses

import pytest
import torch

from t2i_fast.bench.plain import PlainStep, load_project_weights, plain_networks
from t2i_fast.models import Discriminator, GANConfig, Generator, preset
from t2i_fast.train import TrainConfig
from t2i_fast.train.engine import StepEngine

CONFIGS = {
    "small": preset("small").gan,  # residual blocks, 32 px
    "no-residual-64px": GANConfig(ngf=8, ndf=8, embedding_dim=32, projected_dim=8,
                                  residual=False),
}


def pair(config: GANConfig):
    torch.manual_seed(0)
    G, D = Generator(config), Discriminator(config)
    plain_G, plain_D = plain_networks(config)
    load_project_weights(plain_G, G.state_dict())
    load_project_weights(plain_D, D.state_dict())
    return G, D, plain_G, plain_D


def inputs(config: GANConfig, n: int = 6):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, config.z_dim, generator=g),
            torch.randn(n, config.embedding_dim, generator=g),
            torch.rand(n, 3, config.image_size, config.image_size, generator=g) * 2 - 1)


@pytest.mark.parametrize("name", CONFIGS)
def test_plain_networks_compute_the_projects(name):
    config = CONFIGS[name]
    G, D, plain_G, plain_D = pair(config)
    z, text, images = inputs(config)
    for mode in ("train", "eval"):  # train: batch statistics, and they move alike
        for network in (G, D, plain_G, plain_D):
            network.train(mode == "train")
        with torch.no_grad():
            fake = G(z, text)
            torch.testing.assert_close(plain_G(z, text), fake, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(plain_D(images, text), D(images, text),
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(plain_D(fake, text), D(fake, text),
                                       rtol=1e-5, atol=1e-5)
    for project, plain in ((G, plain_G), (D, plain_D)):
        for (name_a, a), (name_b, b) in zip(project.state_dict().items(),
                                            plain.state_dict().items(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name_a}/{name_b}")


def test_reed_parameters_pair_one_to_one():
    G, D = plain_networks(preset("reed").gan)
    torch.manual_seed(0)
    project_G = Generator(preset("reed").gan)
    load_project_weights(G, project_G.state_dict())
    assert torch.equal(G.net[0].weight, project_G.stages[0][0].weight)
    assert G.net[0].weight.shape == (228, 1024, 4, 4)  # [z + P, 8·ngf, 4, 4]
    project_D = Discriminator(preset("reed").gan)
    load_project_weights(D, project_D.state_dict())
    assert torch.equal(D.joint[0].weight, project_D.joint[0].weight)
    assert D.joint[0].weight.shape == (512, 640, 1, 1)  # [8·ndf, 8·ndf + P, 1, 1]


def test_weights_of_another_network_are_refused():
    G, _ = plain_networks(preset("reed").gan)
    with pytest.raises(ValueError, match="has 68 entries, the project's state dict 32"):
        load_project_weights(G, Generator(preset("dcgan").gan).state_dict())
    narrow, _ = plain_networks(dataclasses.replace(preset("reed").gan, projected_dim=64))
    with pytest.raises(ValueError, match=r"embed.0.weight \(64, 1024\) does not pair"):
        load_project_weights(narrow, Generator(preset("reed").gan).state_dict())


class FixedText(torch.nn.Module):
    """A frozen text encoder that hands back the embeddings it was given."""

    def __init__(self, text: torch.Tensor):
        super().__init__()
        self.text = text

    def encode_mean(self, captions: torch.Tensor) -> torch.Tensor:
        return self.text


class Batch:
    def __init__(self, images, wrong, captions):
        self.images, self.wrong_images, self.captions = images, wrong, captions


def test_plain_step_is_the_projects_eager_step(float64):
    # float64: Adam divides by |gradient|, and where a gradient is near zero float32's
    # rounding of the two steps' different call orders (which the thread count changes)
    # becomes a step of ~lr that grows from step to step.
    config = CONFIGS["small"]
    G, D, plain_G, plain_D = pair(config)
    n = 6
    _, text, images = inputs(config, n)
    wrong = images.roll(1, 0)
    # The plain step is the paper's: no mode-seeking term, no class loss, one learning rate
    # (bench_step.py's config as well).
    settings = TrainConfig(data="-", run="-", preset="small", batch_size=n,
                           text_encoder="frozen.pt", ema_decay=0.0, mode_seeking=0.0,
                           class_loss=0.0, d_lr_scale=1.0)
    engine = StepEngine(G=G, D=D, text_encoder=FixedText(text), G_ema=None, config=settings,
                        device=torch.device("cpu"), noise=torch.Generator().manual_seed(3),
                        backend="eager", precision="fp32")
    # One call per batch, as the plain step makes them: one call over the batches side by side
    # rounds float32 otherwise (tests/test_grouped_batchnorm.py bounds that), and Adam's division
    # by |gradient| grows the difference step by step.
    engine.grouped = False
    plain = PlainStep(plain_G, plain_D)
    noise = torch.Generator().manual_seed(3)  # drawn as the engine draws: z, then GAN-INT's
    batch = Batch(images, wrong, torch.zeros(n, 4, 1, 1))
    for step in range(3):
        ours = engine.step(batch, step=step)
        z = torch.randn(n, config.z_dim, generator=noise)
        z_mixed = torch.randn(n, config.z_dim, generator=noise)
        d_loss, g_loss = plain(images, wrong, text, z, z_mixed)
        torch.testing.assert_close(d_loss.float(), ours["d_loss"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_loss.float(), ours["g_loss"], rtol=1e-6, atol=1e-7)
    for project, mine in ((G, plain_G), (D, plain_D)):
        for (name, a), b in zip(project.state_dict().items(), mine.state_dict().values(),
                                strict=True):
            # The engine's losses are float32 by design (t2i_fast/losses.py): their rounding
            # moves weights by ~lr·1e-2 through Adam, the same at any thread count.
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert all(p.requires_grad for p in plain_D.parameters())  # unfrozen after G's update
