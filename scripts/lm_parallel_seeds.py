"""Run an LM suite (``style-tic`` / ``hidden-preference``) with its seeds in parallel worker processes.

``purify bench`` runs an LM suite's seeds one after another in one process (1 torch thread). On a shared machine a
long run then takes hours; this script runs the same suite, the same conditions and the same per-seed code
(:func:`purify.bench.lm_common.run_seed`, seeded per seed) with ``--workers`` seeds at a time in forked processes,
and writes the report with the suite's own summarise / probe-free / report code. Only the scheduling differs.

Usage::

    python scripts/lm_parallel_seeds.py hidden-preference --seeds 5 --first-seed 1000 --workers 3 \\
        --out results/hidden-preference/probe-free --option 'conditions=[function_anchor,replace:reference]'
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import torch

from purify.bench import lm_common, lm_suites, probe_free
from purify.bench.report import environment, verdict_notes, write_report

_JOB: dict[str, Any] = {}
FORKED_NOTE = ("The suite's own notes (e.g. hidden-preference's teacher-sample filter counts) are not collected here: "
               "they are counted inside the forked workers; summary.json's data_sizes has the kept samples.")


def _one(seed: int) -> tuple[int, dict[str, Any]]:
    torch.set_num_threads(1)
    j = _JOB
    return seed, lm_common.run_seed(j["suite"], j["models"], j["tokenizers"], j["tokenizer"], seed, False)


def parallel_run(workers: int, suite: lm_common.Suite, seeds: list[int], out: str | Path, progress: bool,
                 notes: Any, command: str) -> dict[str, Any]:
    """:func:`purify.bench.lm_common.run` with the seeds spread over ``workers`` forked processes."""
    start = time.perf_counter()
    loaded = {k: lm_common.load_model(p) for k, p in suite.teachers.items()}
    _, tokenizer = lm_common.load_model(suite.student)
    _JOB.update(suite=suite, models={k: m.eval() for k, (m, _) in loaded.items()},
                tokenizers={k: t for k, (_, t) in loaded.items()}, tokenizer=tokenizer)
    with mp.get_context("fork").Pool(min(workers, len(seeds))) as pool:
        runs = {}
        for seed, run in pool.imap_unordered(_one, seeds):
            runs[seed] = run
            print(f"seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)
    runs = {s: runs[s] for s in sorted(runs)}
    wall = time.perf_counter() - start
    summary = lm_common.summarise(suite, runs, wall)
    summary["columns"] = lm_common.columns(suite.columns)
    if suite.sweeps:
        summary["probe_free"] = probe_free.block(summary, suite.sweeps, suite.guards)
    command += f"  # seeds run {workers} at a time by scripts/lm_parallel_seeds.py"
    write_report(out, summary, environment(summary["seeds"], wall, command), summary["columns"],
                 [FORKED_NOTE, *notes(summary), f"Measured wall time: {wall:.0f} s on this machine "
                  f"({min(workers, len(seeds))} worker processes, 1 torch thread each).", *verdict_notes(summary),
                  *probe_free.notes(summary.get("probe_free", {}))])
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=lm_suites.SUITES)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=lm_suites.FIRST_SEED)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="the suite's smoke-test size")
    a = p.parse_args(argv)
    kwargs: dict[str, Any] = {}
    if a.option:
        from omegaconf import OmegaConf

        kwargs.update(OmegaConf.to_container(OmegaConf.from_dotlist(a.option)))
    lm_common.run = lambda *args: parallel_run(a.workers, *args)  # the suite builds its spec, we schedule it
    lm_suites.run_suite(a.suite, seeds=a.seeds, out=a.out, first_seed=a.first_seed, progress=False,
                         quick=a.quick, **kwargs)
    print(f"{a.suite} results written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
