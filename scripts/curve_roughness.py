"""How much a scored vanilla's trait swings between neighbouring points of its training curve.

A frontier verdict reads vanilla's early-stopping curve between two measured points; when the trait swings widely
from one checkpoint to the next, a denser curve does not settle the reading. This prints, per scored condition of a
stored ``summary.json``, the mean and the largest |Δ transfer| between consecutive curve points from ``--from-step``
on (all seeds pooled).

Usage::

    python scripts/curve_roughness.py results/hidden-preference/on-policy-replace/summary.json --from-step 60
"""

from __future__ import annotations

import argparse
import json


def roughness(summary: dict, from_step: int) -> dict[str, dict[str, float]]:
    """Condition → ``{"pairs", "mean_abs_step", "max_abs_step"}`` over every seed's curve from ``from_step``."""
    out = {}
    for name, cond in summary["conditions"].items():
        steps = []
        for rec in cond["per_seed"]:
            curve = [p for p in rec.get("curve") or [] if p["step"] >= from_step]
            steps += [abs(b["transfer"] - a["transfer"]) for a, b in zip(curve, curve[1:])]
        if steps:
            out[name] = {"pairs": len(steps), "mean_abs_step": sum(steps) / len(steps), "max_abs_step": max(steps)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("summary")
    p.add_argument("--from-step", type=int, default=0)
    args = p.parse_args()
    with open(args.summary) as f:
        for name, r in roughness(json.load(f), args.from_step).items():
            print(f"{name}: {r['pairs']} neighbouring pairs, mean |Δ transfer| {r['mean_abs_step']:.3f}, "
                  f"largest {r['max_abs_step']:.3f}")


if __name__ == "__main__":
    main()
