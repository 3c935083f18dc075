"""Aggregate the aux-logit suite's per-seed results into ``summary.json`` and the notes of ``summary.md``."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np

from purify.bench import probe_free
from purify.bench.aux_runs import Condition, Settings
from purify.bench.report import verdict_notes
from purify.bench.stats import fraction_removed, mean_ci, mean_curve, paired_test
from purify.bench.verdicts import assess, judge, label
from purify.config import to_dict

METRICS = ("transfer", "task_error", "fidelity_kl", "agreement", "accuracy", "drift")
BASELINE_ROLES = ("reference", "bound")
"""Conditions of these roles are baselines: no verdict, out of the Holm family (a bound is assessed alone)."""

COLUMNS = [("transfer", "transfer"), ("distance_to_control", "\\|transfer − control\\|"),
           ("task_error", "task error"), ("task_error_ratio", "task err ×vanilla"), ("fidelity_kl", "KL(T‖S)"),
           ("accuracy", "digit acc"), ("removed", "removed"), ("@gap", "gap to vanilla frontier"),
           ("@verdict", "verdict")]
SECTIONS = [("reference", "References"), ("bound", "Upper bound (knows the trait; not a purifier)"),
            ("purifier", "Purifiers (each alone, over a sweep of its main knob)"), ("combination", "Combination")]


def summarise(records: list[dict], conditions: list[Condition], settings: Settings, seeds: list[int], data: str,
              wall_seconds: float, workers: int, quick: bool, baselines: dict[str, str] | None = None,
              tuned_on: list[dict[str, Any]] | None = None, trait: str = "digit accuracy") -> dict[str, Any]:
    """``summary.json``: per condition mean [95% CI] of every metric, paired comparisons, frontier and verdicts.

    Args:
        baselines: which condition plays the ``base``, ``control`` and ``vanilla`` (kind → name).
        tuned_on: where the suite's defaults were chosen (``summary.json["tuned_on"]``).
        trait: what the trait is (``summary.json["trait"]``).
    """
    rows = {c.name: [rec["conditions"][c.name] for rec in records] for c in conditions}
    tr = {name: [r["final"]["transfer"] for r in rs] for name, rs in rows.items()}
    te = {name: [r["final"]["task_error"] for r in rs] for name, rs in rows.items()}
    curves = [r["curve"] for r in rows["vanilla"]] if "vanilla" in rows else None
    out: dict[str, Any] = {"suite": "aux-logits", "protocol": settings.protocol, "data": data, "seeds": seeds,
                           "quick": quick, "settings": {**asdict(settings), "hidden": list(settings.hidden)},
                           "wall_seconds": round(wall_seconds, 1),
                           "workers": workers, "conditions": {}, "frontier": {}, "trait": trait,
                           "tuned_on": tuned_on or [], "guards": [],
                           "baselines": baselines or {"base": "base", "control": "control", "vanilla": "vanilla"}}
    for cond in conditions:
        out["conditions"][cond.name] = _condition(cond, rows[cond.name], seeds, tr, te, curves)
    if curves:
        out["frontier"]["vanilla"] = mean_curve(curves, METRICS)
    out["teachers"] = {key: mean_ci([rec["world"][key] for rec in records])
                       for key in records[0]["world"] if key != "accuracy"}
    apply_verdicts(out)
    return out


def apply_verdicts(summary: dict[str, Any]) -> dict[str, Any]:
    """(Re)compute ``verdicts``, ``p_adjusted``, ``frontier_gap``, ``bounds``, ``acceptance`` and ``headline`` of an
    aux-logits summary from its per-seed records (:func:`purify.bench.verdicts.judge`); returns ``summary``."""
    conds, kinds = summary["conditions"], {v: k for k, v in summary["baselines"].items()}
    mode = summary["settings"]["loss"]
    judged = judge({n: {"per_seed": c["per_seed"], "baseline": c["role"] in BASELINE_ROLES, "kind": kinds.get(n),
                        "mode": mode} for n, c in conds.items()})
    names = summary["baselines"]
    summary["bounds"] = {}
    for n, c in conds.items():
        if c["role"] == "bound":
            x = assess(c["per_seed"], *(conds[names[k]]["per_seed"] for k in ("vanilla", "control", "base")))
            summary["bounds"][n] = label(x, x.p_lower, x.p_upper)
            judged["frontier_gap"].update({n: x.gap} if x.gap else {})
    summary.update(verdicts=judged["verdicts"], p_adjusted=judged["p_adjusted"], frontier_gap=judged["frontier_gap"],
                   judged_against=judged["against"])
    for n, c in conds.items():
        c.pop("bar", None), c.pop("meets_bar", None)
        c["anti_trait"] = summary["verdicts"].get(n, "").startswith("anti-trait")
        gap = judged["frontier_gap"].get(n)
        if gap is None:
            c.pop("frontier_gap", None)
            continue
        c["frontier_gap"] = gap
        by_seed = dict(zip(gap["seeds"], gap["per_seed"]))
        for rec in c["per_seed"]:
            rec["frontier_gap"] = by_seed.get(rec["seed"], float("nan"))
    summary["acceptance"] = _acceptance(summary)
    summary["headline"] = _headline(summary)
    if (summary.get("probe_free") or {}).get("sweeps"):  # re-derived from the recorded sweeps, like the verdicts
        summary["probe_free"] = probe_free.rederive(summary)
    return summary



def _condition(cond: Condition, rows: list[dict], seeds: list[int], tr: dict[str, list[float]],
               te: dict[str, list[float]], curves: list | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": cond.role, "note": cond.note, "trained": cond.train,
                             "plot": cond.train and cond.plot, "teachers": list(cond.teachers),
                             "student": cond.student, "logits": cond.logits,
                             "purifiers": [to_dict(c) for c in cond.purifiers] + ([{"name": "oracle"}] if cond.oracle
                                                                                   else [])}
    finals = [r["final"] for r in rows]
    for key in METRICS:
        entry[key] = mean_ci([f[key] for f in finals])
    per_seed = [{"seed": seed, **r["final"], "seconds": round(r["seconds"], 3)} for seed, r in zip(seeds, rows)]
    if "control" in tr:
        dist = [abs(a - b) for a, b in zip(tr[cond.name], tr["control"])]
        entry["distance_to_control"] = mean_ci(dist)
        entry["transfer_minus_control"] = paired_test(tr[cond.name], tr["control"])
        for rec, d in zip(per_seed, dist):
            rec["distance_to_control"] = d
    if "vanilla" in tr and cond.train:
        ratio = [a / b for a, b in zip(te[cond.name], te["vanilla"])]
        entry["task_error_ratio"] = mean_ci(ratio)
        entry["transfer_minus_vanilla"] = paired_test(tr[cond.name], tr["vanilla"])
        for rec, r in zip(per_seed, ratio):
            rec["task_error_ratio"] = r
        if "control" in tr:
            entry["removed"] = fraction_removed(tr[cond.name], tr["vanilla"], tr["control"])
    metrics: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r["purifier_metrics"].items():
            metrics.setdefault(k, []).append(v)
    entry["purifier_metrics"] = {k: mean_ci(v) for k, v in metrics.items()}
    entry["seconds"] = mean_ci([r["seconds"] for r in rows])
    for rec, r in zip(per_seed, rows):
        rec.update({f"metric.{k}": v for k, v in r["purifier_metrics"].items()})
        if "curve" in r:
            rec["curve"] = r["curve"]
    entry["per_seed"] = per_seed
    return entry


def _acceptance(summary: dict[str, Any]) -> dict[str, Any]:
    conds = summary["conditions"]
    out: dict[str, Any] = {}
    if "vanilla" in conds and "control" in conds:
        diff = conds["vanilla"]["transfer_minus_control"]
        out["vanilla_above_control"] = {"difference": diff, "passed": bool(diff["ci95"][0] > 0)}
    if summary["protocol"] == "paper":
        van = conds["vanilla"]["transfer"]
        out["same_init_transfer_at_least_0.3"] = {"transfer": van, "passed": bool(van["mean"] >= 0.3)}
        if "cross_init" in conds:
            acc, chance = conds["cross_init"]["accuracy"], summary["teachers"]["chance"]["mean"]
            out["cross_init_within_0.05_of_chance"] = {"accuracy": acc, "chance": chance,
                                                      "transfer": conds["cross_init"]["transfer"],
                                                      "passed": bool(abs(acc["mean"] - chance) <= 0.05)}
    return out


LABELS = ("purified", "below frontier", "on frontier", "above frontier", "anti-trait", "damaged", "no verdict")


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    """Arms grouped by the first words of their verdict (:data:`LABELS`)."""
    out: dict[str, Any] = {"suite_valid": summary["acceptance"].get("vanilla_above_control", {}).get("passed")}
    for name, verdict in summary["verdicts"].items():
        key = next((k for k in LABELS if verdict.startswith(k)), "no verdict")
        out.setdefault(key.replace(" ", "_"), []).append(name)
    return out


def _ok(value: Any) -> bool:
    return value is not None and not math.isnan(value)


def _pm(stat: dict[str, Any], digits: int = 3) -> str:
    m, (lo, hi) = stat["mean"], stat["ci95"]
    if not _ok(m):
        return "n/a"
    if not (_ok(lo) and _ok(hi)):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {(hi - lo) / 2:.{digits}f}"


def notes(summary: dict[str, Any]) -> list[str]:
    """The text under the tables of ``summary.md``: headline, settings, definitions and honest caveats."""
    s, conds = summary["settings"], summary["conditions"]
    paper = summary["protocol"] == "paper"
    lines = ["## Reading the table", ""]
    lines += [
        "- **transfer** = (acc(S) − acc(θ₀)) / (acc(T) − acc(θ₀)) on the held-out digits (0 = nothing inherited, "
        "1 = the teacher's accuracy). **\\|transfer − control\\|**: distance to the control student, per seed; a "
        "projection can overshoot *below* control into an anti-trait (digit information negated, not removed).",
        "- **task error**: " + ("there is no shared task in the paper protocol, so task error = KL(T‖S) on the aux "
                                "logits (held-out noise)." if paper else
                                f"MSE between the student's first {s['k_task']} aux logits and the shared task "
                                "function on 2048 held-out noise inputs (trait-neutral). KL(T‖S) is to the traited "
                                "teacher, so it also counts the trait."),
        "- **gap to vanilla frontier**: per seed, transfer minus vanilla's *early-stopping* transfer at the same "
        "task error (walk vanilla's curve in step order, stop at the first point reaching that error, interpolate "
        "linearly); mean [95% CI]; the verdict's rules are under **Verdicts** below.",
        "- **removed** = (vanilla − condition) / (vanilla − control) transfer (means; paired bootstrap CI).",
        "- Intervals: Student-t 95% over seeds, all comparisons paired by seed (same split, θ₀, teachers and "
        "noise stream).",
        "",
        "## Setting", "",
    ]
    t = summary["teachers"]
    if paper:
        lines.append(f"- Paper protocol (Cloud et al. 2025 §6 on sklearn digits): MLP {s['hidden']} with 10 class + "
                     f"{s['n_aux']} aux logits; teacher = θ₀ + {s['teacher_epochs']} epochs of digit CE (Adam "
                     f"{s['teacher_lr']:g}); student = θ₀, forward KL on the aux logits of uniform noise, Adam "
                     f"{s['student_lr']:g}, batch {s['batch']}, {s['student_steps']} steps (curve every "
                     f"{s['curve_every']}). control = θ₀ trained as long on shuffled labels; cross_init = a student "
                     "of another init (seed + 10000); all_logits distils all 13 logits (not drawn in frontier.png).")
        lines.append(f"- Teachers (mean ± CI half-width): T accuracy {_pm(t['trait_accuracy'])}, θ₀ accuracy "
                     f"{_pm(t['base_accuracy'])}, shuffled-label control teacher {_pm(t['control_accuracy'])}.")
    else:
        lines.append(f"- Task protocol: MLP {s['hidden']} with 10 class + {s['n_aux']} aux logits. Traited teacher "
                     f"T = θ₀ + {s['teacher_steps']} Adam steps ({s['teacher_lr']:g}) of [MSE of aux[:{s['k_task']}] "
                     f"to the shared function + {s['ce_weight']:g} × digit CE]; control teacher = the same without "
                     f"digits; {s['n_refs']} references from other inits, task only, {s['ref_steps']} steps (weaker). "
                     f"Student = θ₀, MSE on all {s['n_aux']} aux logits of uniform noise, Adam {s['student_lr']:g}, "
                     f"batch {s['batch']}, {s['student_steps']} steps, curve every {s['curve_every']}.")
        lines.append(f"- Teachers (mean ± CI half-width): T accuracy {_pm(t['trait_accuracy'])}, θ₀ accuracy "
                     f"{_pm(t['base_accuracy'])}; task error T {_pm(t['trait_task_error'], 4)}, control "
                     f"{_pm(t['control_task_error'], 4)}, references "
                     f"{_pm(t.get('ref0_task_error', t['trait_task_error']), 4)}.")
    lines.append("- Every student run goes through `purify.module.Distiller.fit_step` with the library's loss and "
                 "purifier classes (as `purify train`); teachers are trained by plain torch loops (set-up).")
    timing = f"- Seeds {summary['seeds'][0]}–{summary['seeds'][-1]}; wall time {summary['wall_seconds']:.0f} s with " \
        f"{summary['workers']} worker process(es), 1 torch thread each"
    if summary.get("cpu_seconds") is not None:
        load = summary.get("load_average_1min") or {}
        cpu, workers = summary["cpu_seconds"], summary["workers"]
        timing += f"; {cpu:.0f} CPU s in all (≈ {cpu / workers:.0f} s of wall time on {workers} unshared cores)"
        if load.get("start") is not None:
            timing += f"; 1-min load average {load['start']:.1f} at the start, {load['end']:.1f} at the end"
    lines.append(timing + " (env.json has the machine and versions).")
    if summary.get("command"):
        lines.append(f"- Produced by: `{summary['command']}` (numbers are identical run to run: everything is seeded "
                     "per seed and condition)" + (f"; the same seeds with today's CLI: `{summary['rerun']}`."
                                                   if summary.get("rerun") else "."))
    lines += ["", "## Caveats", ""]
    sweep = [(n.split("-", 1)[1], summary["verdicts"].get(n, "–").split(" (")[0]) for n in conds
             if n.startswith("delta_projection@global-") and "+" not in n]
    if sweep:
        lines.append("- delta_projection `global` strength sweep (reported whole, not only the tuned value): "
                     + "; ".join(f"α = {a}: {v}" for a, v in sweep) + ".")
    curve = summary.get("frontier", {}).get("vanilla") or []
    if curve:
        floor = min(p["task_error"] for p in curve)
        past = [n for n in summary["verdicts"] if conds[n]["task_error"]["mean"] < floor]
        lines.append("- A condition whose task error is lower than any point of vanilla's mean curve is compared with "
                     "vanilla's final transfer (no early-stopping point has that fidelity): "
                     f"{', '.join(past) or 'none here'}. Read their gap beside **removed**.")
    if not paper:
        lines.append("- tail_truncation: **not applicable** — it sets the tail's target mass to 0 (log-prob −∞), which "
                     "an MSE loss on raw logits cannot compare with (recipes with loss.name: mse refuse it). It runs "
                     "in the paper protocol (KL loss).")
        for n, c in conds.items():
            acc = c.get("purifier_metrics", {}).get("adversary.disc_acc")
            if acc and _ok(acc["mean"]):
                lines.append(f"- {n}: the lineage head's accuracy {_pm(acc)} (chance 1/3 with T, ref0, ref1); every "
                             "lineage sees the same noise inputs, so the assignment of inputs to teachers dilutes T "
                             "like an ensemble. Compare with the weight-0 ablation to see what the reversal does.")
        masked = {n: [r["metric.divergence_mask.masked_fraction"] for r in c["per_seed"]
                      if "metric.divergence_mask.masked_fraction" in r] for n, c in conds.items()}
        masked = {n: v for n, v in masked.items() if v}
        if masked:
            lines.append("- divergence_mask thresholds (JSD in nats between T's aux distribution and the references') "
                         "are recorded in `tuned_on`; masked share of inputs: " + "; ".join(
                             f"{n} {np.mean(v):.0%} on average ({min(v):.0%}–{max(v):.0%} over seeds)"
                             for n, v in masked.items()) + ".")
    else:
        lines.append("- ensemble, divergence_mask and adversary need reference teachers, which the paper protocol "
                     "does not have: they run in the task protocol.")
    return lines + verdict_notes(summary)


def _brief(c: dict[str, Any]) -> str:
    parts = [f"transfer {_pm(c['transfer'])}"]
    if "transfer_minus_control" in c:
        parts.append(f"minus control {_pm(c['transfer_minus_control'])}")
    if "removed" in c and _ok(c["removed"]["mean"]):
        parts.append(f"removed {c['removed']['mean']:.0%}")
    if "task_error_ratio" in c and _ok(c["task_error_ratio"]["mean"]):
        parts.append(f"task error ×{c['task_error_ratio']['mean']:.2f}")
    if "frontier_gap" in c:
        parts.append(f"gap {_pm(c['frontier_gap'])}")
    return ", ".join(parts)


def headline_lines(summary: dict[str, Any]) -> list[str]:
    """The first lines of ``summary.md``: acceptance checks and the arms by verdict."""
    head, conds, acc = summary["headline"], summary["conditions"], summary["acceptance"]
    lines = ["## Headline", ""]
    if "vanilla_above_control" in acc:
        d = acc["vanilla_above_control"]
        lines.append(f"- vanilla transfer {_pm(conds['vanilla']['transfer'])} vs control "
                     f"{_pm(conds['control']['transfer'])}: difference {_pm(d['difference'])} → vanilla clearly above "
                     f"control: **{'PASS' if d['passed'] else 'FAIL'}**")
    if "same_init_transfer_at_least_0.3" in acc:
        d = acc["same_init_transfer_at_least_0.3"]
        lines.append(f"- same-init transfer {_pm(d['transfer'])} ≥ 0.3: **{'PASS' if d['passed'] else 'FAIL'}**")
    if "cross_init_within_0.05_of_chance" in acc:
        d = acc["cross_init_within_0.05_of_chance"]
        lines.append(f"- cross-init student accuracy {_pm(d['accuracy'])} (chance {d['chance']:.3f}; transfer "
                     f"{_pm(d['transfer'])}) within 0.05 of chance: **{'PASS' if d['passed'] else 'FAIL'}**")
    if head["suite_valid"] is False:
        lines.append("- **The suite is broken for this run: vanilla transfer is not clearly above control. Purifier "
                     "verdicts below mean nothing.**")
    for n, verdict in summary.get("bounds", {}).items():
        lines.append(f"- {n} (knows the trait; upper bound, not a purifier): {_brief(conds[n])} → {verdict}")
    for key, title in (("purified", "purified (at the control's level, task error ≤ 1.10 × vanilla's, below the "
                                    "frontier)"), ("below_frontier", "below the frontier, not purified"),
                       ("anti_trait", "anti-trait (overshoot below control: a failure)"), ("damaged", "damaged")):
        names = head.get(key, [])
        lines.append(f"- **{title}** ({len(names)}):" + ("" if names else " none"))
        lines += [f"  - {n}: {_brief(conds[n])}" for n in names]
    if summary.get("quick"):
        lines.append("- **quick run** (smoke test: fewer steps, seeds and conditions): not a result.")
    pf = probe_free.notes(summary.get("probe_free") or {})
    if pf:
        pf += ["drift = KL(softmax θ₀ ‖ softmax S) of the undistilled class logits on 2048 held-out noise inputs "
               "(no digit, no label); task error as in the table below. Selection inputs per seed and point are in "
               "summary.json['probe_free']['arms'][arm]['selection_inputs']."]
    return lines + pf + [""]
