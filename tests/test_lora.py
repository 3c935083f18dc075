"""LoRA students (student.lora through peft): only the adapter trains, exports load with peft and plain transformers
and give the trained student's logits, exact resume, validation of the section and of weight-editing purifiers."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from purify.assembly import build_run, load_recipe
from purify.cli import main
from purify.config import LoraSpec, ModelSpec
from purify.lm.bases import resolve_base
from purify.models import build_model, model_forward
from purify.module import Distiller
from purify.purifiers.anchor import Anchor, AnchorConfig
from purify.train import train
from purify.types import RecipeError
from tests.conftest import mlp_overrides

peft = pytest.importorskip("peft")
RECIPE = str(Path(__file__).parents[1] / "recipes" / "lora.yaml")
SMALL = ["trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3", "trainer.val_check_interval=3",
         "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
         "trainer.accelerator=cpu", "data.max_length=32", "data.batch_size=8", "scheduler.warmup_steps=0",
         "optim.name=sgd", "optim.lr=0.5"]  # SGD: a wrong gradient scale shows in the weights (Adam hides it)


def lora_recipe(out: Path, *extra: str):
    return load_recipe(RECIPE, [*SMALL, f"output_dir={out}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 6-step LoRA run of the shipped recipe (adapter and merged exports, checkpoints at steps 3 and 6)."""
    out = tmp_path_factory.mktemp("lora") / "full"
    recipe = lora_recipe(out)
    train(recipe)
    return recipe, out


