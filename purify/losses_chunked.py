"""Chunked distillation loss: the loss and its gradient a few positions at a time, never ``B×T×V`` temporaries.

The autograd graph of :func:`purify.losses.forward_kl` and friends keeps several vocabulary-sized tensors alive
from forward to backward (two log-softmaxes, the teacher's probabilities, the KL terms, the mixture for JSD) and
backward builds as many again: 6x one logits tensor of extra peak memory for forward KL and 12x for JSD at
``V = 262,144``. :class:`ChunkedDistillLoss` instead walks the target positions in chunks of ``chunk_rows`` rows
under ``no_grad``; for each chunk it computes the per-position loss *and* the closed-form gradient with respect to
the student's logits, scaled by the position's ``weight / num_items``, and writes it into one preallocated buffer of
the student logits' size. Backward returns that buffer (scaled in place when the incoming gradient is not 1). The
extra peak is one logits tensor plus a few ``chunk_rows × V`` temporaries (Liger-Kernel's fused linear JSD and
TRL's chunked losses use the same trick).

Gradients with respect to the student logits ``x``, temperature ``τ``, ``q = softmax(x/τ)``, ``p = softmax(y/τ)``
(the teacher), per position, before the ``weight / num_items`` factor:

- forward KL ``τ²·KL(p‖q)``: ``τ·(q − p)``.
- reverse KL ``τ²·KL(q‖p)``: ``τ·q ⊙ (d − Σ q·d)`` with ``d = log q − log p``.
- generalized JSD ``τ²·(β·KL(p‖M) + (1−β)·KL(q‖M))``, ``M = β·p + (1−β)·q``: ``τ·(1−β)·q ⊙ (d − Σ q·d)`` with
  ``d = log q − log M`` (the terms through ``M`` cancel).
- logit MSE ``mean_v (x − y)²``: ``2·(x − y)/V``; cross-entropy on label ``c`` (no temperature):
  ``softmax(x) − onehot(c)``.

Positions that do not count (weight 0; for ``ce`` also label ``IGNORE_INDEX``) are never read: their loss is 0 and
their gradient exactly 0, whatever their logits hold (NaN or ``-inf`` included; issue #14).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from purify.config import loss_value_problems
from purify.types import IGNORE_INDEX, LossName

CHUNK_BYTES = 8 * 2**20
"""Size of one float32 ``chunk_rows × V`` temporary; the default ``chunk_rows`` is ``CHUNK_BYTES // (4·V)``."""


@dataclass(frozen=True)
class LossSpec:
    """What to compute per position: soft loss ``name`` plus ``ce_weight`` times hard-label cross-entropy."""

    name: str
    """``forward_kl``, ``reverse_kl``, ``jsd``, ``mse`` or ``ce`` (cross-entropy only)."""
    beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0
    ignore_index: int = -100

    @classmethod
    def of(cls, name: str, beta: float, temperature: float, hard_label_weight: float, caller: str) -> LossSpec:
        """The spec of one call of a loss function (``distillation_loss``'s arguments), its settings checked by the
        rules a recipe's ``loss`` section follows (:func:`purify.config.loss_value_problems`; ``beta`` only for
        ``jsd``).

        Raises:
            ValueError: ``caller`` and an unknown loss name, or every setting out of range.
        """
        names = list(typing.get_args(LossName))
        if name not in names:
            raise ValueError(f"{caller}: unknown loss name {name!r}; expected one of {names}")
        problems = loss_value_problems(beta if name == "jsd" else 0.5, temperature, hard_label_weight)
        if problems:
            raise ValueError(f"{caller}: " + "; ".join(f"{key} {problem}" for key, problem in problems))
        return cls(name=name, beta=beta, temperature=temperature, ignore_index=IGNORE_INDEX,
                   ce_weight=hard_label_weight if name != "ce" else 1.0)


