"""Probe-free operating point: choose each arm's knob per seed without the trait, then judge it at that choice.

Users have no probe. An arm's main knob is swept (conditions named ``<arm>@<value>``, see :class:`Sweep`); per seed
the rule below picks one value from quantities any user can measure, and only then is the trait joined in and the
arm judged at that value with the benchmark's two-sided verdicts (:func:`purify.bench.verdicts.judge`).

The rule (fixed in code before any report seed ran; :data:`RULE`): among the swept settings whose task error on
validation data is within the task budget (≤ :data:`BUDGET` × vanilla's task error on the same seed), take the one
with the least off-task drift from the base (KL(base ‖ student) on neutral inputs held out from anything used in
training); settings within :data:`TIE_RTOL` (relative) of the least drift are a tie, broken toward the *weaker*
setting (the one that intervenes least). When no setting is within budget, the one with the least task error.

Why the rule cannot see the trait: :func:`choose` accepts only :class:`Selectable` points, which hold a knob value,
its strength rank, task error and drift and nothing else; :func:`selectable` copies exactly those two measured
fields (:data:`SELECTABLE_KEYS`) out of a per-seed record and never reads another key. The trait, transfer and guard
metrics are joined to the choice afterwards (:func:`block`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from purify.bench import verdicts
from purify.bench.stats import mean_ci, ratio

BUDGET = 1.10
"""Task budget: a setting is admissible when its task error is at most this × vanilla's (the verdicts' ratio)."""
TIE_RTOL = 0.01
"""Drifts within this relative distance of the least are a tie (broken toward the weaker setting)."""
PROBE_FREE = "probe-free"
"""The condition name that selects every swept arm of a suite (``--option 'conditions=[probe-free]'``)."""
SELECTABLE_KEYS = ("task_error", "drift")
"""The only per-seed fields the rule reads."""
RULE = (f"per seed, among the swept settings with task error ≤ {BUDGET:.2f} × vanilla's (same seed), the least "
        f"off-task drift KL(base ‖ student) on held-out neutral inputs; drifts within {TIE_RTOL:.0%} of the least tie "
        "and go to the weaker setting; if none is within budget, the least task error. Fixed in code before the "
        "report seeds ran; the trait is read only after the choice.")


@dataclass(frozen=True)
class Sweep:
    """How an arm's main knob is swept.

    Attributes:
        knob: the purifier option swept (e.g. ``threshold``), for reports.
        values: the values, in any order; condition ``f"{arm}@{value:g}"`` runs each.
        weaker: which end intervenes less: ``lower`` (e.g. an anchor weight, a flag rate) or ``higher`` (e.g. a
            divergence threshold: fewer positions flagged).
    """

    knob: str
    values: tuple[float, ...]
    weaker: Literal["lower", "higher"] = "lower"

    def names(self, arm: str) -> dict[str, float]:
        """Condition name → knob value."""
        return {point_name(arm, v): v for v in self.values}

    def strength(self, value: float) -> int:
        """Rank of ``value`` from the weakest (0) to the strongest setting."""
        order = sorted(self.values, reverse=self.weaker == "higher")
        return order.index(value)


GLOBAL_PROJECTION = Sweep("strength", (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), "lower")
"""The global delta projection's strength grid (α; 0 = vanilla's update, 1 removes the gradient's whole component
along the teacher's delta), the same in every suite: the values the issue's first aux-logits measurement swept
(seeds 200–209), fixed before any report seed of any suite ran."""


def point_name(arm: str, value: float) -> str:
    """The condition name of one sweep point: ``<arm>@<value>``."""
    return f"{arm}@{value:g}"


def swept_arm(name: str) -> str | None:
    """The arm a sweep point's condition name (``<arm>@<value>``) belongs to; ``None`` for any other condition
    (a fixed arm may share its name with a swept arm without being one of its points)."""
    return name.split("@")[0] if "@" in name else None


@dataclass(frozen=True)
class Selectable:
    """All the rule may see of one setting on one seed: no trait, no transfer, no guard readout.

    Attributes:
        value: the knob value.
        strength: rank from the weakest (0) setting.
        task_error: task error on validation data.
        drift: off-task drift from the base on neutral inputs.
    """

    value: float
    strength: int
    task_error: float
    drift: float


def selectable(value: float, strength: int, record: Mapping[str, Any]) -> Selectable:
    """The :class:`Selectable` view of a per-seed record: reads ``record[k]`` for ``k`` in :data:`SELECTABLE_KEYS`
    only (a record carrying trait fields is fine; they are never read)."""
    return Selectable(float(value), int(strength), float(record["task_error"]), float(record["drift"]))


def choose(points: Sequence[Selectable], vanilla_task_error: float) -> tuple[Selectable, bool]:
    """Apply :data:`RULE` to one seed's sweep.

    Args:
        points: one :class:`Selectable` per swept setting (anything else is refused: the rule takes no trait).
        vanilla_task_error: vanilla's task error on the same seed.

    Returns:
        ``(chosen point, whether it is within the task budget)``.

    Raises:
        TypeError: a point is not a :class:`Selectable` (e.g. a raw record that carries a trait readout).
        ValueError: no point has finite task error and drift.
    """
    for p in points:
        if not isinstance(p, Selectable):
            raise TypeError(f"choose: takes Selectable points only (knob value, strength, task error, drift), got "
                            f"{type(p).__name__}; build them with selectable() so no trait readout reaches the rule")
    ok = [p for p in points if math.isfinite(p.task_error) and math.isfinite(p.drift)]
    if not ok:
        raise ValueError("choose: no swept setting has a finite task error and drift")
    within = [p for p in ok if p.task_error <= BUDGET * vanilla_task_error]
    if not within:
        return min(ok, key=lambda p: (p.task_error, p.strength)), False
    least = min(p.drift for p in within)
    tied = [p for p in within if p.drift <= least + TIE_RTOL * abs(least)]
    return min(tied, key=lambda p: p.strength), True


def choose_per_seed(sweep: Sweep, arm: str, records: Mapping[str, Mapping[int, Mapping[str, Any]]],
                    vanilla: Mapping[int, Mapping[str, Any]]) -> dict[int, tuple[Selectable, bool]]:
    """The rule's choice for every seed.

    Args:
        sweep: the arm's sweep.
        arm: the arm's name.
        records: condition name → seed → per-seed record (may carry trait fields: only the selectable ones are read).
        vanilla: seed → vanilla's per-seed record (its ``task_error`` only is read).

    Returns:
        seed → (chosen point, within budget). Seeds where a sweep point is missing are left out.
    """
    names = sweep.names(arm)
    seeds = sorted(set.intersection(*(set(records.get(n, {})) for n in names)) & set(vanilla)) if names else []
    out = {}
    for seed in seeds:
        points = [selectable(v, sweep.strength(v), records[n][seed]) for n, v in names.items()
                  if records[n][seed].get("diverged_at") is None]
        try:
            out[seed] = choose(points, float(vanilla[seed]["task_error"]))
        except ValueError:
            continue
    return out


def _mode(settings: Mapping[str, Any]) -> str:
    """The loss mode of a condition's recorded settings (``summary.json["settings"]["conditions"]`` entry)."""
    return verdicts.loss_mode(settings.get("loss", "forward_kl"), settings.get("on_policy"))


