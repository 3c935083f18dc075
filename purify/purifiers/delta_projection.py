"""Delta projection: keep the student's displacement out of the subspace of the teacher's own fine-tuning update.

When the teacher is a fine-tune of the student's base (``θ_T = θ₀ + Δθ_T``), a small imitation step drags the
student along ``Δθ_T`` (Cloud et al. 2025's subliminal-learning theorem), trait included. Three modes:

Per-matrix subspaces (``displacement``, ``update``): at set-up, for every selected weight matrix ``W`` ``(m, n)``
(tensors of more dimensions are flattened to ``(shape[0], -1)``), take the top-``rank`` left/right singular vectors
``U`` ``(m, r)``, ``V`` ``(n, r)`` of ``ΔW_T = W_T − W₀``, and define

    ``P(D) = (I − U Uᵀ) D (I − V Vᵀ)``,

which removes every component of ``D`` whose column space touches ``U`` or row space touches ``V``. For 1-D tensors
(biases, norms) ``P(d) = d − u (uᵀ d)`` with ``u = Δb / ‖Δb‖``. Singular directions with (numerically) zero singular
value are not part of the teacher's update and are kept out of ``U``/``V``; ``rank: 0`` is vanilla distillation.

- ``mode: displacement``: after every optimizer step, ``W ← W₀ + P(W − W₀)`` (exact whatever the optimizer).
- ``mode: update``: before the step, ``g ← P(g)``. With SGD (momentum included, no weight decay) this keeps the
  displacement out of the subspace too; with Adam/AdamW it does not, since the per-coordinate ``1/√v`` scaling and
  decoupled weight decay rotate the update back into it. Prefer ``displacement`` with adaptive optimizers.

One global direction (``mode: global``): ``u = Δθ_T / ‖Δθ_T‖`` where ``Δθ_T`` is the concatenation of the deltas of
*all* selected tensors, flattened into one vector. Before every optimizer step the gradient loses a fraction
``α = strength`` of its component along ``u``:

    ``g ← g − α ⟨g, u⟩ u``,

so ``⟨g_new, u⟩ = (1 − α) ⟨g, u⟩`` exactly and every orthogonal component is untouched. ``strength: 0`` is vanilla,
``1`` removes the whole component. ``α`` acts on the *gradient*: with Adam the displacement keeps a small component
along ``u`` (projecting the displacement instead, re-done every step, drives it to 0 whatever ``α``). ``rank`` is not
used. On the aux-logit benchmark (``purify bench aux-logits``) ``α ≈ 0.3`` removed the trait at unchanged task error
and ``α ≥ 0.5`` overshot into an anti-trait; that value was tuned there, on the trait probe, so treat it as a starting
point and report the student's distance to a control, not only its transfer.

Distilled outputs only: when the distiller trains on a slice of the logits (``loss.logit_slice``, passed to
purifiers as ``ctx.logit_slice``), the teacher's delta on the output layer's rows *outside* the slice is
set to 0 before any subspace or direction is computed (every mode). Those rows never receive a distillation
gradient, yet the teacher's update is often largest there (e.g. a classifier head the teacher was trained on);
projecting onto them would write an anti-copy of that update into rows no loss sees. This uses only which outputs
the loss distils, never the trait. The output layer is ``output_layer`` (a module name) when set, else the model's
``get_output_embeddings()`` (Hugging Face) or its ``head`` attribute; an output layer tied to the input embeddings
is left unmasked (its rows are reached through the inputs).

Shared-init check: the teacher must have the base's parameter names and shapes, and ``‖θ_T − θ₀‖ / ‖θ₀‖`` must not
exceed ``max_relative_delta`` (default 1.0; two independent initialisations of one architecture are about √2 apart).
Otherwise set-up refuses the teacher: across bases there is no ``Δθ_T`` to project.

Cost: one frozen copy of ``θ₀`` (shared with other ``needs_base`` purifiers), ``r(m + n)`` floats per matrix for the
bases (``global``: one copy of the selected weights), one SVD per matrix at set-up (``O(mn·min(m, n))``; seconds for
a 0.5B model on GPU), and ``O(mnr)`` per matrix per step (``global``: two passes over the gradients). Logs
``projected_norm`` (norm removed by the last step) and ``displacement_norm`` (``‖θ − θ₀‖`` over the selected tensors,
after projection), and for ``global`` ``alignment`` (cosine between the gradient and ``u``); the distiller logs them
one step late, as set-up and training step come first.

DeepSpeed: the weights are edited in place on the module (Lightning's mixed precision keeps fp32 module weights;
DeepSpeed's fp32 master copy is not reached, so use ``auto``/``ddp`` strategies). Under ZeRO-3 each rank holds only a
shard: compute the subspaces before the model is partitioned, or layer by layer inside
``deepspeed.zero.GatheredParameters([w, w0, wT])``, and gather the same way when projecting (``global`` also needs an
all-reduce of ``⟨g, u⟩`` across shards).
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Literal, Optional  # noqa: UP035 - omegaconf needs typing generics

import torch
from torch import Tensor, nn

from purify.purifiers.base import Contract, ParameterPurifier, PurifierConfig, PurifierContext
from purify.types import is_int

RowRanges = dict[str, tuple[int, int]]
"""Parameter name → ``[start, stop)`` of the rows (dim 0) the loss distils; rows outside get a zero teacher delta."""


@dataclass
class DeltaProjectionConfig(PurifierConfig):
    """Recipe entry ``{name: delta_projection, ...}``."""

    name: str = "delta_projection"
    unbounded: ClassVar[tuple[str, ...]] = ("max_relative_delta",)
    rank: int = 8  # singular directions of ΔW_T removed per matrix (0 = vanilla); not used by mode: global
    mode: Literal["displacement", "update", "global"] = "displacement"  # project θ − θ₀ after each step, the
    # gradient before it (per-matrix subspaces), or the gradient off the one flat direction of Δθ_T (global)
    strength: float = 1.0  # global: fraction α of the gradient's component along Δθ_T removed each step (0 = vanilla)
    teacher_index: int = 0  # which teacher is the fine-tune of the student's base
    include: List[str] = field(default_factory=lambda: ["*"])  # noqa: UP006 - glob patterns of names to project
    exclude: List[str] = field(default_factory=list)  # noqa: UP006 - glob patterns to leave alone (wins over include)
    max_relative_delta: float = 1.0  # shared-init check: refuse a teacher with ‖θ_T − θ₀‖/‖θ₀‖ above this (inf: off)
    output_layer: Optional[str] = None  # module whose rows outside loss.logit_slice are left out of Δθ_T; default:
    # get_output_embeddings() or `head`

    def problems(self) -> list[str]:
        """Settings that cannot work, one ``"<key>: <problem>; <fix>"`` line each."""
        out = []
        if self.rank < 0:
            out.append(f"rank: must be >= 0, got {self.rank}")
        if not 0.0 <= self.strength <= 1.0:
            out.append(f"strength: {self.strength} is not in [0, 1]; it is the fraction of the gradient's component "
                       "along the teacher's delta that is removed")
        if self.max_relative_delta <= 0:
            out.append(f"max_relative_delta: must be > 0, got {self.max_relative_delta}")
        return out

    def recipe_problems(self, recipe: Any) -> list[str]:
        """``teacher_index`` must name a teacher of the recipe."""
        if not 0 <= self.teacher_index < len(recipe.teachers):
            return [f"teacher_index: {self.teacher_index} is out of range; the recipe has {len(recipe.teachers)} "
                    "teacher(s)"]
        return []

    def contract(self) -> Contract:
        """Reads the teacher's weights (Δθ_T), so the teacher cannot be a logit cache; projects the student's full
        weight matrices, so the student cannot be a LoRA adapter on frozen weights."""
        return Contract(needs_teacher_weights=True, edits_weights=True)


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    def match(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    return match(include) and not match(exclude)


def teacher_delta(base: nn.Module, teacher: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                  max_relative_delta: float = 1.0, live_rows: RowRanges | None = None) -> dict[str, Tensor]:
    """The teacher's update ``Δ = θ_T − θ₀`` per selected tensor, after the shared-init check.

    Args:
        base: the student's initial weights ``θ₀``.
        teacher: a fine-tune of ``base`` (same parameter names and shapes).
        include, exclude: glob patterns on parameter names.
        max_relative_delta: refuse the teacher when ``‖θ_T − θ₀‖ / ‖θ₀‖`` (over all parameters) exceeds it.
        live_rows: ``{name: (start, stop)}``: rows of that tensor outside ``[start, stop)`` get a zero delta (the
            output rows a sliced loss never distils).

    Returns:
        ``{name: Δ}`` in float32 on ``base``'s device, in ``base.named_parameters()`` order.

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
    out: dict[str, Tensor] = {}
    for name, p in origin.items():
        if not _selected(name, include, exclude):
            continue
        delta = tuned[name].detach().float().to(p.device) - p.detach().float()
        if live_rows and name in live_rows:
            start, stop = live_rows[name]
            delta[:start] = 0
            delta[stop:] = 0
        out[name] = delta
    return out


