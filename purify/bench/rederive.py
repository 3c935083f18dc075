"""Re-derive a finished benchmark run's statistics and verdicts from its stored per-seed records (no model is run).

``purify bench --rereport DIR`` reads ``DIR/summary.json``, whose conditions keep every seed's final scores and
vanilla's early-stopping curves, recomputes the summary with the current :mod:`purify.bench.verdicts`, and rewrites
``summary.json|md|csv`` and ``frontier.png``; ``env.json`` keeps the command that produced the numbers and gains
``rereported_by``.

Every suite goes through the one :func:`purify.bench.lm_common.summarise`; aux-logits adds its own blocks
(:func:`purify.bench.aux_summary.finish`) and report layout (:func:`purify.bench.aux_logits.write`).

A summary must carry what the run declared (``trait``, ``guards``, ``tuned_on``, ``columns``, each condition's
fields in ``settings.conditions`` and, but for aux-logits, its ``notes``): every committed summary does. One written
before those fields existed is refused with a message; re-run its command to renew it.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any

from purify.bench import aux_logits, aux_summary, lm_common, lm_suites, owl, probe_free, tic_smollm2
from purify.bench.lm_common import Condition, Suite
from purify.bench.report import BenchError
from purify.bench.verdicts import guards_from
from purify.types import first_line

FIELDS = {f.name for f in fields(Condition)}
REQUIRED = ("trait", "guards", "tuned_on", "columns")
"""What a summary must record to be re-derived (besides its per-seed records and ``settings.conditions``)."""
TUNED_TRAIT = {"aux-logits": aux_logits.TRAIT, **lm_suites.TUNED_TRAIT, "owl-smollm2": owl.TUNED_TRAIT,
               "tic-smollm2": tic_smollm2.TUNED_TRAIT}
"""The trait each suite's ``tuned_on`` choices looked at: a summary written before its records named it
(``looked_at``) gains it on re-derivation, and every summary takes the trait today's record of the same choice
(seeds and what) names — one shared by two suites names the suite it was made on —, else the suite's default."""
LOOKED_AT = {(tuple(e["seeds"]), e["what"]): e["looked_at"] for entries in (
    *aux_logits.TUNED_ON.values(), *lm_suites.TUNED_ON.values(), owl.TUNED_ON, tic_smollm2.TUNED_ON)
    for e in entries if "looked_at" in e}


def _stored(path: Path) -> dict[str, Any]:
    """A stored run's JSON file, or a :class:`BenchError` naming it."""
    if not path.is_file():
        raise BenchError(f"--rereport: {path} does not exist; give the directory of a finished benchmark run")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchError(f"--rereport: {path} cannot be read as JSON ({first_line(err)}); restore it (git checkout) "
                         "or re-run the command in its env.json") from None
    if not isinstance(data, dict):
        raise BenchError(f"--rereport: {path} is not a benchmark run's record (a JSON object)")
    return data


def rereport(directory: str | Path, suite_name: str | None = None) -> dict[str, Any]:
    """Re-derive ``directory``'s report (see the module docstring); returns the new summary. ``suite_name``: the suite
    the caller expects (``purify bench SUITE --rereport DIR``), refused if the run is of another."""
    d = Path(directory)
    old = _stored(d / "summary.json")
    if suite_name is not None and old.get("suite") != suite_name:
        raise BenchError(f"--rereport {directory}: that run is of suite {old.get('suite')!r}, not {suite_name!r}; "
                         "drop the suite name")
    aux = old.get("suite") == "aux-logits"
    missing = [k for k in ("suite", "protocol", "seeds", "conditions", "wall_seconds", *REQUIRED,
                           *(() if aux else ("notes",))) if k not in old]
    if missing or "conditions" not in old.get("settings", {}):
        raise BenchError(f"--rereport: {d / 'summary.json'} was written before summaries recorded "
                         f"{', '.join(missing or ['settings.conditions'])}; re-run the command in its env.json")
    env = _stored(d / "env.json")
    if env.get("seeds") != old["seeds"]:  # a summary copied beside another run's record
        raise BenchError(f"--rereport: {d / 'env.json'} is of a run on seeds {env.get('seeds')}, the summary's are "
                         f"{old['seeds']}; put the summary back beside its own env.json")
    try:
        summary = _rebuild(old, d, aux)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:  # a hand-edited file: tracebacks
        if isinstance(err, BenchError):
            raise
        where = traceback.extract_tb(err.__traceback__)[-1]
        raise BenchError(f"--rereport: {d / 'summary.json'} cannot be re-derived ({type(err).__name__}: "
                         f"{first_line(err)}, at {Path(where.filename).name}:{where.lineno}): a field is not as purify "
                         "writes it; restore it (git checkout) or re-run the command in its env.json (a file purify "
                         "wrote unchanged failing here is purify's bug: report it with this line)") from None
    env["rereported_by"] = f"purify bench --rereport {directory}"
    (aux_logits.write if aux else lm_common.publish)(d, summary, env)
    return summary


