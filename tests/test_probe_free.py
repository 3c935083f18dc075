"""The probe-free strength rule: hand-made sweeps, the rule's blindness to the trait, the summary block."""

from collections.abc import Mapping

import pytest

from purify.bench.probe_free import (
    Selectable,
    Sweep,
    block,
    choose,
    choose_per_seed,
    notes,
    point_name,
    rederive,
    selectable,
)
from purify.bench.verdicts import Guard


def pt(value: float, strength: int, err: float, drift: float) -> Selectable:
    return Selectable(value, strength, err, drift)


def test_least_drift_within_the_task_budget():
    points = [pt(0.05, 3, 1.30, 0.010),  # least drift, but over 1.10 × vanilla's task error
              pt(0.1, 2, 1.05, 0.020),
              pt(0.2, 1, 1.00, 0.030),
              pt(0.4, 0, 0.90, 0.050)]
    assert choose(points, vanilla_task_error=1.0) == (points[1], True)
    assert choose(points, vanilla_task_error=1.2) == (points[0], True)  # 1.30 ≤ 1.10 × 1.2: now admissible


def test_ties_go_to_the_weaker_setting_and_no_admissible_setting_takes_the_least_task_error():
    tied = [pt(0.1, 2, 1.0, 0.0200), pt(0.2, 1, 1.0, 0.0201), pt(0.4, 0, 1.0, 0.0300)]
    assert choose(tied, 1.0)[0].value == 0.2  # within 1% of the least drift: the weaker of the two
    over = [pt(1.0, 0, 2.0, 0.01), pt(3.0, 1, 1.5, 0.001)]
    assert choose(over, 1.0) == (over[1], False)


def test_the_rule_refuses_anything_but_selectable_points():
    record = {"value": 0.1, "strength": 0, "task_error": 1.0, "drift": 0.1, "trait": 0.9, "transfer": 0.8}
    with pytest.raises(TypeError, match="Selectable points only"):
        choose([record], 1.0)  # a raw record carries the trait: refused


class TraitTrap(Mapping):
    """A per-seed record whose trait fields fail the test the moment anything reads them."""

    def __init__(self, **values):
        self.values = values

    def __getitem__(self, key):
        if key in ("trait", "transfer", "distance_to_control", "owl_share", "animal_mass", "accuracy"):
            raise AssertionError(f"the rule read {key!r}")
        return self.values[key]

    def get(self, key, default=None):
        return self[key] if key in self.values else default

    def __iter__(self):
        raise AssertionError("the rule iterated over a record's keys")

    def __len__(self):
        return len(self.values)


def test_choice_per_seed_never_reads_a_trait_field_and_ignores_its_value():
    sweep = Sweep("threshold", (0.05, 0.1, 0.3), weaker="higher")
    assert [sweep.strength(v) for v in (0.3, 0.1, 0.05)] == [0, 1, 2]

    def records(trait_of):
        drift = {0.05: 0.01, 0.1: 0.02, 0.3: 0.05}
        err = {0.05: 1.5, 0.1: 1.05, 0.3: 0.95}
        return {point_name("replace", v): {s: TraitTrap(task_error=err[v] + s / 1000, drift=drift[v], trait=trait_of(v),
                                                         transfer=trait_of(v)) for s in (0, 1, 2)}
                for v in sweep.values}

    vanilla = {s: {"task_error": 1.0} for s in (0, 1, 2)}
    low = choose_per_seed(sweep, "replace", records(lambda v: 0.0), vanilla)
    high = choose_per_seed(sweep, "replace", records(lambda v: 10 * v), vanilla)
    assert {s: p.value for s, (p, _) in low.items()} == {0: 0.1, 1: 0.1, 2: 0.1}
    assert {s: p.value for s, (p, _) in high.items()} == {s: p.value for s, (p, _) in low.items()}
    assert selectable(0.1, 1, TraitTrap(task_error=1.0, drift=0.5, trait=1.0)) == pt(0.1, 1, 1.0, 0.5)


