"""The training losses on inputs small enough to check by hand."""
import math

import pytest
import torch

from rrcm.train.losses import consistency_finetune_loss, info_nce, symmetric_info_nce


def lse(*values: float) -> float:
    return math.log(sum(math.exp(v) for v in values))


def test_info_nce_2x2_by_hand():
    # q1 = e1, q2 = e2; k1 = e1, k2 = (e1 + e2)/sqrt 2 (unnormalized on input: both sides are normalized).
    q = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    k = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    T = 0.2
    # cosines: q1.k1 = 1, q1.k2 = c, q2.k1 = 0, q2.k2 = c; positives on the diagonal.
    expected = [lse(1 / T, c / T) - 1 / T, lse(0 / T, c / T) - c / T]
    got = info_nce(q, k, temperature=T)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_info_nce_key_offset_3_keys_by_hand():
    # Two queries against three gathered keys; this process's keys start at offset 1.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    T = 0.5
    # q1: cosines (0, 1, -1), positive = key 1; q2: cosines (1, 0, 0), positive = key 2.
    expected = [lse(0, 1 / T, -1 / T) - 1 / T, lse(1 / T, 0, 0) - 0]
    assert info_nce(q, k, temperature=T, key_offset=1).tolist() == pytest.approx(expected, rel=1e-6)


def test_info_nce_is_scale_invariant_and_low_for_matching_pairs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 5, generator=g)
    k = torch.randn(6, 5, generator=g)
    assert torch.allclose(info_nce(q, k), info_nce(7 * q, 0.1 * k), atol=1e-6)
    # Keys equal to their queries: every positive has the largest logit.
    matched = info_nce(q, q)
    assert (matched < info_nce(q, k)).all()
    assert (matched < math.log(6)).all()


def test_symmetric_info_nce_averages_both_directions():
    g = torch.Generator().manual_seed(1)
    qa, qb, ka, kb = (torch.randn(4, 3, generator=g) for _ in range(4))
    expected = 0.5 * (info_nce(qa, kb) + info_nce(qb, ka))
    assert torch.allclose(symmetric_info_nce(qa, qb, ka, kb), expected)


def test_consistency_finetune_loss_two_copies_by_hand():
    # One image, two classes, label 0; copy 1 p = (1/2, 1/2), copy 2 p = (3/4, 1/4).
    logits = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])]
    labels = torch.tensor([0])
    lam, eta = 10.0, 0.5
    avg = (0.625, 0.375)
    ce = (-math.log(0.5) - math.log(0.75)) / 2
    kl1 = avg[0] * math.log(avg[0] / 0.5) + avg[1] * math.log(avg[1] / 0.5)
    kl2 = avg[0] * math.log(avg[0] / 0.75) + avg[1] * math.log(avg[1] / 0.25)
    ent = -(avg[0] * math.log(avg[0]) + avg[1] * math.log(avg[1]))
    loss, parts = consistency_finetune_loss(logits, labels, lam, eta)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["kl"].item() == pytest.approx((kl1 + kl2) / 2, rel=1e-5)
    assert parts["entropy"].item() == pytest.approx(ent, rel=1e-6)
    assert loss.item() == pytest.approx(ce + lam * (kl1 + kl2) / 2 + eta * ent, rel=1e-6)


def test_consistency_terms_identities():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0])
    # Identical copies: no inconsistency, and the loss is CE + eta * H(p).
    loss, parts = consistency_finetune_loss([z1, z1.clone()], y, 10.0, 0.5)
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(parts["ce"], torch.nn.functional.cross_entropy(z1, y))
    # KL(p_avg || p_j) averaged, plus H(p_avg), is the cross-entropy of each copy against p_avg.
    _, parts = consistency_finetune_loss([z1, z2], y, 1.0, 1.0)
    p_avg = (z1.softmax(1) + z2.softmax(1)) / 2
    xent = -(p_avg * (z1.log_softmax(1) + z2.log_softmax(1)) / 2).sum(1).mean()
    assert (parts["kl"] + parts["entropy"]).item() == pytest.approx(xent.item(), rel=1e-5)


