"""README.md's benchmark result tables are generated from the committed ``results/**/summary.json``."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_readme", ROOT / "scripts" / "check_readme.py")
check_readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_readme)


def test_readme_tables_match_the_summaries():
    assert check_readme.main(["--check"]) == 0


def test_a_stale_table_is_caught_and_named(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    summary = json.loads((ROOT / "results" / "tic-smollm2" / "summary.json").read_text())
    row = check_readme.table(summary, ["anchor"]).splitlines()[-1]
    assert row.startswith("| anchor | 0.539 [0.453, 0.624] | +0.539 | 1.11 |") and "frontier unresolved" in row
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace(row, row.replace("0.539 [", "0.391 [")))
    assert check_readme.main(["--check", "--readme", str(stale)]) == 1
    assert "results/tic-smollm2/summary.json differs" in capsys.readouterr().err
    assert check_readme.main(["--readme", str(stale)]) == 0 and stale.read_text() == readme  # regenerated


def test_probe_free_tables_show_the_choice_per_seed_and_the_verdict_at_it(tmp_path):
    summary = {"probe_free": {"arms": {"anchor": {
        "knob": "weight", "chosen": {"1000": 1.0, "1001": 3.0}, "within_budget": {"1000": True, "1001": False},
        "transfer_minus_control": {"mean": -0.0123, "ci90": [-0.05, 0.0251], "n": 2},
        "task_error_ratio": {"mean": 1.046},
        "guards": {"accuracy": {"label": "facts accuracy", "mean": 0.0912, "problem": "below the control's CI"}},
        "verdict": "damaged: facts accuracy (below the control's CI)"}}}}
    assert check_readme.probe_free_table(summary).splitlines()[-1] == (
        "| anchor (weight) | 1, 3* | -0.012 [-0.050, +0.025] | 1.05 | facts accuracy 0.0912 (broken) | damaged: facts "
        "accuracy |")
    shaky = {"label": "P(any animal)", "mean": 0.667, "problem": None, "seeds_below_band": [1001],
             "control_seeds_below_band": [1000, 1001]}
    summary["probe_free"]["arms"]["anchor"].update(guards={"animal_mass": shaky}, verdict="purified (…)")
    assert check_readme.probe_free_table(summary).splitlines()[-1].endswith(
        "| P(any animal) 0.667; 1 of 2 seeds below its band (control 2) | purified |")
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    readme = tmp_path / "README.md"
    readme.write_text(f"<!-- probe-free-table: {path} -->\nstale\n<!-- /probe-free-table -->\n")
    assert check_readme.main(["--check", "--readme", str(readme)]) == 1
    assert check_readme.main(["--readme", str(readme)]) == 0 and "| anchor (weight) | 1, 3* |" in readme.read_text()


def test_a_p_value_quoted_in_prose_must_be_its_runs(tmp_path, capsys):
    """The README's prose quoted p_adj values a change of the Holm family had left behind (13 of them): each quote is
    checked against the summaries of the runs its paragraph names (else the last named before it), at the digits it
    shows, and against the arm the paragraph names where it names one."""
    summary = tmp_path / "results" / "run" / "summary.json"
    summary.parent.mkdir(parents=True)
    arms = {"b": {"p_adjusted": 2.2e-7}}
    summary.write_text(json.dumps({"p_adjusted": {"a": 0.00351}, "probe_free": {"arms": arms}}))
    good = "--out results/run ... below (gap -0.4, p_adj = 0.0035) and (p_adj = 2.2e-7)."
    assert check_readme.stale_p_values(good, tmp_path) == []
    stale = good.replace("0.0035", "0.0018") + "\nno run named: p_adj = 0.1"
    assert check_readme.stale_p_values("p_adj = 0.1", tmp_path) == [
        "line 1: p_adj = 0.1 names no results/ run before it"]
    assert check_readme.stale_p_values(stale, tmp_path) == [
        "line 1: p_adj = 0.0018 is no p-value of results/run/summary.json", "line 2: p_adj = 0.1 is no p-value of "
        "results/run/summary.json"]
    readme = (ROOT / "README.md").read_text()
    quoted = "p_adj = 0.0052"  # the fox run's probe-free arm
    assert quoted in readme
    stale_readme = tmp_path / "README.md"
    stale_readme.write_text(readme.replace(quoted, "p_adj = 0.0017"))
    assert check_readme.main(["--check", "--readme", str(stale_readme)]) == 1
    err = capsys.readouterr().err
    assert "p_adj = 0.0017 is no p-value of replace:competent:on-policy of " in err
    assert "results/hidden-preference/on-policy-competent-fox/summary.json" in err
    # the arm named decides: a's value quoted for b fails; another run named in between does not hide the first
    assert check_readme.stale_p_values("--out results/run: arm b (p_adj = 0.0035)", tmp_path) == [
        "line 1: p_adj = 0.0035 is no p-value of b of results/run/summary.json"]
    other = tmp_path / "results" / "other" / "summary.json"
    other.parent.mkdir()
    other.write_text(json.dumps({"p_adjusted": {"c": 0.5}}))
    assert check_readme.stale_p_values("--out results/run, beside results/other: a (p_adj ≈ 0.0035)", tmp_path) == []


def _summary(verdict: str, seeds: list[int], tuned_seeds: list[int], trait: str = "P(owl | q)") -> dict:
    arm = {"knob": "threshold", "verdict": verdict, "transfer_minus_control": {"mean": 0.01, "ci90": [-0.02, 0.04],
                                                                              "n": len(seeds)},
           "task_error_ratio": {"mean": 0.934}, "frontier_gap": {"margin": 0.05}}
    return {"suite": "s", "trait": trait, "seeds": seeds, "probe_free": {"arms": {"replace": arm}},
            "tuned_on": [{"seeds": tuned_seeds, "trait": True, "what": "x"},
                         {"seeds": seeds, "trait": False, "what": "looked at no trait"}]}


def test_the_scoreboard_puts_wins_first_and_says_which_seeds_were_held_out(tmp_path):
    runs = {"a": _summary("damaged: facts (below)", [1, 2, 3], [2]),
            "b": _summary("purified (transfer − control +0.01, ...)", [10, 11, 12], [1, 2]),
            "c": {"suite": "s", "trait": "t", "seeds": [1], "probe_free": {"arms": {}}}}
    for name, summary in runs.items():
        (tmp_path / "results" / name).mkdir(parents=True)
        (tmp_path / "results" / name / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "results" / "b" / "PREREGISTERED.md").write_text("fixed before the run")
    rows = check_readme.scoreboard(tmp_path).splitlines()[2:]
    assert rows == [
        "| **purified** | replace (threshold) | P(owl \\| q) | [b](results/b) | 10–12 (3; fresh, pre-registered) | "
        "+0.010 [-0.020, +0.040] | ±0.050 | 0.93 |",
        "| damaged: facts | replace (threshold) | P(owl \\| q) | [a](results/a) | 1–3 (3; tuning seeds) | "
        "+0.010 [-0.020, +0.040] | ±0.050 | 0.93 |"]
    readme = tmp_path / "README.md"
    readme.write_text("<!-- scoreboard -->\nstale\n<!-- /scoreboard -->\n")
    text, changed = check_readme.render(readme.read_text(), tmp_path)
    assert "the scoreboard (results/**/summary.json)" in changed and rows[0] in text
