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

Every condition is paired by seed (same split, same ``θ₀``, same noise stream). Each arm gets one two-sided verdict
(:mod:`purify.bench.verdicts`: purified, below/on/above frontier, anti-trait, damaged or no verdict, Holm-adjusted
across the arms). Outputs (``summary.json``, ``.md``, ``.csv``,
``frontier.png``, ``env.json``) are written by :mod:`purify.bench.report`.

Seeds run in worker processes (``spawn``): a script that calls :func:`run_suite` needs the usual
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from purify.bench import probe_free
from purify.bench.aux_runs import COMPETENT, Condition, Settings, run_seed
from purify.bench.aux_summary import summarise
from purify.bench.digits import read_arrays, split
from purify.bench.probe_free import Sweep, point_name
from purify.bench.report import BenchError, environment, write_report
from purify.purifiers.adversary import AdversaryConfig
from purify.purifiers.anchor import AnchorConfig
from purify.purifiers.delta_projection import DeltaProjectionConfig
from purify.purifiers.divergence_mask import DivergenceMaskConfig
from purify.purifiers.ensemble import EnsembleConfig
from purify.purifiers.fingerprint import FingerprintAdversaryConfig
from purify.purifiers.function_anchor import FunctionAnchorConfig
from purify.purifiers.tail_truncation import TailTruncationConfig

SUITE = "aux-logits"
FIRST_SEED = 20
"""Seeds start at 20, disjoint from every :data:`TUNED_ON` entry (seeds 0-19)."""
WORKERS = 2
BASELINES = {"base": "base", "control": "control", "vanilla": "vanilla"}
"""Which reference condition plays each part of a verdict (kind → condition name)."""
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
TUNED_ON: dict[str, list[dict[str, Any]]] = {
    "task": [_ALPHA_TUNING,
             {"seeds": list(range(10, 20)), "trait": True, "what": "α = 0.3 (looked at once, to confirm it)"},
             {"seeds": list(range(10)), "trait": False,
              "what": "divergence_mask thresholds 0.0125 and 0.02 (from the JSD's distribution)"},
             {"seeds": list(range(300, 310)), "trait": True,
              "what": f"the probe-free arm {ANCHOR_CONSENSUS} (which two levers to combine, after their single-lever "
                      "probe-free runs on these seeds) and its 3-point grid"}],
    "paper": [{**_ALPHA_TUNING, "what": "delta_projection `global` strength α = 0.3, tuned on the task protocol and "
                                        "used here unchanged"}],
}
"""Where a default was chosen (``summary.json["tuned_on"]``); the report's seed caveats are computed from it."""

PROTOCOLS: dict[str, Settings] = {
    "task": Settings(),
    "paper": Settings(protocol="paper", n_aux=3, k_task=0, teacher_steps=0, teacher_epochs=10, n_refs=0,
                      student_steps=1000, student_lr=3e-4, loss="forward_kl", curve_every=50),
}
QUICK = {"task": {"teacher_steps": 300, "student_steps": 200, "n_eval": 1024},
         "paper": {"student_steps": 300, "n_eval": 1024}}


def _ens(w: float) -> EnsembleConfig:
    return EnsembleConfig(combine="logits", weights=[w, (1 - w) / 2, (1 - w) / 2])


def _dp(**kw: Any) -> DeltaProjectionConfig:
    return DeltaProjectionConfig(**kw)


REFS = ("trait", "ref0", "ref1")
COMBINATION = "delta_projection@global-0.2+ensemble@w-0.5"
"""The best combination, chosen on seeds 0-9 (the tuning seeds) among global α ∈ {0.1, 0.2, 0.3} × ensemble
w ∈ {0.5, 0.75}: the one closest to control without overshooting into an anti-trait."""


