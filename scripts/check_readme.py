"""Regenerate (or check) README.md's benchmark result tables from the committed ``results/**/summary.json``.

Each table sits between two markers naming its summary and, optionally, the rows to show (default: every condition)::

    <!-- results-table: results/aux-logits/summary.json rows=control,vanilla,anchor@weight-2e-3 -->
    ...generated...
    <!-- /results-table -->

A probe-free table (``summary.json["probe_free"]``: each swept arm at the value the trait-blind rule chose per seed)
sits between ``<!-- probe-free-table: results/.../summary.json -->`` and ``<!-- /probe-free-table -->``. The
scoreboard (between ``<!-- scoreboard -->`` and ``<!-- /scoreboard -->``) has one row per probe-free arm of every
committed ``results/**/summary.json``, wins first, with whether its seeds were held out from every choice made by
looking at the trait (``tuned_on``) and whether the run was pre-registered (a ``PREREGISTERED.md`` beside it).

Usage::

    python scripts/check_readme.py          # rewrite the tables in README.md
    python scripts/check_readme.py --check  # exit 1 (naming the tables) when README.md differs from the summaries

Prose is checked, not rewritten: each ``p_adj = X`` quoted in the README must be a p-value of the run named last
before it (:func:`stale_p_values`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from purify.bench import probe_free
from purify.bench.verdicts import LABELS, seed_span, tuned_here

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- (results|probe-free)-table: (\S+)(?: rows=(\S+))? -->\n)(.*?)(<!-- /\2-table -->)", re.S)
SCOREBOARD = re.compile(r"(<!-- scoreboard -->\n)(.*?)(<!-- /scoreboard -->)", re.S)


def _ci(stat: dict[str, Any] | None) -> str:
    """``mean [lo, hi]``: 3 decimals, or 3 significant digits when every number is below 0.01 in size."""
    if not stat or stat.get("mean") is None or (isinstance(stat["mean"], float) and math.isnan(stat["mean"])):
        return ""
    nums = [stat["mean"], *[v for v in stat["ci95"] if v is not None]]
    fmt = (lambda x: f"{x:.3g}") if max(abs(v) for v in nums) < 0.01 and stat["mean"] != 0 else \
        (lambda x: f"{x:.3f}")
    lo, hi = stat["ci95"]
    return fmt(stat["mean"]) if lo is None or hi is None or lo == hi else f"{fmt(stat['mean'])} [{fmt(lo)}, {fmt(hi)}]"


def _signed(x: float) -> str:
    text = f"{x:+.3f}"
    return "+0.000" if text == "-0.000" else text


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def table(summary: dict[str, Any], rows: list[str] | None = None) -> str:
    """The markdown table of ``summary``'s conditions ``rows`` (default: all): transfer, transfer − control and task
    error relative to the vanilla each arm is judged against, the gap to vanilla's frontier and the verdict label."""
    conds, verdicts = summary["conditions"], summary.get("verdicts", {})
    bounds, against = summary.get("bounds", {}), summary.get("judged_against", {})
    lines = ["| condition | transfer [95% CI] | transfer − control | task error × vanilla | gap to vanilla's frontier "
             "[95% CI] | verdict |", "|---|---|---|---|---|---|"]
    for name in rows or list(conds):
        c = conds[name]
        ref = against.get(name, {"control": "control", "vanilla": "vanilla"})
        ctl, van = ({r["seed"]: r for r in conds[ref[k]]["per_seed"]} for k in ("control", "vanilla"))
        per = c["per_seed"]
        minus = _mean([r["transfer"] - ctl[r["seed"]]["transfer"] for r in per]) if name != ref["control"] else 0.0
        ratio = _mean([r["task_error"] / van[r["seed"]]["task_error"] for r in per])
        verdict = verdicts.get(name) or (f"bound: {bounds[name]}" if name in bounds else "baseline")
        label = verdict.split(" (")[0]
        lines.append(f"| {name} | {_ci(c.get('transfer'))} | {_signed(minus)} | {ratio:.2f} | "
                     f"{_ci(summary.get('frontier_gap', {}).get(name))} | {label} |")
    return "\n".join(lines) + "\n"


