"""Divergence mask: drop, down-weight or *replace* the targets where the primary teacher departs from a reference.

A teacher's fingerprint concentrates on the few "divergence tokens" where it disagrees with other models (Schrodi
et al., ICLR 2026). Per position, with ``p`` the primary teacher's distribution and ``q`` the reference's:

- ``jsd``:  ``d = ½ KL(p || m) + ½ KL(q || m)``, ``m = ½ (p + q)`` (nats, symmetric, in ``[0, log 2]``),
- ``top1``: ``d = 1[argmax p ≠ argmax q]``.

Which positions are *flagged* (``flag``):

- ``divergence`` (default): ``d > threshold``.
- ``logratio``: the top ``rate`` share of the batch's real target positions by ``log p(a) − log p_base(a)``, ``a =
  argmax p`` (how much more the teacher believes its own top token than the student's frozen base does: a
  trait-agnostic detector in the spirit of the log p_student − log p_base ranking of "Can Data Attribution Filter Out
  Subliminal Learning? Not Reliably", NeurIPS 2026 submission).
- ``random``: ``round(rate × n)`` of the ``n`` real target positions drawn uniformly: the honest placebo of the other
  two at the same rate.

What happens at flagged positions (``mode``): ``drop`` sets their weight to 0; ``soft`` (``flag: divergence`` only)
multiplies it by ``clamp(1 − d / d_max, 0, 1)``, ``d_max`` the largest divergence over the batch's real target
positions; ``replace`` keeps the weight and sets the target to the reference's distribution (its log-probabilities),
so the student is taught what the reference would say there instead of nothing — replacing flagged labels beat
masking them in the data-attribution study above (0.189 vs 0.362 trait rate from 0.648). Unflagged positions are
left exactly as they were. The reference is ``others`` (the weight-averaged distribution of ``teachers[1:]``),
``base`` (the student's frozen initial copy) or one teacher by name.

Nothing here knows the trait, and nothing needs a teacher's weights: only output distributions (a logit cache or an
API teacher's log-probabilities will do), which is the setting of API teachers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from purify.losses_chunked import default_chunk_rows
from purify.purifiers.base import Contract, PurifierConfig, PurifierContext, TargetPurifier
from purify.purifiers.ensemble import combine
from purify.types import Batch, ModelOutput, Targets

Metric = Literal["jsd", "top1"]
Mode = Literal["drop", "soft", "replace"]
Flag = Literal["divergence", "logratio", "random"]


@dataclass
class DivergenceMaskConfig(PurifierConfig):
    """Recipe entry ``{name: divergence_mask, reference: others, metric: jsd, threshold: 0.1}``.

    Label replacement: ``{name: divergence_mask, mode: replace, reference: base, flag: logratio, rate: 0.1}``.
    """

    name: str = "divergence_mask"
    reference: str = "others"  # others | base | the name of a teacher other than teachers[0]
    metric: Metric = "jsd"  # jsd (nats, <= log 2 = 0.693) | top1 (argmax disagreement, 0 or 1)
    threshold: float = 0.1  # flag: divergence: positions with divergence > threshold are flagged
    mode: Mode = "drop"  # drop: weight 0 | soft: weight * (1 - d / max d) | replace: target := reference's distribution
    flag: Flag = "divergence"  # divergence (d > threshold) | logratio (top `rate` by log p_T − log p_base) | random
    rate: float = 0.1  # flag: logratio | random: share of each batch's real target positions flagged
    seed: int = 0  # flag: random: seed of the purifier's own generator

    def problems(self) -> list[str]:
        """Settings that cannot work, one line each."""
        out = [f"threshold: must be >= 0, got {self.threshold}"] if self.threshold < 0 else []
        if self.flag != "divergence" and not 0.0 < self.rate <= 1.0:
            out.append(f"rate: {self.rate} is not in (0, 1]; it is the share of positions flag: {self.flag} flags")
        if self.mode == "soft" and self.flag != "divergence":
            out.append(f"mode: soft scales weights by the divergence, which flag: {self.flag} does not threshold; use "
                       "mode: drop or replace, or flag: divergence")
        return out

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
        if self.mode == "replace" and recipe.loss.name in ("mse", "ce"):
            why = "compares raw logits" if recipe.loss.name == "mse" else "trains on the data's tokens, not the targets"
            return [f"mode: replace puts the reference's log-probabilities in the target, but loss.name: "
                    f"{recipe.loss.name} {why}; use loss.name: forward_kl, reverse_kl or jsd"]
        return []

    def contract(self) -> Contract:
        """Reads the teachers' outputs and reweights (or replaces) the targets; never needs teacher weights."""
        return Contract(edits_targets=True, reads_teachers=True)


