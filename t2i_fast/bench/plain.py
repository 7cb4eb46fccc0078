"""Reed et al.'s GAN-INT-CLS networks and training step as a user writes them in plain
PyTorch: ``torch.nn`` modules in NCHW, G's first layer an ``nn.ConvTranspose2d`` of the 1×1
map, D's joint layer a concatenation of the replicated text projection and a 1×1
convolution, the losses ``binary_cross_entropy_with_logits``. The stock rows of
``scripts/bench_step.py`` time this step; nothing here comes from the project's models,
engine or losses, so that the comparison is with what PyTorch gives without the project.

The networks have the project's parameters, tensor for tensor (``load_project_weights``), so
both start from the same weights and compute the same functions (``tests/test_bench_plain.py``
checks outputs and first training steps against the project's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    """act(x + f(x)), f a bottleneck: 1×1 conv to ``hidden``, 3×3, 3×3 back, each with BN."""

    def __init__(self, channels: int, hidden: int, act: Callable[[], nn.Module]):
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act(),
            nn.Conv2d(hidden, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), act(),
            nn.Conv2d(hidden, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.f(x))


def _leaky() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


def _relu() -> nn.Module:
    return nn.ReLU(inplace=True)


def _stages(image_size: int) -> int:
    """Resolution doublings between the 4×4 map and the image."""
    return image_size.bit_length() - 3


class PlainGenerator(nn.Module):
    """G(z [B, z_dim], text [B, embedding_dim]) → images [B, 3, S, S]."""

    def __init__(self, *, image_size: int, ngf: int, z_dim: int, embedding_dim: int,
                 projected_dim: int, residual: bool):
        super().__init__()
        n = _stages(image_size)
        widths = [ngf * 2 ** (n - 1 - i) for i in range(n)]
        self.embed = nn.Sequential(nn.Linear(embedding_dim, projected_dim, bias=False),
                                   nn.BatchNorm1d(projected_dim), _leaky())
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim + projected_dim, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0])]
        layers.append(Residual(widths[0], widths[0] // 4, _relu) if residual else _relu())
        for i in range(1, n):
            layers += [nn.ConvTranspose2d(widths[i - 1], widths[i], 4, 2, 1, bias=False),
                       nn.BatchNorm2d(widths[i])]
            layers.append(Residual(widths[i], widths[i] // 4, _relu) if residual and i == 1
                          else _relu())
        layers += [nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, self.embed(text)], 1)[:, :, None, None])


class PlainDiscriminator(nn.Module):
    """D(images [B, 3, S, S], text [B, embedding_dim]) → one logit per image [B]."""

    def __init__(self, *, image_size: int, ndf: int, embedding_dim: int, projected_dim: int,
                 residual: bool):
        super().__init__()
        n = _stages(image_size)
        widths = [ndf * 2**i for i in range(n)]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, 2, 1), _leaky()]
        for i in range(1, n):
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, 2, 1, bias=False),
                       nn.BatchNorm2d(widths[i])]
            layers.append(Residual(widths[i], widths[i] // 4, _leaky)
                          if residual and i == n - 1 else _leaky())
        self.image = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(embedding_dim, projected_dim, bias=False),
                                   nn.BatchNorm1d(projected_dim), _leaky())
        self.joint = nn.Sequential(nn.Conv2d(widths[-1] + projected_dim, widths[-1], 1,
                                             bias=False),
                                   nn.BatchNorm2d(widths[-1]), _leaky())
        self.logit = nn.Conv2d(widths[-1], 1, 4)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.image(images)  # [B, C, 4, 4]
        t = self.embed(text)[:, :, None, None].expand(-1, -1, *h.shape[-2:])  # [B, P, 4, 4]
        return self.logit(self.joint(torch.cat([h, t], 1))).flatten()  # [B]


def plain_networks(config) -> tuple[PlainGenerator, PlainDiscriminator]:
    """G and D with the widths of ``config`` (a ``GANConfig``, read by attribute)."""
    shared = {"image_size": config.image_size, "embedding_dim": config.embedding_dim,
              "projected_dim": config.projected_dim, "residual": config.residual}
    return (PlainGenerator(ngf=config.ngf, z_dim=config.z_dim, **shared),
            PlainDiscriminator(ndf=config.ndf, **shared))


def load_project_weights(network: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies a project network's state dict (``Generator`` into ``PlainGenerator``,
    ``Discriminator`` into ``PlainDiscriminator``) into ``network``.

    The plain networks declare their layers in the project's order, so the two state dicts
    pair entry by entry; each pair must agree in kind (weight, bias, running_mean, …) and
    shape. The shapes agree because G's first layer is a transposed convolution in both (the
    project computes it as a matrix product, same weight) and D's joint 1×1 convolution
    takes [image features, text projection] in that order in both (the project splits its
    weight instead of concatenating)."""
    mine = network.state_dict()
    if len(mine) != len(state):
        raise ValueError(f"{type(network).__name__} has {len(mine)} entries, the project's "
                         f"state dict {len(state)}")
    copied = {}
    for (name, value), (source, given) in zip(mine.items(), state.items(), strict=True):
        if name.rpartition(".")[2] != source.rpartition(".")[2] or value.shape != given.shape:
            raise ValueError(f"{name} {tuple(value.shape)} does not pair with the project's "
                             f"{source} {tuple(given.shape)}")
        copied[name] = given
    network.load_state_dict(copied)


