"""Adversary purifier: a discriminator head behind gradient reversal hides *which lineage* an example came from.

A small MLP head reads the student's last hidden states ``h`` ``(B, T, H)`` (mean-pooled over target positions, or
per position) and predicts a label per example; a gradient-reversal layer of scale ``s(p) = weight · λ(p)`` sits
between ``h`` and the head, so one backward pass trains the head on ``CE(head(h), label)`` and pushes the student
toward features from which the label cannot be read (DANN, Ganin & Lempitsky 2015). ``disc_acc`` at chance means
the fingerprint is gone from what the head can see.

Labels (``target``):

- ``source``: ``batch["source"]`` ``(B,)`` from the data (jsonl records with a ``"source"`` field, e.g. text a
  teacher generated vs reference text); ``-1`` (unknown) examples are left out of the head's loss.
- ``lineage``: with ``K ≥ 2`` online teachers, :meth:`Adversary.transform_targets` gives each example one teacher,
  ``label = hash(example inputs) mod K`` (:func:`example_lineage`), and that teacher's logits as its target. The
  assignment must be a function of the inputs: the head only sees the student's features of the inputs, so a
  label that changed with batch order would be unreadable by construction. A student that imitates teacher A on
  some inputs and teacher B on others has to represent which one it is imitating; the reversal removes that, which
  leaves what the teachers share. Recipe validation requires it to be the first purifier (it picks raw teacher
  logits) and refuses it beside ``ensemble`` (which would recombine all teachers).

The loss term returned to the distiller is ``CE - CE.detach()``: zero in value (the student maximises what the head
minimises, so the game has no value to add to the objective and ``train/loss`` stays comparable with vanilla), with
the gradient of ``CE``. The head's loss is logged as ``disc_loss``. ``weight: 0`` trains the head as a probe of
the lineage without touching the student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from purify.purifiers.base import (
    Contract,
    PurifierConfig,
    PurifierContext,
    StudentPurifier,
    TargetPurifier,
    output_layer,
)
from purify.purifiers.grl import dann_lambda, reverse_gradient
from purify.types import Batch, ModelOutput, Targets

_PRIME = 2_147_483_647


@dataclass
class AdversaryConfig(PurifierConfig):
    """Recipe entry ``{name: adversary, ...}``."""

    name: str = "adversary"
    weight: float = 0.1  # reversal strength: the student receives -weight·λ(p)·∂CE/∂h (0 = probe only)
    target: Literal["lineage", "source"] = "lineage"  # label: teacher assigned per example, or batch["source"]
    pool: Literal["mean", "token"] = "mean"  # mean over target positions, or one prediction per position
    hidden_dim: int = 64  # width of the head's hidden layer
    ramp: Literal["dann", "constant"] = "dann"  # λ(p) = 2/(1+exp(-10p)) - 1, or λ = 1
    num_sources: int = 2  # classes for target: source (labels 0 .. num_sources-1)

    def problems(self) -> list[str]:
        """Settings that cannot work, one ``"<key>: <problem>; <fix>"`` line each."""
        out = []
        if self.weight < 0:
            out.append(f"weight: must be >= 0, got {self.weight}; 0 trains the head as a probe only")
        if self.hidden_dim < 1:
            out.append(f"hidden_dim: must be >= 1, got {self.hidden_dim}")
        if self.target == "source" and self.num_sources < 2:
            out.append(f"num_sources: must be >= 2, got {self.num_sources}")
        return out

    def recipe_problems(self, recipe: Any) -> list[str]:
        """``target: lineage`` needs at least two teachers."""
        if self.target == "lineage" and len(recipe.teachers) < 2:
            return [f"target: 'lineage' needs at least 2 teachers, got {len(recipe.teachers)}; add a teacher, or use "
                    "target: source with data records carrying a 'source' field"]
        return []

    def contract(self) -> Contract:
        """With ``target: lineage`` it sets each example's teacher: first, and it edits and reads the targets."""
        lineage = self.target == "lineage"
        return Contract(first=lineage, edits_targets=lineage, reads_teachers=lineage)