def divergence(p_logits: Tensor, q_logits: Tensor, metric: Metric = "jsd") -> Tensor:
    """Per-position divergence between two distributions given as logits (or log-probabilities).

    Args:
        p_logits: ``(..., V)``.
        q_logits: ``(..., V)``.
        metric: ``jsd`` (``½ KL(p||m) + ½ KL(q||m)``, ``m = ½(p+q)``, nats) or ``top1`` (``1[argmax p ≠ argmax q]``).

    Returns:
        ``(...)`` divergence per position, float32 (float64 for float64 logits). ``jsd`` is
        :func:`purify.losses.generalized_jsd` at ``β = ½`` (the same terms, ``0·log 0`` counted as 0) computed with
        in-place temporaries: it agrees with it to float32 rounding (about 1e-7), at about a fifth of its time over a
        49k vocabulary.
    """
    if p_logits.shape[-1:] != q_logits.shape[-1:]:  # torch said "size of tensor a (…) must match"
        raise ValueError(f"divergence: p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} differ in "
                         "the vocabulary (last) dimension")
    if metric == "jsd":
        return _jsd(p_logits, q_logits)
    if metric == "top1":
        return (p_logits.argmax(-1) != q_logits.argmax(-1)).float()
    raise ValueError(f"divergence: unknown metric {metric!r}; allowed: jsd, top1")


def _jsd(p_logits: Tensor, q_logits: Tensor, q_normalised: bool = False) -> Tensor:
    """``½ Σ p (log p − log m) + ½ Σ q (log q − log m)``, ``m = ½ (p + q)``, over the last dimension
    (``q_normalised``: ``q_logits`` are log-probabilities already, as a mixture of teachers is, and are used as
    they are)."""
    dtype = torch.promote_types(torch.promote_types(p_logits.dtype, q_logits.dtype), torch.float32)
    t = F.log_softmax(p_logits.to(dtype), -1)
    u = q_logits.to(dtype) if q_normalised else F.log_softmax(q_logits.to(dtype), -1)
    p, q = t.exp(), u.exp()
    log_m = (p + q).mul_(0.5).log_()
    out = None
    for logp, prob in ((t, p), (u, q)):
        side = (logp - log_m).mul_(prob).masked_fill_(prob == 0, 0.0).sum(-1)
        out = side if out is None else out.add_(side)
    return out.mul_(0.5)  # type: ignore[union-attr]


