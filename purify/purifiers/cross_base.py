"""Cross-base purifier: distil from teachers of another family whose tokenizer differs from the student's.

A teacher's quirks live in its own tokens and weights; once its targets are moved onto the student's tokens they no
longer line up with the student's weights, so they transfer weakly (DESIGN §3.4). Each aligned teacher runs on its
own tokenization of the same text (``batch["teacher_batches"][i]``, built by :class:`purify.data.TokenDataset`);
student position ``p`` takes the teacher's prediction at the position whose next token covers exactly the same
characters (:func:`purify.align.target_positions`). Unaligned positions carry no teacher signal.

``alignment``:

- ``shared_vocab``: the teacher's distribution moves onto student tokens with identical surface text and is
  renormalised over them (:func:`purify.align.map_logprobs`, mapped mass ``m``). For the primary teacher this is
  the target, with per-position weight ``m`` (0 where unaligned), so a position counts as much as the teacher's
  mass that the student's vocabulary can express. Another aligned teacher ``i`` becomes
  ``p_i' = m·q_i + (1 − m)·p_target``: where it has no opinion in the student's tokens it defers to the primary
  target, so an ``ensemble`` listed after ``cross_base`` combines it safely.
- ``uld``: universal logit distillation, ``weight · W1(sort p_s, sort p_t)`` at aligned positions
  (:func:`purify.align.uld_loss`) as an extra loss term. A ULD-aligned primary teacher enters the objective only
  through this term: the KL target gets weight 0 (and so does ``loss.hard_label_weight``'s cross-entropy, which
  shares the per-position weight).

Logs per aligned teacher: ``position_coverage/<name>`` (share of target positions aligned), and for
``shared_vocab`` ``vocab_coverage/<name>`` (mean mapped mass ``m`` over aligned positions) and
``vocab_overlap/<name>`` (share of the teacher's vocabulary with a student match); for ``uld`` ``uld/<name>``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, List, Literal, Optional  # noqa: UP035 - omegaconf needs typing generics

import torch
import torch.nn.functional as F
from torch import Tensor

from purify.align import VocabMap, differing_tokenizers, map_logprobs, target_positions, uld_loss, vocab_map
from purify.purifiers.base import Contract, PurifierConfig, PurifierContext, StudentPurifier, TargetPurifier
from purify.types import Batch, ModelOutput, Targets

Alignment = Literal["shared_vocab", "uld"]


@dataclass
class CrossBaseConfig(PurifierConfig):
    """Recipe entry ``{name: cross_base, alignment: shared_vocab}``; it must be the first purifier."""

    name: str = "cross_base"
    alignment: Alignment = "shared_vocab"  # shared_vocab | uld (see the module docstring)
    teachers: Optional[List[Any]] = None  # indices or teachers[i].name; null = every teacher whose tokenizer differs
    weight: float = 1.0  # uld: weight of the W1 term

    def problems(self) -> list[str]:
        """Settings that cannot work, one line each."""
        if self.alignment == "uld" and self.weight < 0:
            return [f"weight: must be >= 0, got {self.weight}"]
        return []

    def recipe_problems(self, recipe: Any) -> list[str]:
        """Teacher references must name teachers of the recipe."""
        names = [t.name for t in recipe.teachers if t.name is not None]
        return [f"teachers: unknown teacher {ref!r}; give an index below {len(recipe.teachers)} or one of {names} "
                "(set teachers[i].name to refer to a teacher)"
                for ref in self.teachers or []
                if not (isinstance(ref, int) and 0 <= ref < len(recipe.teachers))
                and not (isinstance(ref, str) and ref in names)]

    def contract(self) -> Contract:
        """First: it aligns the teacher outputs in place, which later purifiers read; shared_vocab zeroes unmatched
        tokens, uld keeps a teacher in its own vocabulary."""
        return Contract(first=True, needs_tokenizer=True, needs_full_support=self.alignment == "shared_vocab",
                        keeps_own_vocab=self.alignment == "uld")


def resolve_teachers(refs: list[Any] | None, names: list[str], differing: list[int]) -> list[int]:
    """Teacher indices a ``cross_base`` entry aligns.

    Args:
        refs: the entry's ``teachers`` (indices or names), or ``None`` for every teacher in ``differing``.
        names: one name per teacher.
        differing: indices of teachers whose tokenizer differs from the student's.
    """
    if refs is None:
        return list(differing)
    return [ref if isinstance(ref, int) else names.index(ref) for ref in refs]


class CrossBase(TargetPurifier, StudentPurifier):
    """Align teachers with other tokenizers to the student's positions and vocabulary (see the module docstring).

    Implements both hooks: ``transform_targets`` aligns (and, for ``uld``, keeps the aligned teacher logits), and
    ``extra_loss`` adds the ULD term (0 for ``shared_vocab``).
    """

    kind = "target"

    def __init__(self, config: CrossBaseConfig) -> None:
        super().__init__(config)
        self.aligned: list[int] = []
        self.names: list[str] = []
        self.vmaps: dict[int, VocabMap] = {}
        self.student_vocab = 0
        self._uld: list[tuple[Tensor, Tensor, Tensor]] = []  # ULD teachers: (batch rows, positions, logits)

    def setup(self, ctx: PurifierContext) -> None:
        """Pick the aligned teachers (warning about named ones that share the student's tokenizer) and build the
        vocabulary maps."""
        student_tok, teacher_toks = ctx.student_tokenizer, ctx.teacher_tokenizers
        if student_tok is None or not teacher_toks or len(teacher_toks) != len(ctx.teachers):
            raise ValueError("cross_base: needs the student's tokenizer and one tokenizer per teacher; pass "
                             "Distiller(student_tokenizer=..., teacher_tokenizers=[...])")
        differing = differing_tokenizers(student_tok, teacher_toks)
        chosen = resolve_teachers(self.config.teachers, ctx.teacher_names, differing)
        same = [f"teachers[{i}] ({ctx.teacher_names[i]})" for i in chosen if i not in differing]
        if same or not chosen:
            what = ", ".join(same) if same else "every teacher"
            warnings.warn(f"cross_base: {what} uses the student's tokenizer; there is nothing to align and its "
                          "targets pass through unchanged", UserWarning, stacklevel=2)
        self.aligned = [i for i in chosen if i in differing]
        self.names = list(ctx.teacher_names)
        self.student_vocab = ctx.vocab_width or int(ctx.student.config.vocab_size)  # what the loss reads
        if self.config.alignment == "shared_vocab":
            self.vmaps = {i: vocab_map(student_tok, teacher_toks[i]) for i in self.aligned}

    def transform_targets(self, batch: Batch, teacher_outputs: list[ModelOutput], targets: Targets) -> Targets:
        """Align each chosen teacher; replaces its entry of ``teacher_outputs`` with student-space logits
        (``shared_vocab``) and, when it is the primary teacher, the targets."""
        if not self.aligned:
            return targets
        real = batch["target_mask"] > 0
        n = real.sum().clamp_min(1)
        metrics: dict[str, Tensor] = {}
        mapped: dict[int, tuple[Tensor, Tensor]] = {}
        self._uld = []
        for i in self.aligned:
            if i not in batch.get("teacher_batches", {}):
                raise ValueError(f"cross_base: the batch has no teacher_batches[{i}]; build the data with the "
                                 "teacher's tokenizer (DistillDataModule(teacher_tokenizers=...))")
            pos = target_positions(batch["offsets"], batch["teacher_batches"][i]["offsets"])  # (B, T)
            where = ((pos >= 0) & real).nonzero(as_tuple=True)  # N aligned target positions
            picked = teacher_outputs[i].logits[where[0], pos[where]]  # (N, V_t)
            name = self.names[i]
            metrics[f"position_coverage/{name}"] = where[0].numel() / n
            if self.config.alignment == "uld":
                self._uld.append(where + (picked,))
                continue
            logq, mass = map_logprobs(picked, self.vmaps[i], self.student_vocab)  # (N, V_s), (N,)
            full = torch.zeros(*real.shape, self.student_vocab, device=logq.device)
            full[where] = torch.where(mass[:, None] > 0, logq, torch.zeros_like(logq))
            mapped[i] = (full, torch.zeros(real.shape, device=mass.device).index_put(where, mass.clamp(0.0, 1.0)))
            metrics[f"vocab_coverage/{name}"] = mass.sum() / max(1, mass.numel())
            metrics[f"vocab_overlap/{name}"] = torch.tensor(self.vmaps[i].coverage)
        if 0 in mapped:
            logits, mass = mapped.pop(0)
            targets = Targets(logits=logits, weight=targets.weight * mass.to(targets.weight.dtype))
            teacher_outputs[0] = ModelOutput(logits=logits)
        elif 0 in self.aligned:  # uld primary: it enters the objective through extra_loss only
            targets = Targets(logits=torch.zeros(*real.shape, self.student_vocab, device=real.device),
                              weight=torch.zeros_like(targets.weight))
        fallback = F.log_softmax(targets.logits.float(), dim=-1)
        for i, (logq, mass) in mapped.items():  # p_i' = m·q_i + (1 − m)·p_target
            teacher_outputs[i] = ModelOutput(logits=torch.logaddexp(logq + mass.log()[..., None],
                                                                    fallback + torch.log1p(-mass)[..., None]))
        self.last_metrics = metrics
        return targets

    def extra_loss(self, batch: Batch, student_output: ModelOutput, progress: float) -> Tensor:
        """``weight · mean_i W1`` over the ULD-aligned teachers at their aligned positions (0 for ``shared_vocab``)."""
        if not self._uld:
            return student_output.logits.new_zeros(())
        logits = student_output.logits
        terms = [uld_loss(logits[b, p], picked, torch.ones(len(b), device=logits.device)) for b, p, picked in self._uld]
        for term, i in zip(terms, self.aligned):
            self.last_metrics[f"uld/{self.names[i]}"] = term.detach()
        self._uld = []
        return self.config.weight * torch.stack(terms).mean()