def task_conditions(quick: bool = False) -> list[Condition]:
    """The task protocol's default conditions (quick: a smoke-test subset)."""
    refs = [
        Condition("base", "reference", train=False, note="θ₀, not distilled"),
        Condition("control", "reference", teachers=("control",), note="teacher = θ₀ trained on the task only"),
        Condition("vanilla", "reference", curve=True, note="plain distillation; its curve is the frontier"),
        Condition("oracle", "bound", oracle=True, note="knows the trait: projects off the digit-CE gradient when "
                  "aligned (upper bound, not a purifier)"),
    ]
    if quick:
        return refs + [Condition("delta_projection@global-0.3", purifiers=(_dp(mode="global", strength=0.3),)),
                       Condition("ensemble@w-0.5", teachers=REFS, purifiers=(_ens(0.5),))]
    return refs + [
        Condition("cross_init_teacher", teachers=("ref0",), note="teacher of another init (a cross-base teacher)"),
        Condition("ensemble@w-0.5", teachers=REFS, purifiers=(_ens(0.5),), note="mean of logits, weight of T"),
        Condition("ensemble@w-0.75", teachers=REFS, purifiers=(_ens(0.75),)),
        Condition("divergence_mask@jsd-0.0125", teachers=REFS,
                  purifiers=(DivergenceMaskConfig(reference="others", threshold=0.0125),),
                  note="drop inputs where T's aux distribution departs from the references' (JSD, nats)"),
        Condition("divergence_mask@jsd-0.02", teachers=REFS,
                  purifiers=(DivergenceMaskConfig(reference="others", threshold=0.02),)),
        Condition("adversary@weight-0.1", teachers=REFS, purifiers=(AdversaryConfig(weight=0.1),),
                  note="lineage head + gradient reversal; each input is assigned one of T, ref0, ref1"),
        Condition("adversary@weight-0", teachers=REFS, purifiers=(AdversaryConfig(weight=0.0),),
                  note="same per-input teacher assignment, no reversal (ablation)"),
        Condition("anchor@weight-2e-4", purifiers=(AnchorConfig(weight=2e-4),), note="L2-SP pull toward θ₀"),
        Condition("anchor@weight-2e-3", purifiers=(AnchorConfig(weight=2e-3),)),
        Condition("delta_projection@rank-4", purifiers=(_dp(rank=4),), note="per-matrix SVD subspaces, displacement"),
        Condition("delta_projection@rank-8", purifiers=(_dp(rank=8),)),
        Condition("delta_projection@global-0.2", purifiers=(_dp(mode="global", strength=0.2),),
                  note="one flat direction of Δθ_T, fraction α of the gradient's component removed"),
        Condition("delta_projection@global-0.3", purifiers=(_dp(mode="global", strength=0.3),)),
        Condition("delta_projection@global-0.5", purifiers=(_dp(mode="global", strength=0.5),)),
        Condition(COMBINATION, "combination", teachers=REFS, purifiers=(_ens(0.5), _dp(mode="global", strength=0.2)),
                  note="chosen on seeds 0-9 among 4 (α, w) pairs: closest to control without an anti-trait"),
    ]


