"""Shared types: the leaf of purify's import graph (it imports nothing of purify).

Every layer speaks these: :data:`Batch` (a collated batch), :class:`ModelOutput` (what a model gives the distiller),
:class:`Targets` (the distillation target after purification), :class:`RecipeError` (a user-input problem) and
:data:`IGNORE_INDEX`.
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

IGNORE_INDEX = -100
"""Label value that marks a position as not a target (the Hugging Face convention)."""

LossName = Literal["forward_kl", "reverse_kl", "jsd", "mse", "ce"]
"""The distillation objectives (:mod:`purify.losses`), by recipe name."""

Batch = dict[str, Any]
"""A collated batch: ``target_mask`` ``(B, T)`` and ``labels`` ``(B, T)`` aligned with the model outputs, plus the
model inputs (``input_ids``/``attention_mask`` for language models, ``x`` for vector models) and optional
``source`` ``(B,)`` lineage labels and ``num_items`` (global target count)."""


class RecipeError(ValueError):
    """A problem with user input, reported as ``"<dotted.key>: <what is wrong>; <how to fix>"``.

    Several problems found together are one error whose message has one such line per problem
    (:attr:`problems` keeps them as a list).
    """

    def __init__(self, message: str | list[str]) -> None:
        self.problems = [message] if isinstance(message, str) else list(message)
        super().__init__("\n".join(self.problems))


class TrainingStopped(RuntimeError):
    """A signal (a scheduler's SIGTERM, Ctrl-C), or a write the file system refused (a full disk), stopped training
    before it finished; ``lineage.json`` says ``status: failed`` where it could be written. ``exit_code`` is the
    shell's code for that signal (128 + its number), 1 for a refused write, never 0; ``report``: whether this process
    says so (a multi-process run's first process; the others stop with the same code, silently)."""

    def __init__(self, message: str, exit_code: int, report: bool = True) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.report = report


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss or weights; the message names the step, ``step`` holds it (1-based: the
    step that produced it) where the caller knew it."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


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


def first_line(err: BaseException | str, limit: int = 240, lines: int = 1) -> str:
    """What a one-line error quotes of another exception (or of its message): the first ``lines`` non-empty lines,
    joined (an exception's type name when it has none), cut at a word to at most ``limit`` characters, marked `` …``
    where cut."""
    text = " ".join([line.strip() for line in str(err).splitlines() if line.strip()][:lines])
    text = text or (type(err).__name__ if isinstance(err, BaseException) else "")
    return text if len(text) <= limit else (text[:limit].rsplit(" ", 1)[0] or text[:limit]) + " …"


def _argument(text: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Any:
    """``convert(text)`` if ``ok`` accepts it, else an ``argparse`` error saying what was ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def is_int(value: Any, at_least: int | None = None) -> bool:
    """Whether ``value`` is an integer (a numpy one too; a bool is not), ``>= at_least`` when given."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and (at_least is None
                                                                                     or value >= at_least)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a finite real number (a numpy one too; a bool is not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def position_limit(model: Any) -> int | None:
    """The most positions ``model`` reads (its config's ``max_position_embeddings`` or ``n_positions``; a peft model
    around one too), or ``None`` when it names none."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


SEED_RANGE = "a seed, an integer in [0, 2**32)"
"""What a seed must be (what numpy and torch accept), as the messages say it."""


def is_seed(value: int) -> bool:
    """Whether ``value`` is a seed numpy and torch accept (:data:`SEED_RANGE`)."""
    return 0 <= value < 2**32


def seed_int(text: str) -> int:
    """An ``argparse`` ``type``: a seed (:func:`is_seed`)."""
    return _argument(text, int, is_seed, SEED_RANGE)


def positive_int(text: str) -> int:
    """An ``argparse`` ``type``: an integer ≥ 1 (a count of samples, tokens, examples)."""
    return _argument(text, int, lambda v: v >= 1, "an integer >= 1")


def temperature(text: str) -> float:
    """An ``argparse`` ``type``: a finite sampling temperature ≥ 0 (0 = greedy)."""
    return _argument(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = greedy)")


def probability_mass(text: str) -> float:
    """An ``argparse`` ``type``: a nucleus mass in (0, 1]."""
    return _argument(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")
