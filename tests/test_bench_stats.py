"""Benchmark statistics and report files: intervals by hand, true early-stopping frontier on hand-made curves."""

import json
import math

import pytest

from purify.bench.report import csv_rows, jsonable, markdown, sweep_key, write_report
from purify.bench.stats import (
    ABOVE,
    BELOW,
    NO_GAIN,
    ON,
    UNRESOLVED,
    fraction_removed,
    frontier_gap,
    interpolate_curve,
    mean_ci,
    mean_curve,
    paired_test,
)

T_975_DF3 = 3.182446305284263  # scipy.stats.t.ppf(0.975, 3), from tables


def test_mean_ci_matches_a_hand_computation():
    out = mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)  # sample sd (ddof 1) = 1.2910
    half = T_975_DF3 * sd / math.sqrt(4)
    assert out["mean"] == 2.5 and out["n"] == 4
    assert out["ci95"] == pytest.approx([2.5 - half, 2.5 + half], abs=1e-9)
    assert out["ci95"][1] - 2.5 == pytest.approx(2.0543, abs=1e-4)


def test_mean_ci_edge_cases():
    assert mean_ci([0.3]) == {"mean": 0.3, "ci95": [0.3, 0.3], "n": 1}
    assert mean_ci([1.0, float("nan"), 3.0])["n"] == 2  # NaNs are dropped
    assert math.isnan(mean_ci([])["mean"])


