"""Distillation losses: pure functions on logits, per position, plus a masked global-mean reduction.

Shapes: logits are ``(..., V)`` (``(B, T, V)`` for language models, ``(B, 1, V)`` for vector models); every
per-position function returns ``(...)``, one value per target position. :func:`reduce_loss` turns those into a
scalar: ``sum(per_position * weight) / num_items``, where ``num_items`` is the number of real target positions in
the *global* batch (all ranks and accumulation steps) so that data parallelism and gradient accumulation leave the
update unchanged. Positions with weight 0 (padding, prompt, masked by a purifier) contribute nothing.

Conventions (documented because peers differ):
- Temperature ``T`` divides both student and teacher logits and the divergence is multiplied by ``T**2``
  (Hinton et al. 2015), so gradient magnitudes do not shrink as ``T`` grows. TRL's GKD omits the ``T**2``.
- Generalized JSD follows Agarwal et al. 2024 / TRL: mixture ``M = beta * p_teacher + (1 - beta) * p_student``,
  ``JSD_beta = beta * KL(p_teacher || M) + (1 - beta) * KL(p_student || M)``; ``beta=0`` is the forward KL
  ``KL(teacher || student)`` and ``beta=1`` the reverse KL ``KL(student || teacher)`` (special-cased: the mixture
  formula degenerates to 0 there).
- MSE compares raw logits, averaged over the logit dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from purify.config import loss_value_problems
from purify.losses_chunked import (
    LossSpec,
    active_rows,
    check_labels,
    chunked_loss,
    kl_from_log_probs,
    positions_counted,
    reduce_rows,
    target_count,
    upcast,
)
from purify.types import IGNORE_INDEX, LossName

__all__ = [
    "IGNORE_INDEX", "LossName", "SOFT_LOSSES", "distillation_loss", "forward_kl", "generalized_jsd", "hard_label_ce",
    "logit_mse", "reduce_loss", "reverse_kl",
]

_kl = kl_from_log_probs


def _tempered(logits: Tensor, temperature: float, caller: str) -> Tensor:
    """``log_softmax(logits / temperature)`` in float32 or wider, the temperature checked by the loss settings' rule
    (:func:`purify.config.loss_value_problems`: 0 gave NaN, a negative one the KL of the flipped distributions)."""
    problems = loss_value_problems(0.5, temperature, 0.0)  # only the temperature can be out of range here
    if problems:
        raise ValueError(f"{caller}: " + "; ".join(f"{key} {problem}" for key, problem in problems))
    return F.log_softmax(upcast(logits) / temperature, -1)


def _shape(x: Tensor) -> str:
    return str(tuple(x.shape))


def _fits(shape: torch.Size, onto: torch.Size) -> bool:
    """Whether ``shape`` broadcasts onto ``onto`` without widening it (a scalar weight, one teacher for the batch)."""
    try:
        return torch.broadcast_shapes(shape, onto) == onto
    except RuntimeError:
        return False


def _check_logits(x: Any, what: str, caller: str) -> None:
    """Refuse, naming ``caller`` and ``what``, logits that are no floating-point tensor ``(..., V)``."""
    if not (isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 1):
        got = f"{x.dtype} {_shape(x)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{caller}: {what} must be a floating-point tensor (..., V), got {got}")


def check_pair(student: Tensor, teacher: Tensor, caller: str) -> None:
    """Refuse, naming ``caller``, a ``teacher`` that is no tensor of the ``student``'s vocabulary (last dimension) or
    whose positions do not broadcast onto the student's without widening them (two teachers' losses were summed):
    torch said "size of tensor a (…) must match", or widened silently."""
    _check_logits(student, "student_logits", caller)
    _check_logits(teacher, "teacher_logits", caller)
    if teacher.shape[-1] != student.shape[-1]:
        raise ValueError(f"{caller}: teacher_logits {_shape(teacher)} and student_logits {_shape(student)} differ in "
                         "the vocabulary (last) dimension; a teacher of another tokenizer needs the cross_base "
                         "purifier, a padded vocabulary loss.logit_slice")
    if not _fits(teacher.shape[:-1], student.shape[:-1]):  # a teacher may broadcast onto the positions, never widen
        raise ValueError(f"{caller}: teacher_logits {_shape(teacher)} do not match student_logits {_shape(student)}: "
                         "one teacher distribution per student position")


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Forward KL ``T² · KL(p_t || p_s)`` per position (mode-covering; classic Hinton KD).

    Args:
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits or log-probabilities (any per-position shift is fine).
        temperature: softmax temperature ``T`` applied to both.

    Returns:
        ``(...)`` divergence per position.
    """
    check_pair(student_logits, teacher_logits, "forward_kl")
    s, t = (_tempered(x, temperature, "forward_kl") for x in (student_logits, teacher_logits))
    return _kl(t, s) * temperature**2


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Reverse KL ``T² · KL(p_s || p_t)`` per position (mode-seeking). Shapes as :func:`forward_kl`."""
    check_pair(student_logits, teacher_logits, "reverse_kl")
    s, t = (_tempered(x, temperature, "reverse_kl") for x in (student_logits, teacher_logits))
    return _kl(s, t) * temperature**2


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """Generalized Jensen-Shannon divergence ``JSD_beta`` (Agarwal et al. 2024, "On-policy distillation").

    ``M = beta·p_t + (1-beta)·p_s``; ``JSD_beta = beta·KL(p_t||M) + (1-beta)·KL(p_s||M)``, times ``T²``.
    ``beta=0`` returns :func:`forward_kl`, ``beta=1`` :func:`reverse_kl`. The mixture is formed in log space.

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(..., V)``.
        beta: interpolation in ``[0, 1]``.
        temperature: softmax temperature.

    Returns:
        ``(...)`` divergence per position.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    check_pair(student_logits, teacher_logits, "generalized_jsd")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    s, t = (_tempered(x, temperature, "generalized_jsd") for x in (student_logits, teacher_logits))
    # an entry neither puts mass on (both -inf) is left out of the mixture: logsumexp's gradient there is NaN
    both = torch.isneginf(s) & torch.isneginf(t)
    m = torch.logsumexp(torch.stack([t.masked_fill(both, 0.0) + math.log(beta),
                                     s.masked_fill(both, 0.0) + math.log1p(-beta)]), dim=0)
    return (beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)) * temperature**2


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean squared error between raw logits, averaged over the last dimension. ``temperature`` is ignored."""
    del temperature
    check_pair(student_logits, teacher_logits, "logit_mse")
    return (upcast(student_logits) - upcast(teacher_logits)).pow(2).mean(-1)


def hard_label_ce(student_logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy against hard labels per position; ``IGNORE_INDEX`` labels give 0.

    Args:
        student_logits: ``(..., V)``.
        labels: ``(...)`` integer token ids (e.g. the sampled text, or the teacher's argmax).
        temperature: ignored (hard labels have no temperature).
    """
    del temperature
    check_labels(labels, student_logits.shape[-1], "hard_label_ce")  # float labels were truncated to ids
    flat = upcast(student_logits).reshape(-1, student_logits.shape[-1])
    out = F.cross_entropy(flat, labels.reshape(-1).long(), ignore_index=IGNORE_INDEX, reduction="none")
    return out.reshape(labels.shape)


