"""Ensemble purifier: combine K teachers per position so that no single teacher's idiosyncrasies dominate.

With normalised teacher weights ``w_k`` (``Σ w_k = 1``) and per-teacher log-probabilities ``log p_k`` over the
vocabulary, the target at each position is

- ``mean``:    ``log Σ_k w_k p_k`` (mixture of distributions; mode-covering),
- ``logmean``: ``Σ_k w_k log p_k − logsumexp_v(Σ_k w_k log p_k)`` (renormalised geometric mean; a token needs every
  teacher's support),
- ``min``:     ``min_k log p_k − logsumexp_v(min_k log p_k)`` (renormalised per-token minimum; weights only choose
  which teachers take part: those with ``w_k > 0``),
- ``logits``:  ``Σ_k w_k z_k`` on raw logits ``z_k`` (the only mode whose output is raw logits, so the only one
  ``loss.name: mse`` can compare with).

K identical teachers give the single teacher's distribution in every mode. The combination replaces the current
target logits, so the ensemble goes first among target-side purifiers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Literal, Optional  # noqa: UP035 - omegaconf needs typing generics

import torch
import torch.nn.functional as F
from torch import Tensor

from purify.losses import forward_kl
from purify.purifiers.base import Contract, PurifierConfig, PurifierContext, TargetPurifier
from purify.types import Batch, ModelOutput, Targets

CombineMode = Literal["mean", "logmean", "min", "logits"]


@dataclass
class EnsembleConfig(PurifierConfig):
    """Recipe entry ``{name: ensemble, combine: mean}``."""

    name: str = "ensemble"
    combine: CombineMode = "mean"  # mean | logmean | min | logits (see the module docstring)
    weights: Optional[List[float]] = None  # one per teacher, overriding teachers[i].weight; normalised to sum 1

    def problems(self) -> list[str]:
        """Settings that cannot work, one line each."""
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            return [f"weights: {list(self.weights)} must be >= 0 and sum to a positive number"]
        return []

    def recipe_problems(self, recipe: Any) -> list[str]:
        """At least two teachers, one weight per teacher, and a loss that reads log-probabilities."""
        k, out = len(recipe.teachers), []
        if k < 2:
            out.append(f"teachers: ensemble needs at least 2 teachers (got {k}); add teachers or remove the ensemble "
                       "purifier")
        if self.combine != "logits" and recipe.loss.name == "mse":
            out.append(f"combine: {self.combine!r} gives log-probabilities but loss.name: mse compares raw logits; use "
                       "combine: logits or a KL/JSD loss")
        if self.weights is not None and len(self.weights) != k:
            out.append(f"weights: got {len(self.weights)} weights for {k} teachers; give one per teacher")
        return out

    def contract(self) -> Contract:
        """Builds the targets afresh from every teacher's raw outputs."""
        return Contract(rebuilds_targets=True, reads_teachers=True)


def normalise_weights(weights: Tensor | list[float]) -> Tensor:
    """``w / Σ w`` as a float tensor; raises ``ValueError`` unless the weights are ``>= 0`` with a positive sum."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"ensemble weights must be >= 0 and sum to a positive number, got {w.tolist()}")
    return w / w.sum()


def combine(logits: Tensor, weights: Tensor, how: CombineMode = "mean") -> Tensor:
    """Combine K teachers' outputs per position.

    Args:
        logits: ``(K, ..., V)`` raw logits (or log-probabilities) of K teachers, stacked.
        weights: ``(K,)`` non-negative weights with a positive sum (normalised here).
        how: ``mean`` | ``logmean`` | ``min`` | ``logits`` (formulas in the module docstring).

    Returns:
        ``(..., V)`` float32: normalised log-probabilities, or weighted-mean raw logits for ``how="logits"``.
    """
    w = normalise_weights(weights).to(logits.device)
    if logits.dim() < 2 or w.shape != logits.shape[:1]:  # an IndexError from a boolean mask of another length
        raise ValueError(f"combine: weights {tuple(w.shape)} must hold one weight per teacher of logits "
                         f"{tuple(logits.shape)} (K, ..., V): K = {logits.shape[0] if logits.dim() else 0}")
    keep = w > 0  # a zero-weight teacher takes no part (and its -inf log-probs never meet a 0 weight)
    w, z = w[keep], logits[keep].float()
    shape = (-1,) + (1,) * (z.dim() - 1)
    if how == "logits":
        return (w.view(shape) * z).sum(0)
    logp = F.log_softmax(z, dim=-1)
    if how == "mean":
        return torch.logsumexp(logp + w.log().view(shape), dim=0)
    if how == "logmean":
        out = (w.view(shape) * logp).sum(0)
    elif how == "min":
        out = logp.min(0).values
    else:
        raise ValueError(f"combine: unknown mode {how!r}; allowed: mean, logmean, min, logits")
    return out - torch.logsumexp(out, dim=-1, keepdim=True)


class Ensemble(TargetPurifier):
    """Replace the target with the weighted combination of all teachers (see :func:`combine`).

    Logs ``top1_changed`` (fraction of real target positions whose argmax differs from the primary teacher's) and
    ``kl_primary`` (mean ``KL(p_primary || p_ensemble)`` over them, nats).
    """

    def __init__(self, config: EnsembleConfig) -> None:
        super().__init__(config)
        self.weights: Tensor | None = None

    def setup(self, ctx: PurifierContext) -> None:
        """Take the weights from the config, else from the recipe's ``teachers[i].weight``."""
        weights = self.config.weights if self.config.weights is not None else ctx.teacher_weights
        if len(weights) != len(ctx.teachers):
            raise ValueError(f"ensemble: {len(weights)} weights for {len(ctx.teachers)} teachers")
        self.weights = normalise_weights(list(weights))

    def transform_targets(self, batch: Batch, teacher_outputs: list[ModelOutput], targets: Targets) -> Targets:
        if self.weights is None:
            raise RuntimeError("ensemble: call setup(ctx) before transform_targets")
        stacked = torch.stack([out.logits for out in teacher_outputs])
        combined = combine(stacked, self.weights, self.config.combine)
        with torch.no_grad():
            real = batch["target_mask"] > 0
            n = real.sum().clamp_min(1)
            primary = teacher_outputs[0].logits
            changed = (combined.argmax(-1) != primary.argmax(-1)) & real
            kl = forward_kl(combined, primary)
            self.last_metrics = {"top1_changed": changed.sum() / n, "kl_primary": (kl * real).sum() / n}
        return Targets(logits=combined, weight=targets.weight)
