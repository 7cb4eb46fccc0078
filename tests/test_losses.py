import math

import pytest
import torch

from t2i_fast.losses import (
    discriminator_loss,
    generator_loss,
    interpolate_embeddings,
    mode_seeking_loss,
    sje_loss,
)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _log_d(x: float) -> float:  # log D = log σ(x)
    return math.log(_sigmoid(x))


def _log_1m_d(x: float) -> float:  # log(1 - D)
    return math.log(1 - _sigmoid(x))


RR, RW, FR = [0.0, 2.0, -1.5], [1.0, -1.0, 0.5], [-0.5, 3.0, 0.25]


def _logits(*values):
    return [torch.tensor(v, requires_grad=True) for v in values]


def test_gan_cls_discriminator_loss_by_hand():
    expected = sum(-(_log_d(r) + 0.5 * (_log_1m_d(w) + _log_1m_d(f)))
                   for r, w, f in zip(RR, RW, FR, strict=True)) / 3
    rr, rw, fr = _logits(RR, RW, FR)
    loss = discriminator_loss(rr, rw, fr, matching_aware=True)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_plain_discriminator_loss_by_hand_ignores_wrong():
    expected = sum(-(_log_d(r) + _log_1m_d(f)) for r, f in zip(RR, FR, strict=True)) / 3
    rr, rw, fr = _logits(RR, RW, FR)
    loss = discriminator_loss(rr, rw, fr, matching_aware=False)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    other = discriminator_loss(rr, torch.full((3,), 50.0), fr, matching_aware=False)
    assert discriminator_loss(rr, None, fr, matching_aware=False).item() == loss.item()
    assert other.item() == loss.item()
    loss.backward()
    assert rw.grad is None


def test_matching_aware_needs_wrong_logits():
    with pytest.raises(ValueError, match="wrong"):
        discriminator_loss(torch.zeros(2), None, torch.zeros(2), matching_aware=True)


@pytest.mark.parametrize("matching_aware", [True, False])
def test_discriminator_loss_gradients_are_analytic(matching_aware):
    rr, rw, fr = _logits(RR, RW, FR)
    discriminator_loss(rr, rw, fr, matching_aware=matching_aware).backward()
    b = 3
    fake_weight = 0.5 if matching_aware else 1.0
    # d/dx -log σ(x) = σ(x) - 1;  d/dx -log(1 - σ(x)) = σ(x)
    expected_rr = [(_sigmoid(x) - 1) / b for x in RR]
    expected_fr = [fake_weight * _sigmoid(x) / b for x in FR]
    torch.testing.assert_close(rr.grad, torch.tensor(expected_rr))
    torch.testing.assert_close(fr.grad, torch.tensor(expected_fr))
    if matching_aware:
        torch.testing.assert_close(rw.grad, torch.tensor([0.5 * _sigmoid(x) / b for x in RW]))
    else:
        assert rw.grad is None


def test_losses_are_finite_for_extreme_logits():
    big = torch.tensor([200.0, -200.0])
    loss = discriminator_loss(-big, big, big, matching_aware=True)
    # Sample 0: -log σ(-200) + ½(-log(1 - σ(200)) · 2) = 200 + 200; sample 1: ≈ 0.
    assert loss.item() == pytest.approx(200.0, rel=1e-6)
    assert generator_loss(-big).item() == pytest.approx(100.0, rel=1e-6)


def test_generator_loss_by_hand():
    fake = torch.tensor(FR)
    assert generator_loss(fake).item() == pytest.approx(
        sum(-_log_d(x) for x in FR) / 3, rel=1e-6)
    interp = torch.tensor([1.0, -2.0])
    extra = sum(-_log_d(x) for x in [1.0, -2.0]) / 2
    base = generator_loss(fake).item()
    for w in (0.0, 1.0, 2.5):
        got = generator_loss(fake, interp, interp_weight=w).item()
        assert got == pytest.approx(base + w * extra, rel=1e-6)


def test_generator_loss_gradient_is_non_saturating():
    x = torch.tensor([-8.0, 0.0], requires_grad=True)
    generator_loss(x).backward()
    # -log D keeps a strong gradient where D rejects the fake (σ(-8) - 1 ≈ -1).
    torch.testing.assert_close(x.grad, torch.tensor([_sigmoid(-8.0) - 1, -0.5]) / 2)


def test_mode_seeking_loss_by_hand():
    a = torch.tensor([[0.0, 1.0], [0.5, -0.5]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.5]])  # |a - b|: 1, 0, 0.5, 1 → mean 0.625
    za, zb = torch.zeros(2, 3), torch.full((2, 3), 2.0)  # mean |za - zb| = 2
    loss, ratio = mode_seeking_loss(a, b, za, zb)
    assert ratio.item() == pytest.approx(0.3125)
    assert loss.item() == pytest.approx(1 / (0.3125 + 1e-5))
    assert loss.dtype == torch.float32


