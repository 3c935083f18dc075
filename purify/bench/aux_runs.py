"""One seed of the aux-logit suite: its teachers (set-up, plain torch) and its students (through the Distiller).

The student of every condition starts from the same ``θ₀`` (or, for ``cross_init``, another init), imitates its
teacher(s) on the same stream of noise inputs through :class:`~purify.module.Distiller` with the library's losses and
purifier classes, exactly as ``purify train`` would (:func:`fit`, the suite's :data:`purify.bench.lm_common.Fit`), and
is scored (:func:`evaluate`) on:

- ``trait`` / ``accuracy``: digit accuracy on the held-out test split; ``transfer`` (computed by
  :func:`purify.bench.lm_common.run_conditions`): ``(acc(S) − acc(S₀)) / (acc(T) − acc(S₀))`` (the trait; 0 = none;
  ``S₀`` is the student's own init);
- ``task_error``: MSE between the student's first ``k`` aux logits and the shared task function on held-out noise
  (paper protocol, which has no task: ``fidelity_kl``);
- ``fidelity_kl``: ``KL(softmax T_aux ‖ softmax S_aux)`` on held-out noise; ``agreement``: top-1 agreement of the
  aux logits with the traited teacher's;
- ``drift``: the off-task drift the probe-free rule reads (:mod:`purify.bench.probe_free`): ``KL(p_S₀ ‖ p_S)`` of the
  *undistilled* class logits' softmax, student vs its own base, averaged over held-out noise inputs (a stream of
  their own, used by nothing else). It needs no labels and no digit: only the base and noise.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from purify.bench.digits import Split, noise, read_arrays, split, task_function
from purify.bench.lm_common import Condition, fit_extras, run_conditions
from purify.bench.oracle import TraitGradientOracle
from purify.config import LossConfig, OptimConfig
from purify.losses import forward_kl
from purify.models import AuxMLP
from purify.module import Distiller
from purify.purifiers import build_purifiers

DRIFT_SEED = 97_000
"""Noise seed offset of the drift inputs (``DRIFT_SEED + seed``): disjoint from training (``seed + 2000``) and
evaluation (``99_000 + seed``) streams."""


@dataclass(frozen=True)
class Settings:
    """Every knob of a protocol (defaults: the task protocol; see ``PROTOCOLS`` in :mod:`purify.bench.aux_logits`)."""

    protocol: str = "task"
    n_aux: int = 16  # auxiliary logits m
    k_task: int = 3  # aux logits the shared task constrains (0: no task, paper protocol)
    hidden: tuple[int, ...] = (256, 256)
    teacher_lr: float = 3e-4
    teacher_steps: int = 600  # task protocol: steps of (task MSE + ce_weight · digits CE); paper: 0 → epochs
    teacher_epochs: int = 10  # paper protocol: epochs of digits CE
    ce_weight: float = 1.0
    ref_steps: int = 90  # reference teachers (other inits, task only)
    n_refs: int = 2
    student_steps: int = 600
    student_lr: float = 1e-3
    loss: str = "mse"  # mse on raw aux logits | forward_kl on their softmax
    batch: int = 128
    n_eval: int = 2048
    curve_every: int = 25


@dataclass
class World:
    """Everything one seed's conditions share."""

    seed: int
    data: Split
    base: AuxMLP
    cross_base: AuxMLP
    teachers: dict[str, AuxMLP]
    x_eval: Tensor
    f_eval: Tensor | None
    trait_eval: Tensor  # the traited teacher's aux logits on x_eval
    x_drift: Tensor  # held-out noise for the off-task drift (no other use)
    acc: dict[str, float] = field(default_factory=dict)  # base, cross_base, trait teacher, ...
    info: dict[str, float] = field(default_factory=dict)