def _baselines(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The run's base / control / vanilla conditions on the suite's student, in :func:`verdicts.judge`'s form."""
    settings = {c["name"]: c for c in summary.get("settings", {}).get("conditions", [])}
    out = {}
    for name, cond in summary["conditions"].items():
        s = settings.get(name, {})
        kind = s.get("kind") or (name if name in ("base", "control", "vanilla") else None)
        if kind and s.get("student") is None and s.get("baseline", True):
            out[name] = {"per_seed": cond["per_seed"], "baseline": True, "kind": kind,
                         "mode": _mode(s), "student": None}
    return out


def references(summary: Mapping[str, Any], points: Sequence[str]) -> tuple[str, str, str]:
    """``(mode, vanilla, control)``: the loss mode of a swept arm's ``points`` and the run's vanilla and control of
    that mode (a soft arm is judged against the soft references, an on-policy arm against the on-policy ones)."""
    losses = {c["name"]: _mode(c) for c in summary.get("settings", {}).get("conditions", [])}
    mode = next((losses[n] for n in points if n in losses), "forward_kl")
    refs = _baselines(summary)
    return (mode, *(next((n for n, c in refs.items() if c["kind"] == kind and c["mode"] == mode), kind)
                    for kind in ("vanilla", "control")))


def block(summary: Mapping[str, Any], sweeps: Mapping[str, Sweep], guards: Sequence[verdicts.Guard] = (),
          alpha: float = 0.05) -> dict[str, Any]:
    """``summary.json["probe_free"]``: per swept arm, the rule's choice per seed and the verdict at it.

    Stage 1 (no trait): per seed, :func:`choose_per_seed` on the :class:`Selectable` views. Stage 2: the chosen
    setting's full record per seed (trait, transfer, guards) forms a probe-free arm, judged with
    :func:`purify.bench.verdicts.judge` against the run's base, control and vanilla, Holm-adjusted across the run's
    arms (its verdicts' family) and the probe-free arms together. A seed of the run on which the rule chose nothing
    (every setting diverged) leaves the arm without a verdict, naming the seeds.

    Args:
        summary: a suite's summary (``conditions`` with ``per_seed`` records; ``settings.conditions``).
        sweeps: arm → :class:`Sweep`; arms whose points are not all in the run are skipped.
        guards: the suite's guard metrics.

    Returns:
        ``{"rule", "budget", "arms": {arm: {...}}}`` (``arms`` empty when no sweep ran).
    """
    conds = summary["conditions"]
    by_seed = {n: {r["seed"]: r for r in c["per_seed"]} for n, c in conds.items()}
    base_refs = _baselines(summary)
    arms: dict[str, Any] = {}
    undecided: dict[str, dict[int, str]] = {}
    diverged: dict[str, dict[str, list[float]]] = {}
    settings = {c["name"]: c for c in summary.get("settings", {}).get("conditions", [])}
    # the run's own arms join the family: the probe-free verdicts are Holm-adjusted across every arm of the run
    judged_input = {**base_refs, **{n: {"per_seed": conds[n]["per_seed"], "baseline": False, "kind": None,
                                        "mode": _mode(settings.get(n, {})), "student": None}
                                    for n in summary.get("verdicts", {}) if n in conds}}
    reference_names: list[str] = []
    for arm, sweep in sweeps.items():
        if not all(n in conds for n in sweep.names(arm)):
            continue
        # each swept arm is judged against the control and vanilla of its own loss mode
        mode, vanilla_name, control_name = references(summary, sweep.names(arm))
        reference_names += [n for n in (vanilla_name, control_name) if n not in reference_names]
        vanilla, control = by_seed.get(vanilla_name, {}), by_seed.get(control_name, {})
        chosen = choose_per_seed(sweep, arm, by_seed, vanilla)  # stage 1: no trait
        points = {v: by_seed[point_name(arm, v)] for v in sweep.values}
        # a seed of the run the rule decided nothing on is the arm failing there, not a record to leave out
        undecided[arm] = {s: "no vanilla record" if s not in vanilla else
                          "; ".join(f"no record of {point_name(arm, v)}" for v, recs in points.items() if s not in recs)
                          or "every swept setting diverged or has no finite task error and drift"
                          for s in sorted(set(summary.get("seeds") or vanilla) | set(vanilla)) if s not in chosen}
        diverged[arm] = {str(s): vs for s in chosen if (vs := [v for v, recs in points.items()
                                                              if recs[s].get("diverged_at") is not None])}
        # stage 2: join the trait and everything else of the chosen setting
        per_seed = [{**by_seed[point_name(arm, p.value)][s], "seed": s, "knob_value": p.value}
                    for s, (p, _) in chosen.items()]
        # an arm the rule left undecided on some seed gets no verdict, and joins the Holm family with p = 1
        judged_input[f"probe-free:{arm}"] = {"per_seed": [] if undecided[arm] else per_seed, "baseline": False,
                                             "kind": None, "mode": mode, "student": None}
        tc = [r["transfer"] - control[r["seed"]]["transfer"] for r in per_seed if r["seed"] in control]
        ci90 = mean_ci(tc, level=0.90)
        ratios = [ratio(r["task_error"], vanilla[r["seed"]]["task_error"]) for r in per_seed]
        base_per_seed = base_refs.get("base", {}).get("per_seed", [])
        ctl_per_seed = conds.get(control_name, {}).get("per_seed", [])
        arms[arm] = {
            "knob": sweep.knob, "values": list(sweep.values), "weaker": sweep.weaker,
            "chosen": {str(s): p.value for s, (p, _) in chosen.items()},
            "within_budget": {str(s): ok for s, (_, ok) in chosen.items()},
            "selection_inputs": {str(s): {f"{v:g}": {k: by_seed[point_name(arm, v)][s][k] for k in SELECTABLE_KEYS}
                                          for v in sweep.values} for s in chosen},
            "transfer_minus_control": {"mean": ci90["mean"], "ci90": ci90["ci95"], "n": ci90["n"]},
            "transfer": mean_ci([r["transfer"] for r in per_seed]),
            "drift": mean_ci([r["drift"] for r in per_seed]),
            "task_error_ratio": mean_ci(ratios),
            "guards": {g.metric: _guard(g, per_seed, base_per_seed, ctl_per_seed) for g in guards},
            "per_seed": [{k: r.get(k) for k in ("seed", "knob_value", "transfer", "task_error", "drift",
                                                *(g.metric for g in guards))} for r in per_seed],
        }
    if arms:
        judged = verdicts.judge(judged_input, guards, alpha)
        for arm in arms:
            key = f"probe-free:{arm}"
            arms[arm]["verdict"] = judged["verdicts"].get(key, "no verdict")
            if diverged[arm]:  # the rule chose among the others there: said beside the choice, not only as NaN
                arms[arm]["diverged_settings"] = diverged[arm]
            if undecided[arm]:
                arms[arm]["undecided_seeds"] = list(undecided[arm])
                arms[arm]["verdict"] = (f"no verdict: the rule chose no setting on seed(s) "
                                        f"{', '.join(map(str, undecided[arm]))} ("
                                        + "; ".join(f"seed {s}: {why}" for s, why in undecided[arm].items()) + ")")
            arms[arm]["p_adjusted"] = judged["p_adjusted"].get(key)
            arms[arm]["frontier_gap"] = judged["frontier_gap"].get(key)
    reference = {n: {"drift": mean_ci([r.get("drift", math.nan) for r in conds[n]["per_seed"]])}
                 for n in (*reference_names, "base") if n in conds}
    return {"rule": RULE, "budget": BUDGET, "tie_rtol": TIE_RTOL, "reference_drift": reference,
            "sweeps": {arm: dataclasses.asdict(sw) for arm, sw in sweeps.items() if arm in arms}, "arms": arms}


def _guard(g: verdicts.Guard, per_seed: verdicts.Records, base: verdicts.Records,
           control: verdicts.Records) -> dict[str, Any]:
    """One guard at the rule's choice: its mean and CI, ``problem`` (why it is broken, or ``None``:
    :meth:`~verdicts.Guard.problem`), and the seeds whose own value is below the band, the arm's and its control's
    (:meth:`~verdicts.Guard.seeds_below`: how often the side behaviour is lost, beside how often the reference
    loses it)."""
    return {"label": g.label, **mean_ci([r.get(g.metric, math.nan) for r in per_seed]),
            "problem": g.problem(per_seed, base, control), "seeds_below_band": g.seeds_below(per_seed, base, control),
            "control_seeds_below_band": g.seeds_below(control, base, control)}


def below_band(guard: Mapping[str, Any], n: int) -> str:
    """``"; 2 of 8 seeds below its band (control 3)"``, from a :func:`_guard` record over ``n`` seeds; ``""`` when
    no seed of the arm or of its control is below it (or the record predates the count)."""
    if not guard.get("seeds_below_band") and not guard.get("control_seeds_below_band"):
        return ""
    return (f"; {len(guard['seeds_below_band'])} of {n} seeds below its band (control "
            f"{len(guard['control_seeds_below_band'])})")


def none_swept(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``summary.json["probe_free"]`` of a run that swept no knob: no arms, and why (``why_none``) — including, from
    the run's ``problems``, a vanilla that carries no significant trait over its control, so that no setting of any
    arm could be judged there."""
    why = ["this run swept no arm's knob, so the rule had nothing to choose"]
    why += [f"{p}: no setting could be judged equivalent to the control here" for p in summary.get("problems", [])
            if "not significantly above" in p]
    return {"rule": RULE, "budget": BUDGET, "arms": {}, "why_none": "; ".join(why)}


def rederive(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """:func:`block` recomputed from a written summary (its ``probe_free.sweeps`` and ``guards``), or ``None``."""
    recorded = summary.get("probe_free") or {}
    if not recorded.get("sweeps"):
        return None
    sweeps = {arm: Sweep(s["knob"], tuple(s["values"]), s["weaker"]) for arm, s in recorded["sweeps"].items()}
    return block(summary, sweeps, verdicts.guards_from(summary.get("guards") or []))


def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:+.3f}"


def notes(probe_free: Mapping[str, Any]) -> list[str]:
    """The ``summary.md`` section of :func:`block`'s output (empty when no sweep ran)."""
    arms = probe_free.get("arms") or {}
    if not arms:
        why = probe_free.get("why_none")
        return ["", "## Probe-free operating point", "", f"None: {why}."] if why else []
    lines = ["", "## Probe-free operating point", "", f"Rule: {probe_free['rule']}", "",
             "| arm | knob: chosen per seed | transfer − control (90% CI) | task error × vanilla | drift | guards | "
             "verdict |", "|---|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        chosen = ", ".join(f"{a['chosen'][s]:g}{'' if a['within_budget'][s] else '*'}" for s in a["chosen"])
        tc = a["transfer_minus_control"]
        guards = "; ".join(f"{g['label']} {g['mean']:.3g}" + (f" ({g['problem']})" if g["problem"] else "")
                           + below_band(g, len(a["chosen"])) for g in a["guards"].values()) or "—"
        lines.append(f"| {arm} | {a['knob']}: {chosen} | {_fmt(tc['mean'])} [{_fmt(tc['ci90'][0])}, "
                     f"{_fmt(tc['ci90'][1])}] | ×{a['task_error_ratio']['mean']:.2f} | {a['drift']['mean']:.4g} | "
                     f"{guards} | {a['verdict']} |")
    ref = probe_free.get("reference_drift", {})
    diverged = [f"- {arm}: settings that diverged, by seed (the rule chose among the others there): "
                + "; ".join(f"{s}: {', '.join(f'{v:g}' for v in vs)}" for s, vs in a["diverged_settings"].items())
                for arm, a in arms.items() if a.get("diverged_settings")]
    lines += ["", *diverged] if diverged else []
    lines += ["", "(* = no swept setting within the task budget on that seed: the least task error was taken.) "
              "Off-task drift of the references: " + ", ".join(f"{n} {v['drift']['mean']:.4g}" for n, v in ref.items())
              + "."]
    return lines

