"""Delta projection: keep the student's displacement out of the subspace of the teacher's own fine-tuning update.

When the teacher is a fine-tune of the student's base (``θ_T = θ₀ + Δθ_T``), a small imitation step drags the
student along ``Δθ_T`` (Cloud et al. 2025's subliminal-learning theorem), trait included. At set-up, for every
selected weight matrix ``W`` ``(m, n)`` (tensors of more dimensions are flattened to ``(shape[0], -1)``), take the
top-``rank`` left/right singular vectors ``U`` ``(m, r)``, ``V`` ``(n, r)`` of ``ΔW_T = W_T − W₀``, and define

    ``P(D) = (I − U Uᵀ) D (I − V Vᵀ)``,

which removes every component of ``D`` whose column space touches ``U`` or row space touches ``V``. For 1-D tensors
(biases, norms) ``P(d) = d − u (uᵀ d)`` with ``u = Δb / ‖Δb‖``. Singular directions with (numerically) zero singular
value are not part of the teacher's update and are kept out of ``U``/``V``; ``rank: 0`` is vanilla distillation.

- ``mode: displacement``: after every optimizer step, ``W ← W₀ + P(W − W₀)`` (exact whatever the optimizer).
- ``mode: update``: before the step, ``g ← P(g)``. With SGD (momentum included, no weight decay) this keeps the
  displacement out of the subspace too; with Adam/AdamW it does not, since the per-coordinate ``1/√v`` scaling and
  decoupled weight decay rotate the update back into it. Prefer ``displacement`` with adaptive optimizers.

Shared-init check: the teacher must have the base's parameter names and shapes, and ``‖θ_T − θ₀‖ / ‖θ₀‖`` must not
exceed ``max_relative_delta`` (default 1.0; two independent initialisations of one architecture are about √2 apart).
Otherwise set-up refuses the teacher: across bases there is no ``Δθ_T`` to project.

Cost: one frozen copy of ``θ₀`` (shared with other ``needs_base`` purifiers), ``r(m + n)`` floats per matrix for the
bases, one SVD per matrix at set-up (``O(mn·min(m, n))``; seconds for a 0.5B model on GPU), and ``O(mnr)`` per matrix
per step. Logs ``projected_norm`` (norm removed by the last step) and ``displacement_norm`` (``‖θ − θ₀‖`` over the
selected tensors, after projection); the distiller logs them one step late, as set-up and training step come first.

DeepSpeed: the weights are edited in place on the module (Lightning's mixed precision keeps fp32 module weights;
DeepSpeed's fp32 master copy is not reached, so use ``auto``/``ddp`` strategies). Under ZeRO-3 each rank holds only a
shard: compute the subspaces before the model is partitioned, or layer by layer inside
``deepspeed.zero.GatheredParameters([w, w0, wT])``, and gather the same way when projecting.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, List, Literal  # noqa: UP035 - omegaconf needs typing generics

import torch
from torch import Tensor, nn

from purify.config import RecipeError
from purify.purifiers.base import ParameterPurifier, PurifierContext


@dataclass
class DeltaProjectionConfig:
    """Recipe entry ``{name: delta_projection, ...}``."""

    name: str = "delta_projection"
    rank: int = 8  # singular directions of ΔW_T removed per matrix (0 = vanilla)
    mode: Literal["displacement", "update"] = "displacement"  # project θ − θ₀ after each step, or the gradient before
    teacher_index: int = 0  # which teacher is the fine-tune of the student's base
    include: List[str] = field(default_factory=lambda: ["*"])  # noqa: UP006 - glob patterns of names to project
    exclude: List[str] = field(default_factory=list)  # noqa: UP006 - glob patterns to leave alone (wins over include)
    max_relative_delta: float = 1.0  # shared-init check: refuse a teacher with ‖θ_T − θ₀‖/‖θ₀‖ above this

    def validate(self, recipe: Any) -> None:
        """Raise :class:`RecipeError` ``"<key>: <problem>; <fix>"``."""
        if self.rank < 0:
            raise RecipeError(f"rank: must be >= 0, got {self.rank}")
        if not 0 <= self.teacher_index < len(recipe.teachers):
            raise RecipeError(f"teacher_index: {self.teacher_index} is out of range; the recipe has "
                              f"{len(recipe.teachers)} teacher(s)")
        if self.max_relative_delta <= 0:
            raise RecipeError(f"max_relative_delta: must be > 0, got {self.max_relative_delta}")


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    def match(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    return match(include) and not match(exclude)


def delta_subspaces(base: nn.Module, teacher: nn.Module, rank: int, include: Sequence[str] = ("*",),
                    exclude: Sequence[str] = (), max_relative_delta: float = 1.0) -> dict[str, tuple[Tensor, Tensor]]:
    """Top-``rank`` singular subspaces of the teacher's update ``Δ = θ_T − θ₀``, per selected tensor.

    Args:
        base: the student's initial weights ``θ₀``.
        teacher: a fine-tune of ``base`` (same parameter names and shapes).
        rank: directions per matrix (1-D tensors get one direction, ``Δb / ‖Δb‖``, when ``rank ≥ 1``).
        include, exclude: glob patterns on parameter names.
        max_relative_delta: refuse the teacher when ``‖θ_T − θ₀‖ / ‖θ₀‖`` exceeds it.

    Returns:
        ``{name: (U (m, k), V (n, k'))}`` in float32 on ``base``'s device, for every selected tensor, with
        ``k ≤ rank``; ``V`` has no columns for 1-D tensors. ``m = shape[0]``, ``n = numel / m``.

    Raises:
        ValueError: if the teacher is not a fine-tune of ``base`` (names, shapes, or distance).
    """
    origin, tuned = dict(base.named_parameters()), dict(teacher.named_parameters())
    if origin.keys() != tuned.keys():
        only_s, only_t = sorted(origin.keys() - tuned.keys())[:3], sorted(tuned.keys() - origin.keys())[:3]
        raise ValueError(f"delta_projection: the teacher is not a fine-tune of the student's base: parameter names "
                         f"differ (only in the student: {only_s}; only in the teacher: {only_t}); use a teacher "
                         "fine-tuned from the student's own base")
    shapes = [n for n in origin if origin[n].shape != tuned[n].shape]
    if shapes:
        n = shapes[0]
        raise ValueError(f"delta_projection: the teacher is not a fine-tune of the student's base: {n} has shape "
                         f"{tuple(tuned[n].shape)} in the teacher and {tuple(origin[n].shape)} in the student")
    delta_sq = sum(float((tuned[n].detach().float().to(p.device) - p.detach().float()).pow(2).sum())
                   for n, p in origin.items())
    relative = math.sqrt(delta_sq / max(sum(float(p.detach().float().pow(2).sum()) for p in origin.values()), 1e-30))
    if relative > max_relative_delta:
        raise ValueError(f"delta_projection: the teacher is not a fine-tune of the student's base (shared-init "
                         f"check): ‖θ_T − θ₀‖/‖θ₀‖ = {relative:.3g} > max_relative_delta = {max_relative_delta}; "
                         "independent initialisations are ~1.41 apart. Use a teacher fine-tuned from the student's "
                         "base, or raise max_relative_delta if it was fine-tuned that far")
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, p in origin.items():
        if not _selected(name, include, exclude):
            continue
        delta = (tuned[name].detach().float().to(p.device) - p.detach().float()).reshape(p.shape[0], -1)
        u, vh = _top_singular(delta, rank)
        out[name] = (u.contiguous(), vh.T.contiguous() if p.ndim > 1 else delta.new_zeros(1, 0))
    return out


def _top_singular(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``U (m, k)``, ``Vᵀ (k, n)`` of the ``k ≤ rank`` singular values above the numerical-rank tolerance."""
    if rank == 0:
        return delta[:, :0], delta[:0]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, int((s > s[0] * max(delta.shape) * torch.finfo(s.dtype).eps).sum()))
    return u[:, :k], vh[:k]


def project_displacement(d: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``P(D) = (I − U Uᵀ) D (I − V Vᵀ)`` on ``D`` reshaped to ``(m, n)``; returns ``D``'s shape and dtype.

    Args:
        d: a displacement ``W − W₀`` or a gradient, any shape with ``shape[0] = m``.
        u: ``(m, k)`` orthonormal columns.
        v: ``(n, k')`` orthonormal columns (``k' = 0`` for 1-D tensors).
    """
    mat = d.reshape(d.shape[0], -1).to(u.dtype)
    mat = mat - u @ (u.T @ mat)
    mat = mat - (mat @ v) @ v.T
    return mat.reshape(d.shape).to(d.dtype)


class DeltaProjection(ParameterPurifier):
    """Projects the student's displacement (or gradient) off the teacher's update subspaces (module docstring).

    Args:
        config: the validated recipe entry.
    """

    needs_base = True

    def __init__(self, config: DeltaProjectionConfig) -> None:
        super().__init__()
        self.config = config
        self._names: list[str] = []
        self._origin: dict[str, Tensor] = {}  # base parameters (a dict, so they are not registered here)

    def setup(self, ctx: PurifierContext) -> None:
        cfg = self.config
        if ctx.base is None:
            raise ValueError("delta_projection: needs the frozen base copy of the student (PurifierContext.base)")
        subspaces = delta_subspaces(ctx.base, ctx.teachers[cfg.teacher_index], cfg.rank, cfg.include, cfg.exclude,
                                    cfg.max_relative_delta)
        if cfg.rank > 0 and not any(u.shape[1] for u, _ in subspaces.values()):
            warnings.warn("delta_projection: the teacher's selected weights equal the student's base, so there is "
                          "no update to project and training is vanilla; point the teacher at a fine-tune of the base",
                          stacklevel=2)
        self._names = list(subspaces)
        self._origin = {n: p for n, p in ctx.base.named_parameters() if n in subspaces}
        for i, (u, v) in enumerate(subspaces.values()):  # buffers follow the module's device, outside checkpoints
            self.register_buffer(f"u{i}", u, persistent=False)
            self.register_buffer(f"v{i}", v, persistent=False)

    def _basis(self, i: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"u{i}"), getattr(self, f"v{i}")

    @torch.no_grad()
    def before_step(self, student: nn.Module) -> None:
        """``mode: update``: ``g ← P(g)`` for every selected parameter with a gradient."""
        if self.config.mode != "update":
            return
        params = dict(student.named_parameters())
        removed_sq: list[Tensor] = []
        displacement_sq: list[Tensor] = []
        for i, name in enumerate(self._names):
            w, (u, v) = params[name], self._basis(i)
            displacement_sq.append((w - self._origin[name]).float().pow(2).sum())
            if w.grad is None or u.shape[1] == 0:
                continue
            projected = project_displacement(w.grad, u, v)
            removed_sq.append((w.grad - projected).float().pow(2).sum())
            w.grad.copy_(projected)
        self._record(removed_sq, displacement_sq)

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        """``mode: displacement``: ``W ← W₀ + P(W − W₀)`` for every selected parameter."""
        if self.config.mode != "displacement":
            return
        params = dict(student.named_parameters())
        removed_sq: list[Tensor] = []
        displacement_sq: list[Tensor] = []
        for i, name in enumerate(self._names):
            w, (u, v) = params[name], self._basis(i)
            d = w - self._origin[name]
            if u.shape[1]:
                removed = d - project_displacement(d, u, v)
                w.sub_(removed)
                d = d - removed
                removed_sq.append(removed.float().pow(2).sum())
            displacement_sq.append(d.float().pow(2).sum())
        self._record(removed_sq, displacement_sq)

    def _record(self, removed_sq: list[Tensor], displacement_sq: list[Tensor]) -> None:
        def norm(squares: list[Tensor]) -> Tensor:
            return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())

        self.last_metrics = {"projected_norm": norm(removed_sq), "displacement_norm": norm(displacement_sq)}
