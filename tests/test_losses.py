"""Losses against hand computations on a 2×3×5 tensor, limits, masking and global normalisation."""

import math

import pytest
import torch
import torch.nn.functional as F

from purify.losses import (
    IGNORE_INDEX,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    hard_label_ce,
    logit_mse,
    reduce_loss,
    reverse_kl,
)

torch.manual_seed(0)
S = torch.randn(2, 3, 5)
T = torch.randn(2, 3, 5)


def softmax_row(row, temp=1.0):
    z = [v / temp for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def kl_row(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def by_hand(fn):
    return torch.tensor([[fn(S[b, t].tolist(), T[b, t].tolist()) for t in range(3)] for b in range(2)])


def test_forward_kl_matches_hand_computation_with_temperature_squared():
    temp = 2.0
    hand = by_hand(lambda s, t: kl_row(softmax_row(t, temp), softmax_row(s, temp)) * temp**2)
    torch.testing.assert_close(forward_kl(S, T, temperature=temp), hand, rtol=1e-5, atol=1e-6)


def test_reverse_kl_matches_hand_computation():
    hand = by_hand(lambda s, t: kl_row(softmax_row(s), softmax_row(t)))
    torch.testing.assert_close(reverse_kl(S, T), hand, rtol=1e-5, atol=1e-6)


def test_jsd_matches_hand_computation_and_limits():
    beta = 0.3

    def jsd(s, t):
        ps, pt = softmax_row(s), softmax_row(t)
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        return beta * kl_row(pt, m) + (1 - beta) * kl_row(ps, m)

    torch.testing.assert_close(generalized_jsd(S, T, beta=beta), by_hand(jsd), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(generalized_jsd(S, T, beta=0.0), forward_kl(S, T))
    torch.testing.assert_close(generalized_jsd(S, T, beta=1.0), reverse_kl(S, T))
    # matches torch's kl_div convention for forward KL
    ref = F.kl_div(F.log_softmax(S, -1), F.log_softmax(T, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(forward_kl(S, T), ref)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(S, T, beta=1.5)


def test_mse_and_ce_match_hand_computation():
    hand = by_hand(lambda s, t: sum((a - b) ** 2 for a, b in zip(s, t)) / 5)
    torch.testing.assert_close(logit_mse(S, T), hand)
    labels = torch.tensor([[1, 4, IGNORE_INDEX], [0, 2, 3]])
    ce = hard_label_ce(S, labels)
    for b in range(2):
        for t in range(3):
            y = labels[b, t].item()
            want = 0.0 if y == IGNORE_INDEX else -math.log(softmax_row(S[b, t].tolist())[y])
            assert ce[b, t].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_reduce_is_masked_mean_and_global_count_matches_concatenation():
    per_pos = torch.arange(6.0).reshape(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert reduce_loss(per_pos, mask).item() == pytest.approx((0 + 1 + 3) / 3)
    # two micro-batches with unequal target counts: summing per-micro losses normalised by the global count
    # equals the loss of the concatenated batch (what accumulation and data parallelism must reproduce)
    a, b = per_pos[:1], per_pos[1:]
    ma, mb = mask[:1], mask[1:]
    total = reduce_loss(a, ma, num_items=3) + reduce_loss(b, mb, num_items=3)
    assert total.item() == pytest.approx(reduce_loss(per_pos, mask).item())
    # a fully masked batch gives 0, not NaN
    assert reduce_loss(per_pos, torch.zeros_like(mask)).item() == 0.0


def test_weighted_sum_with_hard_labels_and_soft_weights():
    labels = torch.randint(0, 5, (2, 3))
    w = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])
    got = distillation_loss(S, T, w, name="forward_kl", labels=labels, hard_label_weight=0.25)
    per = forward_kl(S, T) + 0.25 * hard_label_ce(S, labels)
    want = (per * w).sum() / 5  # five positions with positive weight
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(S, T, w, name="ce")


def test_gradient_of_forward_kl_points_student_toward_teacher():
    s = S.clone().requires_grad_(True)
    forward_kl(s, T).sum().backward()
    # d KL(t||s) / d s_logits = p_s - p_t
    torch.testing.assert_close(s.grad, F.softmax(S, -1) - F.softmax(T, -1), rtol=1e-5, atol=1e-6)