def _summary() -> dict:
    """Five seeds: vanilla transfers ~1 over a control at ~0, a dense vanilla curve, one swept arm whose least-drift
    setting within budget (weight 1) sits at the control, a stronger setting (3) over budget, a weaker one (0.3)
    that keeps half the trait."""
    seeds = [0, 1, 2, 3, 4]
    jitter = [0.01, -0.02, 0.015, -0.005, 0.0]
    curve = [{"step": 0, "task_error": 2.0, "transfer": 0.0}, {"step": 1, "task_error": 1.2, "transfer": 0.9},
             {"step": 2, "task_error": 1.1, "transfer": 0.95}, {"step": 3, "task_error": 1.0, "transfer": 1.0}]

    def rec(s, j, **kw):
        return {"seed": s, "accuracy": 0.5, **kw}

    conds = {
        "base": [rec(s, j, transfer=0.0, task_error=2.0, drift=0.0) for s, j in zip(seeds, jitter)],
        "control": [rec(s, j, transfer=j, task_error=1.0, drift=0.01) for s, j in zip(seeds, jitter)],
        "vanilla": [rec(s, j, transfer=1.0 - j, task_error=1.0, drift=0.1, curve=curve)
                    for s, j in zip(seeds, jitter)],
        "anchor@0.3": [rec(s, j, transfer=0.5 + j, task_error=1.0, drift=0.05) for s, j in zip(seeds, jitter)],
        "anchor@1": [rec(s, j, transfer=j + 0.3 * j, task_error=1.05, drift=0.02) for s, j in zip(seeds, jitter)],
        "anchor@3": [rec(s, j, transfer=-0.5, task_error=1.6, drift=0.001) for s, j in zip(seeds, jitter)],
    }
    settings = [{"name": "base", "baseline": True, "kind": "base", "loss": "forward_kl", "student": None},
                {"name": "control", "baseline": True, "kind": "control", "loss": "forward_kl", "student": None},
                {"name": "vanilla", "baseline": True, "kind": "vanilla", "loss": "forward_kl", "student": None}]
    settings += [{"name": n, "baseline": False, "kind": None, "loss": "forward_kl", "student": None}
                 for n in ("anchor@0.3", "anchor@1", "anchor@3")]
    return {"conditions": {n: {"per_seed": r} for n, r in conds.items()}, "settings": {"conditions": settings}}


def test_block_joins_the_trait_after_the_choice_and_judges_it():
    guards = [Guard("accuracy", "facts accuracy", not_below_control_ci=True)]
    out = block(_summary(), {"anchor": Sweep("weight", (0.3, 1.0, 3.0)), "missing": Sweep("rate", (0.1,))}, guards)
    assert list(out["arms"]) == ["anchor"]  # an arm whose points did not run is skipped
    arm = out["arms"]["anchor"]
    assert arm["chosen"] == {str(s): 1.0 for s in range(5)} and all(arm["within_budget"].values())
    jitter = [0.01, -0.02, 0.015, -0.005, 0.0]
    assert arm["transfer_minus_control"]["mean"] == pytest.approx(0.3 * sum(jitter) / 5)  # anchor@1 minus control
    assert arm["task_error_ratio"]["mean"] == pytest.approx(1.05)
    assert arm["guards"]["accuracy"]["problem"] is None
    assert arm["selection_inputs"]["0"]["3"] == {"task_error": 1.6, "drift": 0.001}
    assert arm["verdict"].startswith("purified"), arm["verdict"]
    summary = {**_summary(), "probe_free": out, "guards": [{"metric": "accuracy", "label": "facts accuracy",
                                                            "min_ratio_of_base": None, "not_below_control_ci": True}]}
    assert rederive(summary) == out  # recomputed from what summary.json records
    text = "\n".join(notes(out))
    assert "## Probe-free operating point" in text and "| anchor | weight: 1, 1, 1, 1, 1 |" in text