def interpolate(text: torch.Tensor) -> torch.Tensor:
    """GAN-INT's embeddings halfway between each caption's and the previous sample's."""
    return 0.5 * text + 0.5 * text.roll(1, 0)


def generate(G: nn.Module, z: torch.Tensor, text: torch.Tensor, z_mixed: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fake images, GAN-INT's interpolated embeddings and their images."""
    mixed = interpolate(text)
    return G(z, text), mixed, G(z_mixed, mixed)


def discriminator_loss(D: nn.Module, images: torch.Tensor, wrong: torch.Tensor,
                       text: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """GAN-CLS: real/right is real, real/wrong and fake/right are fake (half weight each)."""
    real_right, real_wrong, fake_right = D(images, text), D(wrong, text), D(fake, text)
    return (F.binary_cross_entropy_with_logits(real_right, torch.ones_like(real_right))
            + 0.5 * (F.binary_cross_entropy_with_logits(real_wrong, torch.zeros_like(real_wrong))
                     + F.binary_cross_entropy_with_logits(fake_right,
                                                          torch.zeros_like(fake_right))))


def generator_loss(D: nn.Module, fake: torch.Tensor, text: torch.Tensor,
                   interp: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """Non-saturating: D should call both fake batches real."""
    # The interpolated batch first, as the project's step: D's running statistics follow
    # the order of its calls.
    inter = D(interp, mixed)
    right = D(fake, text)
    return (F.binary_cross_entropy_with_logits(right, torch.ones_like(right))
            + F.binary_cross_entropy_with_logits(inter, torch.ones_like(inter)))


class PlainStep:
    """One GAN-INT-CLS step: D's update on (real, right), (real, wrong), (fake, right), then
    G's on D's verdict on its fake and interpolated images, G run once per step (its fakes
    detached for D's update). The text embeddings are given (a frozen encoder's, computed
    beforehand); no moving average of G.

    ``compile``: None for eager, else ``torch.compile``'s keyword arguments, applied to
    ``generate``, ``discriminator_loss`` and ``generator_loss`` (backward and the optimizers
    stay outside, as usual). ``autocast``: None or the dtype of an autocast region around
    each update's forward.
    """

    def __init__(self, G: nn.Module, D: nn.Module, *, lr: float = 2e-4,
                 betas: tuple[float, float] = (0.5, 0.999), fused_adam: bool = False,
                 autocast: torch.dtype | None = None, compile: dict | None = None):
        self.G, self.D = G, D
        adam = {"lr": lr, "betas": betas, **({"fused": True} if fused_adam else {})}
        self.opt_g = torch.optim.Adam(G.parameters(), **adam)
        self.opt_d = torch.optim.Adam(D.parameters(), **adam)
        self.autocast = autocast
        self.cuda_graphs = bool(compile) and compile.get("mode") == "reduce-overhead"
        wrap = (lambda fn: torch.compile(fn, **compile)) if compile is not None else (
            lambda fn: fn)
        self._generate, self._d_loss, self._g_loss = (
            wrap(generate), wrap(discriminator_loss), wrap(generator_loss))

    def _forward(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        device = next(self.G.parameters()).device.type
        return torch.autocast(device, dtype=self.autocast)

    def __call__(self, images: torch.Tensor, wrong: torch.Tensor, text: torch.Tensor,
                 z: torch.Tensor, z_mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both updates; returns D's and G's losses (detached)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self._forward():
            fake, mixed, interp = self._generate(self.G, z, text, z_mixed)
            d_loss = self._d_loss(self.D, images, wrong, text, fake.detach())
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        # D's weights need no gradient from G's loss.
        self.D.requires_grad_(False)
        with self._forward():
            g_loss = self._g_loss(self.D, fake, text, interp, mixed)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.D.requires_grad_(True)
        self.opt_g.step()
        return d_loss.detach(), g_loss.detach()
