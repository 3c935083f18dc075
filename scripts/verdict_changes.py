"""List every benchmark verdict that changed between two commits (default: before the two-sided verdicts, 9a05141~1,
and the working tree), for each committed ``results/**/summary.json``.

Usage::

    python scripts/verdict_changes.py [--before 9a05141~1] [--out results/verdict-changes.md]

Old summaries stored ``verdicts[arm]`` (or ``conditions[arm].frontier_gap.verdict``) as a frontier label; new ones
store the two-sided label followed by its reason. Arms are compared by label (the text before the first " (" or
":"); the full new verdict is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _label(verdict: str | None) -> str:
    if verdict is None:
        return "—"
    head = verdict.split(" (")[0]
    return head.split(":")[0] if head.startswith(("no verdict", "damaged")) else head


def _old_verdicts(rev: str, path: str) -> dict[str, str] | None:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return None
    old = json.loads(proc.stdout)
    out = dict(old.get("verdicts") or {})
    for arm, cond in (old.get("conditions") or {}).items():
        gap = cond.get("frontier_gap") if isinstance(cond, dict) else None
        if arm not in out and isinstance(gap, dict) and "verdict" in gap:
            out[arm] = gap["verdict"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="9a05141~1")
    ap.add_argument("--out", default=str(ROOT / "results" / "verdict-changes.md"))
    args = ap.parse_args()
    lines = ["# Verdicts before and after the two-sided rules", "",
             f"`python scripts/verdict_changes.py --before {args.before}`: every arm of every committed "
             "`results/**/summary.json` that existed before, its old one-sided frontier label and its label under "
             "the current rules (`purify/bench/verdicts.py`: two-sided, frontier read at the least favourable end of "
             "each segment, Holm-adjusted, guards, arms paired with their own loss mode's vanilla). No model was "
             "re-run: the new verdicts were re-derived from the stored per-seed records (`purify bench --rereport`).",
             ""]
    changed = kept = 0
    for path in sorted(ROOT.glob("results/**/summary.json")):
        rel = str(path.relative_to(ROOT))
        old = _old_verdicts(args.before, rel)
        if old is None:
            continue
        new = json.loads(path.read_text()).get("verdicts") or {}
        rows = []
        baselines = sorted(set(old) - set(new))
        for arm in sorted(new):
            o, n = _label(old.get(arm)), _label(new.get(arm))
            if o != n:
                rows.append(f"| {arm} | {o} | {n} | {new.get(arm, '—')} |")
                changed += 1
            else:
                kept += 1
        lines += [f"## {rel}", ""]
        lines += (["| arm | before | after | full verdict now |", "|---|---|---|---|", *rows] if rows
                  else ["No verdict changed."])
        if baselines:
            lines += ["", f"Reference arms, which carry no verdict now (marked baselines): {', '.join(baselines)}."]
        lines.append("")
    lines.insert(4, f"{changed} verdicts changed, {kept} kept.")
    lines.insert(5, "")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"{changed} changed, {kept} kept; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
