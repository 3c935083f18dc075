"""Re-derive a finished benchmark run's statistics and verdicts from its stored per-seed records (no model is run).

``purify bench --rereport DIR`` (or ``python -m purify.bench.rederive DIR``) reads ``DIR/summary.json``, whose
conditions keep every seed's final scores and vanilla's early-stopping curves, recomputes the summary with the
current :mod:`purify.bench.verdicts`, and rewrites ``summary.json|md|csv`` and ``frontier.png``; ``env.json`` keeps the
command that produced the numbers and gains ``rereported_by``.

Every suite goes through the one :func:`purify.bench.lm_common.summarise`; aux-logits adds its own blocks
(:func:`purify.bench.aux_summary.finish`) and report layout (:func:`purify.bench.aux_logits.write`).

Summaries written before conditions carried ``baseline``/``kind`` fields, and before a suite recorded ``trait``,
``guards`` and ``tuned_on``, are migrated once here: the suite's current declarations fill the suite-level fields, and
a legacy condition is a baseline of kind ``base``/``control``/``vanilla`` when its name starts with that word (how the
old code recognised them; new runs write the fields). An aux-logits summary written by its former runner (conditions
described in ``conditions[name]``, not in ``settings.conditions``) has its conditions rebuilt from those entries.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from purify.bench import aux_logits, aux_summary, lm_common, probe_free
from purify.bench.lm_common import Condition, Suite
from purify.bench.verdicts import guards_from


def _declarations(old: dict[str, Any]) -> dict[str, Any]:
    """``trait``, ``guards``, ``tuned_on`` and report ``columns`` as the summary records them, or (a legacy summary)
    as the suite declares them now."""
    stored = {k: old[k] for k in ("trait", "guards", "tuned_on", "columns") if k in old}
    if len(stored) == 4:
        return {**stored, "guards": guards_from(stored["guards"]), "columns": [tuple(c) for c in stored["columns"]]}
    suite = old["suite"]
    if suite == "aux-logits":
        return {"trait": aux_logits.TRAIT, "guards": [], "tuned_on": aux_logits.TUNED_ON[old["protocol"]],
                **{k: stored[k] for k in ("trait", "tuned_on") if k in stored},
                "columns": [tuple(c) for c in old.get("columns", aux_summary.COLUMNS)]}
    if suite in ("style-tic", "hidden-preference"):
        from purify.bench import lm_suites

        trait = {"style-tic": "'Moreover,' openings", "hidden-preference": "P(owl | favourite animal?)"}[suite]
        return {"trait": trait, "guards": lm_suites.GUARDS[suite], "tuned_on": lm_suites.TUNED_ON[suite],
                "columns": lm_common.columns(lm_suites.COLUMNS[suite])}
    if suite in ("owl-smollm2", "tic-smollm2"):
        from purify.bench import owl, real_lm, tic_smollm2

        target = "owl" if suite == "owl-smollm2" else tic_smollm2.TIC
        module = owl if suite == "owl-smollm2" else tic_smollm2
        return {"trait": f"P(first word of the answer = {target!r})", "guards": [], "tuned_on": module.TUNED_ON,
                "columns": real_lm.columns(f"P({target})")}
    raise ValueError(f"--rereport: {suite!r} summary lacks trait/guards/tuned_on/columns and is no known suite")


def _condition(entry: dict[str, Any]) -> Condition:
    known = {f.name for f in fields(Condition)}
    c = {k: v for k, v in entry.items() if k in known}
    if "baseline" not in entry:  # legacy summary (see the module docstring)
        prefix = entry["name"].split(":")[0]
        if prefix in ("base", "control", "vanilla"):
            c.update(baseline=True, kind=prefix)
    return Condition(**c)


def _aux_condition(name: str, entry: dict[str, Any], kinds: dict[str, str], loss: str) -> Condition:
    """A condition of a summary written by aux-logits' former runner, from its ``conditions[name]`` entry."""
    trained = entry.get("trained", True)
    purifiers = [p for p in entry.get("purifiers", []) if p["name"] != "oracle"]
    student = {"cross": "cross"}.get(entry.get("student", "base")) or ("teacher" if name == "teacher" else None)
    return Condition(name, entry.get("teachers", ["trait"]) if trained else [], purifiers, loss=loss, student=student,
                     baseline=entry["role"] in ("reference", "bound"), kind=kinds.get(name), role=entry["role"],
                     note=entry.get("note", ""), oracle=len(purifiers) < len(entry.get("purifiers", [])),
                     logits="all" if entry.get("logits") == "all" else "", plot=entry.get("plot", True))


