"""Divergence mask: drop or down-weight the positions where the primary teacher departs from a reference.

A teacher's fingerprint concentrates on the few "divergence tokens" where it disagrees with other models (Schrodi
et al., ICLR 2026). Per position, with ``p`` the primary teacher's distribution and ``q`` the reference's:

- ``jsd``:  ``d = ½ KL(p || m) + ½ KL(q || m)``, ``m = ½ (p + q)`` (nats, symmetric, in ``[0, log 2]``),
- ``top1``: ``d = 1[argmax p ≠ argmax q]``.

Positions with ``d > threshold`` are masked. ``drop`` sets their weight to 0; ``soft`` multiplies it by
``clamp(1 − d / d_max, 0, 1)`` where ``d_max`` is the largest divergence over the batch's real target positions (so
the most divergent position gets 0, and positions at or below the threshold keep their weight). The reference is
``others`` (the weight-averaged distribution of ``teachers[1:]``), ``base`` (the student's frozen initial copy) or
one teacher by name. Nothing here knows the trait; the targets themselves are left unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from purify.losses import generalized_jsd
from purify.purifiers.base import Contract, PurifierConfig, PurifierContext, TargetPurifier
from purify.purifiers.ensemble import combine
from purify.types import Batch, ModelOutput, Targets

Metric = Literal["jsd", "top1"]
Mode = Literal["drop", "soft"]


@dataclass
class DivergenceMaskConfig(PurifierConfig):
    """Recipe entry ``{name: divergence_mask, reference: others, metric: jsd, threshold: 0.1}``."""

    name: str = "divergence_mask"
    reference: str = "others"  # others | base | the name of a teacher other than teachers[0]
    metric: Metric = "jsd"  # jsd (nats, <= log 2 = 0.693) | top1 (argmax disagreement, 0 or 1)
    threshold: float = 0.1  # positions with divergence > threshold are masked
    mode: Mode = "drop"  # drop: weight 0 | soft: weight * (1 - d / max d)

    def problems(self) -> list[str]:
        """Settings that cannot work, one line each."""
        return [f"threshold: must be >= 0, got {self.threshold}"] if self.threshold < 0 else []

    def recipe_problems(self, recipe: Any) -> list[str]:
        """The reference must exist: other teachers with weight, the base, or a named non-primary teacher."""
        names = [t.name for t in recipe.teachers[1:] if t.name is not None]
        if self.reference == "others" and len(recipe.teachers) < 2:
            return ["reference: 'others' needs at least 2 teachers (got 1); add a teacher or use reference: base"]
        if self.reference == "others" and sum(t.weight for t in recipe.teachers[1:]) <= 0:
            return ["reference: 'others' needs teachers[1:] with a positive total weight; raise one of their weights"]
        if self.reference not in ("others", "base", *names):
            primary = " (that is teachers[0], the primary teacher)" if self.reference == recipe.teachers[0].name else ""
            return [f"reference: unknown reference {self.reference!r}{primary}; allowed: "
                    f"{', '.join(['others', 'base', *names])} (set teachers[i].name to refer to a teacher)"]
        return []

    def contract(self) -> Contract:
        """Reads the teachers' outputs and reweights the targets."""
        return Contract(edits_targets=True, reads_teachers=True)


def divergence(p_logits: Tensor, q_logits: Tensor, metric: Metric = "jsd") -> Tensor:
    """Per-position divergence between two distributions given as logits (or log-probabilities).

    Args:
        p_logits: ``(..., V)``.
        q_logits: ``(..., V)``.
        metric: ``jsd`` (``½ KL(p||m) + ½ KL(q||m)``, ``m = ½(p+q)``, nats) or ``top1`` (``1[argmax p ≠ argmax q]``).

    Returns:
        ``(...)`` float32 divergence per position.
    """
    if metric == "jsd":
        return generalized_jsd(q_logits, p_logits, beta=0.5)
    if metric == "top1":
        return (p_logits.argmax(-1) != q_logits.argmax(-1)).float()
    raise ValueError(f"divergence: unknown metric {metric!r}; allowed: jsd, top1")


