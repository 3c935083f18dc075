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

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from purify.config import type_problems
from purify.types import Batch, ModelOutput, RecipeError, Targets


@dataclass(frozen=True)
class Contract:
    """How a purifier composes with the others and with the recipe, declared as data.

    :mod:`purify.assembly` checks every recipe's purifier list against these facts once, so no purifier needs to
    know another by name.

    Attributes:
        first: must be the first purifier (e.g. cross-base alignment: later ones read aligned outputs).
        edits_targets: changes the targets (its change is lost if a later purifier rebuilds them).
        rebuilds_targets: builds the targets afresh from the raw teacher outputs, discarding earlier edits.
        reads_teachers: reads the teachers' outputs in the student's vocabulary.
        keeps_own_vocab: leaves some teacher outputs in their own vocabulary, which readers cannot use.
        needs_teacher_weights: needs a teacher as a model with weights (not a logit cache, not an API).
        needs_tokenizer: needs language models with tokenizers (not vector models, no ``loss.logit_slice``).
        needs_full_support: gives some vocabulary entries zero target mass, which only losses that allow it
            (forward KL, JSD with beta < 1) can use.
        edits_weights: edits the student's full weight matrices (or their gradients), which a LoRA student
            (``student.lora``) keeps frozen.
    """

    first: bool = False
    edits_targets: bool = False
    rebuilds_targets: bool = False
    reads_teachers: bool = False
    keeps_own_vocab: bool = False
    needs_teacher_weights: bool = False
    needs_tokenizer: bool = False
    needs_full_support: bool = False
    edits_weights: bool = False


class PurifierConfig:
    """Mixin of every purifier's config dataclass: its checks and its :class:`Contract`.

    Subclasses override :meth:`problems` (checks of the config alone), :meth:`recipe_problems` (checks against the
    recipe it sits in) and :meth:`contract`. Problems are ``"<key>: <what is wrong>; <how to fix>"`` lines with keys
    relative to the purifier's entry.
    """

    name: str
    unbounded: ClassVar[tuple[str, ...]] = ()
    """Number fields where ``inf`` means something (a bound that ``inf`` switches off); NaN is refused everywhere."""

    def problems(self) -> list[str]:
        """What is wrong with this config on its own (empty when it can work)."""
        return []

    def recipe_problems(self, recipe: Any) -> list[str]:
        """What is wrong with this config inside ``recipe`` (teacher count, loss, …)."""
        return []

    def contract(self) -> Contract:
        """How this purifier composes with others."""
        return Contract()


def number_problems(config: Any) -> list[str]:
    """A NaN in any number field of a purifier config (or in a list of numbers), or an infinity outside its
    :attr:`PurifierConfig.unbounded` fields: the field checks compare with ``<``, which NaN passes, and either would
    reach the loss as a non-finite value mid-run."""
    out = []
    allowed = getattr(config, "unbounded", ())
    for f in dataclasses.fields(config) if dataclasses.is_dataclass(config) else ():
        value = getattr(config, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)
               and not (f.name in allowed and v == math.inf)]
        if bad:
            what = "finite numbers" if isinstance(value, (list, tuple)) else "a finite number"
            out.append(f"{f.name}: must be {what}{' or inf' if f.name in allowed else ''}, got {value}")
    return out


def require_valid(config: Any) -> None:
    """Raise :class:`RecipeError` listing every problem of a purifier config (library use validates here): a value
    its field's type does not allow (a misspelt choice such as ``flag="logratios"``, which the purifier would
    otherwise run as another choice), then its own :meth:`PurifierConfig.problems`. The same checks as a recipe's
    purifier entry."""
    name = getattr(config, "name", type(config).__name__)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        wrong = type_problems(config, f"{name}.")
        if wrong:
            raise RecipeError(wrong)
    problems = number_problems(config) or (config.problems() if hasattr(config, "problems") else [])
    if problems:
        raise RecipeError([f"{name}.{p}" for p in problems])

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
        logit_slice: ``[start, stop)`` of the logits the loss distils (``loss.logit_slice``), or ``None``.
        student_tokenizer: the student's tokenizer (``None`` for vector models), for vocabulary alignment.
        teacher_tokenizers: one tokenizer (or ``None``) per teacher.
        vocab_width: the student's logits per position as the loss reads them, where the student and its
            same-tokenizer teachers have output layers padded to different sizes (the narrowest: every model in
            the student's vocabulary is cut to it); ``None`` otherwise (the student's own width).
    """

    student: nn.Module
    teachers: list[nn.Module]
    teacher_names: list[str]
    teacher_weights: list[float]
    base: nn.Module | None = None
    forward: Callable[..., ModelOutput] | None = None
    total_steps: int = 1
    logit_slice: list[int] | None = None
    student_tokenizer: Any | None = None
    teacher_tokenizers: list[Any] = field(default_factory=list)
    vocab_width: int | None = None


class Purifier(nn.Module):
    """Base class of all purifiers. Subclasses set :attr:`kind` and implement the matching method."""

    kind: ClassVar[Literal["target", "student", "parameter"]]
    needs_base: ClassVar[bool] = False
    """Ask the distiller for a frozen copy of the student's initial weights (``PurifierContext.base``)."""
    needs_hidden: ClassVar[bool] = False
    """Ask the distiller to compute the student's hidden states (``ModelOutput.hidden``)."""

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        if isinstance(config, dict):  # a recipe entry's form: it reached the first step as an AttributeError
            cls = type(self).__name__
            raise RecipeError(f"{cls}: takes its config dataclass ({cls}Config(...)), not a dict; or build it from "
                              "the dict with purify.purifiers.build_purifiers([{'name': ..., ...}])")
        if config is not None:
            require_valid(config)
        self.config = config
        self.last_metrics: dict[str, float | Tensor] = {}

    def setup(self, ctx: PurifierContext) -> None:  # noqa: B027 - optional hook
        """Called once before training with the student, teachers and frozen base."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups for the purifier's own trainable parameters (e.g. a discriminator head)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "name": f"purifier.{type(self).__name__}"}] if params else []


class TargetPurifier(Purifier):
    """Transforms teacher targets: ``(batch, teacher outputs, targets) -> targets``.

    The loss is normalised by the batch's target positions counted before any target purifier (``target_mask``, or
    the run's global count): lowering ``targets.weight`` lowers the loss, raising it raises it."""

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


def output_layer(model: nn.Module, who: str) -> nn.Linear:
    """A model's output layer (``get_output_embeddings()`` or ``.head``): its ``in_features`` is the width of the last
    hidden state, its ``out_features`` the number of outputs.

    Raises:
        ValueError: naming ``who`` (the purifier), when the model has no such ``nn.Linear``.
    """
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else getattr(model, "head", None)
    if not isinstance(out, nn.Linear):
        raise ValueError(f"{who}: cannot read the output layer of {type(model).__name__}; it needs an output "
                         "nn.Linear (get_output_embeddings() or .head) whose input is the last hidden state")
    return out
