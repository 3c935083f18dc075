"""Run an LM suite (``style-tic`` / ``hidden-preference``) with its seeds in parallel worker processes.

The committed LM runs in README were launched with this script; it is ``purify bench SUITE --workers N`` (default
2) with ``--out`` required, progress lines per finished seed only, and no lower bound on ``--seeds`` but 1 (a
two-seed re-run that records purifier metrics is not a verdict run). Its flags are checked as ``purify bench``'s
before anything runs (:func:`purify.bench.report.check_run`): an ``--out`` holding a finished run, e.g. a committed
result, is refused unless ``--overwrite``; a bad flag or option is one ``lm_parallel_seeds: error:`` line, exit 2.
The seeds, their per-seed code and the report are the benchmark spine's (:func:`purify.bench.lm_common.run_seeds`);
only the scheduling differs, and ``env.json`` records the equivalent ``purify bench ... --workers N`` command.

Usage::

    python scripts/lm_parallel_seeds.py hidden-preference --seeds 5 --first-seed 1000 --workers 3 \\
        --out results/hidden-preference/probe-free --option 'conditions=[function_anchor,replace:reference]'
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from purify.bench import lm_suites
from purify.bench.lm_common import STOPPED
from purify.bench.report import BenchError, check_run, parse_options
from purify.stopping import sigterm_stops
from purify.types import TrainingStopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=lm_suites.SUITES)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=lm_suites.FIRST_SEED)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="the suite's smoke-test size")
    p.add_argument("--overwrite", action="store_true", help="let --out replace a finished run")
    a = p.parse_args(argv)
    try:
        check_run(out=a.out, seeds=a.seeds, first_seed=a.first_seed, workers=a.workers, quick=a.quick,
                  overwrite=a.overwrite)
        kwargs: dict[str, Any] = parse_options(a.option) if a.option else {}
        with sigterm_stops(STOPPED):  # the forked seed workers are terminated with it (they ran on as orphans)
            lm_suites.run_suite(a.suite, seeds=a.seeds, out=a.out, first_seed=a.first_seed, progress=False,
                                 quick=a.quick, workers=a.workers, **kwargs)
    except BenchError as err:
        print(f"lm_parallel_seeds: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"lm_parallel_seeds: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"{a.suite} results written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
