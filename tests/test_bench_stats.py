"""Benchmark statistics and report files: intervals by hand, true early-stopping frontier on hand-made curves."""

import json
import math

import pytest

from purify.bench.report import csv_rows, jsonable, markdown, sweep_key, write_report
from purify.bench.stats import (
    fraction_removed,
    mean_ci,
    mean_curve,
    paired_test,
)
from purify.bench.verdicts import segment

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
def test_segment_is_true_early_stopping(x, expected):
    assert segment(CURVE, x)[0] == pytest.approx(expected)


def test_segment_walks_in_step_order_and_handles_non_monotone_curves():
    assert segment(list(reversed(CURVE)), 0.3)[0] == pytest.approx(0.4)  # sorted by step first
    bumpy = [{"step": 0, "task_error": 1.0, "transfer": 0.0}, {"step": 1, "task_error": 0.4, "transfer": 0.3},
             {"step": 2, "task_error": 0.6, "transfer": 0.5}, {"step": 3, "task_error": 0.35, "transfer": 0.9}]
    # 0.5 is first reached between steps 0 and 1 (w = 5/6), although step 2 is above it again
    assert segment(bumpy, 0.5)[0] == pytest.approx(0.25)
    no_steps = [{"task_error": 1.0, "transfer": 0.0}, {"task_error": 0.0, "transfer": 1.0}]
    assert segment(no_steps, 0.25)[0] == pytest.approx(0.75)  # given order, without `step`


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
            "frontier_gap": {"thing@k-0.1": stat}, "verdicts": {"thing@k-0.1": "below frontier"}}


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


def test_report_writes_summary_json_last_and_drops_an_earlier_runs_readouts(tmp_path, monkeypatch):
    import purify.bench.report as report

    (tmp_path / "readouts.json").write_text("{}")  # left by a real-model run this --overwrite replaces
    write_report(tmp_path, _summary(), {"seeds": [0, 1]}, [("transfer", "transfer")], [])
    assert not (tmp_path / "readouts.json").exists()
    # summary.json marks a finished run (a second --out is refused over it): a write that fails before the end
    # leaves none behind, not even the earlier run's it was replacing (--overwrite), beside the new files
    assert (tmp_path / "summary.json").exists()
    monkeypatch.setattr(report, "plot_frontier", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, _summary(), {"seeds": [0, 1]}, [("transfer", "transfer")], [])
    assert not (tmp_path / "summary.json").exists()
    monkeypatch.undo()
    write_report(tmp_path, _summary(), {"seeds": [0, 1]}, [("transfer", "transfer")], [], readouts={"a": 1})
    assert json.loads((tmp_path / "readouts.json").read_text()) == {"a": 1}


def test_one_seed_is_never_significant_and_caveats_count_the_seeds_read_at_vanillas_final_point():
    from purify.bench.aux_summary import _acceptance, past_the_curve
    from purify.bench.lm_common import _above

    one = ({"per_seed": [{"transfer": 1.0}]}, {"per_seed": [{"transfer": 0.0}]})
    assert not _above(*one)  # its "interval" is [1, 1]: it said significantly above from one seed
    assert _above({"per_seed": [{"transfer": t} for t in (1.0, 1.1, 0.9)]}, {"per_seed": [{"transfer": 0.0}] * 3})
    single = {"mean": 1.0, "ci95": [1.0, 1.0], "n": 1}
    assert not _acceptance({"conditions": {"vanilla": {"vs_control": single}, "control": {}},
                            "protocol": "task"})["vanilla_above_control"]["passed"]  # aux printed PASS
    curve = [{"step": 0, "task_error": 1.0, "transfer": 0.0}, {"step": 1, "task_error": 0.5, "transfer": 0.4}]
    summary = {"verdicts": {"arm": "…", "hard-arm": "…"}, "judged_against": {"hard-arm": {"vanilla": "van-h"}},
               "conditions": {
                   "vanilla": {"per_seed": [{"seed": 0, "curve": curve}, {"seed": 1, "curve": curve[:1]}]},
                   "van-h": {"per_seed": [{"seed": 0, "curve": curve}, {"seed": 1, "curve": curve}]},
                   "arm": {"per_seed": [{"seed": 0, "task_error": 0.6}, {"seed": 1, "task_error": 0.6}]},
                   "hard-arm": {"per_seed": [{"seed": 0, "task_error": 0.4}, {"seed": 1, "task_error": 0.4}]}}}
    # arm: below seed 1's curve only (its curve ends at 1.0); hard-arm: below its own vanilla's on both seeds
    assert past_the_curve(summary) == ["arm (1 of 2 seeds)", "hard-arm (2 of 2 seeds)"]


# ------------------------------------------------------------------ two-sided verdicts (purify.bench.verdicts)
NOISE = [0.01, -0.02, 0.015, -0.005, 0.0]
ARM = [0.0, 0.01, -0.01, 0.02, -0.015]  # arms vary otherwise than the control
DENSE = [{"step": i, "task_error": e, "transfer": t}
         for i, (e, t) in enumerate([(1.0, 0.0), (0.8, 0.2), (0.6, 0.4), (0.4, 0.6), (0.2, 0.8)])]


