"""Pilot that set the ``sgd`` arm's learning-rate grid (:data:`purify.bench.lm_suites.SGD_LRS`) without the trait.

Runs AdamW vanilla and plain SGD at a wide range of learning rates on one seed outside every report range and prints
only what the probe-free rule itself may read: task error (relative to vanilla's) and off-task drift. The trait is
measured by the suite's scorer but never printed, and the run's directory is deleted.

Usage::

    python scripts/sgd_pilot.py style-tic --seed 900 --lrs 0.1 0.3 1 3 10 30
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from purify.bench import lm_common, lm_suites
from purify.bench.lm_common import Condition
from purify.bench.probe_free import point_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=lm_suites.SUITES)
    p.add_argument("--seed", type=int, default=900)
    p.add_argument("--lrs", type=float, nargs="+", required=True)
    args = p.parse_args()
    spec = lm_suites.style_tic_suite() if args.suite == "style-tic" else lm_suites.hidden_preference_suite()
    keep = {c.name: c for c in spec.conditions if c.name in ("base", "vanilla")}
    spec.conditions = [*keep.values(), *(Condition(point_name("sgd", v), ["teacher"], optim={"name": "sgd", "lr": v})
                                         for v in args.lrs)]
    spec.curve_points = 1
    out = Path(tempfile.mkdtemp(prefix="sgd-pilot-"))
    try:
        summary = lm_common.run(spec, [args.seed], out, False, lambda s: [], "sgd pilot")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows = {n: c["per_seed"][0] for n, c in summary["conditions"].items()}
    print(json.dumps({n: {"task_error_vs_vanilla": round(r["task_error"] / rows["vanilla"]["task_error"], 3),
                          "drift": round(r.get("drift", float("nan")), 5), "diverged_at": r.get("diverged_at")}
                      for n, r in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