def stable_seed(*parts: object) -> int:
    """A seed from any labels, equal in every process (``hash(str)`` is salted per process)."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


def make_mlp(seed: int, s: Settings, dim: int, n_classes: int) -> AuxMLP:
    torch.manual_seed(seed)
    return AuxMLP(in_dim=dim, hidden=list(s.hidden), n_classes=n_classes, n_aux=s.n_aux)


@torch.no_grad()
def accuracy(net: AuxMLP, data: Split) -> float:
    return float((net.logits(data.x_test)[:, :data.n_classes].argmax(1) == data.y_test).float().mean())


def _train_task_teacher(net: AuxMLP, f: Callable[[Tensor], Tensor], steps: int, s: Settings, seed: int,
                        data: Split | None = None) -> AuxMLP:
    """Adam on MSE(first k aux logits, f) on fresh noise, plus ``ce_weight`` × class CE when ``data`` is given."""
    c, task = net.n_classes, slice(net.n_classes, net.n_classes + s.k_task)
    opt = torch.optim.Adam(net.parameters(), lr=s.teacher_lr)
    g = torch.Generator().manual_seed(seed)
    dim = net.body[0].in_features
    for _ in range(steps):
        x = noise(s.batch, dim, g)
        loss = F.mse_loss(net.logits(x)[:, task], f(x))
        if data is not None:
            idx = torch.randint(len(data.x_train), (s.batch,), generator=g)
            loss = loss + s.ce_weight * F.cross_entropy(net.logits(data.x_train[idx])[:, :c], data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _train_class_teacher(net: AuxMLP, data: Split, s: Settings, seed: int, labels: Tensor | None = None) -> AuxMLP:
    """Paper protocol: Adam on class CE over epochs of the training split (``labels`` replaces the true ones)."""
    y = data.y_train if labels is None else labels
    opt = torch.optim.Adam(net.parameters(), lr=s.teacher_lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(s.teacher_epochs):
        perm = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(perm), s.batch):
            idx = perm[i:i + s.batch]
            loss = F.cross_entropy(net.logits(data.x_train[idx])[:, :data.n_classes], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


COMPETENT = ("comp0", "comp1")
"""Task-competent trait-free references of the task protocol: other inits trained on the task only as long as the
traited teacher (built only when a condition uses them)."""


def build_world(seed: int, s: Settings, data_path: str | None, needed: Collection[str] = ()) -> World:
    """Split the data, build ``θ₀`` and train the seed's teachers (plain torch: set-up, not distillation).

    Task protocol: ``trait`` = ``θ₀`` trained on the shared task + digits; ``control`` = ``θ₀`` on the task only, as
    long; ``ref0``, ``ref1`` = other inits on the task only, ``ref_steps`` (weaker); ``comp0``, ``comp1``
    (:data:`COMPETENT`, only when in ``needed``) = two more inits on the task only, ``teacher_steps`` (they know the
    task as well as the teachers). Paper protocol: ``trait`` = ``θ₀`` on digits; ``control`` = ``θ₀`` on the same
    digits with shuffled labels (fine-tuned as much, no trait).
    """
    x, y = read_arrays(data_path)
    data = split(x, y, seed)
    c = data.n_classes
    base = make_mlp(seed, s, data.dim, c).eval()
    cross_base = make_mlp(seed + 10_000, s, data.dim, c).eval()
    x_eval = noise(s.n_eval, data.dim, torch.Generator().manual_seed(99_000 + seed))
    x_drift = noise(s.n_eval, data.dim, torch.Generator().manual_seed(DRIFT_SEED + seed))
    t0 = time.perf_counter()
    teachers: dict[str, AuxMLP] = {}
    f_eval = None
    if s.k_task:
        f = task_function(10_000 + seed, s.k_task, data.dim)
        f_eval = f(x_eval)
        teachers["trait"] = _train_task_teacher(copy.deepcopy(base), f, s.teacher_steps, s, seed + 1, data)
        teachers["control"] = _train_task_teacher(copy.deepcopy(base), f, s.teacher_steps, s, seed + 1)
        for j in range(s.n_refs):
            teachers[f"ref{j}"] = _train_task_teacher(make_mlp(seed + 1000 * (j + 1), s, data.dim, c), f,
                                                      s.ref_steps, s, seed + 7 + j)
        for j, key in enumerate(COMPETENT):
            if key in needed:
                teachers[key] = _train_task_teacher(make_mlp(seed + 1000 * (j + 3), s, data.dim, c), f,
                                                    s.teacher_steps, s, seed + 17 + j)
    else:
        teachers["trait"] = _train_class_teacher(copy.deepcopy(base), data, s, seed + 1000)
        shuffled = data.y_train[torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed + 5000))]
        teachers["control"] = _train_class_teacher(copy.deepcopy(base), data, s, seed + 1000, labels=shuffled)
    world = World(seed, data, base, cross_base, teachers, x_eval, f_eval,
                  trait_eval=_aux(teachers["trait"].logits(x_eval).detach(), c, s), x_drift=x_drift)
    world.info["teacher_seconds"] = time.perf_counter() - t0
    world.acc = {"base": accuracy(base, data), "cross_base": accuracy(cross_base, data),
                 **{k: accuracy(t, data) for k, t in teachers.items()}}
    for k, t in teachers.items():
        world.info[f"{k}_accuracy"] = world.acc[k]
        if f_eval is not None:
            with torch.no_grad():
                world.info[f"{k}_task_error"] = float(F.mse_loss(t.logits(x_eval)[:, c:c + s.k_task], f_eval))
    world.info["base_accuracy"] = world.acc["base"]
    world.info["chance"] = 1.0 / c
    return world


def _aux(logits: Tensor, n_classes: int, s: Settings) -> Tensor:
    return logits[:, n_classes:n_classes + s.n_aux]


@torch.no_grad()
def evaluate(world: World, net: AuxMLP, s: Settings, start: str = "base") -> dict[str, float]:
    """The model's scores (module docstring); ``start`` names the init its drift is measured from (``base`` or
    ``cross``)."""
    c = world.data.n_classes
    aux = _aux(net.logits(world.x_eval), c, s)
    kl = float(forward_kl(aux, world.trait_eval).mean())
    acc = accuracy(net, world.data)
    return {
        "trait": acc,
        "accuracy": acc,
        "fidelity_kl": kl,
        "agreement": float((aux.argmax(-1) == world.trait_eval.argmax(-1)).float().mean()),
        "task_error": kl if world.f_eval is None else float(F.mse_loss(aux[:, :s.k_task], world.f_eval)),
        "drift": class_drift(world.cross_base if start == "cross" else world.base, net, world.x_drift, c),
    }


@torch.no_grad()
def class_drift(base: AuxMLP, net: AuxMLP, x: Tensor, n_classes: int) -> float:
    """``KL(softmax base ‖ softmax net)`` of the first ``n_classes`` logits (the class logits, which the student
    never distils), averaged over the rows of ``x``: 0 for the base itself."""
    b = torch.log_softmax(base.logits(x)[:, :n_classes], -1)
    p = torch.log_softmax(net.logits(x)[:, :n_classes], -1)
    return float((b.exp() * (b - p)).sum(-1).mean())


def _oracle(world: World, s: Settings) -> TraitGradientOracle:
    """The trait loss the oracle may see: class cross-entropy on fresh batches of the training split."""
    data, g = world.data, torch.Generator().manual_seed(world.seed + 3000)

    def trait_loss(student: nn.Module) -> Tensor:
        idx = torch.randint(len(data.x_train), (s.batch,), generator=g)
        return F.cross_entropy(student.logits(data.x_train[idx])[:, :data.n_classes], data.y_train[idx])

    return TraitGradientOracle(trait_loss)


def fit(world: World, cond: Condition, s: Settings,
        on_point: Callable[[int, Any], None] | None = None) -> tuple[tuple[AuxMLP, str], dict[str, float]]:
    """Train one condition's student on one seed (:data:`purify.bench.lm_common.Fit`): from ``θ₀`` (or the other
    init, ``cond.student == "cross"``) on the seed's noise stream, calling ``on_point(step, (student, start))`` every
    ``curve_every`` steps. Returns ``((student, start), extras)``: the steps and each purifier metric's mean over
    them (``metric.<purifier>.<key>``)."""
    torch.manual_seed(stable_seed(world.seed, cond.name))  # purifier heads, anything else drawn from torch's RNG
    c = world.data.n_classes
    start = "cross" if cond.student == "cross" else "base"
    student = copy.deepcopy(world.cross_base if start == "cross" else world.base).train()
    purifiers = build_purifiers(cond.purifiers)
    if cond.oracle:
        purifiers.append(_oracle(world, s))
    logit_slice = None if cond.logits == "all" else [c, c + s.n_aux]
    distiller = Distiller(student, [world.teachers[k] for k in cond.teachers], purifiers=purifiers,
                          loss=LossConfig(name=cond.loss, logit_slice=logit_slice),  # type: ignore[arg-type]
                          optim=OptimConfig(name="adam", lr=s.student_lr), total_steps=s.student_steps)
    optimizer = distiller.build_optimizer()
    g = torch.Generator().manual_seed(world.seed + 2000)  # the same noise stream in every condition
    for step in range(s.student_steps):
        x = noise(s.batch, world.data.dim, g)
        distiller.fit_step({"x": x, "target_mask": torch.ones(s.batch, 1)}, optimizer, step / s.student_steps,
                           step=step)
        if on_point is not None and (step + 1) % s.curve_every == 0 and step + 1 < s.student_steps:
            student.eval()
            on_point(step + 1, (student, start))
            student.train()
    student.eval()
    return (student, start), fit_extras(s.student_steps, distiller.purifier_metric_means())


def run_seed(seed: int, s: Settings, conditions: list[Condition], data_path: str | None,
             progress: bool = False) -> dict[str, Any]:
    """Build the seed's world and run every condition on it (:func:`purify.bench.lm_common.run_conditions`):
    ``{"base", "teacher", "conditions", "world"}`` (``world``: the teachers' accuracies and task errors)."""
    world = build_world(seed, s, data_path, {t for c in conditions for t in c.teachers})
    base, teacher = evaluate(world, world.base, s), evaluate(world, world.teachers["trait"], s)
    own = {"cross": evaluate(world, world.cross_base, s, "cross"), "teacher": teacher}
    records = run_conditions(conditions, base, teacher, lambda cond, on_point: fit(world, cond, s, on_point),
                             lambda model: evaluate(world, model[0], s, model[1]), own, f"seed {seed}", progress,
                             own_shift=True)
    return {"base": base, "teacher": teacher, "conditions": records, "world": {"accuracy": world.acc, **world.info}}
