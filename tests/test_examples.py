"""The README's library examples run as written (every ```python block of its "Library use" section)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def library_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Library use", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_the_four_library_examples():
    blocks = library_blocks()
    assert len(blocks) == 4
    assert "fit_step" in blocks[0] and "PurifyTrainer" in blocks[1] and "L.Trainer" in blocks[2]
    assert "purify.readouts" in blocks[3]


@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["pytorch", "hf_trainer", "lightning", "readouts"])
def test_readme_example_runs_and_trains(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(library_blocks()[index], f"README example {index}", "exec"), namespace)
    if index == 0:
        assert torch.isfinite(namespace["loss"]) and namespace["parts"]["loss"] > 0
    if index == 1:
        teacher, student = namespace["teacher"], namespace["student"]
        assert namespace["trainer"].state.global_step == 3
        assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    if index == 2:
        assert namespace["trainer"].global_step == 10
    if index == 3:  # an exact probability, and a KL of two different models above 0 with agreement in [0, 1]
        assert len(namespace["p_owl"]) == 1 and 0.0 < namespace["p_owl"][0] < 1.0
        fidelity = namespace["fidelity"]
        assert fidelity["fidelity_kl"] > 0 and 0.0 <= fidelity["agreement"] <= 1.0
