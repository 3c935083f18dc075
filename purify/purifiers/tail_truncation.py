"""Tail truncation: keep only the head of the teacher's distribution and renormalise.

Covert signal can ride on low-probability tokens ("token entanglement"); cutting the tail removes that channel and
keeps the target small enough for an offline top-k logit cache. With ``p`` the target distribution at a position,
the kept set ``S`` is the intersection of

- ``top_k``: the ``k`` most probable tokens,
- ``top_p``: the nucleus, the smallest prefix of tokens sorted by probability whose mass reaches ``top_p``,
- ``min_prob``: the tokens with ``p_v >= min_prob``,

always including the most probable token. The new target is ``p'_v = p_v / Σ_{u∈S} p_u`` on ``S`` and 0 elsewhere
(log-probability ``-inf``). ``forward_kl`` and ``jsd`` count ``0 · log 0`` as 0, so the loss stays finite and the
gradient on a student logit is ``q_v − p'_v`` (``q_v`` on dropped tokens: they are pushed down). ``reverse_kl`` and
``mse`` cannot use such a target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional  # noqa: UP035 - omegaconf needs typing generics

import torch
import torch.nn.functional as F
from torch import Tensor

from purify.losses_chunked import default_chunk_rows
from purify.purifiers.base import Contract, PurifierConfig, TargetPurifier
from purify.types import Batch, ModelOutput, Targets, is_int, is_real


@dataclass
class TailTruncationConfig(PurifierConfig):
    """Recipe entry ``{name: tail_truncation, top_k: 20, top_p: 0.95}``; set at least one knob."""

    name: str = "tail_truncation"
    top_k: Optional[int] = None  # keep the k most probable tokens (>= 1)
    top_p: Optional[float] = None  # keep the nucleus holding this much mass, in (0, 1]
    min_prob: Optional[float] = None  # keep tokens with at least this probability (the top-1 is always kept)

    def problems(self) -> list[str]:
        """Settings that cannot work, one line each."""
        out = []
        if self.top_k is None and self.top_p is None and self.min_prob is None:
            out.append("top_k: set at least one of top_k, top_p, min_prob")
        if self.top_k is not None and self.top_k < 1:
            out.append(f"top_k: must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            out.append(f"top_p: {self.top_p} is not in (0, 1]")
        if self.min_prob is not None and not 0.0 <= self.min_prob <= 1.0:
            out.append(f"min_prob: {self.min_prob} is not in [0, 1]")
        return out

    def contract(self) -> Contract:
        """Edits the targets and gives the tail zero mass."""
        return Contract(edits_targets=True, needs_full_support=True)


def keep_mask(logp: Tensor, top_k: int | None = None, top_p: float | None = None,
              min_prob: float | None = None) -> Tensor:
    """Which tokens a truncated target keeps (the intersection of the given criteria, always the top-1).

    Args:
        logp: ``(..., V)`` log-probabilities.
        top_k: keep the ``k`` most probable tokens.
        top_p: keep the smallest most-probable prefix with mass ``>= top_p`` (tokens whose preceding mass in
            descending order is ``< top_p``).
        min_prob: keep tokens with probability ``>= min_prob``.

    Returns:
        ``(..., V)`` bool.

    Raises:
        ValueError: ``top_k`` not an int >= 1, ``top_p`` outside ``(0, 1]``, ``min_prob`` outside ``[0, 1]`` (``top_k``
            0 kept nothing, not even the top-1).
    """
    _check_criteria(top_k, top_p, min_prob)
    keep = torch.ones_like(logp, dtype=torch.bool)
    top1 = logp.argmax(-1, keepdim=True)
    if top_k is not None:
        idx = logp.topk(min(top_k, logp.shape[-1]), dim=-1).indices
        keep &= torch.zeros_like(keep).scatter(-1, idx, True)
        top1 = idx[..., :1]  # a maximum topk kept: argmax's, among tied maxima, could be another (k + 1 kept)
    if top_p is not None:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_logp.exp()
        before = probs.cumsum(-1) - probs  # mass of the more probable tokens
        keep &= torch.zeros_like(keep).scatter(-1, order, before < top_p)
    if min_prob is not None:
        keep &= logp.exp() >= min_prob
    return keep.scatter(-1, top1, True)


def _check_criteria(top_k: int | None, top_p: float | None, min_prob: float | None) -> None:
    """A ``ValueError`` naming a truncation criterion outside its range (:func:`keep_mask`, :func:`truncate`)."""
    if top_k is not None and not is_int(top_k, 1):
        raise ValueError(f"tail truncation: top_k must be an int >= 1 (or None), got {top_k!r}")
    if top_p is not None and not (is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"tail truncation: top_p must be in (0, 1] (or None), got {top_p!r}")
    if min_prob is not None and not (is_real(min_prob) and 0 <= min_prob <= 1):
        raise ValueError(f"tail truncation: min_prob must be in [0, 1] (or None), got {min_prob!r}")


def truncate(logits: Tensor, top_k: int | None = None, top_p: float | None = None,
             min_prob: float | None = None) -> Tensor:
    """Truncated, renormalised log-probabilities: ``log p_v − log Σ_{u∈S} p_u`` on the kept set ``S``, else ``-inf``.

    Args:
        logits: ``(..., V)`` logits or log-probabilities.
        top_k, top_p, min_prob: the criteria of :func:`keep_mask`.

    Returns:
        ``(..., V)`` float32 log-probabilities.
    """
    return truncate_with_stats(logits, top_k, top_p, min_prob)[0]


def truncate_with_stats(logits: Tensor, top_k: int | None = None, top_p: float | None = None,
                        min_prob: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`truncate`, plus the kept probability mass (before renormalising) and kept token count per position.

    The kept set is a prefix of the tokens in descending probability, so it is read off ``torch.topk`` of a few
    candidates per position (:func:`keep_mask`'s own ``topk(top_k)`` without ``top_p``; else a number grown until
    every position's prefix ends) instead of masks and a sort over the whole vocabulary, ``CHUNK_BYTES`` of rows at a
    time (about 5x faster at a 49k vocabulary). Positions where that could pick other tokens than :func:`keep_mask`
    (with ``top_p``: finite probabilities tied across the kept prefix's end, as bf16 logits often are; a top-1 tie
    left out; NaN) take the full-vocabulary path, as do differentiable inputs. Values agree with the dense
    definition to float32 rounding (the normaliser is summed over the kept tokens only).

    Returns:
        ``(..., V)`` float32 log-probabilities, ``(...)`` float32 kept mass and ``(...)`` kept tokens (finite
        log-probabilities in the result).
    """
    _check_criteria(top_k, top_p, min_prob)
    vocab = logits.shape[-1]
    if (logits.requires_grad and torch.is_grad_enabled()) or vocab == 0 or logits.numel() == 0:
        return _dense_with_stats(logits.float(), top_k, top_p, min_prob)
    flat = logits.reshape(-1, vocab)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    mass = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    count = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    rows = default_chunk_rows(vocab)
    with torch.no_grad():
        for a in range(0, flat.shape[0], rows):
            sl = slice(a, a + rows)
            mass[sl], count[sl] = _truncate_rows(flat[sl].float(), out[sl], top_k, top_p, min_prob)
    shape = logits.shape[:-1]
    return out.view(logits.shape), mass.view(shape), count.view(shape)