def test_a_seed_where_every_setting_diverged_leaves_the_arm_without_a_verdict():
    """The rule dropped a seed where every swept setting diverged, silently, and judged the survivors: settings
    diverging on 2 of 5 seeds and at the control elsewhere gave a probe-free ``purified`` on 3 seeds."""
    summary = _summary()
    for name in ("anchor@0.3", "anchor@1", "anchor@3"):
        for seed in (1, 3):
            summary["conditions"][name]["per_seed"][seed]["diverged_at"] = 7
    arm = block(summary, {"anchor": Sweep("weight", (0.3, 1.0, 3.0))})["arms"]["anchor"]
    assert arm["undecided_seeds"] == [1, 3] and list(arm["chosen"]) == ["0", "2", "4"]
    assert arm["verdict"].startswith("no verdict: the rule chose no setting on seed(s) 1, 3 (seed 1: every swept "
                                     "setting diverged or has no finite task error and drift; seed 3: every")
    assert arm["p_adjusted"] is None and arm["frontier_gap"] is None  # out of the Holm family
    # a seed a sweep point has no record of is named as such (it is no divergence)
    missing = _summary()
    missing["conditions"]["anchor@1"]["per_seed"] = missing["conditions"]["anchor@1"]["per_seed"][:4]
    arm = block(missing, {"anchor": Sweep("weight", (0.3, 1.0, 3.0))})["arms"]["anchor"]
    assert arm["verdict"].startswith("no verdict: the rule chose no setting on seed(s) 4 (seed 4: no record of "
                                     "anchor@1)")
    assert "undecided_seeds" not in block(_summary(), {"anchor": Sweep("weight", (0.3, 1.0, 3.0))})["arms"]["anchor"]
    # the strongest setting diverging on one seed: the rule chose among the others there, and the report says so
    partial = _summary()
    partial["conditions"]["anchor@3"]["per_seed"][2]["diverged_at"] = 5
    out = block(partial, {"anchor": Sweep("weight", (0.3, 1.0, 3.0))})
    assert out["arms"]["anchor"]["diverged_settings"] == {"2": [3.0]} and "undecided_seeds" not in out["arms"]["anchor"]
    assert "- anchor: settings that diverged, by seed (the rule chose among the others there): 2: 3" in notes(out)


def test_probe_free_verdicts_are_holm_adjusted_with_the_runs_arms():
    """The probe-free arms were adjusted among themselves (a family of one here) while summary.md said across the
    run's arms: the run's judged arms are in their family now."""
    from purify.bench.verdicts import judge

    summary = _summary()
    entries = {c["name"]: {"per_seed": summary["conditions"][c["name"]]["per_seed"], "baseline": c["baseline"],
                           "kind": c["kind"], "mode": "forward_kl", "student": None}
               for c in summary["settings"]["conditions"]}
    summary["verdicts"] = judge(entries)["verdicts"]
    assert set(summary["verdicts"]) == {"anchor@0.3", "anchor@1", "anchor@3"}
    alone = block(_summary(), {"anchor": Sweep("weight", (0.3, 1.0, 3.0))})["arms"]["anchor"]
    joint = block(summary, {"anchor": Sweep("weight", (0.3, 1.0, 3.0))})["arms"]["anchor"]
    # the probe-free arm is anchor@1 on every seed: same raw p; joined by the run's two judged arms the family grows
    family = 1 + sum(1 for v in summary["verdicts"].values() if v.split(" ")[0] in ("purified", "below", "on",
                                                                                   "above", "no") and "p_adj" in v)
    assert family >= 2 and joint["p_adjusted"] > alone["p_adjusted"]


def test_block_reports_the_seeds_whose_guard_is_below_its_band_beside_the_controls():
    summary = _summary()
    summary["conditions"]["anchor@1"]["per_seed"][2]["accuracy"] = 0.1  # the chosen setting loses it on seed 2
    summary["conditions"]["control"]["per_seed"][4]["accuracy"] = 0.2  # the control on seed 4
    guard = Guard("accuracy", "facts accuracy", min_ratio_of_base=0.5)  # band: ≥ 0.25; the arm's mean 0.42 inside
    g = block(summary, {"anchor": Sweep("weight", (0.3, 1.0, 3.0))}, [guard])["arms"]["anchor"]["guards"]["accuracy"]
    assert g["problem"] is None and g["seeds_below_band"] == [2] and g["control_seeds_below_band"] == [4]
    out = block(summary, {"anchor": Sweep("weight", (0.3, 1.0, 3.0))}, [guard])
    assert "| facts accuracy 0.42; 1 of 5 seeds below its band (control 1) |" in "\n".join(notes(out))


