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


# ---------------------------------------------------------------- chunked path (issue #17) and masked NaNs (#14)
def _loss_and_grad(student, teacher, weight, **kw):
    x = student.clone().requires_grad_(True)
    loss = distillation_loss(x, teacher, weight, **kw)
    loss.backward()
    return loss.detach(), x.grad


def _ragged(seed=0, b=3, t=7, v=11):
    """float64 logits with a wide spread, ragged weights (whole rows, a tail, fractional weights) and labels."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    te = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    w = torch.rand(b, t, generator=g, dtype=torch.float64)
    w[0, 4:] = 0  # a padded tail
    w[1, 0] = 0  # a prompt position
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[2, 3] = IGNORE_INDEX
    return s, te, w, labels


@pytest.mark.parametrize("name,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5),
                                       ("jsd", 1.0), ("mse", 0.5), ("ce", 0.5)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("hard_label_weight", [0.0, 0.3])
def test_chunked_equals_unchunked_values_and_grads(name, beta, temperature, hard_label_weight):
    s, te, w, labels = _ragged()
    kw = dict(name=name, beta=beta, temperature=temperature, labels=labels, hard_label_weight=hard_label_weight)
    want, want_grad = _loss_and_grad(s, te, w, chunk_size=0, **kw)
    # chunk sizes 1, 4 (does not divide the 21 positions nor the 17 active ones), all at once, and the default
    for chunk in (1, 4, 64, None):
        got, got_grad = _loss_and_grad(s, te, w, chunk_size=chunk, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert want_grad[0, 4:].abs().sum() == 0 and want_grad.abs().sum() > 0


def test_chunked_matches_per_position_functions_float32_and_global_count():
    """float32, the default chunking, a global num_items: same value and gradient as reduce_loss over the
    per-position function (tolerance 1e-6 relative: float32 rounding of two summation orders)."""
    s, te, w, _ = (x.float() if x.is_floating_point() else x for x in _ragged(seed=1, t=9, v=257))
    for fn, kw in ((forward_kl, {}), (reverse_kl, {}), (generalized_jsd, {"beta": 0.3})):
        x = s.clone().requires_grad_(True)
        want = reduce_loss(fn(x, te, temperature=1.5, **kw), w, num_items=40)
        want.backward()
        name = {forward_kl: "forward_kl", reverse_kl: "reverse_kl", generalized_jsd: "jsd"}[fn]
        got, grad = _loss_and_grad(s, te, w, name=name, temperature=1.5, num_items=40, **kw)
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-8)


def test_chunked_gradient_is_closed_form_forward_kl():
    # d/ds [ sum_i w_i * T^2 KL(p_t || p_s) / n ] = w_i * T * (softmax(s/T) - softmax(t/T)) / n
    s, te, w, _ = _ragged(seed=2)
    _, grad = _loss_and_grad(s, te, w, name="forward_kl", temperature=2.0, num_items=10.0, chunk_size=2)
    want = w[..., None] * 2.0 * (F.softmax(s / 2, -1) - F.softmax(te / 2, -1)) / 10.0
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "mse", "ce"])
@pytest.mark.parametrize("chunk", [0, None, 3])
def test_nan_and_inf_at_masked_positions_give_finite_loss_and_zero_grad(name, chunk):
    s, te, w, labels = _ragged(seed=3)
    clean, clean_grad = _loss_and_grad(s, te, w, name=name, labels=labels, chunk_size=chunk)
    bad_s, bad_t = s.clone(), te.clone()
    bad_s[0, 4:] = float("nan")  # weight 0
    bad_s[1, 0, :3] = float("-inf")
    bad_t[1, 0] = float("nan")
    bad_t[0, 5] = float("inf")
    got, grad = _loss_and_grad(bad_s, bad_t, w, name=name, labels=labels, chunk_size=chunk)
    assert torch.isfinite(got) and torch.isfinite(grad).all()
    torch.testing.assert_close(got, clean)
    torch.testing.assert_close(grad, clean_grad)
    assert grad[0, 4:].abs().sum() == 0 and grad[1, 0].abs().sum() == 0


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_a_vocabulary_entry_masked_in_both_models_gives_the_same_finite_gradient_on_both_paths(name):
    """Entries both models set to -inf (a padded vocabulary) on real target positions: the chunked path's gradient
    was finite, the exact path's (also taken when the teacher requires grad) NaN for reverse KL and JSD."""
    s, te, w, _ = _ragged(seed=6)
    s[..., -2:] = te[..., -2:] = float("-inf")
    grads = [_loss_and_grad(s, te, w, name=name, chunk_size=chunk) for chunk in (0, None)]
    (exact, exact_grad), (chunked, chunked_grad) = grads
    assert torch.isfinite(exact) and torch.isfinite(exact_grad).all(), name
    torch.testing.assert_close(exact, chunked)
    torch.testing.assert_close(exact_grad, chunked_grad)
    assert exact_grad[..., -2:].abs().sum() == 0