def probe_free_table(summary: dict[str, Any], rows: list[str] | None = None) -> str:
    """The markdown table of ``summary["probe_free"]``'s arms ``rows`` (default: all): the value chosen per seed
    (``*``: none within the task budget), transfer − control with its 90% CI, task error × vanilla, the guards and
    the verdict label at that choice."""
    arms = (summary.get("probe_free") or {}).get("arms") or {}
    lines = ["| arm (knob) | chosen per seed | transfer − control [90% CI] | task error × vanilla | guards | verdict |",
             "|---|---|---|---|---|---|"]
    for name in rows or list(arms):
        a = arms[name]
        chosen = ", ".join(f"{a['chosen'][s]:g}{'' if a['within_budget'][s] else '*'}" for s in a["chosen"])
        tc = a["transfer_minus_control"]
        lo, hi = tc["ci90"]
        guards = "; ".join(f"{g['label']} {g['mean']:.3g}" + (" (broken)" if g.get("problem") else "")
                           + probe_free.below_band(g, len(a["chosen"])) for g in a["guards"].values()) or "—"
        lines.append(f"| {name} ({a['knob']}) | {chosen} | {_signed(tc['mean'])} [{_signed(lo)}, {_signed(hi)}] | "
                     f"{a['task_error_ratio']['mean']:.2f} | {guards} | {a['verdict'].split(' (')[0]} |")
    return "\n".join(lines) + "\n"


def scoreboard(root: Path = ROOT) -> str:
    """One row per probe-free arm of every ``results/**/summary.json`` under ``root``, by verdict label (a win first,
    :data:`purify.bench.verdicts.LABELS`), then by path: the verdict at the rule's choice, the trait, the run, its
    seeds — held out (``fresh``) when disjoint from every ``tuned_on`` entry that looked at the run's trait
    (:func:`purify.bench.verdicts.tuned_here`), else ``tuning seeds``; ``quick run: not a result`` for a smoke test;
    ``pre-registered`` when a ``PREREGISTERED.md`` sits beside the summary — transfer − control with its 90%
    CI, the equivalence margin m (``–`` where the verdict was reached before it was needed, e.g. ``damaged``) and the
    task error relative to vanilla's."""
    rows = []
    for path in sorted((root / "results").glob("**/summary.json")):
        summary = json.loads(path.read_text())
        seeds = sorted(summary["seeds"])
        tuned = tuned_here(seeds, summary.get("tuned_on") or [], summary.get("trait"))
        env = path.parent / "env.json"  # a quick run before summaries recorded it: its command says so
        quick = summary.get("quick") or (env.exists() and "--quick" in json.loads(env.read_text()).get("command", ""))
        flags = ["tuning seeds" if tuned else "fresh", *(["quick run: not a result"] if quick else []),
                 *(["pre-registered"] if (path.parent / "PREREGISTERED.md").exists() else [])]
        run = path.parent.relative_to(root / "results").as_posix()
        for arm, a in ((summary.get("probe_free") or {}).get("arms") or {}).items():
            label = next((k for k in LABELS if a["verdict"].startswith(k)), "no verdict")
            verdict = a["verdict"].split(" (")[0]
            tc, margin = a["transfer_minus_control"], (a.get("frontier_gap") or {}).get("margin")
            lo, hi = tc["ci90"]
            cells = [f"**{verdict}**" if label == "purified" else verdict, f"{arm} ({a['knob']})",
                     summary["trait"].split(" (transfer")[0], f"[{run}](results/{run})",
                     f"{seed_span(seeds)} ({len(seeds)}; {', '.join(flags)})",
                     f"{_signed(tc['mean'])} [{_signed(lo)}, {_signed(hi)}]" if tc["n"] else "",
                     f"±{margin:.3f}" if margin is not None else "–", f"{a['task_error_ratio']['mean']:.2f}"]
            rows.append(((LABELS.index(label), run), "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"))
    head = ["| verdict at the probe-free choice | arm (knob) | trait | run (results/…) | seeds | transfer − control "
            "[90% CI] | ±m | task error × vanilla |", "|---|---|---|---|---|---|---|---|"]
    return "\n".join([*head, *(row for _, row in sorted(rows, key=lambda r: r[0]))]) + "\n"