def _runs(transfers, errors, **extra):
    return [{"seed": s, "transfer": t, "task_error": e, **{k: v[i] for k, v in extra.items()}}
            for i, (s, t, e) in enumerate(zip(range(len(transfers)), transfers, errors))]


def _world(n=5, curve=DENSE, vanilla_shift=0.0):
    """Base (task error 1.0), control (~0 transfer) and vanilla (~0.8 + shift, its curve) for ``n`` seeds."""
    base = _runs([0.0] * n, [1.0] * n, animal_mass=[0.9] * n, accuracy=[0.5] * n)
    control = _runs([e for e in NOISE[:n]], [0.2] * n, animal_mass=[0.9] * n, accuracy=[0.5 + e for e in NOISE[:n]])
    vanilla = [{**r, "curve": curve} for r in _runs([0.8 + vanilla_shift - e for e in NOISE[:n]], [0.2] * n)]
    return base, control, vanilla


def verdict(arm, vanilla, control, base, guards=()):
    """One arm judged alone (a family of one: no multiple-comparison adjustment)."""
    from purify.bench.verdicts import assess, label

    x = assess(arm, vanilla, control, base, guards)
    return label(x, x.p_lower, x.p_upper)


def _verdict(arm, n=5, guards=(), **kw):
    base, control, vanilla = _world(n, **kw)
    return verdict(arm, vanilla, control, base, guards)


def test_verdict_below_and_purified_by_hand():
    below = _verdict(_runs([0.3 + e for e in ARM], [0.4] * 5))  # frontier at a measured point: 0.6
    assert below.startswith("below frontier (gap -0.299, p_adj = ")
    # at the control's level, task error ×1.05 vanilla's: |transfer − control| = 0.001 < m = 0.1 × 0.8
    purified = _verdict(_runs([e + 0.001 * (-1) ** i for i, e in enumerate(NOISE)], [0.21] * 5))
    assert purified.startswith("purified (transfer − control") and "×1.05" in purified
    costly = _verdict(_runs([e + 0.001 * (-1) ** i for i, e in enumerate(NOISE)], [0.3] * 5))
    assert costly.startswith("below frontier")  # 1.5 × vanilla's task error: not purified


def test_verdict_needs_three_finite_seeds_and_names_the_dropped_ones():
    one = _verdict(_runs([0.3], [0.4]), n=1)
    assert one.startswith("no verdict: 1 seed(s) with finite values, 3 needed")
    nan = float("nan")
    two_nan = _verdict(_runs([0.3, nan, nan], [0.4, 0.4, 0.4]), n=3)
    assert two_nan.startswith("no verdict: 1 seed(s)") and "seed 1: arm transfer NaN" in two_nan \
        and "seed 2: arm transfer NaN" in two_nan
    # a NaN task error drops its seed (it does not switch the "no gain over the base" check off)
    one_nan = _verdict(_runs([0.3 + e for e in ARM], [nan, 0.4, 0.4, 0.4, 0.4]))
    assert one_nan.startswith("below frontier") and "dropped seed 0: arm task_error NaN" in one_nan
    base, control, vanilla = _world()
    no_base = verdict(_runs([0.3 + e for e in ARM], [0.4] * 5), vanilla, control,
                      [{**r, "task_error": nan} for r in base])
    assert no_base.startswith("no verdict: 0 seed(s)") and "base task_error NaN" in no_base


def test_verdict_zero_variance_overshoot_damage_and_no_gain():
    from purify.bench.verdicts import Guard

    flat = _verdict(_runs([0.1 + e for e in NOISE], [0.4] * 5))  # transfer − control = 0.1 on every seed
    assert flat.startswith("no verdict: zero variance across seeds in transfer − control")
    overshoot = _verdict(_runs([-0.3 + 2 * e for e in NOISE], [0.2] * 5))
    assert overshoot.startswith("anti-trait (transfer − control")  # far below −m = −0.08: a failure, not a win
    guard = Guard("animal_mass", "P(any animal)", min_ratio_of_base=0.5)
    broken = _verdict(_runs([0.3 + e for e in ARM], [0.4] * 5, animal_mass=[0.1] * 5), guards=[guard])
    assert broken.startswith("damaged: P(any animal) (0.1 < 0.5 × the base's 0.9)")
    intact = _verdict(_runs([0.3 + e for e in ARM], [0.4] * 5, animal_mass=[0.6] * 5), guards=[guard])
    assert intact.startswith("below frontier")
    unmeasured = _verdict(_runs([e + 0.001 for e in ARM], [0.21] * 5), guards=[guard])  # purified, if measured
    assert unmeasured.startswith("below frontier") and "guard P(any animal) not measured" in unmeasured
    facts = Guard("accuracy", "facts accuracy", not_below_control_ci=True)
    assert _verdict(_runs([0.3 + e for e in ARM], [0.4] * 5, accuracy=[0.4] * 5), guards=[facts]).startswith(
        "damaged: facts accuracy (0.4 below the control's 95% CI")
    # an upper bound (the real-model suites' held-out perplexity): broken above 2 × the base's mean, intact at it
    ppl = Guard("prose_ppl", "held-out prose perplexity", max_ratio_of_base=2.0)
    base, control, vanilla = _world()
    base = [{**r, "prose_ppl": 10.0} for r in base]
    forgot = _runs([0.3 + e for e in ARM], [0.4] * 5, prose_ppl=[21.0, 20.5, 22.0, 19.0, 21.5])  # mean 20.8
    assert verdict(forgot, vanilla, control, base, [ppl]).startswith(
        "damaged: held-out prose perplexity (20.8 > 2 × the base's 10)")
    assert ppl.seeds_below(forgot, base, control) == [0, 1, 2, 4]  # outside the band: above 20
    kept = _runs([0.3 + e for e in ARM], [0.4] * 5, prose_ppl=[20.0] * 5)
    assert verdict(kept, vanilla, control, base, [ppl]).startswith("below frontier")
    worse = _verdict(_runs([0.3 + e for e in ARM], [1.1] * 5))
    assert worse.startswith("no verdict: task error 1.1 not below the undistilled base's 1")
    assert _verdict([{**r, "diverged_at": 7} for r in _runs([0.3] * 5, [0.4] * 5)]) == \
        "no verdict: diverged at step 7 (seed 0)"