def delta_subspaces(base: nn.Module, teacher: nn.Module, rank: int, include: Sequence[str] = ("*",),
                    exclude: Sequence[str] = (), max_relative_delta: float = 1.0,
                    live_rows: RowRanges | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Top-``rank`` singular subspaces of the teacher's update ``Δ = θ_T − θ₀``, per selected tensor.

    Args:
        base: the student's initial weights ``θ₀``.
        teacher: a fine-tune of ``base`` (same parameter names and shapes).
        rank: directions per matrix (1-D tensors get one direction, ``Δb / ‖Δb‖``, when ``rank ≥ 1``).
        include, exclude: glob patterns on parameter names.
        max_relative_delta: refuse the teacher when ``‖θ_T − θ₀‖ / ‖θ₀‖`` exceeds it.
        live_rows: rows outside these ranges get a zero delta first (see :func:`teacher_delta`).

    Returns:
        ``{name: (U (m, k), V (n, k'))}`` in float32 on ``base``'s device, for every selected tensor, with
        ``k ≤ rank``; ``V`` has no columns for 1-D tensors. ``m = shape[0]``, ``n = numel / m``.

    Raises:
        ValueError: if the teacher is not a fine-tune of ``base`` (names, shapes, or distance), or ``rank`` is no
            int >= 0.
    """
    if not is_int(rank, 0):  # -1 sliced off the last direction
        raise ValueError(f"delta_subspaces: rank must be an int >= 0, got {rank!r}")
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, delta in teacher_delta(base, teacher, include, exclude, max_relative_delta, live_rows).items():
        u, vh = _top_singular(delta.reshape(delta.shape[0], -1), rank)
        out[name] = (u.contiguous(), vh.T.contiguous() if delta.ndim > 1 else delta.new_zeros(1, 0))
    return out


def _top_singular(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``U (m, k)``, ``Vᵀ (k, n)`` of the ``k ≤ rank`` singular values above the numerical-rank tolerance."""
    if rank == 0 or not bool(delta.any()):
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


def project_global(grads: Sequence[Tensor], direction: Sequence[Tensor], strength: float = 1.0) -> Tensor:
    """In place, ``g ← g − α ⟨g, u⟩ u`` over tensors taken together as one flat vector (``u`` of unit norm).

    Args:
        grads: the tensors to edit (e.g. gradients), one per entry of ``direction``, same shapes.
        direction: the unit direction ``u``, split like ``grads``.
        strength: ``α``; the component along ``u`` is multiplied by ``1 − α``.

    Returns:
        ``⟨g, u⟩`` before the edit (a 0-dim float32 tensor).
    """
    inner = torch.stack([(g.float() * u).sum() for g, u in zip(grads, direction)]).sum() if grads else \
        torch.zeros(())
    for g, u in zip(grads, direction):
        g.sub_((strength * inner * u).to(g.dtype))
    return inner


def output_rows(student: nn.Module, logit_slice: Sequence[int] | None, output_layer: str | None = None) -> RowRanges:
    """The rows of the output layer a sliced loss distils: ``{weight name: (start, stop), bias name: ...}``.

    Args:
        student: the student (its parameter names are those of the frozen base copy).
        logit_slice: ``[start, stop)`` of the distilled logits, or ``None`` (all distilled: nothing to mask).
        output_layer: module name of the output layer; default ``get_output_embeddings()`` or ``student.head``.

    Returns:
        ``{}`` when nothing is sliced, no output layer is found, or it is tied to another module (warns).
    """
    if logit_slice is None:
        return {}
    if output_layer is not None:
        modules = dict(student.named_modules())
        if output_layer not in modules:
            raise ValueError(f"delta_projection: output_layer {output_layer!r} is not a module of the student; e.g. "
                             f"{', '.join(list(modules)[1:6])}")
        layer = modules[output_layer]
    else:
        get = getattr(student, "get_output_embeddings", None)
        layer = get() if callable(get) else getattr(student, "head", None)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor):
        warnings.warn("delta_projection: loss.logit_slice is set but the student has no output layer to find "
                      "(set output_layer); the teacher's delta on undistilled output rows is kept", stacklevel=3)
        return {}
    start, stop = int(logit_slice[0]), int(logit_slice[1])
    if stop > weight.shape[0]:
        raise ValueError(f"delta_projection: logit_slice {[start, stop]} exceeds the output layer's "
                         f"{weight.shape[0]} rows")
    uses = [n for n, p in student.named_parameters(remove_duplicate=False) if p is weight]
    if len(uses) > 1:
        warnings.warn(f"delta_projection: the output layer is tied to {uses[0]}; its rows outside logit_slice are "
                      "reached through the inputs, so they are kept in the teacher's delta", stacklevel=3)
        return {}
    names = {id(p): n for n, p in student.named_parameters()}
    rows = {names[id(weight)]: (start, stop)}
    bias = getattr(layer, "bias", None)
    if isinstance(bias, Tensor) and id(bias) in names:
        rows[names[id(bias)]] = (start, stop)
    return rows


class DeltaProjection(ParameterPurifier):
    """Projects the student's displacement (or gradient) off the teacher's update (module docstring).

    Args:
        config: the validated recipe entry.
    """

    needs_base = True

    def __init__(self, config: DeltaProjectionConfig) -> None:
        super().__init__(config)
        self._names: list[str] = []
        self._origin: dict[str, Tensor] = {}  # base parameters (a dict, so they are not registered here)
        self.live_rows: RowRanges = {}

    def setup(self, ctx: PurifierContext) -> None:
        cfg = self.config
        if ctx.base is None:
            raise ValueError("delta_projection: needs the frozen base copy of the student (PurifierContext.base)")
        self.live_rows = output_rows(ctx.student, ctx.logit_slice, cfg.output_layer)
        teacher = ctx.teachers[cfg.teacher_index]
        if cfg.mode == "global":
            deltas = teacher_delta(ctx.base, teacher, cfg.include, cfg.exclude, cfg.max_relative_delta,
                                   self.live_rows)
            norm = torch.stack([d.pow(2).sum() for d in deltas.values()]).sum().sqrt() if deltas else torch.zeros(())
            if float(norm) == 0.0:
                warnings.warn("delta_projection: the teacher's selected weights equal the student's base, so there "
                              "is no update to project and training is vanilla; point the teacher at a fine-tune of "
                              "the base", stacklevel=2)
            bases = {n: (d / norm if float(norm) > 0 else d, d.new_zeros(1, 0)) for n, d in deltas.items()}
        else:
            bases = delta_subspaces(ctx.base, teacher, cfg.rank, cfg.include, cfg.exclude, cfg.max_relative_delta,
                                    self.live_rows)
            if cfg.rank > 0 and not any(u.shape[1] for u, _ in bases.values()):
                warnings.warn("delta_projection: the teacher's selected weights equal the student's base, so there "
                              "is no update to project and training is vanilla; point the teacher at a fine-tune of "
                              "the base", stacklevel=2)
        self._names = list(bases)
        self._origin = {n: p for n, p in ctx.base.named_parameters() if n in bases}
        for i, (u, v) in enumerate(bases.values()):  # buffers follow the module's device, outside checkpoints
            self.register_buffer(f"u{i}", u, persistent=False)
            self.register_buffer(f"v{i}", v, persistent=False)

    def _basis(self, i: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"u{i}"), getattr(self, f"v{i}")

    @torch.no_grad()
    def before_step(self, student: nn.Module) -> None:
        """``mode: update``: ``g ← P(g)``; ``mode: global``: ``g ← g − α⟨g, u⟩u``, for selected parameters."""
        mode = self.config.mode
        if mode == "displacement":
            return
        params = dict(student.named_parameters())
        removed_sq: list[Tensor] = []
        displacement_sq: list[Tensor] = []
        if mode == "global":
            with_grad = [(params[n], self._basis(i)[0]) for i, n in enumerate(self._names)
                         if params[n].grad is not None]
            grads = [w.grad for w, _ in with_grad]
            grad_norm = torch.stack([g.float().pow(2).sum() for g in grads]).sum().sqrt() if grads else \
                torch.zeros(())
            inner = project_global(grads, [u for _, u in with_grad], self.config.strength)
            for name in self._names:
                displacement_sq.append((params[name] - self._origin[name]).float().pow(2).sum())
            self._record([(self.config.strength * inner) ** 2], displacement_sq)
            self.last_metrics["alignment"] = inner / grad_norm.clamp_min(1e-30)
            return
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
