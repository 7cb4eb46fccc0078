"""The paper's objectives on logits: GAN-CLS / GAN-INT (Reed et al., ICML 2016) and the deep
symmetric structured joint embedding loss (Reed et al., CVPR 2016).

Every loss is computed in float32 (logits from bf16 autocast are upcast) through softplus:
-log σ(x) = softplus(-x) and -log(1 - σ(x)) = softplus(x), finite for any logit. Nothing
here reads a value back to the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _neg_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(-x.float())  # -log σ(x)


def _neg_log_one_minus_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x.float())  # -log(1 - σ(x))


def discriminator_loss(real_right: torch.Tensor, real_wrong: torch.Tensor | None,
                       fake_right: torch.Tensor, *, matching_aware: bool) -> torch.Tensor:
    """D's loss from its logits [B] on (real image, right text), a mismatched pair and (fake
    image, right text), averaged over the batch.

    The mismatched pair is a real image of another class with the right text, as Reed's code
    makes it (the trainer passes D(wrong image, text)); the paper's Algorithm 1 writes it as
    the real image with wrong text. Either way D learns to call a mismatch fake.

    GAN-CLS (``matching_aware``): -[log D(real, right) + ½(log(1 - D(mismatched))
    + log(1 - D(fake, right)))]. Plain GAN: -[log D(real) + log(1 - D(fake))], and
    ``real_wrong`` is ignored (may be None).
    """
    real = _neg_log_sigmoid(real_right)
    fake = _neg_log_one_minus_sigmoid(fake_right)
    if not matching_aware:
        return (real + fake).mean()
    if real_wrong is None:
        raise ValueError("the matching-aware loss needs the (real, wrong text) logits")
    return (real + 0.5 * (_neg_log_one_minus_sigmoid(real_wrong) + fake)).mean()


def generator_loss(fake_right: torch.Tensor, fake_interp: torch.Tensor | None = None, *,
                   interp_weight: float = 1.0) -> torch.Tensor:
    """G's non-saturating loss -log D(G(z, t), t), batch mean; with GAN-INT's logits
    D(G(z, t_β), t_β) on interpolated embeddings, plus ``interp_weight`` times their
    -log D (batch mean)."""
    loss = _neg_log_sigmoid(fake_right).mean()
    if fake_interp is not None:
        loss = loss + interp_weight * _neg_log_sigmoid(fake_interp).mean()
    return loss


def mode_seeking_loss(images_a: torch.Tensor, images_b: torch.Tensor, z_a: torch.Tensor,
                      z_b: torch.Tensor, *, eps: float = 1e-5,
                      across: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mode-seeking term of Mao et al. (CVPR 2019, MSGAN) for images G(z_a, t) and
    G(z_b, t) of the same embeddings: with r = mean|a - b| / mean|z_a - z_b| (how far the
    images move per unit of noise), the loss 1 / (r + eps), which G minimises to keep images
    of one caption apart. Returns (loss, r), both float32 scalars.

    ``across`` sums a 0-d tensor over processes, differentiably: then r is the global
    batch's (every process holds as many pairs), as one process with the whole batch has it."""
    image_sum = (images_a.float() - images_b.float()).abs().sum()
    noise_sum = (z_a.float() - z_b.float()).abs().sum()
    if across is not None:
        image_sum, noise_sum = across(image_sum), across(noise_sum)
    ratio = (image_sum / images_a.numel()) / (noise_sum / z_a.numel())
    return 1 / (ratio + eps), ratio.detach()


def class_loss(logits: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TAC-GAN's auxiliary classification term (Dash et al., 2017, after AC-GAN): the cross
    entropy of class logits [B, K] against class ids [B], batch mean, float32; with the share
    of rows whose top logit is their class, which carries no gradient. D takes it on real
    images (it learns to name their class); G on its images of those images' captions (it is
    pushed to draw that class)."""
    loss = F.cross_entropy(logits.float(), classes)
    accuracy = (logits.detach().argmax(dim=1) == classes).float().mean()
    return loss, accuracy


def interpolate_embeddings(t: torch.Tensor, *, beta: float = 0.5,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """GAN-INT's β·t1 + (1-β)·t2 for embeddings ``t`` [B, E]: t1 = t, t2 = t rolled by s rows
    along the batch, so sample i is mixed with sample (i - s) mod B and never with itself
    (for B > 1). s = 1 by default, which makes the result deterministic; with ``generator``,
    s is drawn uniformly from 1..B-1 (a CPU generator keeps this free of device syncs)."""
    n = t.shape[0]
    shift = 1
    if generator is not None and n > 1:
        shift = int(torch.randint(1, n, (), generator=generator, device=generator.device))
    return beta * t + (1 - beta) * t.roll(shift, dims=0)


def hardest_other_class(text: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """For each embedding of ``text`` [B, E], the most similar (cosine) embedding of the batch
    whose sample is of another class (``classes`` [B]): the mismatch D finds hardest to tell
    (a caption that differs in one attribute), where a random one differs in many. A sample
    whose batch holds no other class gets the next sample's."""
    unit = F.normalize(text.detach().float(), dim=1)
    similarity = unit @ unit.T  # [B, B]
    same = classes[:, None] == classes[None, :]
    similarity = similarity.masked_fill(same, -2.0)  # below any cosine
    best = similarity.argmax(dim=1)  # [B]
    fallback = torch.arange(1, len(text) + 1, device=text.device) % len(text)
    best = torch.where(same.all(dim=1), fallback, best)
    return text[best]


def sje_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
    """The symmetric structured joint embedding hinge loss (DS-SJE) with margin 1.

    S = image_emb @ text_emb.T [B, B], where row j of ``text_emb`` is the (class-averaged)
    text feature for sample j and ``labels`` [B] are the class ids. With M(i) the samples j
    with labels[j] != labels[i]:

        loss = (1/B) Σ_i [ mean_{j ∈ M(i)} max(0, 1 + S[i, j] - S[i, i])      (image → text)
                          + mean_{j ∈ M(i)} max(0, 1 + S[j, i] - S[i, i]) ]   (text → image)

    A sample with no other class in the batch contributes 0. Swapping ``image_emb`` and
    ``text_emb`` transposes S, which swaps the two directions: the loss is unchanged.
    """
    scores = image_emb.float() @ text_emb.float().T  # [B, B]
    matched = scores.diagonal()  # [B]
    mismatch = (labels[:, None] != labels[None, :]).to(scores.dtype)  # [B, B]
    count = mismatch.sum(dim=1).clamp(min=1)  # [B]; the mask is symmetric: rows = columns
    image_to_text = F.relu(1 + scores - matched[:, None]) * mismatch
    text_to_image = F.relu(1 + scores - matched[None, :]) * mismatch
    per_sample = image_to_text.sum(dim=1) / count + text_to_image.sum(dim=0) / count
    return per_sample.mean()