def test_paired_test_is_the_interval_of_the_differences():
    out = paired_test([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    assert out["mean"] == 2.5 and out["ci95"] == pytest.approx(mean_ci([1, 2, 3, 4])["ci95"])
    assert 0 < out["p_value"] < 0.05


# Task error falls and then plateaus at 0.3 while transfer keeps rising: the case that makes the definition matter.
CURVE = [
    {"step": 0, "task_error": 1.0, "transfer": 0.0},
    {"step": 100, "task_error": 0.5, "transfer": 0.2},
    {"step": 200, "task_error": 0.3, "transfer": 0.4},
    {"step": 300, "task_error": 0.3, "transfer": 0.6},
    {"step": 400, "task_error": 0.29, "transfer": 0.8},
]


@pytest.mark.parametrize("x, expected", [
    (0.75, 0.1),   # halfway between step 0 and step 100
    (0.5, 0.2),    # exactly a point
    (0.4, 0.3),    # halfway between step 100 and 200
    (0.3, 0.4),    # the FIRST point reaching 0.3 (step 200), not the later ones on the plateau (0.6, 0.8)
    (0.295, 0.7),  # only step 400 reaches it: halfway from step 300
    (0.1, 0.8),    # never reached: training to the end did not get there → final transfer
    (2.0, 0.0),    # already reached at the first point
])
def test_interpolate_curve_is_true_early_stopping(x, expected):
    assert interpolate_curve(CURVE, x) == pytest.approx(expected)


def test_interpolate_curve_walks_in_step_order_and_handles_non_monotone_curves():
    assert interpolate_curve(list(reversed(CURVE)), 0.3) == pytest.approx(0.4)  # sorted by step first
    bumpy = [{"step": 0, "task_error": 1.0, "transfer": 0.0}, {"step": 1, "task_error": 0.4, "transfer": 0.3},
             {"step": 2, "task_error": 0.6, "transfer": 0.5}, {"step": 3, "task_error": 0.35, "transfer": 0.9}]
    # 0.5 is first reached between steps 0 and 1 (w = 5/6), although step 2 is above it again
    assert interpolate_curve(bumpy, 0.5) == pytest.approx(0.25)
    no_steps = [{"task_error": 1.0, "transfer": 0.0}, {"task_error": 0.0, "transfer": 1.0}]
    assert interpolate_curve(no_steps, 0.25) == pytest.approx(0.75)  # given order, without `step`
    with pytest.raises(ValueError, match="empty curve"):
        interpolate_curve([], 0.5)


def test_frontier_gap_verdicts_from_the_paired_interval():
    curves = [CURVE] * 4
    below = frontier_gap(curves, [{"task_error": 0.4, "transfer": t} for t in (0.0, 0.01, 0.02, 0.0)])
    assert below["per_seed"] == pytest.approx([-0.3, -0.29, -0.28, -0.3]) and below["verdict"] == BELOW
    above = frontier_gap(curves, [{"task_error": 0.3, "transfer": t} for t in (0.8, 0.7, 0.75, 0.8)])
    assert above["verdict"] == ABOVE and above["mean"] == pytest.approx(0.3625)  # 0.8, 0.7, 0.75, 0.8 minus 0.4
    mixed = frontier_gap(curves, [{"task_error": 0.4, "transfer": t} for t in (0.0, 0.6, 0.1, 0.5)])
    assert mixed["verdict"] == ON


def test_frontier_gap_refuses_a_verdict_where_the_comparison_means_nothing():
    start = {"step": 0, "task_error": 1.0, "transfer": 0.0}
    jumpy = [start, {"step": 10, "task_error": 0.4, "transfer": 1.0}]  # the trait is all learnt between two points
    at_base = frontier_gap([jumpy] * 3, [{"task_error": e, "transfer": -1e-5} for e in (1.1, 1.0, 1.05)])
    assert at_base["verdict"] == NO_GAIN  # significantly "below" by 1e-5, but worse than not distilling at all
    guessed = frontier_gap([jumpy] * 3, [{"task_error": 0.5, "transfer": t} for t in (0.5, 0.55, 0.6)])
    assert guessed["verdict"].startswith(UNRESOLVED) and guessed["segment_jump"] == pytest.approx(1.0)
    dense = [start, {"step": 5, "task_error": 0.55, "transfer": 0.8}, {"step": 10, "task_error": 0.4, "transfer": 1.0}]
    measured = frontier_gap([dense] * 3, [{"task_error": 0.5, "transfer": t} for t in (0.5, 0.55, 0.6)])
    assert measured["verdict"] == BELOW and measured["segment_jump"] == pytest.approx(0.2)
    beyond = frontier_gap([jumpy] * 3, [{"task_error": 0.3, "transfer": t} for t in (0.5, 0.55, 0.6)])
    assert beyond["verdict"] == BELOW and beyond["segment_jump"] == 0.0  # past vanilla's end: its final point


def test_fraction_removed_by_hand():
    out = fraction_removed([0.1, 0.1], vanilla=[0.4, 0.5], control=[0.0, 0.0])
    assert out["mean"] == pytest.approx((0.45 - 0.1) / 0.45)
    assert out["ci95"][0] <= out["mean"] <= out["ci95"][1]
    assert fraction_removed([0.0], [0.5], [0.0])["mean"] == pytest.approx(1.0)
    assert fraction_removed([-0.1, -0.1], [0.4, 0.4], [0.0, 0.0])["mean"] == pytest.approx(1.25)  # overshoot
    assert math.isnan(fraction_removed([0.1, 0.2], [0.1, 0.1], [0.2, 0.2])["mean"])  # vanilla not above control


def test_mean_curve_averages_point_by_point():
    out = mean_curve([CURVE, [{**p, "transfer": p["transfer"] + 0.2} for p in CURVE]], ["transfer"])
    assert [p["step"] for p in out] == [0, 100, 200, 300, 400]
    assert out[1]["transfer"] == pytest.approx(0.3) and len(out[1]["transfer_ci95"]) == 2


def _summary():
    stat = {"mean": 0.2, "ci95": [0.1, 0.3], "n": 2}
    cond = {"transfer": stat, "task_error": {"mean": 0.5, "ci95": [0.4, 0.6], "n": 2}, "role": "purifier",
            "per_seed": [{"seed": 0, "transfer": 0.1, "task_error": 0.5, "metric.x": 1.0,
                          "curve": [{"step": 0, "transfer": 0.0, "task_error": 1.0}]},
                         {"seed": 1, "transfer": 0.3, "task_error": 0.5}]}
    return {"suite": "toy", "protocol": "p", "seeds": [0, 1], "frontier": {"vanilla": mean_curve([CURVE, CURVE],
                                                                                                 ["transfer",
                                                                                                  "task_error"])},
            "conditions": {"vanilla": {**cond, "role": "reference"}, "thing@k-0.1": cond, "thing@k-0.3": cond,
                           "base": {**cond, "role": "reference", "plot": False, "nan": float("nan")}},
            "frontier_gap": {"thing@k-0.1": stat}, "verdicts": {"thing@k-0.1": BELOW}}


def test_report_files_tables_and_csv(tmp_path):
    summary = _summary()
    md = markdown(summary, [("transfer", "transfer")], ["note"], intro=["hello"],
                  sections=[("reference", "Refs"), ("purifier", "Purifiers")])
    assert "### Refs" in md and "### Purifiers" in md and "hello" in md and md.rstrip().endswith("note")
    assert "| thing@k-0.1 | 0.200 [0.100, 0.300] | 0.200 [0.100, 0.300] | below frontier |" in md
    rows = csv_rows(summary).splitlines()
    assert rows[0].startswith("condition,seed,point,step,transfer") and "metric.x" in rows[0]
    assert sum(",curve," in r for r in rows) == 4 and sum(",final," in r for r in rows) == 8
    assert sweep_key("thing@k-0.3") == ("thing@k", "0.3", 0.3) and sweep_key("anchor@weight-2e-4")[2] == 2e-4
    assert sweep_key("a@k-1+b@j-2") is None and sweep_key("vanilla") is None
    out = write_report(tmp_path, summary, {"seeds": [0, 1]}, [("transfer", "transfer")], [])
    assert {p.name for p in out.iterdir()} >= {"summary.json", "summary.md", "summary.csv", "frontier.png", "env.json"}
    loaded = json.loads((tmp_path / "summary.json").read_text())  # strict JSON: NaN written as null
    assert loaded["conditions"]["base"]["nan"] is None
    assert jsonable({"a": (1, float("inf"))}) == {"a": [1, None]}


def test_frontier_problems_flag_a_suite_without_transfer_or_fidelity_gain():
    from purify.bench.stats import frontier_problems

    def cond(transfers, errors):
        return {"per_seed": [{"transfer": t, "task_error": e} for t, e in zip(transfers, errors)]}

    sound = {"base": cond([0, 0, 0, 0], [1.0, 1.1, 0.9, 1.0]), "control": cond([0.01, -0.02, 0.0, 0.01], [.2] * 4),
             "vanilla": cond([0.4, 0.5, 0.45, 0.42], [0.2, 0.21, 0.19, 0.2])}
    assert frontier_problems(sound) == []
    no_transfer = {**sound, "vanilla": cond([0.02, -0.01, 0.0, 0.01], [0.2, 0.21, 0.19, 0.2])}
    assert frontier_problems(no_transfer) == ["vanilla transfer is not significantly above control"]
    no_fidelity = {**sound, "vanilla": cond([0.4, 0.5, 0.45, 0.42], [1.2, 1.0, 1.1, 1.3])}
    assert frontier_problems(no_fidelity) == ["vanilla's task error is not significantly below the base's"]
