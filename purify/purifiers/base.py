"""The purifier protocol (DESIGN §3): three kinds of trait-agnostic levers that compose in any order.

- :class:`TargetPurifier` — ``transform_targets(batch, teacher outputs, targets) -> targets``: rewrites the teacher targets and
  per-position weights (ensemble combination, divergence masking, tail truncation, cross-base alignment).
- :class:`StudentPurifier` — ``extra_loss(batch, student output, progress) -> scalar``: adds a loss term (adversary head
  with gradient reversal, anchor to the initial weights).
- :class:`ParameterPurifier` — acts on gradients before the optimizer step or on weights after it (delta
  projection).

Every purifier is a plain ``torch.nn.Module`` (so heads are checkpointed and moved with the student), never sees
the probe that measures the trait, and records what it did in :attr:`Purifier.last_metrics` (masked fraction,
discriminator accuracy, projected norm, …), which trainers log under ``purify/<name>/<metric>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

Batch = dict[str, Any]
"""A collated batch: ``target_mask`` ``(B, T)`` and ``labels`` ``(B, T)`` aligned with the model outputs, plus the
model inputs (``input_ids``/``attention_mask`` for language models, ``x`` for vector models) and optional
``source`` ``(B,)`` lineage labels and ``num_items`` (global target count)."""


@dataclass
class ModelOutput:
    """What a model gives the distiller at the target positions.

    Attributes:
        logits: ``(B, T, V)`` logits aligned with ``batch["target_mask"]`` (for causal LMs: predictions of the next
            token, already shifted).
        hidden: ``(B, T, H)`` last hidden states at the same positions, when asked for.
    """

    logits: Tensor
    hidden: Tensor | None = None


@dataclass
class Targets:
    """The distillation target after purification.

    Attributes:
        logits: ``(B, T, V)`` target logits (or log-probabilities) in the student's vocabulary.
        weight: ``(B, T)`` per-position weight: the 0/1 target mask times any purifier weights in ``[0, 1]``.
    """

    logits: Tensor
    weight: Tensor


@dataclass
class PurifierContext:
    """What a purifier may use at set-up (never the trait probe).

    Attributes:
        student: the student being trained.
        teachers: frozen teachers, in recipe order (``teachers[0]`` is the primary teacher).
        teacher_names: one name per teacher.
        teacher_weights: one weight per teacher (recipe ``teachers[i].weight``).
        base: frozen copy of the student's initial weights, when some purifier asked for it (``needs_base``).
        forward: ``forward(model, batch, hidden=False) -> ModelOutput``, the distiller's way to run any model.
        total_steps: planned optimizer steps (for schedules such as the gradient-reversal ramp).
    """

    student: nn.Module
    teachers: list[nn.Module]
    teacher_names: list[str]
    teacher_weights: list[float]
    base: nn.Module | None = None
    forward: Callable[..., ModelOutput] | None = None
    total_steps: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class Purifier(nn.Module):
    """Base class of all purifiers. Subclasses set :attr:`kind` and implement the matching method."""

    kind: ClassVar[Literal["target", "student", "parameter"]]
    needs_base: ClassVar[bool] = False
    """Ask the distiller for a frozen copy of the student's initial weights (``PurifierContext.base``)."""
    needs_hidden: ClassVar[bool] = False
    """Ask the distiller to compute the student's hidden states (``ModelOutput.hidden``)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_metrics: dict[str, float | Tensor] = {}

    def setup(self, ctx: PurifierContext) -> None:  # noqa: B027 - optional hook
        """Called once before training with the student, teachers and frozen base."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups for the purifier's own trainable parameters (e.g. a discriminator head)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "name": f"purifier.{type(self).__name__}"}] if params else []


class TargetPurifier(Purifier):
    """Transforms teacher targets: ``(batch, teacher outputs, targets) -> targets``."""

    kind = "target"

    def transform_targets(self, batch: Batch, teacher_outputs: list[ModelOutput], targets: Targets) -> Targets:
        raise NotImplementedError


class StudentPurifier(Purifier):
    """Adds a loss term: ``(batch, student output, progress in [0, 1]) -> scalar``.

    A class may also subclass :class:`TargetPurifier` (e.g. an adversary that assigns each example a lineage and
    its target); the distiller calls every hook a purifier implements.
    """

    kind = "student"

    def extra_loss(self, batch: Batch, student_output: ModelOutput, progress: float) -> Tensor:
        raise NotImplementedError


class ParameterPurifier(Purifier):
    """Acts on the student's gradients before each optimizer step and/or on its weights after it."""

    kind = "parameter"

    def before_step(self, student: nn.Module) -> None:  # noqa: B027 - optional hook
        """Edit ``p.grad`` in place before the optimizer step."""

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:  # noqa: B027 - optional hook
        """Edit the weights in place after the optimizer step."""
