"""Pool one probe-free arm's held-out runs: transfer − control at the rule's choice over every seed of several runs.

Each run of ``purify bench`` judges an arm on its own seeds; when the same frozen arm was run on several disjoint
held-out seed ranges, this pools them (per seed: transfer at the rule's choice − the control's transfer; margin m =
10% of the pooled vanilla − control) and prints the pooled mean with its 90% CI and whether the CI lies inside ±m.
Then, per guard metric of the suite, how often the side behaviour is below the guard's band: on how many seeds of the
arm at the rule's choice, of the control and of vanilla it was judged against, and on how many runs each one's 90% CI
of the mean reaches below the band (what a guard judged on an interval instead of the mean would call not intact).
It reads only stored ``summary.json`` files and re-trains nothing.

Usage::

    python scripts/pool_probe_free.py 'function_anchor+ensemble:competent' \\
        results/aux-logits/probe-free-combined/summary.json results/aux-logits/probe-free-replicate/summary.json
"""

from __future__ import annotations

import argparse
import json

from purify.bench.probe_free import point_name, references
from purify.bench.stats import mean_ci
from purify.bench.verdicts import guards_from


def pooled(arm: str, summaries: list[dict]) -> dict:
    """Per-seed gaps pooled over ``summaries`` (seeds must be disjoint) and the equivalence test against ±m; each
    run's seeds against the control and vanilla it judged the arm against (:func:`purify.bench.probe_free.references`).
    """
    gaps, excess, seen = [], [], set()
    for s in summaries:
        entry = s["probe_free"]["arms"][arm]
        # the control and vanilla the run judged the arm against (its own loss mode: on-policy with on-policy, ...)
        _, vanilla_name, control_name = references(s, [point_name(arm, v) for v in entry.get("values", ())])
        control = {r["seed"]: r["transfer"] for r in s["conditions"][control_name]["per_seed"]}
        vanilla = {r["seed"]: r["transfer"] for r in s["conditions"][vanilla_name]["per_seed"]}
        for rec in entry["per_seed"]:
            if rec["seed"] in seen:
                raise SystemExit(f"pool_probe_free: seed {rec['seed']} appears in two runs; pool disjoint runs only")
            seen.add(rec["seed"])
            gaps.append(rec["transfer"] - control[rec["seed"]])
            excess.append(vanilla[rec["seed"]] - control[rec["seed"]])
    m = 0.10 * sum(excess) / len(excess)
    stat = mean_ci(gaps, level=0.90)
    lo, hi = stat["ci95"]  # mean_ci keeps the key name "ci95" at any level
    return {"n": len(gaps), "mean": stat["mean"], "ci90": [lo, hi], "margin": m, "inside": -m < lo and hi < m}


def guard_tally(arm: str, summaries: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """Per guard label, for the arm at the rule's choice (``arm``), its ``control`` and ``vanilla``: ``seeds`` (all
    seeds), ``below`` (seeds under the band: :meth:`purify.bench.verdicts.Guard.seeds_below`), ``runs`` and
    ``ci_below`` (runs whose 90% CI of the mean reaches under the band)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for s in summaries:
        entry = s["probe_free"]["arms"][arm]
        _, vanilla_name, control_name = references(s, [point_name(arm, v) for v in entry.get("values", ())])
        base, control = s["conditions"]["base"]["per_seed"], s["conditions"][control_name]["per_seed"]
        who = {arm: entry["per_seed"], "control": control, "vanilla": s["conditions"][vanilla_name]["per_seed"]}
        for g in guards_from(s.get("guards") or []):
            band = g.band(base, control)
            if band is None:
                continue
            for name, records in who.items():
                t = out.setdefault(g.label, {}).setdefault(name, {"seeds": 0, "below": 0, "runs": 0, "ci_below": 0})
                stat = mean_ci([r.get(g.metric, float("nan")) for r in records], level=0.90)
                t["seeds"] += len(records)
                t["below"] += len(g.seeds_below(records, base, control))
                t["runs"] += 1
                t["ci_below"] += int(stat["ci95"][0] < band)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arm")
    p.add_argument("summaries", nargs="+")
    args = p.parse_args()
    runs = []
    for path in args.summaries:
        try:
            with open(path) as f:
                run = json.load(f)
        except (OSError, ValueError) as err:
            raise SystemExit(f"pool_probe_free: error: {path}: cannot read it as JSON ({err})") from None
        arms = (run.get("probe_free") or {}).get("arms") or {} if isinstance(run, dict) else {}
        if args.arm not in arms:
            raise SystemExit(f"pool_probe_free: error: {path} has no probe-free arm {args.arm!r} (its probe-free "
                             f"arms: {', '.join(sorted(arms)) or 'none'})")
        runs.append(run)
    r = pooled(args.arm, runs)
    print(f"{args.arm}: {r['n']} seeds pooled; transfer − control at the rule's choice {r['mean']:+.4f}, 90% CI "
          f"[{r['ci90'][0]:+.4f}, {r['ci90'][1]:+.4f}]; m = {r['margin']:.4f} → "
          f"{'inside ±m' if r['inside'] else 'NOT inside ±m'}")
    for label, who in guard_tally(args.arm, runs).items():
        print(f"{label} below its band — " + "; ".join(
            f"{name}: {t['below']} of {t['seeds']} seeds, 90% CI reaching below it on {t['ci_below']} of {t['runs']} "
            "runs" for name, t in who.items()))


if __name__ == "__main__":
    main()