def test_mode_seeking_gradient_pushes_the_images_apart():
    a = torch.tensor([[0.0, 1.0]], requires_grad=True)
    b = torch.tensor([[0.5, 0.0]], requires_grad=True)
    loss, _ = mode_seeking_loss(a, b, torch.zeros(1, 4), torch.ones(1, 4))
    loss.backward()
    # A step against the gradient moves each pixel of a away from b's, and b's away from a's.
    assert torch.all(torch.sign(-a.grad) == torch.sign(a.detach() - b.detach()))
    assert torch.all(torch.sign(-b.grad) == torch.sign(b.detach() - a.detach()))


def test_bf16_logits_give_float32_loss():
    x = torch.tensor(RR, dtype=torch.bfloat16)
    assert discriminator_loss(x, x, x, matching_aware=True).dtype == torch.float32
    assert generator_loss(x, x).dtype == torch.float32


def test_interpolate_embeddings_default_is_a_fixed_shift():
    t = torch.arange(12.0).reshape(4, 3)
    got = interpolate_embeddings(t, beta=0.25)
    expected = torch.stack([0.25 * t[i] + 0.75 * t[(i - 1) % 4] for i in range(4)])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(interpolate_embeddings(t), (t + t.roll(1, 0)) / 2)
    assert interpolate_embeddings(t, beta=1.0).equal(t)


def test_interpolate_embeddings_random_shift_never_pairs_with_itself():
    t = torch.randn(5, 4)
    seen = set()
    for seed in range(20):
        got = interpolate_embeddings(t, generator=torch.Generator().manual_seed(seed))
        again = interpolate_embeddings(t, generator=torch.Generator().manual_seed(seed))
        assert got.equal(again)
        shifts = [s for s in range(5) if torch.allclose(got, (t + t.roll(s, 0)) / 2)]
        assert len(shifts) == 1 and shifts[0] != 0
        seen.add(shifts[0])
    assert len(seen) > 1


def _sje_by_loops(img, txt, labels, *, directions=("image", "text")):
    s = img @ txt.T
    n = len(labels)
    total = 0.0
    for i in range(n):
        other = [j for j in range(n) if labels[j] != labels[i]]
        if not other:
            continue
        if "image" in directions:
            total += sum(max(0.0, 1 + s[i, j].item() - s[i, i].item())
                         for j in other) / len(other)
        if "text" in directions:
            total += sum(max(0.0, 1 + s[j, i].item() - s[i, i].item())
                         for j in other) / len(other)
    return total / n


def test_sje_loss_by_hand():
    img = torch.tensor([[1.0], [2.0]])
    txt = torch.tensor([[1.0], [1.0]])
    # S = [[1, 1], [2, 2]]; image→text: max(0, 1+1-1) = 1, max(0, 1+2-2) = 1;
    # text→image: max(0, 1+2-1) = 2, max(0, 1+1-2) = 0; (1 + 2 + 1 + 0) / 2 = 2.
    assert sje_loss(img, txt, torch.tensor([0, 1])).item() == pytest.approx(2.0)
    assert sje_loss(img, txt, torch.tensor([3, 3])).item() == 0.0  # no mismatched pair


def test_sje_loss_matches_loops_with_repeated_classes():
    img, txt = torch.randn(7, 5), torch.randn(7, 5)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3])
    expected = _sje_by_loops(img, txt, labels.tolist())
    assert expected > 0
    assert sje_loss(img, txt, labels).item() == pytest.approx(expected, rel=1e-5)


def test_sje_loss_zero_only_when_matches_win_by_the_margin():
    labels = torch.tensor([0, 1, 2, 0])
    classes = torch.eye(3)[labels]  # [4, 3]
    # Matching scores 1.0 beat mismatches 0.0 by exactly the margin: zero loss.
    assert sje_loss(classes, classes, labels).item() == 0.0
    # 0.9 falls short of the margin by 0.1 for every mismatched pair.
    assert sje_loss(0.9**0.5 * classes, 0.9**0.5 * classes, labels).item() == pytest.approx(
        0.2, rel=1e-5)
    assert sje_loss(torch.randn(4, 3), torch.randn(4, 3), labels).item() > 0


def test_sje_loss_is_symmetric_and_differentiable():
    labels = torch.tensor([0, 1, 1, 2, 0])
    img = torch.randn(5, 6, requires_grad=True)
    txt = torch.randn(5, 6, requires_grad=True)
    loss = sje_loss(img, txt, labels)
    torch.testing.assert_close(sje_loss(txt, img, labels), loss)
    # Each direction alone is not symmetric; their sum is.
    one_way = _sje_by_loops(img.detach(), txt.detach(), labels.tolist(), directions=("image",))
    other_way = _sje_by_loops(txt.detach(), img.detach(), labels.tolist(),
                              directions=("image",))
    assert one_way != pytest.approx(other_way)
    # With S symmetric (the same embeddings on both sides) the two directions agree.
    sym = torch.randn(5, 6)
    half = _sje_by_loops(sym, sym, labels.tolist(), directions=("image",))
    assert sje_loss(sym, sym, labels).item() == pytest.approx(2 * half, rel=1e-5)
    loss.backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
