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

from purify.purifiers.base import Contract, PurifierConfig, TargetPurifier
from purify.types import Batch, ModelOutput, Targets


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
    """
    keep = torch.ones_like(logp, dtype=torch.bool)
    if top_k is not None:
        idx = logp.topk(min(top_k, logp.shape[-1]), dim=-1).indices
        keep &= torch.zeros_like(keep).scatter(-1, idx, True)
    if top_p is not None:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_logp.exp()
        before = probs.cumsum(-1) - probs  # mass of the more probable tokens
        keep &= torch.zeros_like(keep).scatter(-1, order, before < top_p)
    if min_prob is not None:
        keep &= logp.exp() >= min_prob
    top1 = logp.argmax(-1, keepdim=True)
    return keep.scatter(-1, top1, True)


def truncate(logits: Tensor, top_k: int | None = None, top_p: float | None = None,
             min_prob: float | None = None) -> Tensor:
    """Truncated, renormalised log-probabilities: ``log p_v − log Σ_{u∈S} p_u`` on the kept set ``S``, else ``-inf``.

    Args:
        logits: ``(..., V)`` logits or log-probabilities.
        top_k, top_p, min_prob: the criteria of :func:`keep_mask`.

    Returns:
        ``(..., V)`` float32 log-probabilities.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    kept = logp.masked_fill(~keep_mask(logp, top_k, top_p, min_prob), float("-inf"))
    return kept - torch.logsumexp(kept, dim=-1, keepdim=True)


class TailTruncation(TargetPurifier):
    """Truncate the current target to its head (see :func:`truncate`); the weights are unchanged.

    Logs ``kept_mass`` (mean probability mass of the kept tokens before renormalising) and ``kept_tokens`` (mean
    number of kept tokens), over real target positions.
    """

    def __init__(self, config: TailTruncationConfig) -> None:
        super().__init__(config)

    def transform_targets(self, batch: Batch, teacher_outputs: list[ModelOutput], targets: Targets) -> Targets:
        cfg = self.config
        out = truncate(targets.logits, cfg.top_k, cfg.top_p, cfg.min_prob)
        with torch.no_grad():
            kept = torch.isfinite(out)
            probs = F.softmax(targets.logits.float(), dim=-1)
            real = batch["target_mask"] > 0
            n = real.sum().clamp_min(1)
            self.last_metrics = {"kept_mass": ((probs * kept).sum(-1) * real).sum() / n,
                                 "kept_tokens": (kept.sum(-1) * real).sum() / n}
        return Targets(logits=out, weight=targets.weight)
