"""Real-model recipes (recipes/real/): structure, and the same recipes built from scaled-down configs of the real
model types (hidden 32, 2 layers) with offline tokenizers, trained for one step (no weights are downloaded); and the
torchrun / SLURM launch scripts that run them, with stub launchers."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from purify.assembly import build_run, load_recipe, validate
from purify.config import Recipe, RecipeError
from purify.data import read_text
from purify.lm.tokenizer import build_tokenizer
from purify.purifiers import PURIFIERS
from purify.strategy import build_strategy

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.joinpath("recipes", "real").glob("*.yaml"))
FAMILIES = {"HuggingFaceTB/SmolLM2-": ("llama", "word"), "Qwen/Qwen2.5-": ("qwen2", "char")}
"""Hub prefix → (transformers model_type of the real checkpoints, tiny tokenizer kind standing in for its vocab)."""
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64}



@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """One offline tokenizer directory per tokenizer kind (families with different vocabularies get different ones)."""
    root, texts = tmp_path_factory.mktemp("tok"), [r["completion"] for r in read_text(None)]
    for kind in ("word", "char"):
        build_tokenizer(texts, kind).save_pretrained(root / kind)
    return {kind: str(root / kind) for kind in ("word", "char")}


def family(path: str) -> tuple[str, str]:
    match = [v for prefix, v in FAMILIES.items() if path.startswith(prefix)]
    assert match, f"{path}: not a known family; add its hub prefix to FAMILIES"
    return match[0]


def scaled(recipe: Recipe, tokenizers: dict[str, str]) -> Recipe:
    """The recipe with every model built from a tiny config of its real model type; a teacher whose name extends the
    student's (a fine-tune of its base) shares the student's init seed."""
    def small(spec, seed):
        model_type, kind = family(spec.path)
        return dataclasses.replace(spec, path=None, revision=None, seed=seed, tokenizer=tokenizers[kind],
                                   config={"model_type": model_type, **SMALL})

    student = recipe.student.path
    teachers = [small(t, 0 if t.path.startswith(student) else i + 1) for i, t in enumerate(recipe.teachers)]
    data = dataclasses.replace(recipe.data, max_length=32, batch_size=4)
    trainer = dataclasses.replace(recipe.trainer, precision="32-true", accelerator="cpu", devices=1)
    return dataclasses.replace(recipe, student=small(recipe.student, 0), teachers=teachers, data=data,
                               trainer=trainer, strategy="auto")


def load_or_skip(path: Path) -> Recipe:
    missing = [p for p in re.findall(r"- name: (\w+)", path.read_text()) if p not in PURIFIERS]
    if missing:
        with pytest.raises(RecipeError, match=rf"purifiers\[0\]\.name: unknown purifier '{missing[0]}'"):
            load_recipe(path)
        pytest.skip(f"{path.name}: purifier {missing[0]!r} is not registered yet")
    return load_recipe(path)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_real_recipe_structure(path):
    recipe = load_or_skip(path)
    method, student, teacher = re.fullmatch(r"([a-z_]+)-(.+)_from_(.+)", path.stem).groups()
    assert method == (recipe.purifiers[0]["name"] if recipe.purifiers else "kd")
    assert recipe.student.name == student and recipe.teachers[0].name.startswith(teacher)
    assert re.search(r"-(135M|360M|0\.5B)$", recipe.student.path), "students are 0.1-0.5B models"
    assert all(t.path and t.path != recipe.student.path for t in recipe.teachers)
    assert recipe.trainer.precision == "bf16-mixed" and recipe.trainer.accelerator == "gpu"
    delta = method == "delta_projection"  # edits weights in place, which DeepSpeed's master copy would not see
    assert recipe.strategy == "ddp" if delta else recipe.strategy in ("deepspeed_stage_2", "deepspeed_stage_3")
    assert recipe.output_dir == f"outputs/real/{path.stem}"
    if not delta:
        strategy = build_strategy(recipe.strategy, accelerator="cpu")  # the GPU one differs only in device selection
        assert strategy.config["zero_optimization"]["stage"] == int(recipe.strategy[-1])


def test_real_recipes_cover_both_families_zero_2_and_3_and_the_purifier_variants():
    recipes = {p.stem: p.read_text() for p in RECIPES}
    assert {"kd", "divergence_mask", "ensemble", "anchor", "delta_projection", "cross_base"} <= {
        name.split("-")[0] for name in recipes}
    assert any("Qwen/" in text and "SmolLM2" in text for text in recipes.values())  # a cross-family teacher
    assert any("deepspeed_stage_3" in t for t in recipes.values()) and any("deepspeed_stage_2" in t for t in
                                                                           recipes.values())


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_real_recipe_builds_and_trains_a_step_at_tiny_scale(path, tokenizers):
    recipe = scaled(load_or_skip(path), tokenizers)
    validate(recipe)
    run = build_run(recipe)
    assert [type(m).__name__ for m in (run.student.module, *[t.module for t in run.teachers])] == [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[s.config["model_type"]]
        for s in (recipe.student, *recipe.teachers)]
    distiller = run.distiller
    with torch.no_grad():
        for teacher, spec in zip(distiller.teachers, recipe.teachers):
            if spec.seed == 0:  # a fine-tune of the student's base: same init plus a small update
                for p in teacher.parameters():
                    p.add_(0.01 * torch.randn_like(p))
    run.datamodule.setup()
    batch = next(iter(run.datamodule.train_dataloader()))
    before = [p.detach().clone() for p in distiller.student.parameters()]
    optimizer = distiller.build_optimizer()
    parts = distiller.fit_step(batch, optimizer, progress=0.0, scheduler=distiller.build_scheduler(optimizer))
    assert torch.isfinite(parts["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, distiller.student.parameters()))


def run_script(script: str, args: list[str], env: dict[str, str], bin_dir: Path) -> list[str]:
    """Run a launch script with stub executables first on PATH; return the argv the launcher was given."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                            env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **env}, check=True)
    return result.stdout.strip().splitlines()[-1].split()


