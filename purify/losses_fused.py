"""Fused linear + distillation loss: the student's logits are never built, only a few rows of them at a time.

:mod:`purify.losses_chunked` keeps the loss's own temporaries to a few ``rows × V`` chunks, but the student's
``(N, V)`` logits (and the gradient buffer of their size) still exist: at ``V = 262,144`` that is 1 GiB of float32
per 1,024 positions, twice. Here the loss takes the student's last hidden states ``h`` ``(N, H)`` and its output
layer ``W`` ``(V, H)`` (and bias) instead: for each chunk of target rows it computes the logits ``h_c Wᵀ``, the
per-row loss and its closed-form gradient ``g_c`` with respect to those logits (:func:`purify.losses_chunked.
rows_loss_grad`), and accumulates ``∂/∂h_c = g_c W`` and ``∂/∂W += g_cᵀ h_c`` (Liger-Kernel's fused linear
cross-entropy / JSD use the same scheme). The teacher can be given the same way (its hidden states and output
layer, read under ``no_grad``), so neither model's full logits exist; or as logits, when they are needed anyway
(target-side purifiers edit them).

The value and gradients equal :func:`purify.losses.distillation_loss` on ``h Wᵀ + b`` to float rounding
(``tests/test_losses_fused.py``); the extra peak memory is the gradients of ``h`` and ``W`` (the sizes of the
activations and of the parameter, which backward builds anyway) plus a few ``rows × V`` temporaries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from purify.losses_chunked import (
    LossSpec,
    _chunks,
    active_rows,
    check_labels,
    default_chunk_rows,
    reduce_rows,
    rows_loss_grad,
    target_count,
    upcast,
)
from purify.types import LossName

__all__ = ["fused_linear_distillation_loss"]


MATMUL_BYTES = 64 * 2**20
"""Size of one float32 ``rows × V`` logits chunk (the default ``chunk_size`` is ``MATMUL_BYTES // (4·V)`` positions:
64 at ``V = 262,144``); the loss itself walks each chunk in rows of :func:`purify.losses_chunked.default_chunk_rows`
(8 MiB temporaries, which stay in cache: 2.5× faster than 64 MiB ones on the 2-core CPU)."""


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``h Wᵀ + b`` for a chunk of rows, in at least float32."""
    z = h @ weight.t()
    return upcast(z if bias is None else z + bias)