class DiscriminatorHead(nn.Module):
    """``Linear(H, hidden) → ReLU → Linear(hidden, C)``: class logits ``(..., C)`` from features ``(..., H)``.

    Args:
        in_dim: feature size ``H``.
        hidden_dim: hidden width.
        num_classes: number of labels ``C``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_classes))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


def example_lineage(batch: Batch, num_teachers: int) -> Tensor:
    """A teacher index per example, ``Σ_j byte_j · m_j mod (2³¹-1) mod K`` over the bytes of its inputs.

    The multipliers ``m_j`` are fixed (seed 0), the attended tokens are moved to the front of the row and padding
    bytes zeroed, so an example gets the same teacher in every epoch, batch and padding length, on either side.

    Args:
        batch: ``input_ids`` ``(B, T)`` with ``attention_mask``, or ``x`` ``(B, ...)``.
        num_teachers: ``K``.

    Returns:
        ``(B,)`` long labels in ``[0, K)``.
    """
    if "input_ids" in batch:  # left padding: the tokens to the front first (a right-padded row stays as it is)
        mask = batch["attention_mask"]
        first = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)
        inputs = torch.gather(batch["input_ids"] * mask, 1, first)
    else:
        inputs = batch["x"]
    rows = inputs.contiguous().view(torch.uint8).reshape(inputs.shape[0], -1).long()
    gen = torch.Generator().manual_seed(0)
    multipliers = torch.randint(1, _PRIME, (rows.shape[1],), generator=gen).to(rows.device)
    return ((rows * multipliers) % _PRIME).sum(1) % num_teachers


class Adversary(StudentPurifier, TargetPurifier):
    """Discriminator head with gradient reversal (see the module docstring).

    The head is built in :meth:`setup` (its width is the student's): in your own loop, call ``setup`` before
    ``load_state_dict`` of a saved adversary (a :class:`purify.module.Distiller` does, in ``setup_purifiers``).

    Args:
        config: the validated recipe entry.
    """

    needs_hidden = True

    def __init__(self, config: AdversaryConfig) -> None:
        super().__init__(config)
        self.head: DiscriminatorHead | None = None
        self.num_classes = 0

    def setup(self, ctx: PurifierContext) -> None:
        cfg = self.config
        if cfg.target == "lineage" and len(ctx.teachers) < 2:
            raise ValueError(f"adversary: target 'lineage' needs at least 2 teachers, got {len(ctx.teachers)}")
        self.num_classes = len(ctx.teachers) if cfg.target == "lineage" else cfg.num_sources
        device = next(ctx.student.parameters()).device
        width = output_layer(ctx.student, "adversary").in_features
        self.head = DiscriminatorHead(width, cfg.hidden_dim, self.num_classes).to(device)

    def transform_targets(self, batch: Batch, teacher_outputs: list[ModelOutput], targets: Targets) -> Targets:
        """``target: lineage``: example ``b``'s target becomes teacher ``example_lineage(batch)[b]``'s logits."""
        if self.config.target != "lineage":
            return targets
        labels = example_lineage(batch, len(teacher_outputs)).to(targets.logits.device)
        logits = teacher_outputs[0].logits
        for k, out in enumerate(teacher_outputs[1:], start=1):
            logits = torch.where((labels == k).view(-1, 1, 1), out.logits, logits)
        return Targets(logits=logits, weight=targets.weight)

    def labels(self, batch: Batch) -> Tensor:
        """``(B,)`` discriminator labels for a batch (``-1`` = unknown, left out)."""
        if self.config.target == "lineage":
            return example_lineage(batch, self.num_classes)
        if "source" not in batch:
            raise ValueError("adversary: target 'source' needs batch['source']; give every jsonl record a 'source' "
                             "field (which lineage produced it), or use target: lineage with 2+ teachers")
        labels = batch["source"]
        if int(labels.max()) >= self.config.num_sources:
            raise ValueError(f"adversary: batch['source'] has label {int(labels.max())} but num_sources is "
                             f"{self.config.num_sources}; raise num_sources to the number of distinct sources")
        return labels

    def extra_loss(self, batch: Batch, student_output: ModelOutput, progress: float) -> Tensor:
        """Zero-valued term with the gradient of the head's cross-entropy (features reversed by ``s(p)``).

        Args:
            batch: with ``target_mask`` ``(B, T)`` and the label source.
            student_output: ``hidden`` ``(B, T, H)`` is required.
            progress: training progress ``p ∈ [0, 1]`` for the ramp.
        """
        cfg = self.config
        assert self.head is not None and student_output.hidden is not None, "call setup() and pass hidden states"
        # in the head's dtype (float32 as setup builds it), whatever the student's (a bf16 student's hidden states)
        hidden = student_output.hidden.to(next(self.head.parameters()).dtype)
        mask = batch["target_mask"].to(hidden.dtype)
        labels = self.labels(batch).to(hidden.device)
        scale = cfg.weight * (dann_lambda(progress) if cfg.ramp == "dann" else 1.0)
        features = reverse_gradient(hidden, scale)
        if cfg.pool == "mean":
            features = (features * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # (B, H)
            keep = (mask.sum(1) > 0) & (labels >= 0)  # (B,)
        else:
            labels = labels[:, None].expand_as(mask)  # (B, T)
            keep = (mask > 0) & (labels >= 0)
        logits = self.head(features).float()  # (B, C) or (B, T, C)
        labels, keep = labels.reshape(-1), keep.reshape(-1).float()
        logits = logits.reshape(labels.shape[0], -1)
        count = keep.sum().clamp_min(1)
        ce = (F.cross_entropy(logits, labels.clamp_min(0), reduction="none") * keep).sum() / count
        acc = ((logits.argmax(-1) == labels).float() * keep).sum() / count
        self.last_metrics = {"disc_loss": ce.detach(), "disc_acc": acc.detach(), "grl_scale": scale}
        return ce - ce.detach()
