"""``purify bench aux-logits``: the subliminal-learning MNIST analogue (Cloud et al. 2025, §6) on sklearn's digits.

An MLP has class logits plus ``m`` auxiliary logits. The traited teacher is the student's own init ``θ₀`` trained on
digits (the trait); the student imitates only the aux logits, on noise inputs, and gains digit accuracy anyway.
Two protocols:

- ``paper``: the paper's setting (``m = 3``, teacher = ``θ₀`` + digits CE, student = forward KL on the aux logits,
  Adam 3e-4, 1000 steps). Checks the setup: same-init transfer is large, a cross-init student's is ≈ 0.
- ``task`` (default): the teachers also learn a *shared task* on the first 3 of ``m = 16`` aux logits (a fixed
  random function of the input), so fidelity means something: task error = MSE to that function. ``control`` is
  ``θ₀`` trained on the task alone; two weaker references from other inits learn the task too (for ensembles and
  masks). The student distils all 16 aux logits with MSE (Adam 1e-3, 600 steps).

Every condition is paired by seed (same split, same ``θ₀``, same noise stream). The suite runs on the benchmark
spine (:mod:`purify.bench.lm_common`: its :class:`~purify.bench.lm_common.Condition`, per-seed loop, forked seed
workers and ``summarise``), so each arm gets the shared two-sided verdict (:mod:`purify.bench.verdicts`: purified,
below/on/above frontier, anti-trait, damaged or no verdict, Holm-adjusted across the arms). Outputs
(``summary.json``, ``.md``, ``.csv``, ``frontier.png``, ``env.json``) are written by :mod:`purify.bench.report`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from purify.bench import lm_common
from purify.bench.aux_runs import COMPETENT, Settings, run_seed
from purify.bench.aux_summary import COLUMNS, METRICS, SECTIONS, finish, headline_lines, notes
from purify.bench.digits import read_arrays, split
from purify.bench.lm_common import Condition
from purify.bench.probe_free import GLOBAL_PROJECTION, Sweep, point_name, swept_arm
from purify.bench.report import (
    BenchError,
    Clock,
    bench_command,
    check_conditions,
    check_options,
    environment,
    write_report,
)
from purify.bench.stats import mean_ci
from purify.bench.verdicts import looking_at

SUITE = "aux-logits"
FIRST_SEED = 20
"""Seeds start at 20, disjoint from every :data:`TUNED_ON` entry (seeds 0-19)."""
WORKERS = 2
ANCHOR_CONSENSUS = "function_anchor+ensemble:competent"
"""The combined probe-free arm: the undistilled-logit function anchor and the competent consensus, strengthened
together along one axis (:data:`ANCHOR_CONSENSUS_GRID`)."""
ANCHOR_CONSENSUS_GRID = {1.0: (0.3, 0.5), 2.0: (1.0, 0.25), 3.0: (3.0, 0.1)}
"""Strength → (function anchor weight, traited teacher's weight in the competent mean)."""
TRAIT = "digit accuracy (transfer = (acc(S) − acc(θ₀)) / (acc(T) − acc(θ₀)))"
_ALPHA_TUNING = {"seeds": list(range(10)), "trait": True,
                 "what": "delta_projection `global` strength α = 0.3 (task protocol) and the combination "
                         "delta_projection@global-0.2+ensemble@w-0.5 (the closest to control without an anti-trait "
                         "among 4 (α, w) pairs)"}
TUNED_ON: dict[str, list[dict[str, Any]]] = {protocol: looking_at(TRAIT, entries) for protocol, entries in {
    "task": [_ALPHA_TUNING,
             {"seeds": list(range(10, 20)), "trait": True, "what": "α = 0.3 (looked at once, to confirm it)"},
             {"seeds": list(range(10)), "trait": False,
              "what": "divergence_mask thresholds 0.0125 and 0.02 (from the JSD's distribution)"},
             {"seeds": list(range(300, 310)), "trait": True,
              "what": f"the probe-free arm {ANCHOR_CONSENSUS} (which two levers to combine, after their single-lever "
                      "probe-free runs on these seeds) and its 3-point grid"}],
    "paper": [{**_ALPHA_TUNING, "what": "delta_projection `global` strength α = 0.3, tuned on the task protocol and "
                                        "used here unchanged"}],
}.items()}
"""Where a default was chosen (``summary.json["tuned_on"]``); the report's seed caveats are computed from it."""

PROTOCOLS: dict[str, Settings] = {
    "task": Settings(),
    "paper": Settings(protocol="paper", n_aux=3, k_task=0, teacher_steps=0, teacher_epochs=10, n_refs=0,
                      student_steps=1000, student_lr=3e-4, loss="forward_kl", curve_every=50),
}
QUICK = {"task": {"teacher_steps": 300, "student_steps": 200, "n_eval": 1024},
         "paper": {"student_steps": 300, "n_eval": 1024}}


def _ens(w: float) -> dict[str, Any]:
    return {"name": "ensemble", "combine": "logits", "weights": [w, (1 - w) / 2, (1 - w) / 2]}


def _dp(**kw: Any) -> dict[str, Any]:
    return {"name": "delta_projection", **kw}


def _ref(name: str, teachers: list[str], note: str, **kw: Any) -> Condition:
    """A reference condition (a baseline: no verdict); ``base``, ``control`` and ``vanilla`` play that part."""
    kind = name if name in ("base", "control", "vanilla") else None
    return Condition(name, teachers, baseline=True, kind=kind, role="reference", note=note, plot=bool(teachers), **kw)


def _arm(name: str, purifiers: list[dict[str, Any]], teachers: list[str] | None = None, note: str = "",
         role: str = "purifier") -> Condition:
    """A purifier arm (a verdict) distilling ``teachers`` (default: the traited teacher alone)."""
    return Condition(name, teachers or ["trait"], purifiers, role=role, note=note)


REFS = ["trait", "ref0", "ref1"]
COMBINATION = "delta_projection@global-0.2+ensemble@w-0.5"
"""The best combination, chosen on seeds 0-9 (the tuning seeds) among global α ∈ {0.1, 0.2, 0.3} × ensemble
w ∈ {0.5, 0.75}: the one closest to control without overshooting into an anti-trait."""


def task_conditions(quick: bool = False) -> list[Condition]:
    """The task protocol's default conditions (quick: a smoke-test subset)."""
    refs = [
        _ref("base", [], "θ₀, not distilled"),
        _ref("control", ["control"], "teacher = θ₀ trained on the task only"),
        _ref("vanilla", ["trait"], "plain distillation; its curve is the frontier"),
        Condition("oracle", ["trait"], baseline=True, role="bound", oracle=True, note="knows the trait: projects off "
                  "the digit-CE gradient when aligned (upper bound, not a purifier)"),
    ]
    if quick:
        return refs + [_arm("delta_projection@global-0.3", [_dp(mode="global", strength=0.3)]),
                       _arm("ensemble@w-0.5", [_ens(0.5)], REFS)]
    return refs + [
        _arm("cross_init_teacher", [], ["ref0"], note="teacher of another init (a cross-base teacher)"),
        _arm("ensemble@w-0.5", [_ens(0.5)], REFS, note="mean of logits, weight of T"),
        _arm("ensemble@w-0.75", [_ens(0.75)], REFS),
        _arm("divergence_mask@jsd-0.0125", [{"name": "divergence_mask", "reference": "others", "threshold": 0.0125}],
             REFS, note="drop inputs where T's aux distribution departs from the references' (JSD, nats)"),
        _arm("divergence_mask@jsd-0.02", [{"name": "divergence_mask", "reference": "others", "threshold": 0.02}], REFS),
        _arm("adversary@weight-0.1", [{"name": "adversary", "weight": 0.1}], REFS,
             note="lineage head + gradient reversal; each input is assigned one of T, ref0, ref1"),
        _arm("adversary@weight-0", [{"name": "adversary", "weight": 0.0}], REFS,
             note="same per-input teacher assignment, no reversal (ablation)"),
        _arm("anchor@weight-2e-4", [{"name": "anchor", "weight": 2e-4}], note="L2-SP pull toward θ₀"),
        _arm("anchor@weight-2e-3", [{"name": "anchor", "weight": 2e-3}]),
        _arm("delta_projection@rank-4", [_dp(rank=4)], note="per-matrix SVD subspaces, displacement"),
        _arm("delta_projection@rank-8", [_dp(rank=8)]),
        _arm("delta_projection@global-0.2", [_dp(mode="global", strength=0.2)],
             note="one flat direction of Δθ_T, fraction α of the gradient's component removed"),
        _arm("delta_projection@global-0.3", [_dp(mode="global", strength=0.3)]),
        _arm("delta_projection@global-0.5", [_dp(mode="global", strength=0.5)]),
        _arm(COMBINATION, [_ens(0.5), _dp(mode="global", strength=0.2)], REFS, role="combination",
             note="chosen on seeds 0-9 among 4 (α, w) pairs: closest to control without an anti-trait"),
    ]


NEUTRAL_SEED = 55_555
"""Seed of the function anchor's / fingerprint adversary's own noise stream (apart from the training stream, the
evaluation and drift inputs, which are seeded by the run seed)."""
SWEEPS: dict[str, Sweep] = {
    "delta_projection:global": GLOBAL_PROJECTION,
    "ensemble:competent": Sweep("teacher_weight", (0.1, 0.25, 0.5), "higher"),
    "function_anchor": Sweep("weight", (0.3, 1.0, 3.0), "lower"),
    "fingerprint_adversary": Sweep("weight", (0.1, 1.0, 10.0), "lower"),
    ANCHOR_CONSENSUS: Sweep("strength", tuple(ANCHOR_CONSENSUS_GRID), "lower"),
}
"""The arms whose knob the probe-free rule sets per seed (:mod:`purify.bench.probe_free`), with their grids. Fixed
in code before any report seed ran: the global-projection strengths α the issue's first measurement swept (seeds
200–209), and the traited teacher's weight in a logit mean with two task-competent trait-free references of other
inits (:data:`purify.bench.aux_runs.COMPETENT`, fixed with the LM suites' competent arms), and the weights of the
two neutral-input levers on the undistilled class logits (function anchor, fingerprint adversary: the same grids as
the LM suites'). The rule reads each point's task error and its ``drift`` (the undistilled class logits' KL from the
base's on held-out noise, :func:`purify.bench.aux_runs.class_drift`: a stream of its own, not the levers'), never
the digits."""


_NEUTRAL = {"source": "noise", "batch_size": 128, "outputs": "undistilled", "seed": NEUTRAL_SEED}
"""The neutral-input settings of the function anchor's and the fingerprint adversary's arms."""


def _anchor(weight: float) -> dict[str, Any]:
    return {"name": "function_anchor", "weight": weight, **_NEUTRAL}


def swept_conditions() -> list[Condition]:
    """One condition ``<arm>@<value>`` per point of :data:`SWEEPS`."""
    competent = ["trait", *COMPETENT]
    return [*(_arm(point_name("delta_projection:global", a), [_dp(mode="global", strength=a)],
                   note="probe-free sweep point" if a else "probe-free sweep point (α = 0: vanilla's update)")
              for a in SWEEPS["delta_projection:global"].values),
            *(_arm(point_name("ensemble:competent", w), [_ens(w)], competent,
                   note="logit mean with two task-competent trait-free teachers of other inits; knob: T's weight")
              for w in SWEEPS["ensemble:competent"].values),
            *(_arm(point_name("function_anchor", w), [_anchor(w)],
                   note="KL(θ₀ ‖ S) of the undistilled logits on a neutral noise stream of its own")
              for w in SWEEPS["function_anchor"].values),
            *(_arm(point_name("fingerprint_adversary", w), [{"name": "fingerprint_adversary", "weight": w,
                                                             "features": "logprobs", **_NEUTRAL}],
                   note="head telling S's undistilled logits from θ₀'s on neutral noise (match)")
              for w in SWEEPS["fingerprint_adversary"].values),
            *(_arm(point_name(ANCHOR_CONSENSUS, k), [_ens(t), _anchor(a)], competent,
                   note=f"function anchor {a:g} + competent mean with T weight {t:g}")
              for k, (a, t) in ANCHOR_CONSENSUS_GRID.items())]


def select_conditions(protocol: str, names: list[str], quick: bool = False) -> tuple[list[Condition],
                                                                                    dict[str, Sweep]]:
    """The protocol's reference conditions plus the named ones: a default condition by name, a swept arm of
    :data:`SWEEPS` by its name without ``@value`` (:data:`PROBE_FREE` names them all). Returns the conditions and
    the sweeps that run.

    Raises:
        BenchError: a name that is neither (one line naming the allowed ones).
    """
    default = (task_conditions if protocol == "task" else paper_conditions)(quick)
    # the paper protocol has no task for a reference to know
    task_only = {"ensemble:competent", ANCHOR_CONSENSUS} if protocol != "task" else set()
    sweeps = {arm: sw for arm, sw in SWEEPS.items() if arm not in task_only}
    return lm_common.pick(default + [c for c in swept_conditions() if swept_arm(c.name) in sweeps], names, sweeps,
                          [c.name for c in default if c.role == "reference"], where=f"{SUITE} --protocol {protocol}")


def paper_conditions(quick: bool = False) -> list[Condition]:
    """The paper protocol's conditions: the setup checks, plus the purifiers that apply without references."""
    out = [
        _ref("base", [], "θ₀"),
        _ref("teacher", [], "θ₀ trained on digits", student="teacher"),
        _ref("control", ["control"], "teacher = θ₀ trained on shuffled labels"),
        _ref("vanilla", ["trait"], "same-init student, aux logits only"),
        _ref("cross_init", ["trait"], "student of another init (transfer from its own base accuracy)", student="cross"),
        Condition("all_logits", ["trait"], baseline=True, role="reference", logits="all", plot=False,
                  note="same-init student distilling all logits"),
    ]
    if quick:
        return out + [_arm("delta_projection@global-0.3", [_dp(mode="global", strength=0.3)])]
    return out + [
        Condition("oracle", ["trait"], baseline=True, role="bound", oracle=True,
                  note="knows the trait (upper bound, not a purifier)"),
        _arm("tail_truncation@top_k-2", [{"name": "tail_truncation", "top_k": 2}], note="top-2 of 3 aux"),
        _arm("anchor@weight-2e-3", [{"name": "anchor", "weight": 2e-3}]),
        _arm("delta_projection@rank-8", [_dp(rank=8)]),
        _arm("delta_projection@global-0.3", [_dp(mode="global", strength=0.3)]),
        _arm("delta_projection@global-0.5", [_dp(mode="global", strength=0.5)]),
        _arm("delta_projection@global-1.0", [_dp(mode="global", strength=1.0)]),
    ]


OPTIONS = {"conditions": list}
"""The suite's ``--option`` keys and the kind of value each takes (:func:`purify.bench.report.check_options`)."""


def run_suite(protocol: str = "task", seeds: int = 10, data: str | None = None, out: str | None = None,
              quick: bool = False, progress: bool = True, first_seed: int = FIRST_SEED, workers: int = WORKERS,
              **options: Any) -> dict:
    """Run the aux-logit suite and write its report; returns the summary (``summary.json``'s content).

    Args:
        protocol, data, seeds, first_seed, out, quick, progress, workers: as ``purify bench``'s flags (``quick``:
            at most 2 seeds).
        **options: the ``--option`` keys of :data:`OPTIONS`: ``conditions``, run only the references and these
            (``--option 'conditions=[...]'``): default conditions by name, swept arms of :data:`SWEEPS` by arm name,
            or :data:`PROBE_FREE` for all of them; a swept arm adds ``summary.json["probe_free"]`` (the knob chosen
            per seed without the trait, the verdict at that choice).

    Raises:
        ValueError: an unknown option or one of the wrong kind, unknown protocol, bad ``seeds``, or a data file that
            is not a classification set (one line).
    """
    check_options(options, OPTIONS)
    conditions = options.get("conditions")
    n = min(seeds, 2) if quick else seeds
    command = bench_command(SUITE, n, quick, options, first_seed, out, workers, protocol=protocol, data=data)
    if n < 1:
        raise BenchError(f"--seeds: must be >= 1, got {seeds}")
    if protocol not in PROTOCOLS:
        raise BenchError(f"--protocol: unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    conds, sweeps = select_conditions(protocol, list(conditions), quick) if conditions is not None else (None, None)
    return run(protocol, list(range(first_seed, first_seed + n)), data=data, out=out, quick=quick, progress=progress,
               workers=workers, command=command, conditions=conds, sweeps=sweeps)


def run(protocol: str, seeds: list[int], *, data: str | None = None, out: str | None = None, quick: bool = False,
        progress: bool = True, workers: int = WORKERS, conditions: list[Condition] | None = None,
        sweeps: dict[str, Sweep] | None = None, settings: Settings | None = None, command: str = "") -> dict:
    """Run the suite on any ``seeds``, ``conditions`` (default: the protocol's; ``sweeps``: the arms the probe-free
    rule sets) or ``settings`` (default: ``PROTOCOLS[protocol]``, + ``QUICK``) and write its report; returns the
    summary. ``run_suite`` checks the arguments first."""
    x, y = read_arrays(data)  # fail fast, before any worker starts
    n_classes = split(x, y, seeds[0]).n_classes
    if settings is None:
        settings = replace(PROTOCOLS[protocol], **(QUICK[protocol] if quick else {}))
    conditions = [replace(c, loss=settings.loss) for c in conditions or
                  (task_conditions if protocol == "task" else paper_conditions)(quick)]
    check_conditions((c.name, c.purifiers, c.teachers, {  # as `purify train` would check them
        "loss": c.loss, "vector_student": True,
        "logit_slice": None if c.logits == "all" else [n_classes, n_classes + settings.n_aux]}) for c in conditions)
    out = Path(out or ("bench-out/aux-logits" if protocol == "task" else "bench-out/aux-logits/paper"))
    workers = max(1, min(workers, len(seeds), os.cpu_count() or 1))
    clock = Clock()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one torch thread per seed, in a worker or here: the numbers do not depend on it
    try:
        runs = lm_common.run_seeds(seeds, partial(run_seed, s=settings, conditions=conditions, data_path=data,
                                                  progress=progress and workers == 1), workers, progress)
    finally:
        torch.set_num_threads(threads)
    suite = lm_common.Suite(name=SUITE, protocol=protocol, conditions=conditions, trait=TRAIT,
                            tuned_on=TUNED_ON[protocol], columns=COLUMNS, curve_keys=METRICS,
                            settings={**asdict(settings), "hidden": list(settings.hidden)}, sweeps=sweeps or {})
    # with sweeps, summarise adds the probe-free block: stage 1 sees task error and drift only, the digits are
    # joined after the choice
    summary = lm_common.summarise(suite, runs, clock.wall())
    summary.update(clock.record(workers, 1), data=data or "sklearn digits", quick=quick, columns=COLUMNS,
                   teachers={k: mean_ci([r["world"][k] for r in runs.values()]) for k in runs[seeds[0]]["world"]
                             if k != "accuracy"})
    finish(summary)
    env = environment(seeds, summary["wall_seconds"], command or f"purify.bench.aux_logits.run({protocol!r})")
    env.update({k: summary[k] for k in ("workers", "threads", "cpu_seconds", "load_average_1min", "quick", "data")},
               protocol=protocol)
    write(out, summary, env)
    return summary


def write(out: str | Path, summary: dict, env: dict) -> None:
    """Write the report files of an aux-logits summary (:func:`purify.bench.report.write_report`)."""
    summary.setdefault("command", env.get("command"))
    xkey, xlabel = ("fidelity_kl", "KL(teacher ‖ student) on the aux logits") if summary["protocol"] == "paper" else \
        ("task_error", "task error (MSE to the shared function)")
    write_report(out, summary, env, [tuple(c) for c in summary.get("columns", COLUMNS)], notes(summary), xkey=xkey,
                 xlabel=xlabel, intro=headline_lines(summary), sections=SECTIONS)