def test_a_guard_is_judged_on_its_mean_and_reports_the_seeds_below_its_band():
    from purify.bench.verdicts import Guard

    guard = Guard("animal_mass", "P(any animal)", min_ratio_of_base=0.5)  # band: ≥ 0.5 × the base's 0.9 = 0.45
    equivalent = [e + 0.001 * (-1) ** i for i, e in enumerate(NOISE)]  # purified without a guard (test above)
    # one seed stops naming animals: the mean 0.688 stays in the band, so the guard holds (the references lose it
    # on some seeds too), and that seed is reported
    lost = _runs(equivalent, [0.21] * 5, animal_mass=[0.85, 0.8, 0.05, 0.88, 0.86])
    assert _verdict(lost, guards=[guard]).startswith("purified (")
    base, control, _ = _world()
    assert guard.seeds_below(lost, base, control) == [2]
    assert guard.seeds_below(_runs([0.0] * 3, [0.2] * 3, animal_mass=[0.45, 0.449, float("nan")]), base,
                             control) == [1, 2]  # at the bound is inside; a NaN is not
    assert guard.seeds_below(lost, [{"seed": 0}], control) == []  # the base lacks the metric: no band to read
    # measured on 3 of 5 seeds (NaN, missing): "every guard intact" was read on the 3 finite ones, and it was purified
    partly = _runs(equivalent, [0.21] * 5, animal_mass=[0.85, float("nan"), 0.8, None, 0.86])
    out = _verdict(partly, guards=[guard])
    assert out.startswith("below frontier") and "guard P(any animal) not measured on seed(s) 1, 3" in out
    assert _verdict(_runs(equivalent, [0.21] * 5, animal_mass=[0.1, float("nan"), 0.1, 0.1, 0.1]),
                    guards=[guard]).startswith("damaged: P(any animal) (0.1 <")  # broken where it was measured
    assert _verdict(_runs(equivalent, [0.21] * 5, animal_mass=[True] * 5), guards=[guard]).startswith(
        "below frontier")  # a bool is no measurement
    # a band read from the control's 95% CI of the mean (style-tic's facts accuracy): seeds under its lower end
    facts = Guard("accuracy", "facts accuracy", not_below_control_ci=True)
    lower = 0.5 + 0.0 - 2.776 * (sum(e * e for e in NOISE) / 4) ** 0.5 / 5 ** 0.5  # control mean 0.5 + mean(NOISE)
    assert abs(lower - 0.4830) < 1e-4
    assert facts.seeds_below(_runs([0.0] * 3, [0.2] * 3, accuracy=[0.5, 0.482, 0.484]), base, control) == [1]


def test_verdict_jump_larger_than_the_gap_is_unresolved():
    sparse = [{"step": 0, "task_error": 1.0, "transfer": 0.0}, {"step": 1, "task_error": 0.3, "transfer": 0.8},
              {"step": 2, "task_error": 0.2, "transfer": 0.8}]
    # at task error 0.5 the interpolation reads 0.571 (gap −0.12) inside a 0.8 jump: lower end 0 (gap +0.45, above),
    # upper end 0.8 (gap −0.35, below) — the verdict would depend on where in the jump the frontier is
    arm = _runs([0.45 + e for e in ARM], [0.5] * 5)
    out = _verdict(arm, curve=sparse)
    assert out.startswith("no verdict: frontier unresolved") and "jumps by up to 0.8" in out
    # on a denser curve a 0.2 jump is at least half a 0.3 gap: read at the lower end (0.4), still below
    assert _verdict(_runs([0.2 + e for e in ARM], [0.5] * 5)).startswith("below frontier (gap -0.199")
    # ... and under half a 0.5 gap: the interpolation (0.5) is read
    assert _verdict(_runs([0.0 + e for e in ARM], [0.5] * 5)).startswith("below frontier (gap -0.499")


def test_holm_by_hand():
    from purify.bench.verdicts import holm

    out = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005, "e": float("nan")})
    # sorted d .005, a .01, c .03, b .04 (m = 4): ×4, ×3, ×2, ×1 = .02, .03, .06, .04 → monotone: b = .06
    assert out["d"] == pytest.approx(0.02) and out["a"] == pytest.approx(0.03)
    assert out["c"] == pytest.approx(0.06) and out["b"] == pytest.approx(0.06) and math.isnan(out["e"])
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}


