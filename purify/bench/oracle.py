"""The oracle: an upper bound that *knows the trait*. Benchmarks only; never a purifier, never in ``PURIFIERS``.

Kitkana & Arora (2026) suppress subliminal transfer by projecting each distillation gradient off the trait's own
gradient whenever the two align. With ``g`` the student's distillation gradient and ``t`` the gradient of a trait
loss (a loss whose *decrease* is the trait, e.g. cross-entropy on the teacher's digit labels), before each step

    ``g ← g − (⟨g, t⟩ / ‖t‖²) t``   if ``⟨g, t⟩ > 0``, else ``g`` unchanged,

over all the student's parameters taken as one vector. A descent step ``−g`` then no longer decreases the trait
loss to first order. It needs the probe, which no purifier may see: it shows how far below vanilla's
early-stopping frontier a trait-agnostic purifier could go.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from purify.purifiers.base import ParameterPurifier


class TraitGradientOracle(ParameterPurifier):
    """Projects the distillation gradient off the trait loss's gradient when they align (module docstring).

    Args:
        trait_loss: ``trait_loss(student) -> scalar``, the loss whose decrease is the trait; called once per step
            (it may draw a fresh batch each call).

    Logs ``projected`` (1 when the step was projected), ``cosine`` (between the two gradients, before) and
    ``projected_norm``.
    """

    name = "oracle"
    """How its metrics are keyed (:meth:`purify.module.Distiller.purifier_metrics`)."""

    def __init__(self, trait_loss: Callable[[nn.Module], Tensor]) -> None:
        super().__init__()
        self.trait_loss = trait_loss

    def before_step(self, student: nn.Module) -> None:
        params = [p for p in student.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        with torch.enable_grad():
            trait = torch.autograd.grad(self.trait_loss(student), params, allow_unused=True)
        trait = [torch.zeros_like(p) if t is None else t for p, t in zip(params, trait)]
        with torch.no_grad():
            inner = torch.stack([(p.grad * t).sum() for p, t in zip(params, trait)]).sum()
            t_sq = torch.stack([t.pow(2).sum() for t in trait]).sum()
            g_sq = torch.stack([p.grad.pow(2).sum() for p in params]).sum()
            project = bool(inner > 0) and bool(t_sq > 0)
            if project:
                for p, t in zip(params, trait):
                    p.grad.sub_(inner / t_sq * t)
            self.last_metrics = {
                "projected": float(project),
                "cosine": float(inner / (t_sq.sqrt() * g_sq.sqrt()).clamp_min(1e-30)),
                "projected_norm": float(inner / t_sq.sqrt()) if project else 0.0,
            }