def stub(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
    (bin_dir / name).chmod(0o755)


def test_torchrun_launcher_sets_devices_and_nodes_and_keeps_overrides_last(tmp_path):
    stub(tmp_path, "python", 'echo "python $*"')
    stub(tmp_path, "nvidia-smi", 'printf "GPU 0: A\\nGPU 1: B\\nGPU 2: C\\n"')
    argv = run_script("launch_torchrun.sh", ["r.yaml", "trainer.max_steps=5"],
                      {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}, tmp_path)
    assert argv == ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node",
                    "3", "--master-addr", "10.0.0.1", "--master-port", "29500", "-m", "purify", "train", "r.yaml",
                    "trainer.devices=3", "trainer.num_nodes=2", "trainer.max_steps=5"]


def test_slurm_launcher_takes_rendezvous_and_sizes_from_slurm(tmp_path):
    stub(tmp_path, "scontrol", 'echo node-07; echo node-08')
    stub(tmp_path, "srun", 'echo "srun $*"')
    env = {"SLURM_JOB_NODELIST": "node-[07-08]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_JOB_ID": "123456"}
    argv = run_script("launch_slurm.sbatch", ["r.yaml", "x=1"], env, tmp_path)
    assert argv == ["srun", "--kill-on-bad-exit=1", "python", "-m", "purify", "train", "r.yaml", "trainer.devices=4",
                    "trainer.num_nodes=2", "x=1"]
    stub(tmp_path, "srun", 'echo "srun $MASTER_ADDR $MASTER_PORT"')
    port = str(15000 + 123456 % 20000)
    assert run_script("launch_slurm.sbatch", ["r.yaml"], env, tmp_path) == ["srun", "node-07", port]


PACKAGED = sorted(ROOT.joinpath("recipes", "real", "packaged").glob("*.yaml"))


@pytest.mark.parametrize("path", PACKAGED, ids=[p.stem for p in PACKAGED])
def test_packaged_model_recipes_validate_without_fetching(path):
    """Recipes naming pip-packaged models (`packaged:`) validate offline: the names are known, nothing is fetched."""
    recipe = load_recipe(path)
    assert recipe.student.packaged and all(t.packaged for t in recipe.teachers)
    with pytest.raises(RecipeError, match=r"student\.packaged: unknown packaged model 'nosuch'; allowed: smollm2-135m"):
        load_recipe(path, ["student.packaged=nosuch"])