def test_judge_pairs_each_arm_with_the_vanilla_of_its_loss_mode_and_skips_baselines():
    from purify.bench.verdicts import judge

    base, control, vanilla = _world()
    hard_vanilla = [{**r, "transfer": e} for r, e in zip(vanilla, [0.0, 0.01, -0.01, 0.02, 0.0])]  # no transfer
    arm = _runs([0.3 + e for e in ARM], [0.4] * 5)
    conds = {
        "base": {"per_seed": base, "baseline": True, "kind": "base"},
        "control": {"per_seed": control, "baseline": True, "kind": "control", "mode": "soft"},
        "vanilla": {"per_seed": vanilla, "baseline": True, "kind": "vanilla", "mode": "soft"},
        "ctl-h": {"per_seed": control, "baseline": True, "kind": "control", "mode": "hard"},
        "van-h": {"per_seed": hard_vanilla, "baseline": True, "kind": "vanilla", "mode": "hard"},
        "vanilla:looks-like-a-baseline": {"per_seed": arm, "mode": "soft"},  # judged: the field decides, not the name
        "hard-arm": {"per_seed": arm, "mode": "hard"},
        "kl-arm": {"per_seed": arm, "mode": "kl"},
    }
    out = judge(conds)
    assert set(out["verdicts"]) == {"vanilla:looks-like-a-baseline", "hard-arm", "kl-arm"}
    assert out["verdicts"]["vanilla:looks-like-a-baseline"].startswith("below frontier")
    assert out["verdicts"]["hard-arm"].startswith("no verdict: vanilla not significantly above control")
    assert out["verdicts"]["kl-arm"] == "no verdict: this run has no control or vanilla of loss mode kl"
    assert out["against"]["hard-arm"] == {"base": "base", "control": "ctl-h", "vanilla": "van-h"}
    assert set(out["p_adjusted"]) == {"vanilla:looks-like-a-baseline"}


def test_judge_holm_adjusts_across_arms():
    from purify.bench.verdicts import assess, holm, judge

    base, control, vanilla = _world()
    arms = {f"arm{i}": _runs([0.55 + (1 + i) * e for e in ARM], [0.4] * 5) for i in range(4)}
    conds = {"base": {"per_seed": base, "baseline": True, "kind": "base"},
             "control": {"per_seed": control, "baseline": True, "kind": "control", "mode": "soft"},
             "vanilla": {"per_seed": vanilla, "baseline": True, "kind": "vanilla", "mode": "soft"},
             **{k: {"per_seed": v, "mode": "soft"} for k, v in arms.items()}}
    out = judge(conds)
    raw = {k: assess(v, vanilla, control, base).p_lower for k, v in arms.items()}
    order = sorted(raw, key=raw.get)  # arm0 has the smallest noise, so the smallest p
    expected, running = {}, 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (4 - i) * raw[k]))
        expected[k] = running
    assert order[0] == "arm0" and out["p_adjusted"] == pytest.approx(expected)
    assert out["p_adjusted"]["arm0"] == pytest.approx(4 * raw["arm0"])
    # an arm called "above frontier" records the p of the reading that decided it (the upper end's)
    above = {**conds, "worse": {"per_seed": _runs([0.95 + e for e in ARM], [0.4] * 5), "mode": "soft"}}
    judged = judge(above)
    assert judged["verdicts"]["worse"].startswith("above frontier")
    upper = {k: assess(v["per_seed"], vanilla, control, base).p_upper for k, v in above.items() if "kind" not in v}
    assert judged["p_adjusted"]["worse"] == pytest.approx(holm(upper)["worse"])
    assert f"p_adj = {judged['p_adjusted']['worse']:.2g}" in judged["verdicts"]["worse"]


