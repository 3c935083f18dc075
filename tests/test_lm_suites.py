"""Smoke test of the LM suites: ``run_suite(..., quick=True)`` writes every output file with the shared schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from purify.bench.lm_suites import run_suite


@pytest.mark.parametrize("suite", ["style-tic", "hidden-preference"])
def test_quick_suite_writes_schema(suite: str, tmp_path: Path) -> None:
    summary = run_suite(suite, seeds=2, out=str(tmp_path), quick=True, progress=False)
    for name in ("summary.json", "summary.md", "summary.csv", "frontier.png", "env.json"):
        assert (tmp_path / name).is_file(), name
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["suite"] == suite and written["seeds"] == [0, 1] == summary["seeds"]
    assert {"base", "control", "vanilla", "delta_projection"} <= set(written["conditions"])
    vanilla = written["conditions"]["vanilla"]
    assert {"transfer", "task_error", "fidelity_kl", "distance_to_control", "per_seed"} <= set(vanilla)
    assert len(written["frontier"]["vanilla"]) == 3 and "delta_projection" in written["verdicts"]
    assert "Measured wall time" in (tmp_path / "summary.md").read_text()


def test_unknown_suite_or_option() -> None:
    with pytest.raises(ValueError, match="unknown LM suite"):
        run_suite("nope")
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        run_suite("style-tic", quick=True, colour=1)


def test_vanilla_is_scored_at_halving_steps_dense_early() -> None:
    from purify.bench.lm_common import curve_steps

    assert curve_steps(160, 4) == [20, 40, 80, 120, 160]  # every 40 steps, plus 160/2, /4, /8
    assert curve_steps(20, 2) == [10, 20] and curve_steps(3, 4) == [1, 2, 3]