def positions_counted(shape: torch.Size | tuple[int, ...], weight: Tensor) -> Tensor:
    """The default ``num_items``: how many of the ``shape`` positions have weight > 0, at least 1 (``weight``
    broadcast over them: a scalar or ``(T,)`` weight counts every position it covers)."""
    return (weight.expand(torch.broadcast_shapes(shape, weight.shape)) > 0).sum().clamp_min(1)


def target_count(name: str, weight: Tensor, labels: Tensor | None, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The default ``num_items``: how many of the ``shape`` positions have ``weight`` > 0 (at least 1), with
    ``name="ce"`` (cross-entropy alone) only those whose label is not ``IGNORE_INDEX`` — a position whose label is
    ignored is no target either."""
    counted = torch.where(labels != IGNORE_INDEX, weight, 0.0) if name == "ce" and labels is not None else weight
    return positions_counted(shape, counted)


def check_labels(labels: Tensor, vocab: int, where: str, ignore_index: int = IGNORE_INDEX) -> None:
    """A ``ValueError`` naming ``where``'s labels when they are no token ids: not integers, or (labels on the CPU)
    outside ``[0, vocab)`` and not ``ignore_index``. On an accelerator reading the check back would stall every
    step: the range is left to the kernel there, which asserts."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be integer token ids, got {labels.dtype}")
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index) if labels.device.type == "cpu" else None
    if bad is not None and bool(bad.any()):
        raise ValueError(f"{where}: labels hold {labels[bad][0].item()}, outside the student's vocabulary "
                         f"[0, {vocab}) and not the ignore index {ignore_index}")