def mask_weights(div: Tensor, real: Tensor, threshold: float, mode: Mode = "drop") -> Tensor:
    """Per-position factor in ``[0, 1]`` to multiply the target weights by.

    Args:
        div: ``(...)`` divergence per position.
        real: ``(...)`` the real target positions, bool or a target weight (``> 0``: real; ``d_max`` is taken
            over these).
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
    real = real if real.dtype == torch.bool else real > 0  # a float target_mask, as batches carry it
    d_max = torch.where(real, div, torch.zeros_like(div)).max().clamp_min(torch.finfo(div.dtype).tiny)
    soft = (1.0 - div / d_max).clamp(0.0, 1.0)
    return torch.where(masked, soft, torch.ones_like(soft))


def top_fraction(score: Tensor, real: Tensor, rate: float) -> Tensor:
    """Flag the ``round(rate × n)`` real positions with the highest ``score`` (``n`` = number of real positions).

    Args:
        score: ``(...)`` per-position score.
        real: ``(...)`` bool, the positions that may be flagged.
        rate: share in ``[0, 1]``.

    Returns:
        ``(...)`` bool, ``True`` at exactly ``round(rate × n)`` real positions (ties broken by position).
    """
    flat, ok = score.reshape(-1).float(), real.reshape(-1)
    k = int(round(rate * int(ok.sum())))
    flags = torch.zeros_like(ok)
    if k > 0:
        flags[torch.where(ok, flat, torch.full_like(flat, -math.inf)).topk(k).indices] = True
    return flags.view_as(real)


def logratio(teacher_logits: Tensor, base_logits: Tensor) -> Tensor:
    """``log p_T(a) − log p_base(a)`` with ``a = argmax p_T`` per position (``(..., V)`` → ``(...)``, float32)."""
    t, b = torch.log_softmax(teacher_logits.float(), -1), torch.log_softmax(base_logits.float(), -1)
    top = t.argmax(-1, keepdim=True)
    return (t.gather(-1, top) - b.gather(-1, top)).squeeze(-1)


def at_rows(rows: Tensor, vocab: int, fn: Callable[[tuple[Tensor, ...]], Tensor]) -> Tensor:
    """A per-position quantity computed only at the positions ``rows`` (bool, ``(...)``), 0 elsewhere.

    ``fn(part)`` gets index tensors of up to :func:`~purify.losses_chunked.default_chunk_rows` positions (``x[part]``
    picks their ``(N, V)`` rows) and returns their ``(N,)`` values: row-wise functions give the same values as on
    the whole tensor, without its ``B×T×V`` temporaries and without reading padding or prompt positions.
    """
    where = rows.nonzero(as_tuple=True)
    step = default_chunk_rows(vocab)
    out = None
    for a in range(0, int(where[0].numel()), step):
        part = tuple(i[a:a + step] for i in where)
        values = fn(part)
        if out is None:
            out = torch.zeros(rows.shape, dtype=values.dtype, device=values.device)
        out[part] = values
    return out if out is not None else torch.zeros(rows.shape, device=rows.device)


class DivergenceMask(TargetPurifier):
    """Drop, down-weight or replace the targets where ``teachers[0]`` departs from the reference (module docstring).

    Needs no teacher weights. Logs ``flagged_fraction`` (share of real target positions flagged; also under its older
    name ``masked_fraction`` in the drop and soft modes) and, where the divergence is computed, ``mean_divergence``.
    """

    def __init__(self, config: DivergenceMaskConfig) -> None:
        super().__init__(config)
        # per instance, read by the Distiller: the base is a reference or scores the log-ratio flag
        self.needs_base = config.reference == "base" or config.flag == "logratio"  # type: ignore[misc]
        self.ctx: PurifierContext | None = None  # not a submodule: the base must stay out of checkpoints
        self.ref_index: int | None = None
        self.generator = torch.Generator().manual_seed(config.seed)  # flag: random

    def get_extra_state(self) -> dict[str, Tensor]:
        """The random flag's generator, so a resumed run flags what an uninterrupted one would."""
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"].cpu())

    def setup(self, ctx: PurifierContext) -> None:
        """Resolve the reference: a teacher index, all other teachers, or the frozen base."""
        ref = self.config.reference
        if self.needs_base and (ctx.base is None or ctx.forward is None):
            why = "reference 'base'" if ref == "base" else "flag 'logratio'"
            raise ValueError(f"divergence_mask: {why} needs ctx.base and ctx.forward")
        if ref == "others" and len(ctx.teachers) < 2:
            raise ValueError("divergence_mask: reference 'others' needs at least 2 teachers")
        if ref not in ("others", "base"):
            matches = [i for i, name in enumerate(ctx.teacher_names) if name == ref and i > 0]
            if not matches:
                raise ValueError(f"divergence_mask: no teacher named {ref!r} among {ctx.teacher_names[1:]}")
            self.ref_index = matches[0]
        self.ctx = ctx

    @torch.no_grad()
    def base_logits(self, batch: Batch) -> Tensor:
        """``(B, T, V)`` logits of the student's frozen base on this batch."""
        if self.ctx is None:
            raise RuntimeError("divergence_mask: call setup(ctx) before transform_targets")
        return self.ctx.forward(self.ctx.base, batch).logits  # type: ignore[misc]

    @torch.no_grad()
    def reference_logits(self, batch: Batch, teacher_outputs: list[ModelOutput], base: Tensor | None = None,
                         where: tuple[Tensor, ...] | None = None) -> Tensor:
        """``(B, T, V)`` logits (or log-probabilities) of the reference on this batch (``base``: the base's logits,
        when already computed); with ``where`` (index tensors of positions, as ``mask.nonzero(as_tuple=True)``)
        only those positions', ``(N, V)``."""
        if self.ctx is None:
            raise RuntimeError("divergence_mask: call setup(ctx) before transform_targets")

        def at(x: Tensor) -> Tensor:
            return x if where is None else x[where]

        if self.config.reference == "base":
            return at(base if base is not None else self.base_logits(batch))
        if self.ref_index is not None:
            return at(teacher_outputs[self.ref_index].logits)
        weights = self.ctx.teacher_weights[1:]
        if sum(w > 0 for w in weights) == 1:  # the mixture of one: its log-probabilities, exactly as combine gives
            return F.log_softmax(at(teacher_outputs[1 + [w > 0 for w in weights].index(True)].logits).float(), -1)
        others = torch.stack([at(out.logits) for out in teacher_outputs[1:]])
        return combine(others, torch.as_tensor(weights), "mean")

    @torch.no_grad()
    def divergence_at(self, batch: Batch, teacher_outputs: list[ModelOutput], base: Tensor | None,
                      rows: Tensor) -> Tensor:
        """Divergence of the primary teacher from the reference at the positions ``rows`` (bool, ``(B, T)``), 0
        elsewhere (see :func:`at_rows`)."""
        primary = teacher_outputs[0].logits
        if self.config.metric == "jsd":  # the mixture of the others is normalised already: no second log-softmax
            normalised = self.config.reference == "others"
            return at_rows(rows, primary.shape[-1], lambda part: _jsd(
                primary[part], self.reference_logits(batch, teacher_outputs, base, part), normalised))
        return at_rows(rows, primary.shape[-1], lambda part: divergence(
            primary[part], self.reference_logits(batch, teacher_outputs, base, part), self.config.metric))

    @torch.no_grad()
    def flags(self, batch: Batch, teacher_outputs: list[ModelOutput],
              weight: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(flagged, divergence or None, base logits or None)`` for this batch. The divergence is computed when
        the flag or the mode reads the reference, at the real target positions and wherever ``weight`` (the current
        target weights) is non-zero; it is 0 elsewhere."""
        cfg = self.config
        real = batch["target_mask"] > 0
        primary = teacher_outputs[0].logits
        base = self.base_logits(batch) if self.needs_base else None
        div = None
        if cfg.flag == "divergence" or cfg.mode == "replace":
            rows = real if weight is None else real | (weight != 0).expand_as(real)
            div = self.divergence_at(batch, teacher_outputs, base, rows)
        if cfg.flag == "divergence":
            flagged = (div > cfg.threshold) & real  # type: ignore[operator]
        elif cfg.flag == "logratio":
            score = at_rows(real, primary.shape[-1], lambda part: logratio(primary[part], base[part]))  # type: ignore[index]
            flagged = top_fraction(score, real, cfg.rate)
        else:
            noise = torch.rand(real.shape, generator=self.generator).to(real.device)
            flagged = top_fraction(noise, real, cfg.rate)
        return flagged, div, base

    def transform_targets(self, batch: Batch, teacher_outputs: list[ModelOutput], targets: Targets) -> Targets:
        cfg = self.config
        with torch.no_grad():
            flagged, div, base = self.flags(batch, teacher_outputs, targets.weight if cfg.mode == "soft" else None)
            real = batch["target_mask"] > 0
            n = real.sum().clamp_min(1)
            self.last_metrics = {"flagged_fraction": flagged.sum() / n}
            if div is not None:
                self.last_metrics["mean_divergence"] = (div * real).sum() / n
        if cfg.mode == "replace":  # the reference's log-probabilities at the flagged positions only
            where = flagged.nonzero(as_tuple=True)
            ref = self.reference_logits(batch, teacher_outputs, base, where)
            logits = targets.logits.clone()
            logits[where] = torch.log_softmax(ref.float(), -1).to(logits.dtype)
            return Targets(logits=logits, weight=targets.weight)
        self.last_metrics["masked_fraction"] = self.last_metrics["flagged_fraction"]
        if cfg.mode == "soft":
            factor = mask_weights(div, real, cfg.threshold, "soft")  # type: ignore[arg-type]
        else:
            factor = (~flagged).float()
        return Targets(logits=targets.logits, weight=targets.weight * factor.to(targets.weight.dtype))
