"""Anchor purifier: L2-SP (Li et al. 2018, "Explicit inductive bias for transfer learning"), a pull toward the
student's initial weights ``θ₀``.

``L_anchor = weight/2 · Σ_i ‖θ_i − θ₀,i‖²`` over the student's trainable parameters, so ``∂L/∂θ = weight · (θ − θ₀)``.
A cheap baseline every benchmark reports beside early stopping. Note that from a shared initialisation it keeps the
student near ``θ₀``, where a small imitation step follows the teacher's own update, so it may *raise* transfer
(DESIGN §3). Costs one frozen copy of the student (``needs_base``) and one pass over the weights per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from purify.purifiers.base import PurifierConfig, PurifierContext, StudentPurifier
from purify.types import Batch, ModelOutput


@dataclass
class AnchorConfig(PurifierConfig):
    """Recipe entry ``{name: anchor, weight: ...}``."""

    name: str = "anchor"
    weight: float = 0.01  # strength of the pull: the gradient is weight·(θ − θ₀)

    def problems(self) -> list[str]:
        """A negative weight pushes away from the base."""
        if self.weight < 0:
            return [f"weight: must be >= 0, got {self.weight}; a negative weight pushes away from the base"]
        return []


def squared_distance(student: nn.Module, base: nn.Module) -> Tensor:
    """``Σ_i ‖θ_i − θ₀,i‖²`` over ``student``'s trainable parameters, paired with ``base``'s by name (scalar; 0
    without trainable parameters).

    Raises:
        ValueError: ``base`` lacks one of them, or holds it in another shape (it was a KeyError, or a broadcast).
    """
    origin = dict(base.named_parameters())
    terms = []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        o = origin.get(name)
        if o is None or o.shape != p.shape:
            got = "none of that name" if o is None else f"one of shape {tuple(o.shape)}"
            raise ValueError(f"anchor: the base has {got} for the student's {name} {tuple(p.shape)}; give a copy "
                             "of the student's initial weights (the same names and shapes)")
        terms.append((p - o).pow(2).sum())
    return torch.stack(terms).sum() if terms else torch.zeros(())


def anchor_penalty(student: nn.Module, base: nn.Module, weight: float = 1.0) -> Tensor:
    """L2-SP penalty ``weight/2 · Σ_i ‖θ_i − θ₀,i‖²``; its gradient is exactly ``weight · (θ − θ₀)``.

    Args:
        student: the model being trained.
        base: a frozen copy of its initial weights (same parameter names).
        weight: strength.

    Returns:
        Scalar penalty, differentiable in ``student``'s parameters.

    Raises:
        ValueError: a negative weight (it pushes away from the base), or a ``base`` that does not pair with
            ``student`` (:func:`squared_distance`).
    """
    if not weight >= 0:
        raise ValueError(f"anchor_penalty: weight must be >= 0, got {weight}; a negative weight pushes away from the "
                         "base")
    return weight / 2 * squared_distance(student, base)


class Anchor(StudentPurifier):
    """Adds :func:`anchor_penalty` to the loss and logs ``anchor_distance = ‖θ − θ₀‖``.

    Args:
        config: the validated recipe entry.
    """

    needs_base = True

    def __init__(self, config: AnchorConfig) -> None:
        super().__init__(config)
        self._models: tuple[nn.Module, nn.Module] | None = None  # a tuple, so they are not registered as submodules

    def setup(self, ctx: PurifierContext) -> None:
        if ctx.base is None:
            raise ValueError("anchor: needs the frozen base copy of the student (PurifierContext.base)")
        self._models = (ctx.student, ctx.base)

    def extra_loss(self, batch: Batch, student_output: ModelOutput, progress: float) -> Tensor:
        assert self._models is not None, "call setup() first"
        sq = squared_distance(*self._models)
        self.last_metrics = {"anchor_distance": sq.detach().sqrt()}
        return self.config.weight / 2 * sq