def test_block_judges_an_on_policy_sweep_against_the_on_policy_control_and_vanilla():
    summary = _summary()
    conds, settings = summary["conditions"], summary["settings"]["conditions"]
    op = {"lam": 1.0}
    for kind in ("control", "vanilla"):  # the on-policy references are the old ones; the off-policy vanilla is
        conds[f"{kind}:on-policy"] = conds[kind]  # made twice as good, so pairing with it leaves no setting in budget
        settings.append({"name": f"{kind}:on-policy", "baseline": True, "kind": kind, "loss": "forward_kl",
                         "student": None, "on_policy": op})
    conds["vanilla"] = {"per_seed": [{**r, "task_error": 0.5} for r in conds["vanilla"]["per_seed"]]}
    for s in settings:
        if s["name"].startswith("anchor@"):
            s["on_policy"] = op
    arm = block(summary, {"anchor": Sweep("weight", (0.3, 1.0, 3.0))})["arms"]["anchor"]
    assert arm["chosen"] == {str(s): 1.0 for s in range(5)} and all(arm["within_budget"].values())
    assert arm["task_error_ratio"]["mean"] == pytest.approx(1.05)  # against vanilla:on-policy's 1.0, not 0.5
    off = block(_summary() | {"conditions": conds}, {"anchor": Sweep("weight", (0.3, 1.0, 3.0))})
    assert not any(off["arms"]["anchor"]["within_budget"].values())  # the off-policy arms pair with vanilla's 0.5


def test_a_run_without_sweeps_records_why_it_has_no_probe_free_arm():
    from purify.bench.probe_free import none_swept

    out = none_swept({"problems": ["vanilla (ce) transfer is not significantly above control's", "other"]})
    assert out["arms"] == {} and out["rule"] and out["budget"] == 1.1
    assert out["why_none"].startswith("this run swept no arm's knob, so the rule had nothing to choose")
    assert "vanilla (ce) transfer is not significantly above control's: no setting could be judged" in out["why_none"]
    assert "other" not in out["why_none"]
    assert notes(out)[1:] == ["## Probe-free operating point", "", f"None: {out['why_none']}."]
    assert notes({}) == []


def test_the_suites_swept_arms_are_valid_purifier_entries_named_by_point():
    from purify.bench.lm_suites import _probe_free_arms
    from purify.config import OptimConfig
    from purify.purifiers import PURIFIERS

    conditions, sweeps = _probe_free_arms()
    assert {"replace:reference", "replace:base", "function_anchor", "replace:competent", "ensemble:competent",
            "fingerprint_adversary"} <= set(sweeps)
    assert [c.name for c in conditions] == [n for arm, sw in sweeps.items() for n in sw.names(arm)]
    for c in conditions:
        if c.name.startswith("sgd@"):  # the optimizer arm: no purifier, plain SGD at the point's learning rate
            assert c.purifiers == [] and c.optim == {"name": "sgd", "lr": float(c.name[4:])}, c.name
            OptimConfig(**c.optim)
            continue
        (entry,) = c.purifiers
        assert PURIFIERS[entry["name"]][0](**entry).problems() == [], c.name
    assert sweeps["replace:base"].strength(0.2) == 0 and sweeps["function_anchor"].strength(0.3) == 0  # weakest


def test_off_task_drift_is_zero_for_the_base_and_positive_for_another_model():
    import torch

    from purify.bench.lm_suites import _drift_scorer
    from purify.generate import load_model
    from purify.lm import resolve_base

    base, tok = load_model(resolve_base("tiny-llama-a"))
    other, _ = load_model(resolve_base("tiny-llama-b"))
    drift = _drift_scorer(4)
    torch.set_num_threads(1)
    assert drift(base, tok) == pytest.approx(0.0, abs=1e-6)
    assert drift(other, tok) > 0.01


# ------------------------------------------------------------------ aux-logits: global delta projection's α
def test_aux_class_drift_is_zero_for_the_base_and_positive_for_a_trained_model():
    import torch

    from purify.bench.aux_runs import class_drift
    from purify.models import AuxMLP

    torch.manual_seed(0)
    base, other = AuxMLP(8, [16], n_classes=3, n_aux=2), AuxMLP(8, [16], n_classes=3, n_aux=2)
    x = torch.rand(64, 8) * 2 - 1
    assert class_drift(base, base, x, 3) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        p, q = (torch.softmax(m.logits(x)[:, :3], -1) for m in (base, other))
    by_hand = float((p * (p.log() - q.log())).sum(-1).mean())  # KL(base ‖ other) on the class logits only
    assert class_drift(base, other, x, 3) == pytest.approx(by_hand, rel=1e-5) and by_hand > 0


