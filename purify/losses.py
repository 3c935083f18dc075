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
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
"""Label value that marks a position as not a target (the Hugging Face convention)."""

LossName = Literal["forward_kl", "reverse_kl", "jsd", "mse", "ce"]


def _kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """``KL(p || q)`` over the last dimension, from log-probabilities; 0·log 0 counted as 0."""
    p = p_logp.exp()
    return torch.where(p == 0, torch.zeros_like(p), p * (p_logp - q_logp)).sum(-1)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Forward KL ``T² · KL(p_t || p_s)`` per position (mode-covering; classic Hinton KD).

    Args:
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits or log-probabilities (any per-position shift is fine).
        temperature: softmax temperature ``T`` applied to both.

    Returns:
        ``(...)`` divergence per position.
    """
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    return _kl(t, s) * temperature**2


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Reverse KL ``T² · KL(p_s || p_t)`` per position (mode-seeking). Shapes as :func:`forward_kl`."""
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
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
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
    return (beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)) * temperature**2


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean squared error between raw logits, averaged over the last dimension. ``temperature`` is ignored."""
    del temperature
    return (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)


def hard_label_ce(student_logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy against hard labels per position; ``IGNORE_INDEX`` labels give 0.

    Args:
        student_logits: ``(..., V)``.
        labels: ``(...)`` integer token ids (e.g. the sampled text, or the teacher's argmax).
        temperature: ignored (hard labels have no temperature).
    """
    del temperature
    flat = student_logits.float().reshape(-1, student_logits.shape[-1])
    out = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
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
        Scalar loss. Down-weighted positions lower the loss rather than re-scaling the others up.
    """
    if num_items is None:
        num_items = (weight > 0).sum().clamp_min(1)
    return (per_position * weight).sum() / num_items


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weight: Tensor,
    *,
    name: LossName = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    hard_label_weight: float = 0.0,
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Weighted sum of one soft loss and (optionally) hard-label cross-entropy, reduced over the global batch.

    ``loss = soft(student, teacher) + hard_label_weight · CE(student, labels)``; with ``name="ce"`` only the
    cross-entropy term is used (plain SFT on the teacher's text), with weight 1.

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
    """
    if name == "ce" or hard_label_weight > 0:
        if labels is None:
            raise ValueError("distillation_loss: hard-label cross-entropy needs `labels`")
    if name == "ce":
        per_position = hard_label_ce(student_logits, labels)  # type: ignore[arg-type]
    else:
        kwargs = {"beta": beta} if name == "jsd" else {}
        per_position = SOFT_LOSSES[name](student_logits, teacher_logits, temperature=temperature, **kwargs)
        if hard_label_weight > 0:
            per_position = per_position + hard_label_weight * hard_label_ce(student_logits, labels)  # type: ignore[arg-type]
    return reduce_loss(per_position, weight, num_items)