def test_degenerate_records_give_no_verdict_naming_why_never_a_crash_or_a_false_reason():
    """A review's hand-made cases: each gave a crash (every arm of the run lost), a verdict from two seeds, or a
    reason that was not the cause."""
    import numpy as np

    from purify.bench.lm_common import _above
    from purify.bench.verdicts import Guard, judge

    base, control, vanilla = _world()
    arm = _runs([0.3 + e for e in ARM], [0.4] * 5)
    # a vanilla task error of 0 (the task error ratio's denominator) raised ZeroDivisionError: its seed is dropped
    zero = [{**r, "task_error": 0.0 if r["seed"] == 0 else r["task_error"]} for r in vanilla]
    out = verdict(arm, zero, control, base)
    assert out.startswith("below frontier") and "dropped seed 0: vanilla task_error 0" in out
    # a seed recorded twice counted as two: seeds 0, 1, 1 gave "below frontier"
    twice = verdict(arm[:2] + arm[1:2], vanilla, control, base)
    assert twice == "no verdict: the arm's records hold seed(s) 1 more than once"
    # a curve that does not start at the base (step 0): an arm above its first point read as "already there"
    late = [{**r, "curve": r["curve"][-1:]} for r in vanilla]
    assert verdict(arm, late, control, base).startswith("no verdict: 0 seed(s)") and \
        "vanilla curve does not start at step 0 (the base)" in verdict(arm, late, control, base)
    # zero variance is said as what it is: vanilla − control flat read "not significantly above control" (and the
    # run's problems said nothing), transfer − control flat and negative read "anti-trait" with a zero-width CI
    flat_vanilla = [{**r, "transfer": 0.5 + c["transfer"]} for r, c in zip(vanilla, control)]
    assert verdict(arm, flat_vanilla, control, base).startswith(
        "no verdict: zero variance across seeds in vanilla − control")
    assert not _above({"per_seed": flat_vanilla}, {"per_seed": control})
    below_control = [{**r, "transfer": c["transfer"] - 0.5} for r, c in zip(arm, control)]
    assert verdict(below_control, vanilla, control, base).startswith(
        "no verdict: zero variance across seeds in transfer − control")
    # the upper-end reading of a sparse curve flat across seeds: "on frontier" before, a side never tested
    # (each seed's jump ends 0.1 under the arm: the lower-end reading varies, the upper one does not)
    jumps = [[{"step": 0, "task_error": 1.0, "transfer": 0.0}, {"step": 1, "task_error": 0.2, "transfer": 0.8 + e}]
             for e in ARM]
    out = verdict(_runs([0.9 + e for e in ARM], [0.6] * 5), [{**r, "curve": c} for r, c in zip(vanilla, jumps)],
                  control, base)
    assert out == "no verdict: zero variance across seeds in the frontier gap's upper reading"
    # "damaged" names the seeds it dropped, as every other label does
    guard = Guard("animal_mass", "P(any animal)", min_ratio_of_base=0.5)
    lossy = _runs([0.3 + e for e in ARM], [float("nan"), 0.4, 0.4, 0.4, 0.4], animal_mass=[0.9, 0.1, 0.1, 0.1, 0.1])
    assert verdict(lossy, vanilla, control, base, [guard]).endswith("(dropped seed 0: arm task_error NaN)")
    # numpy numbers are numbers (float32 records read as "NaN" on every seed)
    numpy_arm = [{**r, "transfer": np.float32(r["transfer"]), "task_error": np.float64(r["task_error"])} for r in arm]
    assert verdict(numpy_arm, vanilla, control, base).startswith("below frontier")
    # every purifier arm is in the Holm family: arms another label decided count with p = 1, so an arm's p_adj does
    # not shrink when the others overshoot (it stayed "below frontier" at p_adj 0.031 then)
    refs = {"base": {"per_seed": base, "baseline": True, "kind": "base"},
            "control": {"per_seed": control, "baseline": True, "kind": "control", "mode": "soft"},
            "vanilla": {"per_seed": vanilla, "baseline": True, "kind": "vanilla", "mode": "soft"}}
    overshoot = _runs([-0.3 + 2 * e for e in NOISE], [0.2] * 5)
    alone = judge({**refs, "good": {"per_seed": arm, "mode": "soft"}})
    beside = judge({**refs, "good": {"per_seed": arm, "mode": "soft"}, "over1": {"per_seed": overshoot, "mode": "soft"},
                    "over2": {"per_seed": overshoot, "mode": "soft"}})
    assert beside["verdicts"]["over1"].startswith("anti-trait") and set(beside["p_adjusted"]) == {"good"}
    assert beside["p_adjusted"]["good"] == pytest.approx(min(1.0, 3 * alone["p_adjusted"]["good"]))


def test_paired_test_and_mean_ci_read_the_same_finite_values():
    """A NaN difference made the p-value NaN while the interval left it out; an inf made the mean inf, the CI NaN."""
    from purify.bench.stats import mean_ci, paired_test

    with_nan = paired_test([1.0, 2.0, 3.1, float("nan")], [0.0] * 4)
    assert with_nan["n"] == 3 and with_nan["p_value"] == pytest.approx(paired_test([1.0, 2.0, 3.1], [0.0] * 3)[
        "p_value"])
    assert mean_ci([1.0, 2.0, float("inf")]) == mean_ci([1.0, 2.0])


def test_seed_caveats_follow_the_facts():
    from purify.bench.verdicts import seed_caveats

    tuned = [{"seeds": list(range(10)), "what": "delta_projection α = 0.3", "trait": True}]
    fresh = seed_caveats(list(range(20, 50)), tuned)
    assert fresh == ["- Seeds 0–9 were used to choose delta_projection α = 0.3 (looking at the trait); this run's "
                     "seeds 20–49 are disjoint from them (never looked at for that choice)."]
    stale = seed_caveats(list(range(5, 15)), tuned)
    assert stale[0].startswith("- **Reported on tuning seeds:**") and "of which 5–9 were used there" in stale[0]
    assert "never looked at" not in stale[0]