def _rebuild(old: dict[str, Any], d: Path, aux: bool) -> dict[str, Any]:
    """The summary of a stored run's per-seed records under today's rules (:func:`rereport`)."""
    for c in old["settings"]["conditions"]:
        records = (old["conditions"].get(c.get("name")) or {}).get("per_seed")
        if not isinstance(records, list) or [isinstance(r, dict) and r.get("seed") for r in records] != old["seeds"]:
            raise BenchError(f"--rereport: {d / 'summary.json'}: condition {c.get('name')!r} has no per-seed record "
                             f"for each of its seeds {old['seeds']} in order; restore it (git checkout) or re-run the "
                             "command in its env.json")
    conds = [Condition(**{k: v for k, v in c.items() if k in FIELDS}) for c in old["settings"]["conditions"]]
    derived = ("seed", "distance_to_control", "fidelity_loss", "task_error_ratio", "frontier_gap")
    runs = {s: {"base": {k: v["mean"] for k, v in old.get("base", {}).items()},
                "teacher": {k: v["mean"] for k, v in old.get("teacher", {}).items()}, "data": old.get("data_sizes", {}),
                "conditions": {c.name: {k: v for k, v in old["conditions"][c.name]["per_seed"][i].items()
                                        if k not in derived} for c in conds}} for i, s in enumerate(old["seeds"])}
    curve = (old.get("frontier", {}).get("vanilla") or [{}])[0]
    suite = Suite(name=old["suite"], protocol=old["protocol"], conditions=conds, trait=old["trait"],
                  guards=guards_from(old["guards"]),
                  tuned_on=[{**e, "looked_at": LOOKED_AT.get((tuple(e["seeds"]), e["what"]), e.get(
                      "looked_at", TUNED_TRAIT.get(old["suite"], old["trait"])))} if e.get("trait", True) else e
                      for e in old["tuned_on"]],
                  settings={k: v for k, v in old["settings"].items() if k != "conditions"},
                  curve_keys=tuple(k for k in curve if k != "step" and not k.endswith("_ci95")) or
                  Suite.curve_keys)
    new = lm_common.summarise(suite, runs, old["wall_seconds"])
    settings = {**old["settings"], "conditions": new["settings"]["conditions"]}
    summary = {**old, **new, "settings": settings}  # the stored key order: a re-derivation leaves no diff behind
    # the seeds' base and teacher scores are stored as statistics only: re-derived from their means, their intervals
    # would collapse to zero width, so they are kept as the run wrote them
    summary["base"], summary["teacher"] = old["base"], old["teacher"]
    if not aux:  # keeps what the per-seed records cannot give back (aux-logits: everything else is re-derived)
        summary["conditions"] = {n: {**old["conditions"][n], **c} for n, c in new["conditions"].items()}
        summary["notes"] = old["notes"]
    else:
        aux_summary.finish(summary)
    if (old.get("probe_free") or {}).get("arms"):  # the rule's choice and the verdict at it, under today's rules
        summary["probe_free"] = probe_free.rederive({**summary, "probe_free": old["probe_free"]}) or old["probe_free"]
    return summary