def student_from_checkpoint(recipe, ckpt: Path) -> torch.nn.Module:
    run = build_run(recipe)
    run.distiller.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    return run.distiller.student.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(4, 255, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        return model_forward(model, batch).logits


def test_only_the_adapter_trains_and_base_weights_stay_bit_identical(trained):
    recipe, out = trained
    initial = build_run(recipe).distiller.student
    trainable = {n for n, p in initial.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = initial.state_dict()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    after = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    assert after.keys() == before.keys()
    frozen = [k for k in before if k not in trainable]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(bool(after[k].abs().sum() > 0) for k in trainable if ".lora_B." in k)  # B starts at 0 and moved
    # the optimizer held exactly the adapter's tensors
    state = ckpt["optimizer_states"][0]["param_groups"]
    assert sum(len(g["params"]) for g in state) == len(trainable)


def test_adapter_export_loads_with_peft_and_gives_the_trained_logits(trained):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    recipe, out = trained
    student = out / "student"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "lineage.json"} <= {
        p.name for p in student.iterdir()}
    expected = logits(student_from_checkpoint(recipe, out / "checkpoints" / "last.ckpt"))
    base = AutoModelForCausalLM.from_pretrained(resolve_base("tiny-llama-b"))
    onto_base = PeftModel.from_pretrained(base, student).eval()
    torch.testing.assert_close(logits(onto_base), expected, atol=1e-6, rtol=0)
    auto = AutoPeftModelForCausalLM.from_pretrained(student).eval()  # finds the base from adapter_config.json
    torch.testing.assert_close(logits(auto), expected, atol=1e-6, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(resolve_base("tiny-llama-b")).eval()  # PeftModel edited `base`
    assert not torch.allclose(logits(plain), expected, atol=1e-4)  # the adapter changed the base's outputs


def test_merged_export_loads_with_plain_transformers_and_matches(trained):
    from transformers import AutoModelForCausalLM

    recipe, out = trained
    merged_dir = out / "student-merged"
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "lineage.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    expected = logits(student_from_checkpoint(recipe, out / "checkpoints" / "last.ckpt"))
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_resumed_lora_run_equals_uninterrupted(trained):
    recipe, out = trained
    resumed = train(lora_recipe(out.parent / "resumed", f"resume={out / 'checkpoints' / 'step3.ckpt'}",
                                "student.lora.export_merged=false"))
    a = load_file(out / "student" / "adapter_model.safetensors")
    b = load_file(resumed / "student" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert not (resumed / "student-merged").exists()


def test_a_student_with_dropout_resumes_exactly(tmp_path):
    """Dropout draws from the global random stream, which checkpoints did not keep: a resumed LoRA run with
    dropout 0.1 was 0.0097 off the uninterrupted one after two steps (dropout 0 resumed exactly)."""
    drop = ("student.lora.dropout=0.1", "student.lora.export_merged=false")
    full = train(lora_recipe(tmp_path / "full", *drop))
    resumed = train(lora_recipe(tmp_path / "resumed", *drop, f"resume={full / 'checkpoints' / 'step3.ckpt'}"))
    a = load_file(full / "student" / "adapter_model.safetensors")
    b = load_file(resumed / "student" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    again = train(lora_recipe(tmp_path / "again", *drop))  # and from scratch, the same run again
    c = load_file(again / "student" / "adapter_model.safetensors")
    assert all(torch.equal(a[key], c[key]) for key in a)


@pytest.mark.slow
def test_ddp_two_processes_equal_one(trained, tmp_path):
    _, out = trained
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "purify", "train", RECIPE, *SMALL, f"output_dir={tmp_path / 'ddp'}", "strategy=ddp",
           "trainer.devices=2", "data.batch_size=4", "student.lora.export_merged=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = load_file(out / "student" / "adapter_model.safetensors")
    got = load_file(tmp_path / "ddp" / "student" / "adapter_model.safetensors")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_a_deepspeed_lora_run_resumes_exactly_and_refuses_another_base(tmp_path):
    """DeepSpeed leaves frozen weights out of its checkpoints (the teachers, rebuilt from the recipe), so a LoRA
    student's base was missing at load: a resume was a traceback after the run's record was rewritten. The base is
    this build's now, checked against the starting weights the checkpoint's run recorded."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def launch(name, *extra):
        cmd = [sys.executable, "-m", "purify", "train", RECIPE, *SMALL, f"output_dir={tmp_path / name}",
               "strategy=deepspeed_stage_2", "trainer.devices=2", "data.batch_size=4", "trainer.max_steps=4",
               "trainer.checkpoint_every_n_steps=2", "student.lora.export_merged=false", *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    full = launch("full")
    assert full.returncode == 0, full.stderr[-3000:]
    step2 = tmp_path / "full" / "checkpoints" / "step2.ckpt"
    resumed = launch("resumed", f"resume={step2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (load_file(tmp_path / n / "student" / "adapter_model.safetensors") for n in ("full", "resumed"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    other = launch("other", f"resume={step2}", "seed=7")  # another seed: another adapter init (and data order)
    lines = [line for line in other.stderr.splitlines() if line.startswith("purify: error:")]
    assert other.returncode == 2 and len(lines) == 1, other.stderr[-2000:]
    assert "holds a LoRA adapter without its frozen base" in lines[0] and "started from other weights" in lines[0]
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("override, message", [
    ("student.lora.r=0", "student.lora.r: must be an int >= 1, got 0"),
    ("student.lora.alpha=0", "student.lora.alpha: must be a finite number > 0"),
    ("student.lora.dropout=1.0", "student.lora.dropout: 1.0 is not in [0, 1)"),
    ("student.lora.target_modules=[]", "student.lora.target_modules: give module names"),
    ("student.lora.target_modules=[all-linear,q_proj]", "student.lora.target_modules: all-linear stands alone"),
    ("student.lora.rank=4", "student.lora.rank: unknown key"),
    ("teachers=[{builtin: tiny-llama-a, lora: {r: 4}}]", "teachers[0].lora: teachers are frozen"),
    ("student={config: {model_type: llama}, tokenizer: tiny-llama-a, lora: {r: 4}}", "student.lora: LoRA adapts a "
     "pretrained Hugging Face causal LM, but student.config is a random initialisation"),
])
def test_bad_lora_section_names_the_key(tmp_path, override, message):
    with pytest.raises(RecipeError) as err:
        lora_recipe(tmp_path, override)
    assert any(p.startswith(message) for p in err.value.problems), err.value.problems


def test_vector_student_with_lora_is_one_problem(tmp_path):
    spec = "{arch: aux_mlp, kwargs: {in_dim: 16, hidden: [32, 32], n_aux: 3}, lora: {r: 4}}"
    with pytest.raises(RecipeError) as err:
        load_recipe(None, mlp_overrides(tmp_path, student=spec))
    assert err.value.problems == ["student.lora: LoRA adapts a pretrained Hugging Face causal LM, but student.arch is "
                                  "a plain torch module (a vector model); give the student as path, builtin or gguf, "
                                  "or remove student.lora"]


def test_unknown_target_module_names_the_key_and_the_layers():
    spec = ModelSpec(builtin="tiny-llama-b", lora=LoraSpec(target_modules=["qkv"]))
    with pytest.raises(RecipeError) as err:
        build_model(spec, seed=0)
    (line,) = err.value.problems
    assert line.startswith("student.lora.target_modules: ") and "q_proj" in line and "down_proj" in line


def test_a_lora_spec_given_in_python_is_checked_as_a_recipes_is():
    """apply_lora ran none of the recipe's checks: alpha 0 built an adapter whose gradients are all 0, r 0 and
    dropout 1.5 were reported as target_modules problems, and a string target_modules one problem per character."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify.lora import apply_lora

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)
    for spec, message in ((LoraSpec(alpha=0.0), "student.lora.alpha: must be a finite number > 0, got 0.0"),
                          (LoraSpec(r=0), "student.lora.r: must be an int >= 1, got 0"),
                          (LoraSpec(r=2.5), "student.lora.r: must be an int >= 1, got 2.5"),
                          (LoraSpec(dropout=1.5), "student.lora.dropout: 1.5 is not in [0, 1)"),
                          (LoraSpec(bias="some"), "student.lora.bias: 'some' is not one of none, all, lora_only"),
                          (LoraSpec(target_modules="q_proj"), "student.lora.target_modules: give a list of module "
                                                              "names (e.g. [q_proj]), got the string 'q_proj'")):
        with pytest.raises(RecipeError) as err:
            apply_lora(LlamaForCausalLM(cfg), spec, seed=0)
        assert err.value.problems == [message]


def test_cli_bad_lora_value_is_one_line_exit_2(tmp_path, capsys):
    assert main(["train", RECIPE, "student.lora.r=0", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "student.lora.r: must be an int >= 1, got 0" in err


def test_delta_projection_is_refused_with_lora_and_accepted_without(tmp_path):
    entry = "purifiers=[{name: delta_projection, rank: 2}]"
    with pytest.raises(RecipeError) as err:
        lora_recipe(tmp_path, entry)
    assert err.value.problems == ["purifiers[0].name: delta_projection edits the student's full weights, which "
                                  "student.lora freezes (only the adapter trains); remove the purifier or student.lora"]
    full = load_recipe(RECIPE, [*SMALL, f"output_dir={tmp_path}", entry, "student.lora=null"])
    assert full.student.lora is None


def test_anchor_pulls_the_adapter_toward_its_initial_values():
    """On a LoRA student the anchor's penalty is weight/2·(‖A − A₀‖² + ‖B‖²) and its gradient weight·(θ − θ₀) on
    the adapter only; the frozen base gets no gradient."""
    student = build_model(ModelSpec(builtin="tiny-llama-b", lora=LoraSpec(r=2, target_modules=["q_proj"])), 0).module
    teacher = build_model(ModelSpec(builtin="tiny-llama-a"), 0).module
    weight = 0.3
    anchor = Anchor(AnchorConfig(weight=weight))
    distiller = Distiller(student, [teacher], purifiers=[anchor])
    distiller.setup_purifiers()
    adapter = {n: p for n, p in student.named_parameters() if p.requires_grad}
    initial = {n: p.detach().clone() for n, p in adapter.items()}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.values():
            p.add_(torch.randn(p.shape, generator=gen))
    penalty = anchor.extra_loss({}, None, 0.0)
    by_hand = weight / 2 * sum(float((p.detach() - initial[n]).pow(2).sum()) for n, p in adapter.items())
    assert float(penalty) == pytest.approx(by_hand, rel=1e-6)
    assert all(float(initial[n].abs().sum()) == 0 for n in adapter if ".lora_B." in n)  # B₀ = 0: pulls B to 0
    penalty.backward()
    for n, p in adapter.items():
        torch.testing.assert_close(p.grad, weight * (p.detach() - initial[n]))
    assert all(p.grad is None for p in student.parameters() if not p.requires_grad)


@pytest.mark.parametrize("key, names", [("target_modules", "[q_proj, foo_proj]"), ("modules_to_save", "[nonexist]")])
def test_a_lora_module_name_that_matches_nothing_is_refused_beside_one_that_does(tmp_path, key, names):
    """peft refuses only a list where no name matches: [q_proj, foo_proj] trained q_proj alone, modules_to_save
    [nonexist] trained nothing in full, and adapter_config.json and the lineage still listed them."""
    bad = names.strip("[]").split(", ")[-1]
    with pytest.raises(RecipeError, match=rf"student\.lora\.{key}: '{bad}' names no module of this LlamaForCausalLM; "
                                          r"name (layers|modules) of it"):
        build_model(ModelSpec(builtin="tiny-llama-b", lora=LoraSpec(**{key: names.strip("[]").split(", ")})), seed=0)


def test_lineage_show_says_the_export_is_a_lora_adapter(trained):
    """``lineage show`` of an adapter export printed the base's source alone: nothing said it was an adapter."""
    from purify.lineage import format_lineage, read_lineage

    _, out = trained
    (line,) = [x for x in format_lineage(read_lineage(out / "student")).splitlines() if "LoRA" in x]
    assert line.startswith("student LoRA adapter: r=") and "target_modules=" in line and "(seed " in line


def test_a_lora_students_lineage_names_its_bases_own_hash(trained):
    """``init_sha256`` of a LoRA student hashes the base with its freshly seeded adapter: an auditor could not match
    it with the base's hash (a teacher's, a hub's). ``base_sha256`` is the hash of the base built without LoRA."""
    from purify.lineage import read_lineage
    from purify.models import build_model, state_sha256

    recipe, out = trained
    student = read_lineage(out / "student")["student"]
    plain = build_model(dataclasses.replace(recipe.student, lora=None), seed=recipe.seed).module
    assert student["base_sha256"] == state_sha256(plain) != student["init_sha256"]


def test_lineage_show_names_the_seed_the_adapter_was_drawn_with():
    """The adapter is seeded by student.seed where set; lineage show printed the run's seed beside it."""
    from purify.lineage import build_lineage, format_lineage

    for recipe_seed, student_seed, shown in ((7, None, 7), (0, 7, 7), (7, 0, 0)):
        record = build_lineage(student={"name": "s", "source": "builtin:x", "init_sha256": "ab"}, teachers=[], data=[],
                               purifiers=[], recipe={"seed": recipe_seed, "student": {"seed": student_seed,
                                                                                      "lora": {"r": 4}}})
        (line,) = [x for x in format_lineage(record).splitlines() if "LoRA" in x]
        assert f"(seed {shown})" in line