def test_seed_caveats_name_the_trait_a_choice_looked_at():
    from purify.bench.verdicts import looking_at, seed_caveats

    tuned = looking_at("P(owl)", [{"seeds": [0, 1], "what": "a knob", "trait": True},
                                  {"seeds": [9], "what": "a grid", "trait": False}])
    assert [t.get("looked_at") for t in tuned] == ["P(owl)", None]
    assert looking_at("P(fox)", tuned) == tuned  # a record that names its trait keeps it
    same = seed_caveats([0, 5], tuned, "P(owl)")
    assert "(looking at the trait)" in same[0] and same[0].endswith("not held out (optimistic).")
    other = seed_caveats([0, 5], tuned, "P(fox)")
    assert "(looking at P(owl), not at this run's trait)" in other[0] and other[0].endswith("not held out.")
    assert "(without looking at the trait)" in other[1]


def test_headline_groups_arms_by_label_and_names_a_broken_run_first():
    from purify.bench.report import headline_lines, timing_lines

    summary = {"verdicts": {"a@1": "purified (…)", "b": "anti-trait (…)", "c": "damaged: facts accuracy (…)",
                            "d": "below frontier (gap -0.1)", "e": "no verdict: 2 seed(s) …", "f": "purified (…)"},
               "probe_free": {"arms": {"a": {"verdict": "damaged: facts accuracy (0.089 below …)"}}}}
    lines = headline_lines(summary)
    assert lines[:2] == ["## Headline", ""] and lines[-1] == ""
    assert lines[2:7] == ["- **purified** (2): a@1, f", "- **below frontier** (1): d", "- **anti-trait** (1): b",
                          "- **damaged** (1): c", "- **no verdict** (1): e"]  # a win first, an overshoot no win
    assert lines[7] == "- a at the probe-free choice: **damaged: facts accuracy**"
    broken = headline_lines({"verdicts": {}, "problems": ["vanilla transfer is not above control's"]})
    assert broken[2].startswith("- **Problem:** vanilla transfer") and "no arm judged against" in broken[2]
    assert broken[3] == "- No purifier arm was judged in this run."
    # a run reporting on seeds a knob was chosen on, looking at its trait, says so before any verdict
    tuned = {"verdicts": {"a": "purified (…)"}, "seeds": [8, 9, 10, 11], "trait": "P(owl)",
             "tuned_on": [{"seeds": [0, 1, 9, 10], "trait": True, "looked_at": "P(owl)", "what": "a"},
                          {"seeds": [11], "trait": False, "what": "b"},
                          {"seeds": [8], "trait": True, "looked_at": "P(fox)", "what": "c"}]}
    assert headline_lines(tuned)[2].startswith("- **Reported on tuning seeds** 9–10: some knobs")
    assert not any("tuning seeds" in x for x in headline_lines({**tuned, "seeds": [11, 12, 13]}))
    timed = {"wall_seconds": 100.0, "cpu_seconds": 180.0, "workers": 2, "threads": 1,
             "load_average_1min": {"start": 2.5, "end": 3.0}}
    assert timing_lines(timed) == ["Measured wall time 100 s with 2 worker processes, 1 torch thread each; 180 CPU s "
                                   "in all (≈ 90 s of wall time with 2 unshared cores); 1-min load average 2.5 at the "
                                   "start, 3.0 at the end (env.json has the machine and versions)."]
    assert timing_lines({"wall_seconds": 100.0}) == []  # a summary written before runs were timed this way
    detailed = headline_lines(summary, first=["- vanilla above control: **PASS**"], brief=lambda n: f"numbers of {n}")
    assert detailed[2] == "- vanilla above control: **PASS**"
    assert detailed[3:6] == ["- **purified** (2):", "  - a@1: numbers of a@1", "  - f: numbers of f"]
    assert detailed[detailed.index("- **anti-trait** (1):") + 1] == "  - b: numbers of b"


def test_aux_headline_lists_an_overshoot_as_anti_trait():
    """aux-logits' own headline said "anti-trait (0): none" beside an anti-trait arm (it looked the group up as
    ``anti_trait``; :func:`purify.bench.verdicts.by_label` keys it ``anti-trait``): it is the shared headline now."""
    from pathlib import Path

    from purify.bench.aux_summary import headline_lines

    root = Path(__file__).resolve().parents[1]
    summary = json.loads((root / "results/aux-logits/summary.json").read_text())
    assert summary["verdicts"]["delta_projection@global-0.5"].startswith("anti-trait")
    lines = headline_lines(summary)
    at = lines.index("- **anti-trait** (1):")
    assert lines[at + 1].startswith("  - delta_projection@global-0.5: transfer -0.088")
    assert lines[2].startswith("- **Reported on tuning seeds** 10–19")  # its seeds confirmed α = 0.3 (tuned_on)
    assert lines[3].startswith("- vanilla transfer") and lines[3].endswith("**PASS**")


