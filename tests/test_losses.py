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