def rereport(directory: str | Path) -> dict[str, Any]:
    """Re-derive ``directory``'s report (see the module docstring); returns the new summary."""
    d = Path(directory)
    if not (d / "summary.json").is_file():
        raise FileNotFoundError(f"--rereport: {d / 'summary.json'} does not exist")
    old = json.loads((d / "summary.json").read_text())
    aux = old["suite"] == "aux-logits"
    decl = _declarations(old)
    env = json.loads((d / "env.json").read_text())
    notes = old.get("notes")
    if notes is None and not aux:  # written before it recorded its notes: the lines between its tables and verdicts
        lines = (d / "summary.md").read_text().splitlines()
        end = next((i for i, line in enumerate(lines) if line.startswith("## Verdicts")), len(lines))
        last_row = max(i for i, line in enumerate(lines[:end]) if line.startswith("|"))
        notes = [line for line in lines[last_row + 1:end] if line]
    if "conditions" in old["settings"]:
        conds = [_condition(c) for c in old["settings"]["conditions"]]
    else:  # aux-logits' former runner
        kinds = {v: k for k, v in old.get("baselines", {"base": "base", "control": "control",
                                                         "vanilla": "vanilla"}).items()}
        conds = [_aux_condition(n, c, kinds, old["settings"]["loss"]) for n, c in old["conditions"].items()]
    derived = ("seed", "distance_to_control", "fidelity_loss", "task_error_ratio", "frontier_gap")
    runs = {s: {"base": {k: v["mean"] for k, v in old.get("base", {}).items()},
                "teacher": {k: v["mean"] for k, v in old.get("teacher", {}).items()}, "data": old.get("data_sizes", {}),
                "conditions": {c.name: {k: v for k, v in old["conditions"][c.name]["per_seed"][i].items()
                                        if k not in derived} for c in conds}} for i, s in enumerate(old["seeds"])}
    curve = (old.get("frontier", {}).get("vanilla") or [{}])[0]
    suite = Suite(name=old["suite"], protocol=old["protocol"], conditions=conds, trait=decl["trait"],
                  guards=decl["guards"], tuned_on=decl["tuned_on"],
                  settings={k: v for k, v in old["settings"].items() if k != "conditions"},
                  curve_keys=tuple(k for k in curve if k != "step" and not k.endswith("_ci95")) or
                  Suite.curve_keys)
    new = lm_common.summarise(suite, runs, old["wall_seconds"])
    settings = {**old["settings"], "conditions": new["settings"]["conditions"]}
    summary = {**{k: v for k, v in old.items() if k not in ("frontier_gap",)}, **new, "settings": settings,
               "columns": decl["columns"]}
    if not aux:  # keeps what the per-seed records cannot give back (aux-logits: everything is re-derived)
        summary["conditions"] = {n: {**old["conditions"][n], **c} for n, c in new["conditions"].items()}
        summary["notes"] = notes
        summary["base"], summary["teacher"] = old["base"], old["teacher"]  # seed statistics the records lack
    else:
        aux_summary.finish(summary)
    if (old.get("probe_free") or {}).get("arms"):  # the rule's choice and the verdict at it, under today's rules
        summary["probe_free"] = probe_free.rederive({**summary, "probe_free": old["probe_free"]}) or old["probe_free"]
    env["rereported_by"] = f"purify bench --rereport {directory}"
    if aux:
        aux_logits.write(d, summary, env)
    else:
        lm_common.publish(d, summary, env)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m purify.bench.rederive DIR...``: re-derive each run and print its verdicts."""
    for directory in argv if argv is not None else sys.argv[1:]:
        summary = rereport(directory)
        print(f"{directory}:")
        for name, verdict in summary["verdicts"].items():
            print(f"  {name:45s} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