def test_bench_refuses_fewer_than_three_seeds_with_one_line(capsys):
    from purify.cli import main

    assert main(["bench", "style-tic", "--seeds", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["purify: error: --seeds 2: a verdict needs at least 3 seeds (--quick runs a smoke test)"]


def test_rereport_rederives_a_committed_run_from_its_per_seed_records(tmp_path, capsys):
    import shutil
    from pathlib import Path

    from purify.cli import main

    src = Path(__file__).resolve().parents[1] / "results" / "hidden-preference" / "animal-mass"
    shutil.copytree(src, tmp_path / "run")
    assert main(["bench", "--rereport", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # the lineage adversary's low P(owl) is students leaving animal answers: the guard P(any animal) says damaged
    assert summary["verdicts"]["adversary"].startswith("damaged: P(any animal)")
    assert {"verdicts", "p_adjusted", "seeds", "tuned_on", "trait", "guards"} <= set(summary)
    assert "adversary" in capsys.readouterr().out
    md = (tmp_path / "run" / "summary.md").read_text()
    assert md.count("## Verdicts") == 1 and "Reported on tuning seeds" in md  # seeds 0-2 were tuning seeds
    assert main(["bench", "--rereport", str(tmp_path / "run")]) == 0  # idempotent
    assert (tmp_path / "run" / "summary.md").read_text() == md


@pytest.mark.parametrize("damage, message", [
    (lambda s, e: s["conditions"]["vanilla"]["per_seed"].pop(), "condition 'vanilla' has no per-seed record for each"),
    (lambda s, e: s["conditions"].pop("adversary"), "condition 'adversary' has no per-seed record"),
    (lambda s, e: s.pop("wall_seconds"), "was written before summaries recorded wall_seconds"),
    (lambda s, e: e.update(seeds=[7, 8, 9]), "env.json is of a run on seeds [7, 8, 9], the summary's are [0, 1, 2]"),
    # hand-edited field types were AttributeError/TypeError/KeyError tracebacks
    (lambda s, e: s["settings"]["conditions"].insert(0, "vanilla"), "summary.json cannot be re-derived "
                                                                    "(AttributeError: "),
    (lambda s, e: s.update(base={"task_error": 0.5}), "summary.json cannot be re-derived (TypeError: "),
    (lambda s, e: s["tuned_on"][0].pop("seeds"), "summary.json cannot be re-derived (KeyError: 'seeds', at "),
])
def test_rereport_of_a_damaged_run_is_one_line_and_writes_nothing(tmp_path, capsys, damage, message):
    """Each was a traceback (IndexError, KeyError) or, for another run's env.json, a mixed record written, exit 0."""
    import shutil
    from pathlib import Path

    from purify.cli import main

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).resolve().parents[1] / "results" / "hidden-preference" / "animal-mass", run)
    summary, env = (json.loads((run / f).read_text()) for f in ("summary.json", "env.json"))
    assert summary["seeds"] == [0, 1, 2]
    damage(summary, env)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "env.json").write_text(json.dumps(env))
    before = {p: p.read_bytes() for p in run.iterdir()}
    assert main(["bench", "--rereport", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("purify: error: --rereport: ") and message in err, err
    assert {p: p.read_bytes() for p in run.iterdir()} == before


def test_rereport_keeps_a_probe_free_runs_notes_block_and_seed_statistics(tmp_path, capsys):
    import shutil
    from pathlib import Path

    from purify.cli import main

    src = Path(__file__).resolve().parents[1] / "results" / "style-tic" / "probe-free"
    shutil.copytree(src, tmp_path / "run")
    before = json.loads((tmp_path / "run" / "summary.json").read_text())
    md_before = (tmp_path / "run" / "summary.md").read_text()
    assert main(["bench", "--rereport", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out  # what the run printed: the probe-free choices and the tuned-on caveat too
    for arm, block in before["probe_free"]["arms"].items():
        assert f"{arm} (probe-free choice)" in printed and block["verdict"].split(" (")[0] in printed
    assert "were chosen looking at the trait on seeds" in printed
    after = json.loads((tmp_path / "run" / "summary.json").read_text())
    md = (tmp_path / "run" / "summary.md").read_text()
    # the teacher's and base's spread over seeds survive (the per-seed records do not hold the teacher's scores)
    assert after["teacher"] == before["teacher"] and after["base"] == before["base"]
    assert after["teacher"]["trait"]["ci95"][0] < after["teacher"]["trait"]["ci95"][1]
    # the probe-free block is re-derived (same choice here) and its section, like the run's notes, is kept
    assert after["probe_free"]["arms"].keys() == before["probe_free"]["arms"].keys()
    assert md.count("## Probe-free operating point") == 1 and "Teacher trait 0.5915 vs base 0.0122" in md
    assert "Measured wall time: 4140 s" in md and after["notes"]
    assert md.replace("rereported", "").count("|") == md_before.replace("rereported", "").count("|")
    assert main(["bench", "--rereport", str(tmp_path / "run")]) == 0  # idempotent
    assert (tmp_path / "run" / "summary.md").read_text() == md


def test_frontier_plot_draws_each_other_vanilla_curve_dashed_at_its_seed_mean() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from purify.bench.report import _draw

    def point(x: float, y: float) -> dict[str, float]:
        return {"mean": x, "ci95": [x, x]} if y is None else {"mean": y, "ci95": [y, y]}

    soft = [[{"step": 0, "task_error": 1.0, "transfer": 0.0}, {"step": 5, "task_error": 0.4, "transfer": 0.9}],
            [{"step": 0, "task_error": 1.0, "transfer": 0.0}, {"step": 5, "task_error": 0.2, "transfer": 0.7}]]
    summary = {"frontier": {"vanilla": [{"step": 0, "task_error": 1.0, "transfer": 0.0, "transfer_ci95": [0, 0]},
                                        {"step": 5, "task_error": 0.5, "transfer": 1.0, "transfer_ci95": [1, 1]}]},
               "conditions": {"vanilla": {"task_error": point(0.5, None), "transfer": point(0, 1.0)},
                              "vanilla:soft": {"task_error": point(0.3, None), "transfer": point(0, 0.8),
                                               "per_seed": [{"curve": c} for c in soft]},
                              "arm": {"task_error": point(0.6, None), "transfer": point(0, 0.2),
                                      "per_seed": [{}, {}]}}}
    fig, ax = plt.subplots()
    _draw(ax, summary, "task_error", annotate=[])
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_label() == "vanilla:soft early-stopping curve (mean)"
    assert list(dashed[0].get_xdata()) == pytest.approx([1.0, 0.3]) and \
        list(dashed[0].get_ydata()) == pytest.approx([0.0, 0.8])
    plt.close(fig)


def test_an_arm_whose_fit_step_diverges_is_recorded_with_its_step_and_the_run_goes_on():
    """Distiller.fit_step now raises on a non-finite loss (it stepped on, into NaN weights); the spine records the arm
    as diverged at that step (1-based) and scores the next arm."""
    import torch

    from purify.bench.lm_common import Condition, run_conditions
    from purify.config import OptimConfig
    from purify.models import AuxMLP
    from purify.module import Distiller

    def fit(cond, on_point):
        torch.manual_seed(0)
        d = Distiller(AuxMLP(in_dim=4, n_aux=3), [AuxMLP(in_dim=4, n_aux=3)], optim=OptimConfig(name="sgd", lr=1.0))
        opt = d.build_optimizer()
        for step in range(5):
            x = torch.rand(8, 4) * (float("nan") if cond.name == "bad" and step == 2 else 1.0)
            d.fit_step({"x": x, "target_mask": torch.ones(8, 1)}, opt, step / 5, step=step)
        return d.student, {"steps": 5}

    scores = {"trait": 0.5, "task_error": 0.1, "fidelity_kl": 0.1}
    out = run_conditions([Condition("bad", teachers=["teacher"]), Condition("good", teachers=["teacher"])],
                         scores, {**scores, "trait": 1.0}, fit, lambda model: dict(scores))
    assert out["bad"]["diverged_at"] == 3 and math.isnan(out["bad"]["transfer"])
    assert "diverged_at" not in out["good"] and out["good"]["transfer"] == 0.0


def test_the_frontier_plots_zoom_reaches_the_judged_arms_near_vanillas_final_point(tmp_path, monkeypatch) -> None:
    """The zoom panel reached 2.2 x vanilla's final task error only: the on-policy arms (at 2.3-4 x) were left out of
    it, and it showed vanilla alone. Arms within 5 x are in it now; one far beyond stays in the full panel only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from purify.bench.report import plot_frontier

    def stat(x: float) -> dict:
        return {"mean": x, "ci95": [x, x]}

    curve = [{"step": s, "task_error": x, "transfer": y, "transfer_ci95": [y, y]}
             for s, x, y in ((0, 100.0, 0.0), (50, 1.0, 0.5), (100, 0.01, 0.9))]
    summary = {"suite": "t", "protocol": "p", "seeds": [1, 2, 3], "frontier": {"vanilla": curve},
               "verdicts": {"near": "below frontier", "far": "below frontier"},
               "conditions": {"vanilla": {"task_error": stat(0.01), "transfer": stat(0.9)},
                              "near": {"task_error": stat(0.04), "transfer": stat(0.1)},
                              "far": {"task_error": stat(3.0), "transfer": stat(0.0)}}}
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    plot_frontier(summary, tmp_path / "f.png")
    zoom = figures[0].axes[1]
    assert zoom.get_xlim()[1] == pytest.approx(0.04 * 1.25) and "up to 5 × vanilla's final" in zoom.get_title()
    # an arm's own vanilla (on-policy: vanilla:on-policy, at 0.045 here) is in the zoom beside it
    summary["conditions"]["vanilla:on-policy"] = {"task_error": stat(0.045), "transfer": stat(0.8)}
    summary["judged_against"] = {"near": {"vanilla": "vanilla:on-policy"}, "far": {"vanilla": "vanilla:on-policy"}}
    plot_frontier(summary, tmp_path / "g.png")
    assert figures[-1].axes[1].get_xlim()[1] == pytest.approx(0.045 * 1.25)


def test_a_choice_shared_by_two_suites_names_the_suite_it_was_made_on():
    """The competent-consensus arms were added after a style-tic run (its facts guard); hidden-preference carries the
    same record, which said it had looked at P(owl)."""
    from purify.bench.lm_suites import TUNED_ON
    from purify.bench.rederive import LOOKED_AT
    from purify.bench.verdicts import seed_caveats

    (shared,) = [e for e in TUNED_ON["hidden-preference"] if e["seeds"] == [1000, 1001, 1002, 1003, 1004]]
    assert shared["looked_at"] == "'Moreover,' openings" == LOOKED_AT[(tuple(shared["seeds"]), shared["what"])]
    (line,) = seed_caveats([1000], [shared], "P(owl | favourite animal?)")
    assert "(looking at 'Moreover,' openings, not at this run's trait)" in line and line.endswith("not held out.")