def test_aux_probe_free_conditions_and_refusal():
    from purify.bench.aux_logits import SWEEPS, select_conditions
    from purify.bench.probe_free import PROBE_FREE
    from purify.bench.report import BenchError

    conds, sweeps = select_conditions("task", [PROBE_FREE])
    grid, weights = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), (0.1, 0.25, 0.5)
    assert SWEEPS["delta_projection:global"].values == grid and SWEEPS["ensemble:competent"].values == weights
    assert set(sweeps) == {"delta_projection:global", "ensemble:competent", "function_anchor",
                           "fingerprint_adversary", "function_anchor+ensemble:competent"}
    assert [c.name for c in conds] == ["base", "control", "vanilla", *(n for arm, sw in SWEEPS.items()
                                                                        for n in sw.names(arm))]
    projection, consensus = conds[3:3 + len(grid)], conds[3 + len(grid):3 + len(grid) + len(weights)]
    neutral = conds[3 + len(grid) + len(weights):-3]
    assert all(c.purifiers[0]["outputs"] == "undistilled" and c.purifiers[0]["source"] == "noise" for c in neutral)
    combined = conds[-3:]  # both levers, strengthened together: anchor weight up as T's weight goes down
    assert [(c.purifiers[1]["weight"], c.purifiers[0]["weights"][0]) for c in combined] == [(0.3, 0.5), (1.0, 0.25),
                                                                                          (3.0, 0.1)]
    assert [c.purifiers[0]["strength"] for c in projection] == list(grid)
    assert all(c.purifiers[0]["mode"] == "global" for c in projection)
    assert all(c.teachers == ["trait", "comp0", "comp1"] for c in consensus)  # T first, two competent references
    assert [c.purifiers[0]["weights"] for c in consensus] == [[w, (1 - w) / 2, (1 - w) / 2] for w in weights]
    conds, sweeps = select_conditions("paper", ["delta_projection@rank-8"])
    assert sweeps == {} and [c.name for c in conds][-1] == "delta_projection@rank-8"
    _, sweeps = select_conditions("paper", [PROBE_FREE])
    assert "ensemble:competent" not in sweeps  # the paper protocol has no task for a reference to know
    with pytest.raises(BenchError, match="unknown 'ensemble:competent'.*--protocol paper"):
        select_conditions("paper", ["ensemble:competent"])
    with pytest.raises(BenchError, match="unknown 'nope'.*allowed: probe-free, delta_projection:global"):
        select_conditions("task", ["nope"])
    from purify.bench.aux_logits import run_suite

    with pytest.raises(BenchError, match=r"unknown options \['steps'\]; allowed: \['conditions'\]"):
        run_suite(out="/nonexistent/never-written", steps=3)  # the suite checks its options, not only the CLI


def test_aux_competent_references_know_the_task_and_are_built_only_when_used():
    import torch.nn.functional as F

    from purify.bench.aux_runs import COMPETENT, Settings, build_world

    s = Settings(hidden=(32,), teacher_steps=150, ref_steps=20, n_eval=256, batch=64)
    plain = build_world(5, s, None)
    assert not set(COMPETENT) & set(plain.teachers)  # not trained unless a condition uses them
    world = build_world(5, s, None, {"trait", *COMPETENT})
    c, k = world.data.n_classes, s.k_task
    err = {name: float(F.mse_loss(t.logits(world.x_eval)[:, c:c + k].detach(), world.f_eval))
           for name, t in world.teachers.items()}
    for name in COMPETENT:  # trained as long as the teachers: they know the task as the control's teacher does,
        assert err[name] < 1.25 * err["control"] and err[name] < 0.9 * min(err["ref0"], err["ref1"]), err  # not weak
        assert world.acc[name] < world.acc["trait"] - 0.2  # and carry no digit trait
    assert plain.teachers["trait"].state_dict().keys() == world.teachers["trait"].state_dict().keys()