NEUTRAL_SEED = 55_555
"""Seed of the function anchor's / fingerprint adversary's own noise stream (apart from the training stream, the
evaluation and drift inputs, which are seeded by the run seed)."""
PROBE_FREE = "probe-free"
"""``--option 'conditions=[probe-free]'`` runs the references and every swept arm of :data:`SWEEPS`."""
SWEEPS: dict[str, Sweep] = {
    "delta_projection:global": Sweep("strength", (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), "lower"),
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


def _anchor(weight: float) -> FunctionAnchorConfig:
    return FunctionAnchorConfig(weight=weight, **_NEUTRAL)  # type: ignore[arg-type]


def swept_conditions() -> list[Condition]:
    """One condition ``<arm>@<value>`` per point of :data:`SWEEPS`."""
    competent = ("trait", *COMPETENT)
    return [*(Condition(point_name("delta_projection:global", a), purifiers=(_dp(mode="global", strength=a),),
                        note="probe-free sweep point" if a else "probe-free sweep point (α = 0: vanilla's update)")
              for a in SWEEPS["delta_projection:global"].values),
            *(Condition(point_name("ensemble:competent", w), teachers=competent, purifiers=(_ens(w),),
                        note="logit mean with two task-competent trait-free teachers of other inits; knob: T's weight")
              for w in SWEEPS["ensemble:competent"].values),
            *(Condition(point_name("function_anchor", w), purifiers=(_anchor(w),),
                        note="KL(θ₀ ‖ S) of the undistilled logits on a neutral noise stream of its own")
              for w in SWEEPS["function_anchor"].values),
            *(Condition(point_name("fingerprint_adversary", w), purifiers=(FingerprintAdversaryConfig(
                weight=w, features="logprobs", **_NEUTRAL),),  # type: ignore[arg-type]
                note="head telling S's undistilled logits from θ₀'s on neutral noise (match)")
              for w in SWEEPS["fingerprint_adversary"].values),
            *(Condition(point_name(ANCHOR_CONSENSUS, k), teachers=competent, purifiers=(_ens(t), _anchor(a)),
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
    refs = [c for c in default if c.role == "reference"]
    others = {c.name: c for c in default if c.role != "reference"}
    # the paper protocol has no task for a reference to know
    task_only = {"ensemble:competent", ANCHOR_CONSENSUS} if protocol != "task" else set()
    sweeps = {arm: sw for arm, sw in SWEEPS.items() if (arm in names or PROBE_FREE in names) and arm not in task_only}
    allowed = [arm for arm in SWEEPS if arm not in task_only]
    unknown = [n for n in names if n not in others and n not in allowed and n != PROBE_FREE
               and n not in {c.name for c in refs}]
    if unknown:
        raise BenchError(f"conditions: unknown {', '.join(map(repr, unknown))} for aux-logits --protocol {protocol}; "
                         f"allowed: {PROBE_FREE}, {', '.join([*allowed, *others])}")
    swept = [c for c in swept_conditions() if c.name.split("@")[0] in sweeps]
    return refs + [c for n, c in others.items() if n in names] + swept, sweeps


def paper_conditions(quick: bool = False) -> list[Condition]:
    """The paper protocol's conditions: the setup checks, plus the purifiers that apply without references."""
    out = [
        Condition("base", "reference", train=False, note="θ₀"),
        Condition("teacher", "reference", train=False, note="θ₀ trained on digits"),
        Condition("control", "reference", teachers=("control",), note="teacher = θ₀ trained on shuffled labels"),
        Condition("vanilla", "reference", curve=True, note="same-init student, aux logits only"),
        Condition("cross_init", "reference", student="cross", note="student of another init (transfer from its own "
                  "base accuracy)"),
        Condition("all_logits", "reference", logits="all", plot=False,
                  note="same-init student distilling all logits"),
    ]
    if quick:
        return out + [Condition("delta_projection@global-0.3", purifiers=(_dp(mode="global", strength=0.3),))]
    return out + [
        Condition("oracle", "bound", oracle=True, note="knows the trait (upper bound, not a purifier)"),
        Condition("tail_truncation@top_k-2", purifiers=(TailTruncationConfig(top_k=2),), note="top-2 of 3 aux"),
        Condition("anchor@weight-2e-3", purifiers=(AnchorConfig(weight=2e-3),)),
        Condition("delta_projection@rank-8", purifiers=(_dp(rank=8),)),
        Condition("delta_projection@global-0.3", purifiers=(_dp(mode="global", strength=0.3),)),
        Condition("delta_projection@global-0.5", purifiers=(_dp(mode="global", strength=0.5),)),
        Condition("delta_projection@global-1.0", purifiers=(_dp(mode="global", strength=1.0),)),
    ]


@dataclass
class SuiteConfig:
    """A run of the suite (``run_suite`` builds one from CLI arguments)."""

    protocol: str = "task"
    seeds: list[int] | None = None  # default: FIRST_SEED, FIRST_SEED + 1, ... (10 of them)
    data: str | None = None
    out: str | None = None
    quick: bool = False
    progress: bool = True
    workers: int = WORKERS
    conditions: list[Condition] | None = None  # default: the protocol's
    sweeps: dict[str, Sweep] | None = None  # arms the probe-free rule sets (summary.json["probe_free"])
    settings: Settings | None = None  # default: PROTOCOLS[protocol] (+ QUICK)
    command: str = ""


def run_suite(protocol: str = "task", seeds: int = 10, data: str | None = None, out: str | None = None,
              quick: bool = False, progress: bool = True, first_seed: int = FIRST_SEED,
              conditions: list[str] | None = None) -> dict:
    """Run the aux-logit suite and write its report; returns the summary (``summary.json``'s content).

    Args:
        protocol: ``task`` (default) or ``paper``.
        seeds: number of seeds from ``first_seed`` (``quick`` uses at most 2).
        data: an ``.npz`` with ``X`` (float, N×D) and ``y`` (int, N); default sklearn's digits.
        out: output directory; default ``bench-out/aux-logits`` (task) or ``bench-out/aux-logits/paper`` (untracked).
        quick: smoke test: 2 seeds, fewer steps and conditions (≤ 1 min).
        progress: show a progress bar over seeds × conditions.
        first_seed: the first seed (default :data:`FIRST_SEED`, disjoint from :data:`TUNED_ON`).
        conditions: run only the references and these (``--option 'conditions=[...]'``): default conditions by
            name, swept arms of :data:`SWEEPS` by arm name, or :data:`PROBE_FREE` for all of them; a swept arm adds
            ``summary.json["probe_free"]`` (the knob chosen per seed without the trait, the verdict at that choice).

    Raises:
        ValueError: unknown protocol, bad ``seeds``, or a data file that is not a classification set (one line).
    """
    n = min(seeds, 2) if quick else seeds
    command = f"purify bench aux-logits --protocol {protocol} --seeds {seeds} --first-seed {first_seed}" + \
        (f" --data {data}" if data else "") + (f" --out {out}" if out else "") + (" --quick" if quick else "") + \
        (f" --option 'conditions=[{','.join(conditions)}]'" if conditions is not None else "")
    if n < 1:
        raise BenchError(f"--seeds: must be >= 1, got {seeds}")
    if protocol not in PROTOCOLS:
        raise BenchError(f"--protocol: unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    conds, sweeps = select_conditions(protocol, list(conditions), quick) if conditions is not None else (None, None)
    return run(SuiteConfig(protocol=protocol, seeds=list(range(first_seed, first_seed + n)), data=data, out=out,
                           quick=quick, progress=progress, command=command, conditions=conds, sweeps=sweeps))


def run(cfg: SuiteConfig) -> dict:
    """Run a configured suite (any seeds, conditions or settings) and write its report; returns the summary."""
    if cfg.protocol not in PROTOCOLS:
        raise BenchError(f"--protocol: unknown protocol {cfg.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    x, y = read_arrays(cfg.data)  # fail fast, before any worker starts
    seeds = cfg.seeds if cfg.seeds is not None else list(range(FIRST_SEED, FIRST_SEED + 10))
    split(x, y, seeds[0])
    settings = cfg.settings or PROTOCOLS[cfg.protocol]
    if cfg.quick and cfg.settings is None:
        settings = replace(settings, **QUICK[cfg.protocol])
    conditions = cfg.conditions or (task_conditions if cfg.protocol == "task" else paper_conditions)(cfg.quick)
    out = Path(cfg.out or ("bench-out/aux-logits" if cfg.protocol == "task" else "bench-out/aux-logits/paper"))
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    records = _run_seeds(seeds, settings, conditions, cfg.data, cfg.workers, cfg.progress)
    wall = time.perf_counter() - t0
    summary = summarise(records, conditions, settings, seeds, data=cfg.data or "sklearn digits", wall_seconds=wall,
                        workers=min(cfg.workers, len(seeds)), quick=cfg.quick, baselines=BASELINES,
                        tuned_on=TUNED_ON[cfg.protocol], trait=TRAIT)
    if cfg.sweeps:  # stage 1 sees task error and drift only; the digits are joined after the choice
        summary["probe_free"] = probe_free.block(summary, cfg.sweeps)
    env = environment(seeds, wall, cfg.command or f"purify.bench.aux_logits.run({cfg.protocol!r})")
    env.update({"workers": min(cfg.workers, len(seeds)), "torch_threads_per_worker": 1, "protocol": cfg.protocol,
                "quick": cfg.quick, "data": summary["data"], "cpu_seconds": round(_cpu_seconds() - cpu0, 1),
                "load_average_1min": {"start": load_start,
                                      "end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}})
    summary["cpu_seconds"], summary["load_average_1min"] = env["cpu_seconds"], env["load_average_1min"]
    _write(out, summary, env)
    return summary


def _cpu_seconds() -> float:
    """CPU time so far of this process and its finished children (the workers). A run's difference, divided by the
    number of workers, is about its wall time on an unshared machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _write(out: Path, summary: dict, env: dict) -> None:
    from purify.bench.aux_summary import COLUMNS, SECTIONS, headline_lines, notes

    summary.setdefault("command", env.get("command"))

    xkey, xlabel = ("fidelity_kl", "KL(teacher ‖ student) on the aux logits") if summary["protocol"] == "paper" else \
        ("task_error", "task error (MSE to the shared function)")
    write_report(out, summary, env, COLUMNS, notes(summary), xkey=xkey, xlabel=xlabel, intro=headline_lines(summary),
                 sections=SECTIONS)


def render(out: str | Path) -> None:
    """Rewrite a finished run's report files from its ``summary.json`` and ``env.json`` (no training)."""
    import json

    out = Path(out)
    _write(out, json.loads((out / "summary.json").read_text()), json.loads((out / "env.json").read_text()))


def rereport(out: str | Path) -> dict:
    """Re-derive a finished run's verdicts from the per-seed records in its ``summary.json`` with the current rules
    (no training) and rewrite its report; a summary written before ``baselines``, ``tuned_on`` and ``trait`` were
    recorded gets this suite's (``env.json`` gains ``rereported_by``). Returns the summary."""
    import json

    from purify.bench.aux_summary import apply_verdicts

    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    env = json.loads((out / "env.json").read_text())
    summary.setdefault("baselines", BASELINES)
    summary.setdefault("tuned_on", TUNED_ON[summary["protocol"]])
    summary.setdefault("trait", TRAIT)
    summary.setdefault("guards", [])
    if "--first-seed" not in (summary.get("command") or ""):  # written when the first seed was implicit
        seeds = summary["seeds"]
        summary["rerun"] = (f"purify bench aux-logits --protocol {summary['protocol']} --seeds {len(seeds)} "
                            f"--first-seed {seeds[0]} --out {out}")
    apply_verdicts(summary)
    env["rereported_by"] = f"purify bench --rereport {out}"
    _write(out, summary, env)
    return summary


# ---------------------------------------------------------------- seeds in parallel
_QUEUE: Any = None


def _init_worker(q: Any) -> None:
    global _QUEUE
    _QUEUE = q
    torch.set_num_threads(1)


def _worker(seed: int, settings: Settings, conditions: list[Condition], data: str | None) -> dict:
    return run_seed(seed, settings, conditions, data, report=lambda name: _QUEUE.put((seed, name)))


def _run_seeds(seeds: list[int], settings: Settings, conditions: list[Condition], data: str | None, workers: int,
               progress: bool) -> list[dict]:
    """Every seed, in ``workers`` processes (spawned, one torch thread each); results in seed order."""
    from tqdm.auto import tqdm

    total = len(seeds) * len(conditions)
    bar = tqdm(total=total, desc=f"{SUITE} seeds×conditions", disable=not progress, file=sys.stderr, unit="run")
    workers = max(1, min(workers, len(seeds), os.cpu_count() or 1))
    try:
        if workers == 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return [run_seed(s, settings, conditions, data, report=lambda name: bar.update()) for s in seeds]
            finally:
                torch.set_num_threads(threads)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
            futures = [pool.submit(_worker, s, settings, conditions, data) for s in seeds]
            done = 0
            while done < total:
                try:
                    q.get(timeout=0.5)
                    done += 1
                    bar.update()
                except queue.Empty:
                    failed = [f for f in futures if f.done() and f.exception() is not None]
                    if failed:
                        raise failed[0].exception()  # type: ignore[misc]
            return [f.result() for f in futures]
    finally:
        bar.close()


def main(argv: list[str] | None = None) -> int:
    """Development entry point (the product CLI is ``purify bench aux-logits``): any seeds, e.g. the long run."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m purify.bench.aux_logits")
    p.add_argument("--protocol", default="task", choices=list(PROTOCOLS))
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=FIRST_SEED)
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--render", metavar="DIR", help="only rewrite DIR's report files from its summary.json")
    a = p.parse_args(argv)
    if a.render:
        render(a.render)
        return 0
    command = "python -m purify.bench.aux_logits " + " ".join(argv if argv is not None else sys.argv[1:])
    n = min(a.seeds, 2) if a.quick else a.seeds
    run(SuiteConfig(protocol=a.protocol, seeds=list(range(a.first_seed, a.first_seed + n)), data=a.data, out=a.out,
                    quick=a.quick, workers=a.workers, command=command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