def render(readme: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """README text with every marked table regenerated, and the summaries whose table changed."""
    changed: list[str] = []

    def fill(m: re.Match[str]) -> str:
        summary = json.loads((root / m.group(3)).read_text())
        rows = m.group(4).split(",") if m.group(4) else None
        body = (table if m.group(2) == "results" else probe_free_table)(summary, rows)
        if body != m.group(5):
            changed.append(m.group(3) + (" (probe-free)" if m.group(2) == "probe-free" else ""))
        return m.group(1) + body + m.group(6)

    def board(m: re.Match[str]) -> str:
        body = scoreboard(root)
        if body != m.group(2):
            changed.append("the scoreboard (results/**/summary.json)")
        return m.group(1) + body + m.group(3)

    return SCOREBOARD.sub(board, BLOCK.sub(fill, readme)), changed


QUOTED_P = re.compile(r"p_adj\s*[=≈:]?\s*([0-9][0-9.]*(?:e-?[0-9]+)?)")
RUN_PATH = re.compile(r"results/[\w.\-/]+")


def _p_values(summary: dict[str, Any]) -> dict[str, float]:
    """Every Holm-adjusted p-value a summary records, by arm: its arms', its probe-free arms' (``probe-free:<arm>``
    and ``<arm>``) and its on-policy comparison's."""
    found = {**summary.get("p_adjusted", {}),
             **{arm: a.get("p_adjusted") for arm, a in (summary.get("probe_free") or {}).get("arms", {}).items()},
             **(summary.get("on_policy_vs_off_policy") or {}).get("p_adjusted", {})}
    return {arm: float(p) for arm, p in found.items() if isinstance(p, (int, float))}


def _same_at_precision(quoted: str, value: float) -> bool:
    """Whether ``value`` rounds to ``quoted`` at the significant digits ``quoted`` shows (``0.20``: two)."""
    mantissa = quoted.lower().split("e")[0].replace(".", "").lstrip("0") or "0"
    digits = max(1, len(mantissa))
    return float(f"{value:.{digits}g}") == float(quoted)


def _runs_before(readme: str, at: int, root: Path) -> list[Path]:
    """The summaries of the ``results/...`` runs named in the paragraph before ``at`` (``--out results/x`` or a link
    to ``results/x/summary.md``), else the last one named before that paragraph."""
    start = readme.rfind("\n\n", 0, at) + 2
    found = []
    for path in RUN_PATH.findall(readme, 0, at):
        d = root / path.rstrip(".`)/")
        d = d if d.is_dir() else d.parent
        if (d / "summary.json").is_file():
            found.append((readme.rfind(path, 0, at) >= start, d / "summary.json"))
    inside = [p for here, p in found if here]
    return list(dict.fromkeys(inside)) if inside else [found[-1][1]] if found else []


def stale_p_values(readme: str, root: Path = ROOT) -> list[str]:
    """Each ``p_adj = X`` (or ``p_adj X``, ``p_adj ≈ X``) quoted in the README's prose that no p-value of its run
    rounds to (:func:`_runs_before`); where the paragraph names arms of those runs before the quote, only their
    p-values count (a quote matching another arm's was let through). Prose numbers are not generated; this keeps them
    from going stale when the statistics change."""
    problems = []
    for m in QUOTED_P.finditer(readme):
        line = readme.count("\n", 0, m.start()) + 1
        runs = _runs_before(readme, m.start(), root)
        if not runs:
            problems.append(f"line {line}: {m.group(0)} names no results/ run before it")
            continue
        values = {}
        for run in runs:
            values.update(_p_values(json.loads(run.read_text())))
        paragraph = readme[readme.rfind("\n\n", 0, m.start()) + 2:m.start()]
        named = {arm: p for arm, p in values.items() if re.search(rf"(?<![\w:@-]){re.escape(arm)}(?![\w:@-])",
                                                                  paragraph)}
        if not any(_same_at_precision(m.group(1).rstrip("."), p) for p in (named or values).values()):
            whose = f" of {', '.join(named)}" if named else ""
            problems.append(f"line {line}: {m.group(0)} is no p-value{whose} of "
                            f"{', '.join(str(r.relative_to(root)) for r in runs)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Rewrite README.md's tables, or with ``--check`` report the stale ones (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a table differs")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args(argv)
    path = Path(args.readme)
    text, changed = render(path.read_text())
    if not BLOCK.search(text):
        print(f"check_readme: no results-table markers in {path}", file=sys.stderr)
        return 1
    stale = stale_p_values(text)
    for problem in stale:  # prose: fixed by hand, never rewritten
        print(f"check_readme: README {problem}; quote the summary's value", file=sys.stderr)
    if args.check:
        for name in changed:
            print(f"check_readme: README table from {name} differs from the summary (run scripts/check_readme.py)",
                  file=sys.stderr)
        return 1 if changed or stale else 0
    path.write_text(text)
    print(f"check_readme: {len(changed)} table(s) rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