SoftLoss = Callable[..., Tensor]
SOFT_LOSSES: dict[str, SoftLoss] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "mse": logit_mse,
}
"""Per-position losses between student and teacher logits, by recipe name (``loss.name``)."""


def reduce_loss(per_position: Tensor, weight: Tensor, num_items: float | Tensor | None = None) -> Tensor:
    """Masked mean over the global batch: ``sum(per_position * weight) / num_items``.

    Args:
        per_position: ``(...)`` loss per position.
        weight: ``(...)`` weight per position: 0/1 mask of real targets, times any purifier weights in ``[0, 1]``.
        num_items: number of real target positions in the *global* batch (all ranks × accumulation steps). When
            ``None``, the local count of positive weights (at least 1) is used, which equals the global mean only
            when every micro-batch has the same number of targets.

    Returns:
        Scalar loss. Down-weighted positions lower the loss rather than re-scaling the others up; positions with
        weight 0 are left out of the sum, so a NaN or ``inf`` there does not poison its *value*. Their gradient is
        another matter: the NaN of a weight-0 row flows back through ``per_position`` (0 · NaN), so logits that
        may hold NaN/``inf`` at masked rows belong in :func:`distillation_loss`, which zeroes those rows first.
    """
    # a weight may broadcast onto the positions (a scalar, one per time step), never widen them
    if not (isinstance(weight, Tensor) and _fits(weight.shape, per_position.shape)):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"reduce_loss: weight {got} does not match per_position {tuple(per_position.shape)} (one "
                         "weight per position)")
    if num_items is None:
        num_items = positions_counted(per_position.shape, weight)
    return reduce_rows(per_position, weight, num_items)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    weight: Tensor,
    *,
    name: LossName = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    hard_label_weight: float = 0.0,
    num_items: float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Weighted sum of one soft loss and (optionally) hard-label cross-entropy, reduced over the global batch.

    ``loss = soft(student, teacher) + hard_label_weight · CE(student, labels)``; with ``name="ce"`` only the
    cross-entropy term is used (plain SFT on the teacher's text), with weight 1.

    By default the loss and its gradient are computed ``chunk_size`` positions at a time
    (:mod:`purify.losses_chunked`): the same value and gradient as the per-position functions, with about one
    logits tensor of extra peak memory instead of 6-12. The exact autograd path (``chunk_size=0``) is used when
    asked, or when the teacher logits, the weights or ``num_items`` require grad, or shapes only broadcast. Either
    way a position with weight 0 (for ``ce``: or label ``IGNORE_INDEX``) gives loss 0 and gradient 0 whatever its
    logits hold, NaN and ``-inf`` included.

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(..., V)`` (ignored when ``name="ce"``).
        weight: ``(...)`` per-position weight (see :func:`reduce_loss`).
        name: which soft loss (``forward_kl``, ``reverse_kl``, ``jsd``, ``mse``) or ``ce``.
        beta: JSD interpolation (``name="jsd"`` only).
        temperature: softmax temperature for the soft loss.
        labels: ``(...)`` hard labels, needed when ``name="ce"`` or ``hard_label_weight > 0``.
        hard_label_weight: weight of the cross-entropy term.
        num_items: global count of target positions (see :func:`reduce_loss`).
        chunk_size: positions per chunk; ``None`` picks about 8 MiB of float32 per temporary, ``0`` the exact
            (unchunked) autograd path.

    Raises:
        ValueError: naming the argument: logits of two vocabularies, a weight or labels that do not match the
            student's positions, labels outside ``[0, V)`` other than ``IGNORE_INDEX`` (labels on the CPU), a bad
            ``name``/``beta``/...
    """
    spec = LossSpec.of(name, beta, temperature, hard_label_weight, "distillation_loss")
    uses_ce = name == "ce" or hard_label_weight > 0
    if uses_ce and labels is None:
        raise ValueError("distillation_loss: hard-label cross-entropy needs `labels`")
    if name != "ce" and not isinstance(teacher_logits, Tensor):  # None reached torch as an AttributeError
        raise ValueError(f"distillation_loss: the soft loss {name} needs teacher_logits (..., V), got "
                         f"{type(teacher_logits).__name__}; only name='ce' goes without a teacher")
    if isinstance(student_logits, Tensor) and not isinstance(weight, Tensor):  # else the student's check says
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"distillation_loss: weight must be a tensor of per-position weights (or one number), "
                             f"got {type(weight).__name__}")
        weight = torch.tensor(float(weight), device=student_logits.device)  # one weight for every position
    _check_inputs(student_logits, None if name == "ce" else teacher_logits, weight, labels if uses_ce else None,
                  spec.ignore_index)
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"distillation_loss: chunk_size must be >= 0, got {chunk_size}")
    if num_items is None:
        num_items = target_count(name, weight, labels, student_logits.shape[:-1])
    lab = labels if uses_ce else None
    teacher = None if name == "ce" else teacher_logits
    if chunk_size != 0 and _chunkable(student_logits, teacher, weight, lab, num_items):
        return chunked_loss(student_logits, teacher, weight, lab, num_items, spec, chunk_size)
    return _exact_loss(student_logits, teacher_logits, weight, name, beta, temperature, lab, hard_label_weight,
                       num_items)


def _check_inputs(student: Tensor, teacher: Tensor | None, weight: Tensor, labels: Tensor | None,
                  ignore_index: int) -> None:
    """One ``ValueError`` naming the argument, where torch would say "size of tensor a (…) must match" or, on a
    GPU, assert on the device: logits of different vocabularies, a weight or labels that do not cover the student's
    positions, labels outside ``[0, V)`` other than ``ignore_index`` (on the CPU: on an accelerator the check would
    synchronise every step, and the kernel asserts instead)."""
    _check_logits(student, "student_logits", "distillation_loss")
    prefix, vocab = student.shape[:-1], student.shape[-1]
    if teacher is not None:
        check_pair(student, teacher, "distillation_loss")
    for what, x in (("weight", weight), ("labels", labels)):
        # a weight may broadcast (a scalar, one per time step); labels name one token per position
        if x is not None and not (_fits(x.shape, prefix) if what == "weight" else x.shape == prefix):
            raise ValueError(f"distillation_loss: {what} {_shape(x)} does not match student_logits' positions "
                             f"{tuple(prefix)} (one value per position, the vocabulary dimension left out)")
    if labels is not None:
        check_labels(labels, vocab, "distillation_loss", ignore_index)


def _chunkable(student: Tensor, teacher: Tensor | None, weight: Tensor, labels: Tensor | None,
               num_items: float | Tensor) -> bool:
    """Whether the chunked path computes the same thing: gradients flow to the student only, shapes match."""
    grads = torch.is_grad_enabled() and any(
        isinstance(x, Tensor) and x.requires_grad for x in (teacher, weight, num_items))
    prefix = student.shape[:-1]
    return (not grads and student.is_floating_point() and student.dim() >= 1
            and (teacher is None or teacher.shape == student.shape)
            and (labels is None or labels.shape == prefix) and weight.shape == prefix)


def _exact_loss(student: Tensor, teacher: Tensor, weight: Tensor, name: str, beta: float, temperature: float,
                labels: Tensor | None, hard_label_weight: float, num_items: float | Tensor) -> Tensor:
    """The unchunked autograd path; rows that do not count are zeroed first so NaN/-inf there stay harmless."""
    active = active_rows(name, weight, labels)
    if not bool(active.all()):
        keep = active[..., None]
        student = torch.where(keep, student, torch.zeros((), dtype=student.dtype, device=student.device))
        if name != "ce":
            teacher = torch.where(keep, teacher, torch.zeros((), dtype=teacher.dtype, device=teacher.device))
    if name == "ce":
        per_position = hard_label_ce(student, labels)  # type: ignore[arg-type]
    else:
        kwargs = {"beta": beta} if name == "jsd" else {}
        per_position = SOFT_LOSSES[name](student, teacher, temperature=temperature, **kwargs)
        if hard_label_weight > 0:
            per_position = per_position + hard_label_weight * hard_label_ce(student, labels)  # type: ignore[arg-type]
    return reduce_loss(per_position, weight, num_items)