def test_consistency_loss_gradients_stay_finite_for_saturated_softmax():
    z1 = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)
    z2 = torch.tensor([[-1e4, 1e4, 0.0]], requires_grad=True)
    loss, _ = consistency_finetune_loss([z1, z2], torch.tensor([1]), 20.0, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_consistency_loss_needs_two_copies():
    with pytest.raises(ValueError):
        consistency_finetune_loss([torch.zeros(1, 2)], torch.tensor([0]), 1.0, 0.5)


# --- the cascade's diversity term -----------------------------------------------------------------------

def test_diversity_term_by_hand_one_unrecovered_one_recovered_image():
    # Three classes. Image 0, label 2: copies p = (1/2, 1/4, 1/4) and (1/4, 1/2, 1/4), average (3/8, 3/8, 1/4):
    # its top class is not the label, so it gets CE + w * KL(uniform || p_avg). Image 1, label 0: both copies
    # p = (2/3, 1/6, 1/6): recovered, so CE + lam * KL (0 here) + eta * H.
    a, b = torch.tensor([2.0, 1.0, 1.0]).log(), torch.tensor([1.0, 2.0, 1.0]).log()
    c = torch.tensor([4.0, 1.0, 1.0]).log()
    logits = [torch.stack([a, c]), torch.stack([b, c])]
    labels = torch.tensor([2, 0])
    lam, eta, w = 10.0, 0.5, 3.0
    avg = (3 / 8, 3 / 8, 1 / 4)
    kl_uniform = sum(math.log((1 / 3) / q) for q in avg) / 3
    unrecovered = -math.log(1 / 4) + w * kl_uniform  # both copies give the label 1/4
    p = (2 / 3, 1 / 6, 1 / 6)
    recovered = -math.log(2 / 3) + eta * -sum(q * math.log(q) for q in p)
    loss, parts = consistency_finetune_loss(logits, labels, lam, eta, diversity=w)
    assert loss.item() == pytest.approx((unrecovered + recovered) / 2, rel=1e-6)
    assert parts["unrecovered"].item() == 0.5
    assert parts["spread"].item() == pytest.approx((kl_uniform + sum(math.log((1 / 3) / q) for q in p) / 3) / 2, rel=1e-6)


def test_diversity_term_equals_a_direct_kl_from_uniform():
    g = torch.Generator().manual_seed(3)
    logits = [3 * torch.randn(64, 10, generator=g) for _ in range(2)]
    labels = torch.randint(10, (64,), generator=g)
    p_avg = (logits[0].double().softmax(1) + logits[1].double().softmax(1)) / 2
    uniform = torch.full_like(p_avg, 0.1)
    reference = torch.nn.functional.kl_div(p_avg.log(), uniform, reduction="none").sum(1)  # KL(uniform || p_avg)
    _, parts = consistency_finetune_loss(logits, labels, 20.0, 0.5, diversity=1.0)
    assert parts["spread"].item() == pytest.approx(reference.mean().item(), rel=1e-5)
    wrong = p_avg.argmax(1) != labels
    assert 0 < wrong.sum() < 64 and parts["unrecovered"].item() == pytest.approx(wrong.double().mean().item())


def test_diversity_weight_zero_is_the_old_loss_exactly():
    g = torch.Generator().manual_seed(4)
    z1, z2 = (torch.randn(8, 5, generator=g, requires_grad=True) for _ in range(2))
    y = torch.randint(5, (8,), generator=g)
    lam = torch.rand(8, generator=g) * 20
    old, old_parts = consistency_finetune_loss([z1, z2], y, lam, 0.5)
    old_grads = torch.autograd.grad(old, (z1, z2))
    new, parts = consistency_finetune_loss([z1, z2], y, lam, 0.5, diversity=0.0)
    assert torch.equal(old, new) and parts.keys() == old_parts.keys()
    assert all(torch.equal(u, v) for u, v in zip(old_grads, torch.autograd.grad(new, (z1, z2))))


def test_diversity_leaves_recovered_images_alone():
    # Every image's copies agree on its label: with any weight, the same loss and gradients as without.
    g = torch.Generator().manual_seed(5)
    y = torch.arange(6) % 4
    z1, z2 = (torch.randn(6, 4, generator=g) + 8 * torch.nn.functional.one_hot(y, 4) for _ in range(2))
    z1.requires_grad_(), z2.requires_grad_()
    old, _ = consistency_finetune_loss([z1, z2], y, 20.0, 0.5)
    new, parts = consistency_finetune_loss([z1, z2], y, 20.0, 0.5, diversity=5.0)
    assert parts["unrecovered"].item() == 0
    torch.testing.assert_close(new, old)
    for u, v in zip(torch.autograd.grad(old, (z1, z2)), torch.autograd.grad(new, (z1, z2))):
        torch.testing.assert_close(u, v)


def test_diversity_gradient_lowers_an_unrecovered_images_wrong_top_class():
    # Both copies confidently vote class 1, the label is 0. The diversity term's gradient lowers the wrong top
    # class and raises the other classes.
    z1 = torch.tensor([[0.0, 6.0, 1.0, -1.0]], requires_grad=True)
    z2 = torch.tensor([[0.5, 5.0, 0.0, -2.0]], requires_grad=True)
    y = torch.tensor([0])
    full, _ = consistency_finetune_loss([z1, z2], y, 20.0, 0.5, diversity=2.0)
    base, _ = consistency_finetune_loss([z1, z2], y, 20.0, 0.5, diversity=1.0)
    g1 = torch.autograd.grad(full - base, z1)[0][0]  # the gradient of one unit of the diversity term
    assert g1[1] > 0 and (g1[[0, 2, 3]] < 0).all()
    # The unrecovered image's consistency and entropy terms are off: only CE and the diversity term remain.
    ce_only, _ = consistency_finetune_loss([z1, z2], y, 0.0, 0.0)
    spread = -(((z1.softmax(1) + z2.softmax(1)) / 2).log().mean() + math.log(4))
    torch.testing.assert_close(base, ce_only + spread)


def test_diversity_optimum_for_an_unrecoverable_input_keeps_every_class_below_p0():
    # Three training images that noise makes indistinguishable (one logit vector for all, both copies alike),
    # labels 0, 0, 1. CE alone is least at p = (2/3, 1/3, 0, 0): the votes go to class 0, wrong for the third
    # image. With weight w the third image (top class not its label) adds w * KL(uniform || p); the minimum of
    # -2 log p0 - log p1 - (w / K) sum_c log p_c (convex in the logits) is p proportional to (2, 1, 0, 0) + w / K,
    # every class below p0 = 1/2 for w >= 4/3: the loss's gradient vanishes there and nowhere else nearby.
    labels = torch.tensor([0, 0, 1])

    def grad_at(p: list[float], w: float) -> torch.Tensor:
        z = torch.tensor(p, dtype=torch.float64).log().requires_grad_()
        copy = z.expand(3, 4)
        return torch.autograd.grad(consistency_finetune_loss([copy, copy], labels, 20.0, 0.0, diversity=w)[0], z)[0]

    optimum = {4.0: [3 / 7, 2 / 7, 1 / 7, 1 / 7], 20.0: [7 / 23, 6 / 23, 5 / 23, 5 / 23]}
    for w, p in optimum.items():
        assert grad_at(p, w).abs().max() < 1e-6  # the loss is computed in float32
    assert grad_at(optimum[20.0], 4.0).abs().max() > 0.01 and grad_at(optimum[4.0], 20.0).abs().max() > 0.01
    assert grad_at([2 / 3, 1 / 3 - 2e-6, 1e-6, 1e-6], 0.0).abs().max() < 1e-5  # CE alone: (2/3, 1/3, 0, 0)