def active_rows(name: str, weight: Tensor, labels: Tensor | None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The positions that count: weight ≠ 0 and, for ``ce``, a label that is not ``ignore_index`` (the others are
    never read)."""
    active = weight != 0
    return active & (labels != ignore_index) if name == "ce" else active  # type: ignore[operator]


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one float32 temporary is about :data:`CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // (4 * max(vocab, 1)))


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kl_from_log_probs(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """``KL(p || q)`` over the last dimension, from log-probabilities; ``0·log 0`` counted as 0.

    The log-ratio is zeroed where ``p = 0`` before the product (not the product afterwards): where both are
    ``-inf`` (a vocabulary entry masked in both) it is NaN, and ``where`` after the product passes ``0 · NaN`` back
    as the gradient."""
    p = p_logp.exp()
    return (p * (p_logp - q_logp).masked_fill(p == 0, 0.0)).sum(-1)


def _kl_and_centered(q_logp: Tensor, m_logp: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """``KL(q‖m)`` per row and, when asked, ``q ⊙ (d − Σ q·d)`` with ``d = log q − log m`` (0 where ``q = 0``)."""
    q = q_logp.exp()
    zero = q == 0
    d = q_logp - m_logp
    kl = (q * d).masked_fill_(zero, 0.0).sum(-1)
    if not need_grad:
        return kl, None
    return kl, d.sub_(kl[:, None]).mul_(q).masked_fill_(zero, 0.0)


def rows_loss_grad(spec: LossSpec, x: Tensor, y: Tensor | None, labels: Tensor | None,
                   factor: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Loss per row and ``factor · d loss_row / d x_row`` for a ``(C, V)`` chunk of student logits ``x``.

    Args:
        spec: the objective.
        x: ``(C, V)`` student logits; ``y``: ``(C, V)`` teacher logits (``None`` for ``ce``).
        labels: ``(C,)`` hard labels, needed when ``spec.ce_weight > 0`` or ``spec.name == "ce"``.
        factor: ``(C,)`` scale of each row's gradient; ``None`` skips the gradient.

    Returns:
        ``(C,)`` losses and ``(C, V)`` scaled gradients (or ``None``), in at least float32.
    """
    tau, beta, name = spec.temperature, spec.beta, spec.name
    x = upcast(x)
    need_grad = factor is not None
    f = factor[:, None].to(x.dtype) if factor is not None else None
    grad: Tensor | None = None
    s = None
    if name == "jsd" and beta in (0.0, 1.0):
        name = "forward_kl" if beta == 0.0 else "reverse_kl"
    if name == "mse":
        d = x - upcast(y)  # type: ignore[arg-type]
        loss = d.pow(2).mean(-1)
        grad = d.mul_(f * (2.0 / x.shape[-1])) if f is not None else None
    elif name == "ce":
        loss = x.new_zeros(x.shape[0])
    else:
        s = F.log_softmax(x / tau if tau != 1.0 else x, -1)
        yt = upcast(y)  # type: ignore[arg-type]
        t = F.log_softmax(yt / tau if tau != 1.0 else yt, -1)
        if name == "forward_kl":
            p = t.exp()
            loss = (t - s).mul_(p).masked_fill_(p == 0, 0.0).sum(-1) * tau**2
            grad = s.exp().sub_(p).mul_(f * tau) if f is not None else None
        elif name == "reverse_kl":
            kl, grad = _kl_and_centered(s, t, need_grad)
            loss = kl * tau**2
            grad = grad.mul_(f * tau) if grad is not None else None
        else:
            m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
            kl_s, grad = _kl_and_centered(s, m, need_grad)
            loss = (beta * kl_from_log_probs(t, m) + (1.0 - beta) * kl_s) * tau**2
            grad = grad.mul_(f * (tau * (1.0 - beta))) if grad is not None else None
    ce_weight = 1.0 if spec.name == "ce" else spec.ce_weight
    if ce_weight > 0:
        assert labels is not None
        ls = s if s is not None and tau == 1.0 else F.log_softmax(x, -1)
        valid = labels != spec.ignore_index
        safe = torch.where(valid, labels, 0)[:, None]
        nll = torch.where(valid, -ls.gather(1, safe).squeeze(1), 0.0)
        loss = loss + ce_weight * nll
        if f is not None:
            g = ls.exp()
            g.scatter_add_(1, safe, -valid[:, None].to(g.dtype))
            g.mul_(f * (ce_weight * valid.to(g.dtype))[:, None])
            grad = g if grad is None else grad.add_(g)
    return loss, grad


def _chunks(rows: list[int], size: int) -> list[tuple[int, int] | list[int]]:
    """Split sorted row ids into chunks of ``size``: ``(lo, hi)`` for a contiguous range, else the id list."""
    out: list[tuple[int, int] | list[int]] = []
    for a in range(0, len(rows), size):
        part = rows[a:a + size]
        out.append((part[0], part[-1] + 1) if part[-1] - part[0] + 1 == len(part) else part)
    return out


def chunked_rows(spec: LossSpec, student: Tensor, teacher: Tensor | None, labels: Tensor | None, active: Tensor,
                 scale: Tensor | None, chunk_rows: int) -> tuple[Tensor, Tensor | None]:
    """Per-position losses of flat ``(N, V)`` logits, and (when ``scale`` is given) the scaled gradient buffer.

    Args:
        spec: the objective.
        student: ``(N, V)``; ``teacher``: ``(N, V)`` or ``None`` for ``ce``; ``labels``: ``(N,)`` or ``None``.
        active: ``(N,)`` bool, the rows that count; the others get loss 0 and gradient 0 and are never read.
        scale: ``(N,)`` factor of each row's gradient (``weight / num_items``); ``None`` skips gradients.
        chunk_rows: rows per chunk.

    Returns:
        ``(N,)`` losses (at least float32) and the ``(N, V)`` gradient in the student's dtype (or ``None``).
    """
    n, vocab = student.shape
    dtype = torch.promote_types(student.dtype, torch.float32)
    per_pos = torch.zeros(n, dtype=dtype, device=student.device)
    grad = None
    if scale is not None:
        grad = torch.empty(n, vocab, dtype=student.dtype, device=student.device)
        if not bool(active.all()):
            grad[~active] = 0
    rows = active.nonzero().squeeze(1).tolist()
    for part in _chunks(rows, max(1, chunk_rows)):
        if isinstance(part, tuple):
            sel: Any = slice(*part)
            x, y = student[sel], teacher[sel] if teacher is not None else None
        else:
            sel = torch.tensor(part, device=student.device)
            x, y = student.index_select(0, sel), teacher.index_select(0, sel) if teacher is not None else None
        lab = labels[sel] if labels is not None else None
        loss, g = rows_loss_grad(spec, x, y, lab, scale[sel] if scale is not None else None)
        if isinstance(sel, slice):
            per_pos[sel] = loss
        else:
            per_pos.index_copy_(0, sel, loss.to(dtype))
        if grad is not None and g is not None:
            if isinstance(sel, slice):
                grad[sel] = g
            else:
                grad.index_copy_(0, sel, g.to(grad.dtype))
    return per_pos, grad


class ChunkedDistillLoss(torch.autograd.Function):
    """``sum_i weight_i · loss_i / num_items`` whose backward returns a gradient computed chunk-wise in forward.

    One backward per forward: the stored gradient is scaled in place and handed over (a second backward through the
    same graph raises).
    """

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor | None, weight: Tensor, labels: Tensor | None,
                active: Tensor, num_items: Tensor, spec: LossSpec, chunk_rows: int) -> Tensor:
        """Arguments as :func:`chunked_loss`, flattened to rows; ``num_items`` a 0-dim tensor."""
        scale = weight / num_items
        per_pos, grad = chunked_rows(spec, student, teacher, labels, active, scale, chunk_rows)
        ctx.grad = grad
        return reduce_rows(per_pos, weight, num_items)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("purify: the chunked distillation loss supports one backward pass per forward; "
                               "call distillation_loss(..., chunk_size=0) for the exact autograd path")
        ctx.grad = None
        if not bool(grad_out == 1):
            grad.mul_(grad_out.to(grad.dtype))
        return grad, None, None, None, None, None, None, None