def test_hard_labels_of_any_integer_dtype_on_both_paths():
    """int32 labels worked on the chunked path and failed on the exact one ("expected target dtype to be Long")."""
    s, te, w, labels = _ragged(seed=7)
    ref = [_loss_and_grad(s, te, w, name="ce", labels=labels, chunk_size=chunk)[0] for chunk in (0, None)]
    got = [_loss_and_grad(s, te, w, name="ce", labels=labels.int(), chunk_size=chunk)[0] for chunk in (0, None)]
    torch.testing.assert_close(got, ref)


def test_ce_ignores_nan_logits_where_the_label_is_ignore_index():
    s, te, _, labels = _ragged(seed=4)
    w = torch.ones(labels.shape, dtype=s.dtype)
    s[2, 3] = float("nan")  # labels[2, 3] is IGNORE_INDEX
    for chunk in (0, None):
        loss, grad = _loss_and_grad(s, te, w, name="ce", labels=labels, chunk_size=chunk)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[2, 3].abs().sum() == 0


def test_a_real_target_with_nan_logits_still_fails_loudly():
    s, te, w, _ = _ragged(seed=5)
    s[2, 1, 0] = float("nan")  # weight > 0 there
    assert torch.isnan(distillation_loss(s, te, w))


def test_chunked_scales_by_incoming_gradient_and_refuses_a_second_backward():
    s, te, w, _ = _ragged(seed=6)
    _, once = _loss_and_grad(s, te, w, name="jsd")
    x = s.clone().requires_grad_(True)
    loss = distillation_loss(x, te, w, name="jsd")
    (loss * 3.0).backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 3.0 * once)
    with pytest.raises(RuntimeError, match="chunk_size=0"):
        loss.backward()


def test_chunked_path_falls_back_when_teacher_needs_grad_and_without_grad_mode():
    s, te, w, _ = _ragged(seed=7)
    t = te.clone().requires_grad_(True)
    distillation_loss(s, t, w, name="reverse_kl").backward()  # exact path: the teacher gets a gradient too
    assert t.grad is not None and t.grad.abs().sum() > 0
    with torch.no_grad():
        val = distillation_loss(s, te, w, name="jsd")
    torch.testing.assert_close(val, distillation_loss(s, te, w, name="jsd", chunk_size=0))


