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


NAMES = ["pytorch", "fused", "hf_trainer", "lightning", "readouts"]


def test_readme_purifier_stacks_are_valid_recipes():
    """The README's example ``purifiers:`` block was refused by purify itself (adversary: lineage must come first,
    and ensemble may not follow it)."""
    import yaml

    from purify.assembly import load_recipe

    blocks = re.findall(r"```yaml\n(purifiers:.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    for block in blocks:
        entries = yaml.safe_load(block)["purifiers"]
        recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "ensemble.yaml",
                             [f"purifiers={entries}"])
        assert [p["name"] for p in recipe.purifiers] == [e["name"] for e in entries]


def test_readme_has_the_five_library_examples():
    blocks = library_blocks()
    assert len(blocks) == len(NAMES)
    assert "fit_step" in blocks[0] and "fused_linear_distillation_loss" in blocks[1]
    assert "PurifyTrainer" in blocks[2] and "L.Trainer" in blocks[3] and "purify.readouts" in blocks[4]


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
def test_readme_example_runs_and_trains(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(library_blocks()[index], f"README example {index}", "exec"), namespace)
    if index == 0:
        assert torch.isfinite(namespace["loss"]) and namespace["parts"]["loss"] > 0
    if NAMES[index] == "fused":  # equal to the loss on the built logits, and the gradient reached the output layer
        from purify.losses import distillation_loss

        student, teacher, batch = namespace["student"], namespace["teacher"], namespace["batch"]
        with torch.no_grad():
            full = distillation_loss(student(**batch).logits[:, :-1], teacher(**batch).logits[:, :-1],
                                     torch.ones(2, 15), temperature=2.0)
        assert namespace["loss"].item() == pytest.approx(full.item(), rel=1e-5)
        assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0
    if NAMES[index] == "hf_trainer":
        teacher, student = namespace["teacher"], namespace["student"]
        assert namespace["trainer"].state.global_step == 3
        assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    if NAMES[index] == "lightning":
        assert namespace["trainer"].global_step == 10
    if NAMES[index] == "readouts":  # an exact probability, and a KL of two different models above 0 with agreement in [0, 1]
        assert len(namespace["p_owl"]) == 1 and 0.0 < namespace["p_owl"][0] < 1.0
        fidelity = namespace["fidelity"]
        assert fidelity["fidelity_kl"] > 0 and 0.0 <= fidelity["agreement"] <= 1.0