def test_aux_probe_free_run_picks_least_drift_within_budget_and_never_reads_the_digits(tmp_path, monkeypatch):
    import math

    from purify.bench import probe_free as pf
    from purify.bench.aux_logits import run, select_conditions
    from purify.bench.aux_runs import Settings
    from purify.bench.probe_free import PROBE_FREE

    seen = []
    real_choose = pf.choose

    def spy(points, vanilla_task_error):
        seen.append(points)
        return real_choose(points, vanilla_task_error)

    monkeypatch.setattr(pf, "choose", spy)
    tiny = Settings(n_aux=4, hidden=(32,), teacher_steps=30, ref_steps=10, student_steps=20, batch=32, n_eval=128,
                    curve_every=5)
    conds, sweeps = select_conditions("task", [PROBE_FREE])
    summary = run("task", [3, 4, 5], out=str(tmp_path), progress=False, workers=1, conditions=conds, sweeps=sweeps,
                  settings=tiny)
    arm = summary["probe_free"]["arms"]["delta_projection:global"]
    # the rule saw only Selectable views: knob, strength rank, task error, drift
    assert len(seen) == 3 * len(sweeps) and all(type(p) is pf.Selectable for pts in seen for p in pts)
    vanilla = {r["seed"]: r for r in summary["conditions"]["vanilla"]["per_seed"]}
    for seed, chosen in arm["chosen"].items():
        inputs = arm["selection_inputs"][seed]
        within = {float(v): x for v, x in inputs.items() if x["task_error"] <= 1.10 * vanilla[int(seed)]["task_error"]}
        assert within and arm["within_budget"][seed]  # α = 0 is vanilla's update, so the budget is never empty
        least = min(x["drift"] for x in within.values())
        tied = [v for v, x in within.items() if x["drift"] <= least + 0.01 * abs(least)]
        assert chosen == min(tied)  # the weakest of the least-drift settings
        rec = next(r for r in arm["per_seed"] if r["seed"] == int(seed))
        point = summary["conditions"][point_name("delta_projection:global", chosen)]["per_seed"]
        assert rec["transfer"] == next(r["transfer"] for r in point if r["seed"] == int(seed))  # joined afterwards
    # the digits do not move the choice: scramble every trait readout and re-derive
    for cond in summary["conditions"].values():
        for i, r in enumerate(cond["per_seed"]):
            r["transfer"], r["accuracy"] = (-1.0) ** i * 5.0, math.nan
    again = pf.rederive(summary)
    assert again["arms"]["delta_projection:global"]["chosen"] == arm["chosen"]
    md = (tmp_path / "summary.md").read_text()
    assert md.index("## Probe-free operating point") < md.index("### References")


def test_an_lm_suites_conditions_select_fixed_arms_by_name_and_sweeps_by_arm_name_and_refuse_unknown_names():
    from purify.bench.lm_suites import _core, _purifier_conditions, select_conditions
    from purify.bench.probe_free import GLOBAL_PROJECTION
    from purify.bench.report import BenchError

    default = _core(True) + _purifier_conditions(False)
    conds, sweeps = select_conditions(default, ["delta_projection:strength"])
    assert sweeps == {"delta_projection:strength": GLOBAL_PROJECTION}
    assert [c.name for c in conds] == ["base", "control", "vanilla",
                                       *GLOBAL_PROJECTION.names("delta_projection:strength")]
    assert [c.purifiers[0]["strength"] for c in conds[3:]] == list(GLOBAL_PROJECTION.values)
    assert {c.purifiers[0]["mode"] for c in conds[3:]} == {"global"}
    conds, sweeps = select_conditions(default, ["delta_projection:global", "anchor"])  # fixed arms, no sweep
    assert sweeps == {} and [c.name for c in conds] == ["base", "control", "vanilla", "anchor",
                                                        "delta_projection:global"]
    assert conds[-1].purifiers[0]["strength"] == 1.0
    with pytest.raises(BenchError, match=r"conditions: unknown 'nope'; allowed: probe-free, replace:reference"):
        select_conditions(default, ["vanilla:on-policy", "nope"])
    conds, sweeps = select_conditions(default, ["replace:on-policy"])  # an on-policy sweep, with both on-policy refs
    assert list(sweeps) == ["replace:on-policy"] and sweeps["replace:on-policy"].values == (0.05, 0.1, 0.2)
    _, both = select_conditions(default, ["replace:on-policy", "replace:competent:on-policy"])
    assert list(both) == ["replace:on-policy", "replace:competent:on-policy"]
    points = [c for c in conds if c.name.startswith("replace:on-policy@")]
    assert len(points) == 3 and all(c.on_policy and c.teachers == ["teacher", "reference"] for c in points)
    assert {"control:on-policy", "vanilla:on-policy"} <= {c.name for c in conds}
    _, sweeps = select_conditions(default, ["probe-free"])  # "probe-free" names the off-policy sweeps only
    assert "replace:on-policy" not in sweeps and "replace:reference" in sweeps