def test_bad_arguments_name_themselves():
    s, te, w, _ = _ragged(seed=8)
    with pytest.raises(ValueError, match="beta"):
        distillation_loss(s, te, w, name="jsd", beta=-0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        distillation_loss(s, te, w, chunk_size=-1)
    with pytest.raises(ValueError, match="'kl'"):
        distillation_loss(s, te, w, name="kl")  # type: ignore[arg-type]
    for kwargs, message in [({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
                            ({"temperature": -1.0}, "temperature must be a finite number > 0, got -1.0"),
                            ({"hard_label_weight": -1.0}, "hard_label_weight must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=message):  # were NaN, a plausible number, and silently ignored
            distillation_loss(s, te, w, labels=torch.zeros(w.shape, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("chunk", [0, None])
def test_mismatched_inputs_are_named_not_left_to_torch(chunk):
    """Logits of two vocabularies, a weight or labels off the positions, float labels or a label outside the
    vocabulary gave torch's "size of tensor a (7) must match" or "Target 9 is out of bounds" (a device-side assert
    on a GPU); each is one ValueError naming the argument now."""
    s, t, w = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.ones(2, 3)
    labels = torch.randint(0, 5, (2, 3))
    cases = [((s, torch.randn(2, 3, 7), w), {}, r"teacher_logits \(2, 3, 7\).*vocabulary.*cross_base"),
             ((s, torch.randn(2, 4, 5), w), {}, r"teacher_logits \(2, 4, 5\) do not match"),
             ((s, t, torch.ones(2, 4)), {}, r"weight \(2, 4\) does not match student_logits' positions \(2, 3\)"),
             ((s, t, w), {"name": "ce", "labels": labels[:, :2]}, r"labels \(2, 2\) does not match"),
             ((s, t, w), {"name": "ce", "labels": labels.float()}, "labels must be integer token ids"),
             ((s, t, w), {"hard_label_weight": 0.5, "labels": labels.masked_fill(labels == labels[0, 0], 9)},
              r"labels hold 9, outside the student's vocabulary \[0, 5\)"),
             ((s.long(), t, w), {}, "student_logits must be a floating-point tensor"),
             # teachers that only broadcast with the student's positions widened them: (2, 3, V) against a (3, V)
             # student returned the sum of the two teachers' means, a (2, 1, V) student a loss 3x too large
             ((s[0], t, w[0]), {}, r"teacher_logits \(2, 3, 5\) do not match student_logits \(3, 5\): one teacher "
                                   "distribution per student position"),
             ((s[:, :1], t, w[:, :1]), {}, r"teacher_logits \(2, 3, 5\) do not match"),
             ((s, t, w), {"name": "ce", "labels": labels.bool()}, "labels must be integer token ids, got torch.bool"),
             ((s, None, w), {}, r"the soft loss forward_kl needs teacher_logits \(\.\.\., V\), got NoneType"),
             ((s, t, [1.0] * 3), {}, "weight must be a tensor of per-position weights \\(or one number\\), got list")]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            distillation_loss(*args, chunk_size=chunk, **kwargs)
    ignored = labels.masked_fill(labels == labels[0, 0], -100)  # the ignore index is no token: accepted
    assert torch.isfinite(distillation_loss(s, t, w, name="ce", labels=ignored, chunk_size=chunk))
    assert torch.isfinite(distillation_loss(s, t[:1], w, chunk_size=chunk))  # a teacher broadcast over the batch
    assert distillation_loss(s, t, 1.0, chunk_size=chunk).item() == pytest.approx(  # one number: every position
        distillation_loss(s, t, w, chunk_size=chunk).item())
    small = labels.to(torch.int16)  # int16 ids crashed the chunked path in gather(); the exact path took them
    assert distillation_loss(s, t, w, name="ce", labels=small, chunk_size=chunk).item() == pytest.approx(
        distillation_loss(s, t, w, name="ce", labels=labels, chunk_size=0).item())


@pytest.mark.parametrize("chunk", [0, None])
def test_a_broadcast_weight_counts_every_position_it_covers(chunk):
    """A scalar or ``(T,)`` weight broadcast over ``(B, T)`` positions: the default ``num_items`` counted the weight's
    own elements (a scalar weight returned the sum, 6x the mean; a (T,) one 2x); it counts the positions now."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mean = distillation_loss(s, t, torch.ones(2, 3), chunk_size=chunk)
    for weight in (torch.tensor(1.0), torch.ones(3), torch.ones(1, 3)):
        assert distillation_loss(s, t, weight, chunk_size=chunk).item() == pytest.approx(mean.item())
        assert reduce_loss(forward_kl(s, t), weight).item() == pytest.approx(mean.item())


@pytest.mark.parametrize("chunk_size", [None, 0])
def test_a_batch_without_target_positions_has_loss_and_gradient_zero(chunk_size):
    """``num_items=mask.sum()`` (README's pattern; Hugging Face passes 0 for an all-ignored batch) was 0 / 0 = NaN."""
    from purify.losses import distillation_loss, forward_kl, reduce_loss

    s = torch.randn(2, 3, 5, requires_grad=True)
    t, mask = torch.randn(2, 3, 5), torch.zeros(2, 3)
    loss = distillation_loss(s, t, mask, num_items=mask.sum(), chunk_size=chunk_size)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))
    assert reduce_loss(forward_kl(s, t), mask, num_items=mask.sum()).item() == 0.0
    from purify.losses_fused import fused_linear_distillation_loss

    h, w = torch.randn(2, 3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    fused = fused_linear_distillation_loss(h, w, row_weight=mask, teacher_logits=t, num_items=mask.sum(),
                                           chunk_size=chunk_size or 2)
    fused.backward()
    assert fused.item() == 0.0 and not h.grad.any() and not w.grad.any()
    # a count of 0 beside weighted positions is the caller's bug: it stays non-finite (was 0 / 0 before too)
    assert not torch.isfinite(reduce_loss(forward_kl(s, t), torch.ones(2, 3), num_items=0.0))


@pytest.mark.parametrize("chunk_size", [None, 0])
def test_cross_entropy_counts_only_positions_with_a_label(chunk_size):
    """``name="ce"``'s default count included positions whose label is ignored (0.976 where torch gives 1.465)."""
    from purify.losses import distillation_loss

    s, labels = torch.randn(2, 3, 5), torch.tensor([[1, -100, 2], [3, 4, -100]])
    got = distillation_loss(s, torch.zeros_like(s), torch.ones(2, 3), name="ce", labels=labels, chunk_size=chunk_size)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(s.reshape(-1, 5), labels.reshape(-1)))


def test_the_per_position_losses_check_temperature_and_labels():
    """forward_kl(temperature=0) was NaN, -1 the KL of the flipped distributions; hard_label_ce truncated float labels
    to token 0 and left a label past the vocabulary to torch's IndexError."""
    from purify.losses import generalized_jsd, hard_label_ce, reverse_kl

    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    for f in (forward_kl, reverse_kl, generalized_jsd):
        for bad in (0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=rf"^{f.__name__}: temperature must be a finite number > 0, got"):
                f(s, t, temperature=bad)
    with pytest.raises(ValueError, match=r"^hard_label_ce: labels must be integer token ids, got torch\.float32"):
        hard_label_ce(s, torch.full((2, 3), 0.7))
    with pytest.raises(ValueError, match=r"^hard_label_ce: labels hold 7, outside the student's vocabulary \[0, 5\)"):
        hard_label_ce(s, torch.full((2, 3), 7))
    assert torch.equal(hard_label_ce(s, torch.full((2, 3), -100)), torch.zeros(2, 3))


def test_the_standalone_losses_and_helpers_name_a_mismatched_input():
    """The per-position losses, ``reduce_loss`` and the purifiers' public helpers gave torch's "size of tensor a (…)
    must match", an IndexError or a silent widening (a (2, 3, V) teacher against a (3, V) student: a (2, 3) loss,
    two teachers' summed by reduce_loss); each names the argument now, and what fits still runs."""
    from purify.purifiers.divergence_mask import divergence, mask_weights
    from purify.purifiers.ensemble import combine

    s, t = torch.randn(3, 5), torch.randn(3, 5)
    for loss in (forward_kl, reverse_kl, generalized_jsd, logit_mse):
        name = loss.__name__
        with pytest.raises(ValueError, match=rf"^{name}: teacher_logits \(3, 7\) and student_logits \(3, 5\) differ "
                                             "in the vocabulary"):
            loss(s, torch.randn(3, 7))
        with pytest.raises(ValueError, match=rf"^{name}: teacher_logits \(2, 3, 5\) do not match student_logits "
                                             r"\(3, 5\)"):
            loss(s, torch.randn(2, 3, 5))
        with pytest.raises(ValueError, match=rf"^{name}: teacher_logits must be a floating-point tensor"):
            loss(s, None)
        assert loss(s, t[:1]).shape == (3,)  # a teacher broadcast over the student's positions
    with pytest.raises(ValueError, match=r"^reduce_loss: weight \(3, 2\) does not match per_position \(2, 3\)"):
        reduce_loss(torch.rand(2, 3), torch.ones(3, 2))
    assert reduce_loss(torch.ones(2, 3), torch.ones(3)).item() == pytest.approx(1.0)  # one weight per time step
    with pytest.raises(ValueError, match=r"^divergence: p_logits \(2, 5\) and q_logits \(2, 6\) differ"):
        divergence(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"^combine: weights \(2,\) must hold one weight per teacher .* K = 3"):
        combine(torch.randn(3, 2, 4, 5), torch.tensor([1.0, 1.0]))
    div, mask = torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([[1.0, 1.0, 0.0]])  # a float target_mask
    torch.testing.assert_close(mask_weights(div, mask, 0.2, "soft"), mask_weights(div, mask > 0, 0.2, "soft"))
