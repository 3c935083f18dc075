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