class FusedLinearDistillLoss(torch.autograd.Function):
    """``sum_i weight_i · loss_i / num_items`` of the logits ``h Wᵀ + b``, built a chunk of rows at a time.

    Forward computes the loss and the gradients of ``h``, ``W`` and ``b`` together; backward hands them over, scaled
    by the incoming gradient (one backward per forward).
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher: tuple[Any, ...],
                row_weight: Tensor, labels: Tensor | None, active: Tensor, num_items: Tensor, spec: LossSpec,
                chunk_rows: int) -> Tensor:
        """``teacher``: ``("logits", (N, V))``, ``("linear", hidden (N, Ht), weight (V, Ht), bias | None)`` or
        ``("none",)`` (``ce``)."""
        needs = ctx.needs_input_grad
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        per_pos = torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if needs[0] else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if needs[1] else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if bias is not None and needs[2] else None
        scale = row_weight / num_items if any(needs[:3]) else None  # None: the value only (no_grad, evaluation)
        rows = active.nonzero().squeeze(1).tolist()
        sub = min(chunk_rows, default_chunk_rows(weight.shape[0]))  # the loss's temporaries: cache-sized rows
        for part in _chunks(rows, max(1, chunk_rows)):
            sel: Any = slice(*part) if isinstance(part, tuple) else torch.tensor(part, device=hidden.device)
            take = (lambda t: t[sel]) if isinstance(sel, slice) else (lambda t: t.index_select(0, sel))
            h = take(hidden)
            x = _logits(h, weight, bias)
            if teacher[0] == "logits":
                y = take(teacher[1])
            elif teacher[0] == "linear":
                y = _logits(take(teacher[1]), teacher[2], teacher[3])
            else:
                y = None
            lab, factor = (None if t is None else take(t) for t in (labels, scale))
            g = None if factor is None else torch.empty_like(x)
            losses = []
            for a in range(0, x.shape[0], sub):
                cut = slice(a, a + sub)
                row_loss, row_grad = rows_loss_grad(spec, x[cut], None if y is None else y[cut],
                                                    None if lab is None else lab[cut],
                                                    None if factor is None else factor[cut])
                losses.append(row_loss)
                if g is not None:
                    g[cut] = row_grad if row_grad is not None else 0
            loss = torch.cat(losses)
            if isinstance(sel, slice):
                per_pos[sel] = loss
            else:
                per_pos.index_copy_(0, sel, loss.to(dtype))
            if g is None:
                continue
            if grad_h is not None:
                gh = (g.to(weight.dtype) @ weight).to(grad_h.dtype)
                if isinstance(sel, slice):
                    grad_h[sel] = gh
                else:
                    grad_h.index_copy_(0, sel, gh)
            if grad_w is not None:
                grad_w.addmm_(g.t(), upcast(h))
            if grad_b is not None:
                grad_b.add_(g.sum(0))
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))  # type: ignore[union-attr]
        return reduce_rows(per_pos, row_weight, num_items)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("purify: the fused linear distillation loss supports one backward pass per forward")
        ctx.grads = None
        if not bool(grad_out == 1):
            grads = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)
        return (*grads, None, None, None, None, None, None, None)


def fused_linear_distillation_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    row_weight: Tensor,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    name: LossName = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    hard_label_weight: float = 0.0,
    num_items: float | Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """:func:`purify.losses.distillation_loss` of the student logits ``hidden @ weight.T + bias``, without building
    them (see the module docstring).

    Args:
        hidden: ``(..., H)`` the student's last hidden states at the target positions (after its final norm).
        weight: ``(V, H)`` the student's output layer (``model.get_output_embeddings().weight``); ``bias``: ``(V,)``.
        row_weight: ``(...)`` per-position weight (:func:`purify.losses.reduce_loss`).
        teacher_logits: ``(..., V)`` the teacher's logits; or instead ``teacher_hidden`` ``(..., Ht)`` with
            ``teacher_weight`` ``(V, Ht)`` (and ``teacher_bias``), so the teacher's logits are not built either. Not
            needed for ``name="ce"``. The teacher side gets no gradient.
        name, beta, temperature, labels, hard_label_weight, num_items: as :func:`purify.losses.distillation_loss`.
        chunk_size: positions per logits chunk; ``None`` picks about 64 MiB of float32 per ``chunk × V`` tensor
            (:data:`MATMUL_BYTES`).

    Raises:
        ValueError: a shape that does not match, no teacher for a soft loss, or two teachers (``teacher_bias`` is part
            of the ``teacher_weight`` form), ``hidden`` and ``weight`` of two dtypes outside autocast, a
            ``row_weight`` that requires grad, ``chunk_size < 1``.
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"fused_linear_distillation_loss: hidden {tuple(hidden.shape)} does not match the output "
                         f"layer {tuple(weight.shape)} (expected hidden (..., H) and weight (V, H))")
    vocab, prefix = weight.shape[0], hidden.shape[:-1]
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(f"fused_linear_distillation_loss: hidden is {hidden.dtype} and weight {weight.dtype}; give "
                         "them one dtype, or call it inside torch.autocast")
    if bias is not None and bias.shape != (vocab,):  # was torch's "size of tensor a (10) must match (11)"
        raise ValueError(f"fused_linear_distillation_loss: bias {tuple(bias.shape)} should be ({vocab},), one per "
                         "row of the output layer")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_distillation_loss: chunk_size must be >= 1 positions, or None (about 64 MiB "
                         f"of logits per chunk), got {chunk_size}; the fused loss always chunks")
    if row_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("fused_linear_distillation_loss: row_weight requires grad, but the fused loss takes the "
                         "position weights as constants; detach them, or use distillation_loss to learn them")
    if row_weight.shape != prefix:
        raise ValueError(f"fused_linear_distillation_loss: row_weight {tuple(row_weight.shape)} should be "
                         f"{tuple(prefix)}, one weight per position of hidden")
    spec = LossSpec.of(name, beta, temperature, hard_label_weight, "fused_linear_distillation_loss")
    uses_ce = name == "ce" or hard_label_weight > 0
    if uses_ce and (labels is None or labels.shape != prefix):
        raise ValueError(f"fused_linear_distillation_loss: hard-label cross-entropy needs labels of shape "
                         f"{tuple(prefix)}")
    if uses_ce:
        check_labels(labels, vocab, "fused_linear_distillation_loss", spec.ignore_index)  # type: ignore[arg-type]
    given = [teacher_logits is not None, any(t is not None for t in (teacher_hidden, teacher_weight, teacher_bias))]
    if name != "ce" and sum(given) != 1:
        raise ValueError("fused_linear_distillation_loss: give the teacher as teacher_logits, or as teacher_hidden "
                         "with teacher_weight (one of the two)")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    teacher: tuple[Any, ...] = ("none",)
    if name != "ce" and teacher_logits is not None:
        if teacher_logits.shape != (*prefix, vocab):
            raise ValueError(f"fused_linear_distillation_loss: teacher_logits {tuple(teacher_logits.shape)} should be "
                             f"{(*prefix, vocab)}")
        teacher = ("logits", teacher_logits.detach().reshape(-1, vocab))
    elif name != "ce":
        if (teacher_hidden is None or teacher_weight is None or teacher_weight.dim() != 2
                or teacher_weight.shape[0] != vocab or teacher_hidden.shape != (*prefix, teacher_weight.shape[1])):
            raise ValueError("fused_linear_distillation_loss: teacher_hidden (..., Ht) and teacher_weight (V, Ht) "
                             f"must match the student's {tuple(prefix)} positions and V = {vocab}")
        if teacher_hidden.dtype != teacher_weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            raise ValueError(f"fused_linear_distillation_loss: teacher_hidden is {teacher_hidden.dtype} and "
                             f"teacher_weight {teacher_weight.dtype}; give them one dtype, or call it inside "
                             "torch.autocast")
        teacher = ("linear", teacher_hidden.detach().reshape(-1, teacher_weight.shape[1]), teacher_weight.detach(),
                   None if teacher_bias is None else teacher_bias.detach())
    w = row_weight.reshape(-1)
    lab = labels.reshape(-1).long() if uses_ce and labels is not None else None
    active = active_rows(name, w, lab)
    if num_items is None:  # for ce, labelled positions only (it counted ignored labels: a loss 8/11 of its value)
        num_items = target_count(name, w, lab, w.shape)
    n = torch.as_tensor(num_items, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
    rows = chunk_size or max(1, MATMUL_BYTES // (4 * vocab))
    return FusedLinearDistillLoss.apply(flat_h, weight, bias, teacher, w, lab, active, n, spec, rows)
