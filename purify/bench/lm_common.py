"""The benchmark spine: one :class:`Condition`, one per-seed loop, one seed scheduler, one ``summarise``.

Every suite (``aux-logits``, ``style-tic``, ``hidden-preference``, the real-model suites) describes its arms as
:class:`Condition` s, trains and scores them per seed through :func:`run_conditions` (the suite supplies a
:data:`Fit` and a scorer), runs its seeds with :func:`run_seeds` and aggregates them with :func:`summarise` into the
shared ``summary.json`` schema, with the verdicts of :func:`purify.bench.verdicts.judge`.

The language-model suites also share the rest of the runner here: a :class:`Suite` names teacher directories, a
student base, how to make each seed's distillation data from a teacher, how to score a model (trait + fidelity). For
every seed the runner scores the base (``S0``) and the traited teacher (``T``), then trains each condition's student
from the base in a plain loop (``Distiller.fit_step``) and scores it: ``transfer = (trait(S) − trait(S0)) / (trait(T)
− trait(S0))`` (the teacher's base is the student's base). Vanilla is scored at several points during training too:
its early-stopping frontier. Statistics and files come from :mod:`purify.bench.stats` / :mod:`purify.bench.report`.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from purify.align import differing_tokenizers, same_tokenizer
from purify.bench import probe_free, stats, verdicts
from purify.bench.report import (
    BenchError,
    Clock,
    check_conditions,
    check_seeds,
    environment,
    headline_lines,
    timing_lines,
    verdict_notes,
    write_report,
)
from purify.bench.verdicts import Guard
from purify.config import LossConfig, OnPolicyConfig, OptimConfig
from purify.data import TeacherTokenizer, TokenDataset
from purify.generate import load_model
from purify.module import Distiller
from purify.purifiers import build_purifiers
from purify.readouts import Scores
from purify.types import DivergedError

DRIFT_SEED = 515_151
"""Corpus seed of the neutral prose on which the LM suites measure the off-task drift the probe-free rule reads
(:func:`purify.readouts.drift_terms`), held out from every training text."""
METRICS = ("trait", "transfer", "task_error", "fidelity_kl", "accuracy", "agreement", "distance_to_control", "drift")


@dataclass
class Condition:
    """One arm of a suite.

    Attributes:
        name: row label.
        teachers: teacher keys of :attr:`Suite.teachers`; the first is the primary target. Empty = no training.
        purifiers: ``{"name": ..., **options}`` entries built with :data:`purify.purifiers.PURIFIERS` (checked as
            ``purify train`` checks a recipe's, :func:`purify.bench.report.check_conditions`).
        loss: ``forward_kl`` (soft: KD on teacher logits) or ``ce`` (hard: SFT on the sampled text).
        data_from: key of the teacher whose samples are the training text (default: ``teachers[0]``).
        student: another student base (same tokenizer) to distil into instead of :attr:`Suite.student`, e.g. one of
            another initialisation; its transfer is its trait shift over *its own* base, over the teacher's shift
            over the suite's student base (:func:`run_conditions`). A suite may key its bases by name (aux-logits:
            ``cross``, another init; ``teacher``, the traited teacher scored untrained).
        baseline: a reference condition (no verdict), not a purifier arm.
        kind: which reference a baseline is (``base``, ``control`` or ``vanilla``): arms are judged against the
            control and vanilla of their own ``loss`` (:func:`purify.bench.verdicts.judge`); a vanilla on the suite's
            student is scored along its training (its early-stopping curve).
        on_policy: on-policy distillation (:class:`purify.config.OnPolicyConfig` fields, e.g. ``{"lam": 1.0}``):
            the student trains on its own samples of the data's prompts; ``None`` = off-policy. An on-policy arm's
            loss mode is ``<loss>:on-policy`` (:func:`mode`): it is judged against the on-policy control and vanilla.
        optim: :class:`purify.config.OptimConfig` fields overriding the suite's (e.g. ``{"name": "sgd", "lr": 1.0}``):
            an arm that changes the optimizer, not the targets; ``None`` = AdamW at :attr:`Suite.lr`.
        rank: real-model suites: train a LoRA adapter of this rank on the student's trainable blocks instead of the
            blocks themselves (:func:`purify.topblocks.student_top`): an arm that changes the adapter, not the
            targets; 0 = full fine-tune.
        role: the report section it is listed in (aux-logits: ``reference``, ``bound``, ``purifier``,
            ``combination``); a ``bound`` (knows the trait, not a purifier) is a baseline judged alone
            (``summary.json["bounds"]``). Empty: one table.
        note: one line for the report.
        oracle: add the bench-only trait-gradient oracle (:mod:`purify.bench.oracle`) to the purifiers.
        logits: which logits are distilled: empty = the suite's; ``all`` = every logit (aux-logits: the class
            logits too, so the trait is taught directly).
        plot: draw it in ``frontier.png``.
    """

    name: str
    teachers: list[str] = field(default_factory=list)
    purifiers: list[dict[str, Any]] = field(default_factory=list)
    loss: str = "forward_kl"
    data_from: str | None = None
    student: Path | str | None = None
    baseline: bool = False
    kind: str | None = None
    on_policy: dict[str, Any] | None = None
    optim: dict[str, Any] | None = None
    rank: int = 0
    role: str = ""
    note: str = ""
    oracle: bool = False
    logits: str = ""
    plot: bool = True


def mode(cond: Condition) -> str:
    """The loss mode a condition is judged in (:func:`purify.bench.verdicts.loss_mode`)."""
    return verdicts.loss_mode(cond.loss, cond.on_policy)


@dataclass
class Suite:
    """What :func:`summarise` needs of a suite, and everything an LM suite run needs (see the module docstring).

    Attributes:
        name: suite name (``results/<name>``).
        protocol: one-line description for the report title.
        conditions: the arms, ``base``/``control``/``vanilla`` included.
        student: (LM suites) student base directory (also the traited teacher's base).
        teachers: (LM suites) key → model directory, or a function that makes it (called only when a condition of
            the run uses that teacher); ``"teacher"`` is the traited teacher, ``"clean"`` the control's.
        make_data: (LM suites) ``(teacher model, tokenizer, seed) -> records`` of ``{"prompt", "completion"}``.
        score: (LM suites) ``(model, tokenizer, teacher model, seed) -> Scores``.
        steps, batch_size, lr, max_length: distillation settings.
        curve_points: how many vanilla evaluations during training (plus step 0 = the base), at
            :func:`curve_steps`.
        columns: extra ``(key, title)`` report columns.
        notes: extra report notes, rendered after the run (e.g. filter counts gathered while making data).
        trait: what the trait is (``summary.json["trait"]``).
        guards: behaviours that must survive (:class:`purify.bench.verdicts.Guard`).
        tuned_on: where a default was chosen, as data: ``[{"seeds", "what", "trait": looked at the trait}]``.
        sweeps: arm → :class:`purify.bench.probe_free.Sweep` for arms whose knob is swept (conditions
            ``<arm>@<value>``); the probe-free rule picks one value per seed (``summary.json["probe_free"]``).
        settings: ``summary.json["settings"]`` (with the conditions added); ``None``: steps, batch size and lr.
        curve_keys: the metrics averaged along vanilla's curve (``summary.json["frontier"]``).
    """

    name: str
    protocol: str
    student: Path | None = None
    teachers: dict[str, Path | Callable[[], Path]] = field(default_factory=dict)
    make_data: Callable[[Any, Any, int], list[dict[str, str]]] | None = None
    score: Callable[[Any, Any, Any, int], Scores] | None = None
    conditions: list[Condition] = field(default_factory=list)
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    max_length: int = 96
    curve_points: int = 4
    columns: list[tuple[str, str]] = field(default_factory=list)
    notes: Callable[[], list[str]] = list
    trait: str = ""
    guards: list[Guard] = field(default_factory=list)
    tuned_on: list[dict[str, Any]] = field(default_factory=list)
    sweeps: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] | None = None
    curve_keys: tuple[str, ...] = ("transfer", "task_error", "fidelity_kl")


def curve_steps(steps: int, points: int) -> list[int]:
    """The training steps at which vanilla is scored: ``points`` evenly spaced steps ending at ``steps``, plus
    ``steps/2``, ``steps/4``, … (``points`` halvings, rounded up). The halvings put points where a trait is often
    learnt fastest, early, so the early-stopping frontier is measured rather than interpolated across a jump (see
    :func:`purify.bench.stats.frontier_gap`)."""
    even = {max(1, round(steps * i / points)) for i in range(1, points + 1)}
    return sorted(even | {max(1, math.ceil(steps / 2 ** k)) for k in range(points)})


BASELINES = ("base", "control", "vanilla")
"""The conditions every run has, whatever ``conditions=[...]`` names."""


def references(modes: dict[str, str], **fields: Any) -> list[Condition]:
    """``base``, then per loss mode (name suffix → loss) its control (teacher ``clean``) and vanilla (``teacher``)."""
    return [Condition("base", baseline=True, kind="base"),
            *(Condition(kind + sfx, [t], loss=loss, baseline=True, kind=kind, **fields) for sfx, loss in modes.items()
              for kind, t in (("control", "clean"), ("vanilla", "teacher")))]


def pick(conditions: list[Condition], names: list[str], sweeps: dict[str, probe_free.Sweep],
         always: Collection[str] = BASELINES, named_only: Collection[str] = (),
         where: str = "") -> tuple[list[Condition], dict[str, probe_free.Sweep]]:
    """The one rule for what ``--option 'conditions=[...]'`` runs, in ``conditions``' order: the conditions named in
    ``always``; each condition named in ``names``; and every point (``<arm>@<value>``) of each swept arm of
    ``sweeps`` (arm → :class:`purify.bench.probe_free.Sweep`) that ``names`` names without its value, or all of them
    by :data:`purify.bench.probe_free.PROBE_FREE` (refused when nothing is swept) except the arms of ``named_only``.
    A swept arm's name selects its points, never a fixed condition of the same name. Returns the conditions and the
    sweeps that run.

    Raises:
        BenchError: a name that selects nothing, naming every name that would (and ``where``, e.g. the suite).
    """
    def arm(c: Condition) -> str | None:  # the swept arm a condition is a point of
        a = probe_free.swept_arm(c.name)
        return a if a in sweeps and c.name in sweeps[a].names(a) else None

    run = {a: s for a, s in sweeps.items() if a in names or (probe_free.PROBE_FREE in names and a not in named_only)}
    allowed = [*([probe_free.PROBE_FREE, *sweeps] if sweeps else []), *(c.name for c in conditions if arm(c) is None)]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise BenchError(f"conditions: unknown {', '.join(map(repr, unknown))}{' for ' + where if where else ''}; "
                         f"allowed: {', '.join(allowed)}")
    wanted = {*always, *(n for n in names if n not in sweeps)}
    return [c for c in conditions if (c.name in wanted and arm(c) is None) or arm(c) in run], run


Fit = Callable[[Condition, Callable[[int, Any], None] | None], tuple[Any, dict[str, float]]]
"""``fit(cond, on_point) -> (model, extras)``: train ``cond``'s student from its base, calling ``on_point(step,
model)`` at the vanilla curve's points before the last step (``on_point`` is ``None`` for unscored arms); ``extras``
are numbers recorded beside the arm's scores: ``steps`` (the steps trained, required) and any other (e.g. samples).
Raises :class:`purify.types.DivergedError` (``Distiller.fit_step``'s, or non-finite weights at the end)."""


def fit_extras(steps: int, metrics: dict[str, float]) -> dict[str, float]:
    """A :data:`Fit`'s extras: the ``steps`` trained and each purifier metric's mean over them (``metrics``, from
    :meth:`purify.module.Distiller.purifier_metric_means`) as ``metric.<purifier>.<key>``."""
    return {"steps": steps, **{f"metric.{k}": v for k, v in metrics.items()}}


def distill(suite: Suite, cond: Condition, models: dict[str, Any], tokenizers: dict[str, Any], tokenizer: Any,
            records: list[dict[str, str]], seed: int, on_point: Callable[[int, Any], None] | None = None,
            metrics: dict[str, float] | None = None) -> Any:
    """Train a fresh student from the base under ``cond``; calls ``on_point(step, student)`` at the curve points
    before the last step (:data:`Fit`); ``metrics`` (if given) receives each purifier metric's mean over the steps
    (:meth:`purify.module.Distiller.purifier_metric_means`).

    ``tokenizers`` holds each teacher's own tokenizer; a teacher whose tokenizer differs from the student's
    (``tokenizer``) reads its own tokenization of every example (for the ``cross_base`` purifier)."""
    torch.manual_seed(seed)
    student, _ = load_model(cond.student or suite.student)
    purifiers = build_purifiers(cond.purifiers)
    own = [tokenizers[k] for k in cond.teachers]
    optim = OptimConfig(**{"lr": suite.lr, **(cond.optim or {})})
    distiller = Distiller(student, [models[k] for k in cond.teachers], loss=LossConfig(name=cond.loss),
                          purifiers=purifiers, optim=optim, total_steps=suite.steps,
                          teacher_names=cond.teachers, student_tokenizer=tokenizer, teacher_tokenizers=own,
                          on_policy=OnPolicyConfig(**cond.on_policy) if cond.on_policy else None, seed=seed)
    optimizer = distiller.build_optimizer()
    cross = {i: TeacherTokenizer(own[i]) for i in differing_tokenizers(tokenizer, own)}
    data = TokenDataset(records, tokenizer, suite.max_length, cross)
    generator = torch.Generator().manual_seed(seed)
    marks = set(curve_steps(suite.steps, suite.curve_points))
    for step in range(suite.steps):
        idx = torch.randint(len(data), (suite.batch_size,), generator=generator).tolist()
        distiller.fit_step(data.collate([data.item(i) for i in idx]), optimizer, step / suite.steps, step=step)
        if on_point is not None and step + 1 in marks and step + 1 < suite.steps:
            on_point(step + 1, student)
    if not all(torch.isfinite(p).all() for p in student.parameters()):
        raise DivergedError(f"diverged at step {suite.steps}", suite.steps)
    if metrics is not None:
        metrics.update(distiller.purifier_metric_means())
    student.eval()
    return student


def with_transfer(scores: Scores, base: Scores, teacher: Scores, own_base: Scores | None = None,
                  own_shift: bool = False) -> dict[str, float]:
    """``scores`` plus ``transfer = (trait − trait(own base)) / (trait(T) − trait(S0))`` (own base: ``base``; with
    ``own_shift`` the teacher's shift too is measured from the own base); NaN when the teacher's shift is 0."""
    start = own_base or base
    shift = teacher["trait"] - (start if own_shift else base)["trait"]
    return {**scores, "transfer": (scores["trait"] - start["trait"]) / shift if shift else float("nan")}


def run_conditions(conditions: list[Condition], base: Scores, teacher: Scores, fit: Fit,
                   score: Callable[[Any], Scores], own_bases: dict[Any, Scores] | None = None,
                   desc: str = "", progress: bool = False, own_shift: bool = False) -> dict[str, Any]:
    """The per-seed loop of every suite: each condition trained by ``fit`` and scored by ``score`` (``base`` and
    ``teacher`` are the seed's scores of the student's base and of the traited teacher).

    An untrained condition (no teachers) is its student's base as it is (``own_bases[cond.student]``, default the
    base). A vanilla on the suite's student is scored along its training (``curve``: step 0 = the base, the curve
    points, the final step): its early-stopping frontier. An arm whose training diverges is recorded with NaN scores
    and ``diverged_at`` (no verdict) and the loop goes on. An arm on another student base (``own_bases[cond.student]``)
    has its transfer measured from that base's trait (with ``own_shift``, over the teacher's shift from that base too,
    as Cloud et al. measure a cross-init student) and records it as ``own_base_trait``. Every arm records its
    training ``seconds``."""
    out: dict[str, Any] = {}
    for cond in tqdm(conditions, desc=desc, disable=not progress, leave=False):
        own = (own_bases or {}).get(cond.student)
        if not cond.teachers:
            out[cond.name] = with_transfer(own or base, base, teacher)
            continue
        scored = cond.kind == "vanilla" and cond.student is None  # its early-stopping curve is the frontier
        curve = [{"step": 0, **with_transfer(base, base, teacher)}] if scored else []

        def point(step: int, model: Any) -> None:
            curve.append({"step": step, **with_transfer(score(model), base, teacher)})

        t0 = time.perf_counter()
        try:
            model, extras = fit(cond, point if scored else None)
        except DivergedError as err:  # recorded (no verdict), and the run goes on (fit_step says which step)
            out[cond.name] = {**{k: float("nan") for k in base}, "transfer": float("nan"), "diverged_at": err.step}
            continue
        final = {**with_transfer(score(model), base, teacher, own, own_shift), **extras,
                 "seconds": round(time.perf_counter() - t0, 1)}
        if own is not None:
            final["own_base_trait"] = own["trait"]
        if progress:
            tqdm.write(f"{desc} {cond.name}: trait {final['trait']:.4g} transfer {final['transfer']:+.3f} task error "
                       f"{final['task_error']:.3f} ({final['seconds']:.0f} s)")
        out[cond.name] = {**final, "curve": [*curve, {**final, "step": extras["steps"]}]} if curve else final
    return out


def run_seed(suite: Suite, models: dict[str, Any], tokenizers: dict[str, Any], tokenizer: Any, seed: int,
             progress: bool = False) -> dict[str, Any]:
    """All conditions for one seed: ``{"base", "teacher", "conditions": {name: scores (+ curve)}, "data"}``.

    ``models``/``tokenizers``: each teacher and its own tokenizer by key; ``tokenizer``: the student's."""
    teacher = models["teacher"]
    base_model, _ = load_model(suite.student)
    base = suite.score(base_model, tokenizer, teacher, seed)
    t_scores = suite.score(teacher, tokenizer, teacher, seed)
    data = {k: suite.make_data(models[k], tokenizer, seed)
            for k in {c.data_from or c.teachers[0] for c in suite.conditions if c.teachers}}
    own_bases = {}
    for path in {c.student for c in suite.conditions if c.student is not None}:
        model, own_tokenizer = load_model(path)
        if not same_tokenizer(tokenizer, own_tokenizer):
            raise ValueError(f"condition student {path} has another tokenizer than the suite's student; a condition "
                             "may only swap in a student base with the same tokenizer (the scorer compares tokens)")
        own_bases[path] = suite.score(model, tokenizer, teacher, seed)

    def fit(cond: Condition, on_point: Callable[[int, Any], None] | None) -> tuple[Any, dict[str, float]]:
        records, metrics = data[cond.data_from or cond.teachers[0]], {}
        student = distill(suite, cond, models, tokenizers, tokenizer, records, seed, on_point, metrics)
        return student, fit_extras(suite.steps, metrics)

    conditions = run_conditions(suite.conditions, base, t_scores, fit,
                                lambda model: suite.score(model, tokenizer, teacher, seed), own_bases,
                                f"seed {seed}", progress)
    return {"base": base, "teacher": t_scores, "conditions": conditions, "data": {k: len(v) for k, v in data.items()}}


def summarise(suite: Suite, runs: dict[int, dict[str, Any]], wall: float) -> dict[str, Any]:
    """Aggregate per-seed runs into the shared ``summary.json`` schema: means, CIs, vanilla's curve, and the
    two-sided verdicts of :func:`purify.bench.verdicts.judge` (each arm against its own loss mode's references; a
    ``bound`` condition judged alone, ``summary["bounds"]``).

    ``runs[seed]``: ``{"base": Scores, "teacher": Scores, "conditions": {name: record (+ curve)}, "data": sizes}``
    (:func:`run_conditions` makes the conditions' records)."""
    seeds = sorted(runs)
    by_name = {c.name: c for c in suite.conditions}
    names = list(by_name)
    main = {c.kind: c.name for c in reversed(suite.conditions) if c.baseline and c.student is None}  # first of each
    records = {n: [{"seed": s, **runs[s]["conditions"][n]} for s in seeds] for n in names}
    entries = {n: {"per_seed": records[n], "baseline": c.baseline, "kind": c.kind, "mode": mode(c),
                   "student": c.student} for n, c in by_name.items()}
    judged = verdicts.judge(entries, suite.guards)
    bounds = {}
    for n in (n for n, c in by_name.items() if c.role == "bound"):  # judged alone: a family of one
        alone = verdicts.judge({**{k: e for k, e in entries.items() if e["baseline"]},
                                n: {**entries[n], "baseline": False}}, suite.guards)
        bounds[n] = alone["verdicts"][n]
        judged["frontier_gap"].update(alone["frontier_gap"])
    conditions: dict[str, Any] = {}
    for name in names:
        # an arm's columns read the control and vanilla its verdict is judged against (its own loss mode: an
        # on-policy arm against the on-policy ones); baselines and bounds the suite's first control and vanilla
        ref = judged["against"].get(name, main)
        control = {r["seed"]: r["transfer"] for r in records[ref["control"]]} if "control" in ref else {}
        vanilla_err = {r["seed"]: r["task_error"] for r in records[ref["vanilla"]]}
        per_seed = records[name]
        for rec in per_seed:
            if control:
                rec["distance_to_control"] = rec["transfer"] - control[rec["seed"]]
            rec["fidelity_loss"] = stats.ratio(rec["task_error"], vanilla_err[rec["seed"]]) - 1.0
        keys = dict.fromkeys([*METRICS, *(k for k, _ in suite.columns), "fidelity_loss"])
        cond: dict[str, Any] = {k: stats.mean_ci([r[k] for r in per_seed]) for k in keys
                                if all(k in r for r in per_seed)}
        if control and name != ref["control"]:
            cond["vs_control"] = stats.paired_test([r["transfer"] for r in per_seed], [control[s] for s in seeds])
        cond["per_seed"] = per_seed
        conditions[name] = {**({"role": by_name[name].role} if by_name[name].role else {}),
                            **({} if by_name[name].plot else {"plot": False}), **cond}
    problems = [f"{v.name} ({mode(v)}) transfer is not significantly above {c.name}'s" for v in suite.conditions
                for c in suite.conditions if v.kind == "vanilla" and c.kind == "control" and mode(v) == mode(c)
                and v.student is None and c.student is None and not _above(conditions[v.name], conditions[c.name])]
    off = _on_policy_vs_off_policy(by_name, conditions, suite.guards)
    curves = [runs[s]["conditions"][main["vanilla"]]["curve"] for s in seeds
              if runs[s]["conditions"][main["vanilla"]].get("curve")]
    summary = {"suite": suite.name, "protocol": suite.protocol, "trait": suite.trait, "seeds": seeds,
                "problems": problems, "tuned_on": suite.tuned_on,
                "guards": [dataclasses.asdict(g) for g in suite.guards],
                "teacher": {k: stats.mean_ci([runs[s]["teacher"][k] for s in seeds])
                            for k in runs[seeds[0]]["teacher"]},
                "base": {k: stats.mean_ci([runs[s]["base"][k] for s in seeds]) for k in runs[seeds[0]]["base"]},
                "data_sizes": runs[seeds[0]].get("data", {}), "conditions": conditions,
                "frontier": {"vanilla": stats.mean_curve(curves, suite.curve_keys) if curves else []},
                "frontier_gap": judged["frontier_gap"], "verdicts": judged["verdicts"], **({"bounds": bounds} if bounds
                                                                                           else {}),
                "p_adjusted": judged["p_adjusted"], "judged_against": judged["against"], "wall_seconds": round(wall, 1),
                **({"on_policy_vs_off_policy": off} if off else {}),
                "settings": {**(suite.settings or {"steps": suite.steps, "batch_size": suite.batch_size,
                                                   "lr": suite.lr}),
                             "conditions": [{**dataclasses.asdict(c), "student": c.student and Path(c.student).name}
                                            for c in suite.conditions]}}
    # the knob chosen per seed without the trait, and the verdict at that choice (or why there is none)
    summary["probe_free"] = (probe_free.block(summary, suite.sweeps, suite.guards) if suite.sweeps
                             else probe_free.none_swept(summary))
    return summary


def _on_policy_vs_off_policy(by_name: dict[str, Condition], conditions: dict[str, Any],
                             guards: list[Guard]) -> dict[str, Any] | None:
    """Each on-policy vanilla judged as an arm against the off-policy base, control and vanilla (early-stopping
    frontier) of its loss: does on-policy distillation carry less or more of the trait at equal task error?
    ``None`` without an on-policy vanilla."""
    if not any(c.on_policy for c in by_name.values() if c.kind == "vanilla"):
        return None
    entries = {}
    for name, c in by_name.items():
        if c.student is not None or not (c.baseline if not c.on_policy else c.kind == "vanilla"):
            continue
        entries[name] = {"per_seed": conditions[name]["per_seed"], "baseline": not c.on_policy,
                         "kind": None if c.on_policy else c.kind, "mode": c.loss, "student": None}
    judged = verdicts.judge(entries, guards)
    out = {k: judged[k] for k in ("verdicts", "p_adjusted", "frontier_gap", "against")}
    out["curve_gap"] = {name: curve_gap(conditions[name]["per_seed"], conditions[pair["vanilla"]]["per_seed"])
                        for name, pair in judged["against"].items()}
    return out


def curve_gap(on: list[dict[str, Any]], off: list[dict[str, Any]]) -> dict[str, Any]:
    """Two early-stopping curves compared at equal task error: per seed, the mean over ``on``'s curve points (after
    step 0) whose task error lies within the range ``off``'s curve measured on that seed of ``on``'s transfer minus
    ``off``'s early-stopping transfer at that task error (:func:`purify.bench.verdicts.segment`); then the mean over
    seeds with its 95% CI and a t-test against 0. Negative: ``on`` carries less of the trait at equal task error."""
    offs = {r["seed"]: r.get("curve") or [] for r in off}
    per_seed, points = [], 0
    for rec in on:
        ref = offs.get(rec["seed"])
        if not ref or not rec.get("curve"):
            continue
        lo, hi = min(p["task_error"] for p in ref), max(p["task_error"] for p in ref)
        gaps = [p["transfer"] - verdicts.segment(ref, p["task_error"])[0] for p in rec["curve"]
                if p["step"] > 0 and lo <= p["task_error"] <= hi]
        if gaps:
            per_seed.append(float(sum(gaps) / len(gaps)))
            points += len(gaps)
    return {**stats.paired_test(per_seed, [0.0] * len(per_seed)), "points": points}


def on_policy_notes(summary: dict[str, Any]) -> list[str]:
    """Report lines for ``summary["on_policy_vs_off_policy"]`` (empty without on-policy arms)."""
    off = summary.get("on_policy_vs_off_policy")
    if not off:
        return []
    lines = [f"On-policy vs off-policy: {name} judged as an arm against the off-policy references "
             f"({', '.join(f'{k} = {v}' for k, v in off['against'].get(name, {}).items())}): {label}."
             for name, label in off["verdicts"].items()]
    for name, g in off.get("curve_gap", {}).items():
        lines.append(f"On-policy vs off-policy along training: {name}'s transfer minus the off-policy vanilla's "
                     f"early-stopping transfer at the same task error, averaged over its curve points inside the "
                     f"off-policy curve's task-error range ({g['points']} points, {g['n']} seeds): "
                     f"{stats.fmt_test(g)} (negative: less trait at equal task error).")
    return lines


def _above(vanilla: dict[str, Any], control: dict[str, Any]) -> bool:
    return stats.clearly_above_zero(stats.paired_test([r["transfer"] for r in vanilla["per_seed"]],
                                                      [r["transfer"] for r in control["per_seed"]]))


def columns(extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The report columns of an LM suite: the shared ones, then the suite's ``extra``."""
    return [("transfer", "transfer"), ("distance_to_control", "transfer − control"),
            ("task_error", "task error (KL)"), ("fidelity_loss", "task error ÷ vanilla's − 1"),
            ("fidelity_kl", "KL to teacher"), *extra]


_FORKED: dict[str, Callable[[int], dict[str, Any]]] = {}
"""The per-seed function forked seed workers run (set before the pool forks, read in :func:`_forked_seed`)."""

FORKED_NOTE = ("The suite's own notes (e.g. hidden-preference's teacher-sample filter counts) are not collected here: "
               "they are counted inside the forked workers; summary.json's data_sizes has the kept samples.")


def _forked_seed(seed: int) -> tuple[int, dict[str, Any]]:
    torch.set_num_threads(1)
    return seed, _FORKED["one_seed"](seed)


def run_seeds(seeds: list[int], one_seed: Callable[[int], dict[str, Any]], workers: int = 1,
              progress: bool = True) -> dict[int, dict[str, Any]]:
    """The one seed scheduler: ``one_seed(seed)`` for every seed, in seed order. ``workers > 1`` runs that many at a
    time in forked processes (1 torch thread each; they share what the parent loaded, e.g. teacher models); the
    per-seed code is the same, only the scheduling differs. ``progress``: a line per finished seed.

    ``one_seed`` returns the seed's record for :func:`summarise` (``base``, ``teacher``, ``conditions``, ``data``); what
    a suite gathers while it runs a seed (e.g. owl-ft-smollm2's sampling counts and timings) goes into the same record
    under a key of its own (``summarise`` reads only its four), so it comes back from a forked worker too.

    Raises:
        BenchError: a seed outside :data:`purify.types.SEED_RANGE` (e.g. ``--first-seed`` near 2**32), before any
            seed runs."""
    check_seeds(seeds)
    workers = max(1, min(workers, len(seeds)))
    if workers == 1:
        return {s: one_seed(s) for s in seeds}
    start = time.perf_counter()
    _FORKED["one_seed"] = one_seed
    done = {}
    try:
        # a worker takes SIGTERM's default action: the parent's handler (purify bench: unwind) is not theirs
        with mp.get_context("fork").Pool(workers, initializer=signal.signal,
                                          initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
            for seed, record in pool.imap_unordered(_forked_seed, seeds):
                done[seed] = record
                if progress:
                    print(f"seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)
            pool.close()
            pool.join()  # workers exit and are reaped: their CPU time counts in os.times()'s children
    finally:
        _FORKED.clear()
    return {s: done[s] for s in sorted(done)}


STOPPED = "the run did not finish (its output directory gets a summary.json only when one does)"
"""What ``purify bench`` and ``scripts/lm_parallel_seeds.py`` say when a SIGTERM stops them
(:func:`purify.stopping.sigterm_stops`, which unwinds :func:`run_seeds`' pool: it terminates the forked workers, which
ran on as orphans after the parent died of SIGTERM's default action)."""


def run(suite: Suite, seeds: list[int], out: str | Path, progress: bool,
        notes: Callable[[dict[str, Any]], list[str]], command: str, workers: int = 1,
        quick: bool = False) -> dict[str, Any]:
    """Run ``seeds`` of ``suite``, write the report into ``out`` (``command`` goes to env.json) and return the
    summary (``quick``: a smoke-test configuration, recorded as ``summary["quick"]`` and said in the headline).
    ``workers > 1`` runs that many seeds at a time in forked processes (1 torch thread each; the same per-seed code,
    only the scheduling differs; the suite's own notes counted inside the workers are then missing, and the report
    says so)."""
    check_conditions((c.name, c.purifiers, c.teachers, {"loss": c.loss}) for c in suite.conditions)
    check_seeds(seeds)  # before the teachers are built (a new trait's take minutes)
    clock = Clock()
    used = {"teacher", *(k for c in suite.conditions for k in c.teachers)}
    loaded = {k: load_model(p() if callable(p) else p) for k, p in suite.teachers.items() if k in used}
    models, tokenizers = {k: m.eval() for k, (m, _) in loaded.items()}, {k: t for k, (_, t) in loaded.items()}
    _, tokenizer = load_model(suite.student)
    workers = min(workers, len(seeds))
    runs = run_seeds(seeds, lambda s: run_seed(suite, models, tokenizers, tokenizer, s, progress and workers == 1),
                     workers)
    summary = summarise(suite, runs, clock.wall())
    summary.update(clock.record(workers), quick=quick)
    summary["columns"] = columns(suite.columns)
    summary["notes"] = [*(suite.notes() if workers == 1 else [FORKED_NOTE]), *notes(summary)]
    return publish(out, summary, environment(summary["seeds"], summary["wall_seconds"], command))


def publish(out: str | Path, summary: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """The one report writer of the LM suites (the real-model ones included, and :mod:`purify.bench.rederive`):
    ``summary.json|md|csv``, ``frontier.png`` and ``env.json`` into ``out`` with the summary's ``columns`` and
    :func:`report_notes`, and ``readouts.json`` when the summary has ``readouts``. Returns ``summary``."""
    write_report(out, summary, env, summary["columns"], report_notes(summary), intro=headline_lines(summary),
                 readouts=summary.get("readouts"))
    return summary


def report_notes(summary: dict[str, Any]) -> list[str]:
    """The text under an LM suite's tables: the run's own ``summary["notes"]`` (suite notes, wall time), then the
    sections computed from the summary (verdict rules and seed caveats, probe-free block, on-policy comparison), so
    a stored run is rendered again from its ``summary.json`` alone (:mod:`purify.bench.rederive`)."""
    return [*summary.get("notes", []), *timing_lines(summary), *verdict_notes(summary),
            *probe_free.notes(summary.get("probe_free") or {}), *on_policy_notes(summary)]
