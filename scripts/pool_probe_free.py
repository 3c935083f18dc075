"""Pool one probe-free arm's held-out runs: transfer − control at the rule's choice over every seed of several runs.

Each run of ``purify bench`` judges an arm on its own seeds; when the same frozen arm was run on several disjoint
held-out seed ranges, this pools them (per seed: transfer at the rule's choice − the control's transfer; margin m =
10% of the pooled vanilla − control) and prints the pooled mean with its 90% CI and whether the CI lies inside ±m.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arm")
    p.add_argument("summaries", nargs="+")
    args = p.parse_args()
    runs = []
    for path in args.summaries:
        with open(path) as f:
            runs.append(json.load(f))
    r = pooled(args.arm, runs)
    print(f"{args.arm}: {r['n']} seeds pooled; transfer − control at the rule's choice {r['mean']:+.4f}, 90% CI "
          f"[{r['ci90'][0]:+.4f}, {r['ci90'][1]:+.4f}]; m = {r['margin']:.4f} → "
          f"{'inside ±m' if r['inside'] else 'NOT inside ±m'}")


if __name__ == "__main__":
    main()