def reduce_rows(per_pos: Tensor, weight: Tensor, num_items: Tensor | float) -> Tensor:
    """``sum(per_pos · weight) / num_items`` where ``weight ≠ 0`` (masked positions never poison the sum); 0 for a
    batch without a target position and ``num_items`` 0 (every label ignored), not 0 / 0 = NaN (a count of 0 beside
    weighted positions stays a non-finite loss: the caller's bug surfaces)."""
    total = torch.where(weight != 0, per_pos * weight, 0.0).sum()
    n = torch.as_tensor(num_items, dtype=total.dtype, device=total.device)
    return total / torch.where((n == 0) & (total == 0), torch.ones_like(n), n)


def chunked_loss(student: Tensor, teacher: Tensor | None, weight: Tensor, labels: Tensor | None,
                 num_items: Tensor | float, spec: LossSpec, chunk_rows: int | None = None) -> Tensor:
    """Scalar ``sum(weight · loss) / num_items`` of ``(..., V)`` logits, chunk-wise (see the module docstring).

    Args:
        student: ``(..., V)`` student logits; the gradient flows to them only.
        teacher: ``(..., V)`` teacher logits or log-probabilities (``None`` for ``ce``).
        weight: ``(...)`` per-position weights; ``labels``: ``(...)`` hard labels or ``None``.
        num_items: global count of target positions.
        spec: the objective.
        chunk_rows: positions per chunk (default :func:`default_chunk_rows`).
    """
    vocab = student.shape[-1]
    flat = student.reshape(-1, vocab)
    t_flat = teacher.reshape(-1, vocab) if teacher is not None else None
    w = weight.expand(student.shape[:-1]).reshape(-1)
    lab = labels.reshape(-1).long() if labels is not None else None  # gather() takes int64 ids (int16 crashed here)
    active = active_rows(spec.name, w, lab, spec.ignore_index)
    n = torch.as_tensor(num_items, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
    rows = chunk_rows or default_chunk_rows(vocab)
    if student.requires_grad and torch.is_grad_enabled():
        out = ChunkedDistillLoss.apply(flat, t_flat, w, lab, active, n, spec, rows)
        return out
    per_pos, _ = chunked_rows(spec, flat, t_flat, lab, active, None, rows)
    return reduce_rows(per_pos, w, n)
