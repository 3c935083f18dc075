"""The aux-logit suite's blocks on top of the shared summary (:func:`purify.bench.lm_common.summarise`) and the notes
of its ``summary.md``: fraction removed, the teachers, the acceptance checks and the headline."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from purify.bench import probe_free, report
from purify.bench.report import timing_lines, verdict_notes
from purify.bench.stats import clearly_above_zero, fraction_removed, mean_ci
from purify.bench.verdicts import by_label

METRICS = ("transfer", "task_error", "fidelity_kl", "agreement", "accuracy", "drift")
"""The metrics averaged along vanilla's curve (``summary.json["frontier"]``)."""
COLUMNS = [("transfer", "transfer"), ("distance_to_control", "transfer − control"),
           ("task_error", "task error"), ("fidelity_loss", "task error ÷ vanilla's − 1"), ("fidelity_kl", "KL(T‖S)"),
           ("accuracy", "digit acc"), ("removed", "removed"), ("@gap", "gap to vanilla frontier"),
           ("@verdict", "verdict")]
SECTIONS = [("reference", "References"), ("bound", "Upper bound (knows the trait; not a purifier)"),
            ("purifier", "Purifiers (each alone, over a sweep of its main knob)"), ("combination", "Combination")]


def finish(summary: dict[str, Any]) -> dict[str, Any]:
    """Add the suite's own blocks to a shared summary: ``removed`` per trained condition, ``baselines`` (kind →
    name), ``bounds`` (empty without an oracle), ``acceptance`` and ``headline``; returns ``summary``. Every verdict
    in them is the shared one."""
    conds, settings = summary["conditions"], {c["name"]: c for c in summary["settings"]["conditions"]}
    summary.setdefault("bounds", {})
    summary["baselines"] = {c["kind"]: n for n, c in settings.items() if c["kind"] and c["student"] is None}
    names = summary["baselines"]
    if "vanilla" in names and "control" in names:
        tr = {n: [r["transfer"] for r in c["per_seed"]] for n, c in conds.items()}
        for n, c in conds.items():
            if settings[n]["teachers"]:
                c["removed"] = fraction_removed(tr[n], tr[names["vanilla"]], tr[names["control"]])
    summary["acceptance"] = _acceptance(summary)
    summary["headline"] = {"suite_valid": summary["acceptance"].get("vanilla_above_control", {}).get("passed"),
                           **by_label(summary["verdicts"])}  # arms grouped by the first words of their verdict
    return summary


def _acceptance(summary: dict[str, Any]) -> dict[str, Any]:
    conds = summary["conditions"]
    out: dict[str, Any] = {}
    if "vanilla" in conds and "control" in conds:
        diff = conds["vanilla"]["vs_control"]
        out["vanilla_above_control"] = {"difference": diff, "passed": clearly_above_zero(diff)}
    if summary["protocol"] == "paper":
        van = conds["vanilla"]["transfer"]
        out["same_init_transfer_at_least_0.3"] = {"transfer": van, "passed": bool(van["mean"] >= 0.3)}
        if "cross_init" in conds:
            acc, chance = conds["cross_init"]["accuracy"], summary["teachers"]["chance"]["mean"]
            out["cross_init_within_0.05_of_chance"] = {"accuracy": acc, "chance": chance,
                                                      "transfer": conds["cross_init"]["transfer"],
                                                      "passed": bool(abs(acc["mean"] - chance) <= 0.05)}
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
    lines.append(f"- Seeds {summary['seeds'][0]}–{summary['seeds'][-1]}. " + " ".join(timing_lines(summary)))
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
    if summary.get("frontier", {}).get("vanilla"):
        lines.append("- Where a condition's task error on a seed is lower than every point of that seed's vanilla "
                     "curve, its gap there is read at vanilla's final transfer (no early-stopping point has that "
                     f"fidelity): {', '.join(past_the_curve(summary)) or 'none here'}. Read their gap beside "
                     "**removed**.")
    if not paper:
        lines.append("- tail_truncation: **not applicable** — it sets the tail's target mass to 0 (log-prob −∞), which "
                     "an MSE loss on raw logits cannot compare with (recipes with loss.name: mse refuse it). It runs "
                     "in the paper protocol (KL loss).")
        for n, c in conds.items():
            acc = mean_ci([r["metric.adversary.disc_acc"] for r in c["per_seed"] if "metric.adversary.disc_acc" in r])
            if acc["n"] and _ok(acc["mean"]):
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


def past_the_curve(summary: dict[str, Any]) -> list[str]:
    """``"arm (k of n seeds)"`` for each judged arm whose task error on k seeds is below every point of that seed's
    curve of the vanilla it is judged against (there :func:`purify.bench.verdicts.segment` reads the final point)."""
    conds, against = summary["conditions"], summary.get("judged_against") or {}
    out = []
    for n in summary["verdicts"]:
        vanilla = {r["seed"]: r.get("curve") for r in conds[against.get(n, {}).get("vanilla", "vanilla")]["per_seed"]}
        k = sum(1 for r in conds[n]["per_seed"]
                if vanilla.get(r["seed"]) and r["task_error"] < min(p["task_error"] for p in vanilla[r["seed"]]))
        if k:
            out.append(f"{n} ({k} of {len(conds[n]['per_seed'])} seeds)")
    return out


def _brief(c: dict[str, Any], gap: dict[str, Any] | None = None) -> str:
    """One line of an arm's numbers; ``gap``: its entry of ``summary["frontier_gap"]`` (if judged)."""
    parts = [f"transfer {_pm(c['transfer'])}"]
    if "vs_control" in c:
        parts.append(f"minus control {_pm(c['vs_control'])}")
    if "removed" in c and _ok(c["removed"]["mean"]):
        parts.append(f"removed {c['removed']['mean']:.0%}")
    if "fidelity_loss" in c and _ok(c["fidelity_loss"]["mean"]):
        parts.append(f"task error ×{1 + c['fidelity_loss']['mean']:.2f}")
    if gap and _ok(gap.get("mean")):
        parts.append(f"gap {_pm(gap)}")
    return ", ".join(parts)


def headline_lines(summary: dict[str, Any]) -> list[str]:
    """The first lines of ``summary.md``: the acceptance checks, the bound, the arms by verdict with their numbers
    (:func:`purify.bench.report.headline_lines`) and the probe-free block."""
    conds, acc, gaps = summary["conditions"], summary["acceptance"], summary.get("frontier_gap") or {}
    lines = []
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
    lines += [f"- {n} (knows the trait; upper bound, not a purifier): {_brief(conds[n], gaps.get(n))} → {verdict}"
              for n, verdict in summary.get("bounds", {}).items()]
    pf = probe_free.notes(summary.get("probe_free") or {})
    if (summary.get("probe_free") or {}).get("arms"):
        pf += ["drift = KL(softmax θ₀ ‖ softmax S) of the undistilled class logits on 2048 held-out noise inputs "
               "(no digit, no label); task error as in the table below. Selection inputs per seed and point are in "
               "summary.json['probe_free']['arms'][arm]['selection_inputs']."]
    return [*report.headline_lines(summary, lines, lambda n: _brief(conds[n], gaps.get(n)))[:-1], *pf, ""]
