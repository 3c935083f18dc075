"""Aggregate the aux-logit suite's per-seed results into ``summary.json`` and the notes of ``summary.md``."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from purify.bench.aux_runs import Condition, Settings
from purify.bench.stats import BELOW, fraction_removed, frontier_gap, mean_ci, mean_curve, paired_test
from purify.config import to_dict

METRICS = ("transfer", "task_error", "fidelity_kl", "agreement", "accuracy")
BAR_REMOVED, BAR_ERROR = 0.90, 1.10
"""The bar: remove ≥ 90% of vanilla's transfer above control at ≤ 1.10 × vanilla's task error. Overshooting into an
anti-trait (transfer − control CI entirely below 0) is flagged beside it, not hidden in it."""

COLUMNS = [("transfer", "transfer"), ("distance_to_control", "\\|transfer − control\\|"),
           ("task_error", "task error"), ("task_error_ratio", "task err ×vanilla"), ("fidelity_kl", "KL(T‖S)"),
           ("accuracy", "digit acc"), ("removed", "removed"), ("@gap", "gap to vanilla frontier"),
           ("@verdict", "verdict"), ("bar", "bar")]
SECTIONS = [("reference", "References"), ("bound", "Upper bound (knows the trait; not a purifier)"),
            ("purifier", "Purifiers (each alone, over a sweep of its main knob)"), ("combination", "Combination")]


def summarise(records: list[dict], conditions: list[Condition], settings: Settings, seeds: list[int], data: str,
              wall_seconds: float, workers: int, quick: bool) -> dict[str, Any]:
    """``summary.json``: per condition mean [95% CI] of every metric, paired comparisons, frontier and verdicts."""
    rows = {c.name: [rec["conditions"][c.name] for rec in records] for c in conditions}
    tr = {name: [r["final"]["transfer"] for r in rs] for name, rs in rows.items()}
    te = {name: [r["final"]["task_error"] for r in rs] for name, rs in rows.items()}
    curves = [r["curve"] for r in rows["vanilla"]] if "vanilla" in rows else None
    out: dict[str, Any] = {"suite": "aux-logits", "protocol": settings.protocol, "data": data, "seeds": seeds,
                           "quick": quick, "settings": {**asdict(settings), "hidden": list(settings.hidden)},
                           "wall_seconds": round(wall_seconds, 1),
                           "workers": workers, "conditions": {}, "frontier": {}, "frontier_gap": {}, "verdicts": {}}
    for cond in conditions:
        out["conditions"][cond.name] = _condition(cond, rows[cond.name], seeds, tr, te, curves)
        gap = out["conditions"][cond.name].get("frontier_gap")
        if gap is not None:
            out["frontier_gap"][cond.name] = gap
            if cond.role != "reference":  # references (control, vanilla, ...) define the scale, they get no verdict
                out["verdicts"][cond.name] = gap["verdict"]
    if curves:
        out["frontier"]["vanilla"] = mean_curve(curves, METRICS)
    out["teachers"] = {key: mean_ci([rec["world"][key] for rec in records])
                       for key in records[0]["world"] if key != "accuracy"}
    out["acceptance"] = _acceptance(out, settings)
    out["headline"] = _headline(out)
    return out


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
        entry["anti_trait"] = entry["transfer_minus_control"]["ci95"][1] < 0
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
            ok = _ok(entry["removed"]["mean"]) and entry["removed"]["mean"] >= BAR_REMOVED \
                and entry["task_error_ratio"]["mean"] <= BAR_ERROR
            entry["meets_bar"] = bool(ok)
            if cond.role != "reference":
                entry["bar"] = ("meets" if ok else "no") + (", anti-trait" if entry["anti_trait"] else "")
    if curves is not None and cond.train:
        gap = frontier_gap(curves, finals, "task_error", "transfer")
        entry["frontier_gap"] = gap
        for rec, g in zip(per_seed, gap["per_seed"]):
            rec["frontier_gap"] = g
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


def _acceptance(summary: dict[str, Any], s: Settings) -> dict[str, Any]:
    conds = summary["conditions"]
    out: dict[str, Any] = {}
    if "vanilla" in conds and "control" in conds:
        diff = conds["vanilla"]["transfer_minus_control"]
        out["vanilla_above_control"] = {"difference": diff, "passed": bool(diff["ci95"][0] > 0)}
    if s.protocol == "paper":
        van = conds["vanilla"]["transfer"]
        out["same_init_transfer_at_least_0.3"] = {"transfer": van, "passed": bool(van["mean"] >= 0.3)}
        if "cross_init" in conds:
            acc, chance = conds["cross_init"]["accuracy"], summary["teachers"]["chance"]["mean"]
            out["cross_init_within_0.05_of_chance"] = {"accuracy": acc, "chance": chance,
                                                      "transfer": conds["cross_init"]["transfer"],
                                                      "passed": bool(abs(acc["mean"] - chance) <= 0.05)}
    return out


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    conds = summary["conditions"]
    candidates = [n for n, c in conds.items() if c["role"] in ("purifier", "combination")]
    return {
        "suite_valid": summary["acceptance"].get("vanilla_above_control", {}).get("passed"),
        "below_frontier": [n for n in candidates if summary["verdicts"].get(n) == BELOW],
        "meets_bar": [n for n in candidates if conds[n].get("meets_bar") and not conds[n].get("anti_trait")],
        "meets_bar_with_anti_trait": [n for n in candidates
                                      if conds[n].get("meets_bar") and conds[n].get("anti_trait")],
        "anti_trait": [n for n in candidates if conds[n].get("anti_trait")],
    }


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
        "linearly); mean [95% CI]. **below frontier** = the CI is entirely below 0. Where task error plateaus while "
        "transfer keeps rising, vanilla's own final point sits above its frontier"
        + (f" (here {_pm(conds['vanilla']['frontier_gap'])})." if "frontier_gap" in conds.get("vanilla", {}) else "."),
        f"- **removed** = (vanilla − condition) / (vanilla − control) transfer (means; paired bootstrap CI). **bar**: "
        f"removed ≥ {BAR_REMOVED:.0%} at task error ≤ {BAR_ERROR:.2f} × vanilla's (means); **anti-trait** is flagged "
        "beside it when the CI of transfer − control lies entirely below 0 (overshoot: the purifier negated the "
        "trait rather than removing it).",
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
        lines.append(f"- Reproduce: `{summary['command']}` (numbers are identical run to run: everything is seeded "
                     "per seed and condition).")
    lines += ["", "## Caveats", ""]
    if any(n.startswith("delta_projection@global") for n in conds):
        first, last = summary["seeds"][0], summary["seeds"][-1]
        held = "seeds 10–19 were looked at once, to confirm α = 0.3, and not used for tuning after that" \
            if first <= 19 and last >= 10 else "these seeds were never looked at during tuning"
        lines.append("- **Tuned on the trait:** delta_projection `global` strength α = 0.3 was chosen by looking at "
                     "the trait on seeds 0–9 of the task protocol (scratch research, `scratch/aux/FINDINGS.md`), and "
                     f"the combination ({', '.join(n for n in conds if '+' in n) or 'none here'}) was chosen on "
                     "seeds 0–9 among 4 (α, w) pairs as the one closest to control without an anti-trait. This run "
                     f"uses seeds {first}–{last}; {held}. The α sweep is reported, not only the best value: α = 0.2 "
                     "leaves some transfer, α ≥ 0.5 overshoots into an anti-trait. A value tuned on a probe is not "
                     "trait-agnostic in spirit: on a new task α has to be set without the probe.")
    lines.append("- A condition whose task error is lower than any point vanilla reaches is compared with vanilla's "
                 "final transfer (no early-stopping point has that fidelity); ensembles with the references land "
                 "there, since averaging improves the shared task. Read their gap beside **removed**.")
    if not paper:
        lines.append("- tail_truncation: **not applicable** — it sets the tail's target mass to 0 (log-prob −∞), which "
                     "an MSE loss on raw logits cannot compare with (recipes with loss.name: mse refuse it). It runs "
                     "in the paper protocol (KL loss).")
        if any(n.startswith("adversary") for n in conds):
            lines.append("- adversary: every lineage sees the same noise inputs, so a head on the student's features "
                         "has no lineage to read (its accuracy stays at chance, see purifier metrics in "
                         "summary.json); with target: lineage each input is assigned one of T, ref0, ref1, which "
                         "dilutes T like an ensemble. Compare weight 0.1 with the weight-0 ablation to see what the "
                         "reversal itself does.")
        lines.append("- divergence_mask thresholds (JSD in nats between T's aux distribution and the references') "
                     "were set from that divergence's distribution on seeds 0–9, not from the trait: 0.0125 and 0.02 "
                     "mask about 55% and 20% of inputs on average, but the scale varies by seed (0–99% masked); the "
                     "masked fraction per seed is in summary.json / summary.csv.")
    else:
        lines.append("- ensemble, divergence_mask and adversary need reference teachers, which the paper protocol "
                     "does not have: they run in the task protocol.")
    return lines


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
    """The first lines of ``summary.md``: acceptance checks and which conditions beat the frontier or the bar."""
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
    if "oracle" in conds:
        lines.append(f"- oracle (knows the trait; upper bound): {_brief(conds['oracle'])}")
    below = head["below_frontier"]
    lines.append(f"- **below the frontier** ({len(below)}):" + ("" if below else " none"))
    lines += [f"  - {n}: {_brief(conds[n])}" for n in head["below_frontier"]]
    lines.append(f"- **meet the bar** (≥ {BAR_REMOVED:.0%} removed at ≤ {BAR_ERROR:.2f}× task error), no anti-trait: "
                 f"{', '.join(head['meets_bar']) or 'none'}")
    if head["meets_bar_with_anti_trait"]:
        lines.append(f"- meet the bar but overshoot into an anti-trait: {', '.join(head['meets_bar_with_anti_trait'])}")
    lines.append(f"- anti-trait (significantly below control): {', '.join(head['anti_trait']) or 'none'}")
    if summary.get("quick"):
        lines.append("- **quick run** (smoke test: fewer steps, seeds and conditions): not a result.")
    return lines + [""]