def _truncate_dense(x: Tensor, top_k: int | None, top_p: float | None, min_prob: float | None) -> Tensor:
    """The full-vocabulary definition: log-softmax, :func:`keep_mask`, renormalise."""
    logp = F.log_softmax(x, dim=-1)
    kept = logp.masked_fill(~keep_mask(logp, top_k, top_p, min_prob), float("-inf"))
    return kept - torch.logsumexp(kept, dim=-1, keepdim=True)


def _dense_with_stats(x: Tensor, top_k: int | None, top_p: float | None,
                      min_prob: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_truncate_dense` of float32 logits ``x``, with its kept mass (before renormalising) and kept count."""
    out = _truncate_dense(x, top_k, top_p, min_prob)
    kept = torch.isfinite(out)
    return out, (F.softmax(x, dim=-1) * kept).sum(-1), kept.sum(-1).float()


def _truncate_rows(x: Tensor, out: Tensor, top_k: int | None, top_p: float | None,
                   min_prob: float | None) -> tuple[Tensor, Tensor]:
    """:func:`truncate_with_stats` of a ``(C, V)`` float32 chunk of rows, written into ``out`` (``(C, V)``);
    returns the kept mass and count."""
    vocab = x.shape[-1]
    logp = F.log_softmax(x, dim=-1)
    if top_p is None and top_k is not None:
        return _top_k_rows(x, logp, out, min(top_k, vocab), min_prob)
    k = min(vocab, top_k + 1 if top_k is not None else 64)
    while True:
        vals, idx = logp.topk(k, dim=-1)  # descending
        keep = torch.ones_like(vals, dtype=torch.bool)
        if top_k is not None:
            keep[:, top_k:] = False
        if top_p is not None:
            probs = vals.exp()
            keep &= probs.cumsum(-1) - probs < top_p
        if min_prob is not None:
            keep &= vals.exp() >= min_prob
        keep[:, 0] = True
        if k == vocab or not bool(keep[:, -1].any()):  # every row's kept prefix ends inside the candidates
            break
        k = vocab if 8 * k > vocab else 4 * k
    n = keep.sum(-1)  # kept prefix length per row (each criterion keeps a prefix of the descending order)
    odd = vals[:, 0] != vals[:, 0]  # NaN
    if k > 1:  # a finite tie across the prefix's end: which tied tokens are kept depends on the order of the ties
        end = vals.gather(1, (n - 1).clamp_max(k - 2)[:, None]).squeeze(1)
        after = vals.gather(1, n.clamp_max(k - 1)[:, None]).squeeze(1)
        odd |= (n < k) & (end == after) & torch.isfinite(end)
    return _write_rows(x, out, vals, idx, keep, odd, top_k, top_p, min_prob)


def _top_k_rows(x: Tensor, logp: Tensor, out: Tensor, k: int, min_prob: float | None) -> tuple[Tensor, Tensor]:
    """:func:`_truncate_rows` without ``top_p``: the candidates are :func:`keep_mask`'s own ``topk(k)``, so ties at
    the ``k``-th token pick the same tokens; only a top-1 (``argmax``, the first of tied maxima) outside the kept
    candidates takes the full-vocabulary path."""
    vals, idx = logp.topk(k, dim=-1)
    keep = vals.exp() >= min_prob if min_prob is not None else torch.ones_like(vals, dtype=torch.bool)
    keep[:, 0] = True
    top1 = logp.argmax(-1, keepdim=True)
    odd = ~((idx == top1) & keep).any(-1) | (vals[:, 0] != vals[:, 0])  # NaN rows too
    return _write_rows(x, out, vals, idx, keep, odd, k, None, min_prob)


def _write_rows(x: Tensor, out: Tensor, vals: Tensor, idx: Tensor, keep: Tensor, odd: Tensor, top_k: int | None,
                top_p: float | None, min_prob: float | None) -> tuple[Tensor, Tensor]:
    """Write the renormalised kept candidates (``vals`` at ``idx`` where ``keep``) into ``out``, the ``odd`` rows
    by the full-vocabulary definition; returns the kept mass and count per row."""
    kept = vals.masked_fill(~keep, float("-inf"))
    norm = torch.logsumexp(kept, dim=-1, keepdim=True)
    out.fill_(float("-inf")).scatter_(-1, idx, kept - norm)
    mass = norm.squeeze(-1).exp()
    count = torch.isfinite(kept).sum(-1).float()
    if bool(odd.any()):  # ties at a boundary or non-finite rows: the full-vocabulary definition
        bad = odd.nonzero().squeeze(1)
        out[bad], mass[bad], count[bad] = _dense_with_stats(x[bad], top_k, top_p, min_prob)
    return mass, count


class TailTruncation(TargetPurifier):
    """Truncate the current target to its head (see :func:`truncate`); the weights are unchanged.

    Logs ``kept_mass`` (mean probability mass of the kept tokens before renormalising) and ``kept_tokens`` (mean
    number of kept tokens), over real target positions.
    """

    def __init__(self, config: TailTruncationConfig) -> None:
        super().__init__(config)

    def transform_targets(self, batch: Batch, teacher_outputs: list[ModelOutput], targets: Targets) -> Targets:
        cfg = self.config
        out, kept_mass, kept_tokens = truncate_with_stats(targets.logits, cfg.top_k, cfg.top_p, cfg.min_prob)
        with torch.no_grad():
            real = batch["target_mask"] > 0
            n = real.sum().clamp_min(1)
            self.last_metrics = {"kept_mass": torch.where(real, kept_mass, 0.0).sum() / n,  # padding may hold NaN
                                 "kept_tokens": torch.where(real, kept_tokens, 0.0).sum() / n}
        return Targets(logits=out, weight=targets.weight)