def mask_weights(div: Tensor, real: Tensor, threshold: float, mode: Mode = "drop") -> Tensor:
    """Per-position factor in ``[0, 1]`` to multiply the target weights by.

    Args:
        div: ``(...)`` divergence per position.
        real: ``(...)`` bool, the real target positions (``d_max`` is taken over these).
        threshold: positions with ``div > threshold`` are masked.
        mode: ``drop`` (factor 0) or ``soft`` (factor ``clamp(1 − div / d_max, 0, 1)``).

    Returns:
        ``(...)`` factor; 1 at positions at or below the threshold.
    """
    masked = div > threshold
    if mode == "drop":
        return (~masked).float()
    if mode != "soft":
        raise ValueError(f"mask_weights: unknown mode {mode!r}; allowed: drop, soft")
    d_max = torch.where(real, div, torch.zeros_like(div)).max().clamp_min(torch.finfo(div.dtype).tiny)
    soft = (1.0 - div / d_max).clamp(0.0, 1.0)
    return torch.where(masked, soft, torch.ones_like(soft))


class DivergenceMask(TargetPurifier):
    """Weight down the positions where ``teachers[0]`` diverges from the reference (see the module docstring).

    Logs ``masked_fraction`` (share of real target positions above the threshold) and ``mean_divergence``.
    """

    def __init__(self, config: DivergenceMaskConfig) -> None:
        super().__init__(config)
        self.needs_base = config.reference == "base"  # type: ignore[misc] - per instance, read by the Distiller
        self.ctx: PurifierContext | None = None  # not a submodule: the base must stay out of checkpoints
        self.ref_index: int | None = None

    def setup(self, ctx: PurifierContext) -> None:
        """Resolve the reference: a teacher index, all other teachers, or the frozen base."""
        ref = self.config.reference
        if ref == "base" and (ctx.base is None or ctx.forward is None):
            raise ValueError("divergence_mask: reference 'base' needs ctx.base and ctx.forward")
        if ref == "others" and len(ctx.teachers) < 2:
            raise ValueError("divergence_mask: reference 'others' needs at least 2 teachers")
        if ref not in ("others", "base"):
            matches = [i for i, name in enumerate(ctx.teacher_names) if name == ref and i > 0]
            if not matches:
                raise ValueError(f"divergence_mask: no teacher named {ref!r} among {ctx.teacher_names[1:]}")
            self.ref_index = matches[0]
        self.ctx = ctx

    @torch.no_grad()
    def reference_logits(self, batch: Batch, teacher_outputs: list[ModelOutput]) -> Tensor:
        """``(B, T, V)`` logits (or log-probabilities) of the reference on this batch."""
        if self.ctx is None:
            raise RuntimeError("divergence_mask: call setup(ctx) before transform_targets")
        if self.config.reference == "base":
            return self.ctx.forward(self.ctx.base, batch).logits  # type: ignore[misc]
        if self.ref_index is not None:
            return teacher_outputs[self.ref_index].logits
        others = torch.stack([out.logits for out in teacher_outputs[1:]])
        return combine(others, torch.as_tensor(self.ctx.teacher_weights[1:]), "mean")

    def transform_targets(self, batch: Batch, teacher_outputs: list[ModelOutput], targets: Targets) -> Targets:
        cfg = self.config
        with torch.no_grad():
            div = divergence(teacher_outputs[0].logits, self.reference_logits(batch, teacher_outputs), cfg.metric)
            real = batch["target_mask"] > 0
            factor = mask_weights(div, real, cfg.threshold, cfg.mode)
            n = real.sum().clamp_min(1)
            self.last_metrics = {"masked_fraction": ((div > cfg.threshold) & real).sum() / n,
                                 "mean_divergence": (div * real).sum() / n}
        return Targets(logits=targets.logits, weight=targets.weight * factor.to(targets.weight.dtype))
