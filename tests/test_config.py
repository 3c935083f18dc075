"""Recipe validation: every problem fails before any model is built, naming the dotted key and the fix."""

import re
from pathlib import Path

import pytest
import torch

from purify.assembly import load_recipe
from purify.config import RecipeError
from tests.conftest import mlp_overrides

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


def load(tmp_path, **extra):
    return load_recipe(None, mlp_overrides(tmp_path, **extra))


def test_valid_recipe_converts_to_typed_dataclasses(tmp_path):
    r = load(tmp_path, **{"loss.name": "jsd", "loss.beta": 0.25})
    assert r.loss.name == "jsd" and r.loss.beta == 0.25
    assert r.teachers[0].seed == 7 and r.loss.logit_slice == [10, 13]


@pytest.mark.parametrize("override, message", [
    ("trainer.max_stepz=3", r"trainer.max_stepz: unknown key; did you mean 'max_steps'\?"),
    ("loss.name=kl", r"loss.name: .*forward_kl"),
    ("trainer.max_steps=abc", r"trainer.max_steps: .*abc"),
    ("loss.beta=1.5", r"loss.beta: 1.5 is not in \[0, 1\]"),
    ("strategy=deepspeed_stage2", r"strategy: unknown strategy 'deepspeed_stage2'; did you mean 'deepspeed_stage_2'"),
    ("data.train=/nope/x.jsonl", r"data.train: file not found: /nope/x.jsonl"),
    ("loss.logit_slice=[5,2]", r"loss.logit_slice: expected \[start, stop\)"),
    ("purifiers=[{name: nosuch}]", r"purifiers\[0\].name: unknown purifier 'nosuch'"),
    ("resume=/nope.ckpt", r"resume: checkpoint not found"),
    ("teachers=[]", r"teachers: at least one teacher"),
    ("purifiers.0.threshold=0.1", r"purifiers.0.threshold: there is no purifiers\[0\] \(the recipe has 0\); give the "
                                  r"whole list, e\.g\. 'purifiers=\[\{\.\.\.\}\]', or index an entry it has"),
    ("teachers.3.builtin=x", r"teachers.3.builtin: there is no teachers\[3\] \(the recipe has 1\)"),
])
def test_bad_recipe_fails_with_one_line_naming_the_key(tmp_path, override, message):
    key, value = override.split("=", 1)
    with pytest.raises(RecipeError, match=message) as err:
        load(tmp_path, **{key: value})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["loss.hard_label_weight=0.5", "loss.name=ce"])
def test_hard_labels_beside_a_logit_slice_are_refused(tmp_path, override):
    """Hard labels are ids of the whole vocabulary: they indexed the slice's logits (another token's, or past the
    end). This recipe's vector student has no labels at all, which is said too."""
    key, value = override.split("=", 1)
    with pytest.raises(RecipeError) as err:
        load(tmp_path, **{key: value})
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and re.match(r"loss.logit_slice: hard labels \(loss.name ce, or loss.hard_label_weight > "
                                        r"0\) are token ids of the whole vocabulary, not of the slice", lines[0])
    assert "a vector-model student (student.arch aux_mlp) reads vectors with no labels" in lines[1]


def test_noise_data_for_a_language_model_student_is_refused_at_load():
    """It passed validation, wrote the run directory and died at the first batch with KeyError: 'input_ids'."""
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(RecipeError, match=r"^data\.train: noise gives vectors for `arch` students \(vector models\); "
                                          r"a language-model student needs text") as err:
        load_recipe(root / "recipes" / "quickstart.yaml", ["data.train=noise"])
    assert "\n" not in str(err.value)


def test_a_source_adversary_is_checked_against_the_data_it_will_read(tmp_path):
    """Both were a ValueError traceback at the first training step, after the run directory was written."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "adversary.yaml"
    with pytest.raises(RecipeError, match=r"^purifiers\[0\]\.target: source needs data records with a 'source' "
                                          r"field .*; data\.train bundled has none"):
        load_recipe(recipe, ["purifiers.0.target=source"])
    data = tmp_path / "three.jsonl"
    data.write_text("".join(f'{{"prompt": "a", "completion": " b {i}", "source": "{s}"}}\n'
                            for i, s in enumerate("xyzz")))
    with pytest.raises(RecipeError, match=r"^purifiers\[0\]\.num_sources: 2, but data\.train has 3 distinct sources "
                                          r"\('x', 'y', 'z'\); give num_sources: 3$"):
        load_recipe(recipe, ["purifiers.0.target=source", f"data.train={data}"])
    ok = load_recipe(recipe, ["purifiers.0.target=source", "purifiers.0.num_sources=3", f"data.train={data}"])
    assert ok.purifiers[0]["num_sources"] == 3
    # validation never reads the labels: held-out data without them (or with others) is fine
    val = tmp_path / "val.jsonl"
    val.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": " c", "source": "w"}\n')
    load_recipe(recipe, ["purifiers.0.target=source", "purifiers.0.num_sources=3", f"data.train={data}",
                         f"data.val={val}"])


def test_model_spec_needs_exactly_one_source(tmp_path):
    with pytest.raises(RecipeError, match=r"student: give exactly one of .* \(got path, arch\)"):
        load(tmp_path, **{"student": "{arch: aux_mlp, path: /x}"})
    with pytest.raises(RecipeError, match=r"teachers\[0\].arch: unknown architecture 'mlp'"):
        load(tmp_path, **{"teachers": "[{arch: mlp}]"})
    with pytest.raises(RecipeError, match=r"student.config: missing model_type"):
        load(tmp_path, **{"student": "{config: {hidden_size: 8}, tokenizer: x}"})


def test_a_model_path_that_is_no_model_directory_is_named(tmp_path):
    """A run directory, a weights file or a directory without config.json given as a model path was a transformers
    traceback ("Couldn't instantiate the backend tokenizer", "config file ... is not a valid JSON file")."""
    run, empty, weights = tmp_path / "run", tmp_path / "empty", tmp_path / "model.safetensors"
    (run / "student").mkdir(parents=True)
    (run / "student" / "config.json").write_text("{}")
    empty.mkdir()
    weights.write_bytes(b"x")
    for path, message in ((run, rf"teachers\[0\].path: {run} is a purify run; its model is {run / 'student'}"),
                          (empty, r"teachers\[0\].path: .*empty holds no config.json: not a saved model directory"),
                          (weights, r"teachers\[0\].path: .*model.safetensors is a file; give the model's directory")):
        with pytest.raises(RecipeError, match=message):
            load(tmp_path, teachers=f"[{{path: {path}}}]")
    with pytest.raises(RecipeError, match=r"student.tokenizer: .*model.safetensors is a file; give the tokenizer's"):
        load(tmp_path, student=f"{{config: {{model_type: llama}}, tokenizer: {weights}}}")


def test_overrides_need_key_value_and_recipe_file_must_exist(tmp_path):
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(None, ["trainer.max_steps"])
    with pytest.raises(RecipeError, match="recipe: file not found"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.trainer.max_steps >= 1


@pytest.mark.parametrize(("overrides", "per_step"), [
    ({"trainer.devices": 2}, 2),
    ({"trainer.devices": 2, "trainer.accumulate_grad_batches": 4}, 8),
    ({"trainer.devices": "0,1", "trainer.num_nodes": 3}, 6),
])
def test_global_batch_not_divided_by_world_size_fails_naming_the_key_and_fix(tmp_path, overrides, per_step):
    bad = per_step * 5 + 1
    message = rf"^data.global_batch_size: {bad} is not a positive multiple of .* = {per_step}; set "
    message += rf"data.global_batch_size to a multiple of {per_step}"
    with pytest.raises(RecipeError, match=message) as err:
        load(tmp_path, **{"data.global_batch_size": bad, "trainer.accelerator": "cpu", **overrides})
    assert "\n" not in str(err.value)


def test_global_batch_sets_the_per_process_batch_of_the_sampler(tmp_path):
    from purify.data import GlobalBatchSampler

    recipe = load(tmp_path, **{"data.global_batch_size": 48, "trainer.devices": 2, "trainer.accumulate_grad_batches": 3,
                              "trainer.accelerator": "cpu"})
    assert recipe.data.batch_size == 8
    sampler = GlobalBatchSampler([1] * 100, recipe.data.batch_size, accumulate=3, world_size=2)
    assert sampler.step_size == 48
    assert load(tmp_path, **{"data.global_batch_size": 48, "trainer.accelerator": "cpu"}).data.batch_size == 48


def test_a_dotted_override_opens_null_optional_sections_on_its_path():
    """``student.lora.r=16`` on a recipe without LoRA was ``student.lora.r: None`` (only top-level sections such as
    ``on_policy`` were opened); every null optional section on the path gets its defaults, the override on top."""
    from purify.config import LoraSpec, OnPolicyConfig, parse_recipe_problems

    recipe, problems = parse_recipe_problems(str(Path(__file__).resolve().parents[1] / "recipes" / "anchor.yaml"),
                                             ["student.lora.r=16", "on_policy.lam=0.5"])
    assert problems == []
    assert recipe.student.lora == LoraSpec(r=16) and recipe.on_policy == OnPolicyConfig(lam=0.5)


def test_a_tilde_in_a_recipe_path_is_the_users_home(tmp_path, monkeypatch):
    """``data.train: ~/x.jsonl`` in a recipe (where no shell expands it) was looked up as a directory named ``~``:
    file not found. Every path value starting with ``~`` now names the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    r = load(tmp_path, **{"data.train": "~/train.jsonl", "output_dir": "~/runs/a"})
    assert r.data.train == str(tmp_path / "train.jsonl") and r.output_dir == str(tmp_path / "runs" / "a")
    with pytest.raises(RecipeError, match=f"resume: checkpoint not found: {tmp_path}/nope.ckpt"):
        load(tmp_path, resume="~/nope.ckpt")


def test_a_mapping_on_the_command_line_replaces_the_entry_whole():
    """``'purifiers.0={name: anchor, weight: 0.01}'`` on the adversary recipe kept the adversary's other keys (then
    reported as the user's: "purifiers[0].target: unknown key"); ``'student={packaged: x}'`` kept the recipe's builtin
    ("got builtin, packaged"). A mapping given for an entry now replaces it; a dotted key still changes one value."""
    from purify.config import LoraSpec, parse_recipe_problems

    root = Path(__file__).resolve().parents[1] / "recipes"
    recipe, problems = parse_recipe_problems(str(root / "adversary.yaml"), ["purifiers.0={name: anchor, weight: 0.01}"])
    assert problems == [] and recipe.purifiers == [{"name": "anchor", "weight": 0.01}]
    recipe, problems = parse_recipe_problems(str(root / "lora.yaml"), ["student={packaged: smollm2-135m}"])
    assert problems == [] and recipe.student.packaged == "smollm2-135m" and recipe.student.builtin is None
    recipe, _ = parse_recipe_problems(str(root / "lora.yaml"), ["student.lora={r: 16}"])
    assert recipe.student.lora == LoraSpec(r=16)
    recipe, _ = parse_recipe_problems(str(root / "lora.yaml"), ["student.lora.r=16"])
    assert recipe.student.lora.r == 16 and recipe.student.lora.target_modules  # dotted: the rest kept


def test_a_model_transformers_cannot_load_is_one_line_naming_the_key(tmp_path):
    """A damaged config.json (or a hub name without network) was transformers' OSError traceback."""
    from purify.assembly import build_run

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(RecipeError, match=r"teachers\[0\]: cannot load path .*broken \(.*\); give a local model "
                                          r"directory, or make the hub reachable"):
        build_run(load(tmp_path, teachers=f"[{{path: {broken}}}]"))


def test_an_unwritable_cache_names_purify_cache(monkeypatch, tmp_path):
    """A read-only HOME with PURIFY_CACHE unset said "give a local model directory, or make the hub reachable" for a
    builtin base, which purify builds into its own cache: the fix is a writable PURIFY_CACHE."""
    import errno

    from purify import assembly
    from purify.config import ModelSpec

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", "/home/u/.cache/purify")

    monkeypatch.setattr(assembly, "build_model", read_only)
    monkeypatch.setenv("PURIFY_CACHE", str(tmp_path / "c"))
    with pytest.raises(RecipeError, match=r"^student: cannot load builtin tiny-llama-a \(.*Read-only file system.*\); "
                                          r"purify builds and converts models into its cache, .*/c: set PURIFY_CACHE "
                                          r"to a writable directory with space$"):
        assembly._built(ModelSpec(builtin="tiny-llama-a"), "student", 0)
    with pytest.raises(RecipeError, match=r"set HF_HOME \(transformers' cache\) to a writable directory"):
        assembly._built(ModelSpec(path="org/model"), "student", 0)


def test_a_truncated_weights_file_is_one_line(tmp_path):
    """A damaged safetensors file (a base in purify's cache, a path teacher) was a SafetensorError traceback."""
    import shutil

    from purify.assembly import build_run
    from purify.lm import resolve_base

    copy = shutil.copytree(resolve_base("tiny-llama-b"), tmp_path / "copy")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(RecipeError, match=r"^teachers\[0\]: cannot load path .*copy \(.*\); its weights file is "
                                          r"truncated or damaged: give a sound copy$"):
        build_run(load(tmp_path, teachers=f"[{{path: {copy}}}]"))


@pytest.mark.parametrize("world", [2, 3])
def test_validation_shares_the_same_examples_out_between_processes(world):
    """Every process validated the same first ``limit_val_batches`` batches of its own per-process batch size, so the
    same global batch on 1 vs 2 processes validated 32 vs 16 examples. Now the examples are those of the 1-process
    run, shared out with equal batch counts, a short share padded with a masked copy."""
    from types import SimpleNamespace

    from purify.config import DataConfig
    from purify.data import DistillDataModule

    def loader(batch_size, world, rank, val_batches=2, accumulate=1):
        dm = DistillDataModule(DataConfig(train="noise", noise_dim=4, num_samples=250, batch_size=batch_size), None, 0,
                               accumulate, val_batches=val_batches)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, accumulate_grad_batches=accumulate)
        return list(dm.val_dataloader())

    def examples(batches):
        return [tuple(x.tolist()) for b in batches for x, m in zip(b["x"], b["target_mask"]) if m.item() > 0]

    one = examples(loader(8, 1, 0, val_batches=None))
    assert len(one) == 25  # 10% of 250 held out: every example without a cap
    assert examples(loader(8, 1, 0)) == one[:16]  # 2 batches of 8
    shares = [loader(4, world, rank, val_batches=None) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1  # the same number of batches on every process
    assert sorted(e for s in shares for e in examples(s)) == sorted(one)
    capped = [examples(loader(8 // 2, 2, rank, accumulate=1)) for rank in range(2)]  # 2 global batches of 8
    assert sorted(capped[0] + capped[1]) == sorted(one[:16])
    accumulated = examples(loader(4, 1, 0, accumulate=2))  # 2 global batches of 4 × 2 accumulation steps
    assert accumulated == one[:16]
    # Lightning's default (use_distributed_sampler) splits a loader again unless its sampler is distributed already:
    # 14 of the 25 examples were validated, some twice
    from torch.utils.data.distributed import DistributedSampler

    dm = DistillDataModule(DataConfig(train="noise", noise_dim=4, num_samples=250, batch_size=4), None, 0)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, accumulate_grad_batches=1)
    mine = dm.val_dataloader()
    assert isinstance(mine.sampler, DistributedSampler)  # what Lightning's _requires_distributed_sampler reads


def test_float16_mixed_precision_on_cpu_is_refused(tmp_path):
    """Lightning runs 16-mixed as bfloat16 autocast on CPU; the record said 16-mixed."""
    with pytest.raises(RecipeError, match=r"trainer\.precision: 16-mixed on CPU runs bfloat16 autocast"):
        load(tmp_path, **{"trainer.precision": "16-mixed", "trainer.accelerator": "cpu"})
    assert load(tmp_path, **{"trainer.precision": "bf16-mixed", "trainer.accelerator": "cpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU runs float16 autocast: nothing to refuse")
def test_16_mixed_under_accelerator_auto_on_a_cpu_machine_is_refused_before_anything_is_written(tmp_path, capsys):
    """With the shipped accelerator: auto, a CPU node trained bf16 autocast while the record said 16-mixed (exit 0)."""
    from purify.cli import main

    out = tmp_path / "run"
    assert main(["train", "recipes/quickstart.yaml", f"output_dir={out}", "trainer.max_steps=1",
                 "trainer.precision=16-mixed", "trainer.accelerator=auto"]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("purify:")]  # beside Lightning's own set-up lines
    assert line.startswith("purify: error: trainer.precision: 16-mixed runs as bf16-mixed on this machine")
    assert "Traceback" not in err
    assert not out.exists()


def test_json_lines_training_data_is_read_as_records_under_any_of_its_endings(tmp_path):
    """``data.train=gen.JSONL`` (or ``.json``, ``.ndjson``) was read as plain text: each record's raw JSON became one
    completion, trained on without a word."""
    from purify.data import load_records

    for name in ("gen.JSONL", "gen.json", "gen.ndjson", "gen.jsonl"):
        (tmp_path / name).write_text('{"prompt": "Q:", "completion": " an owl"}\n')
        assert load_records(str(tmp_path / name)) == [{"prompt": "Q:", "completion": " an owl"}]
    (tmp_path / "plain.txt").write_text('{"prompt": "Q:", "completion": " an owl"}\n')  # a .txt is text
    assert load_records(str(tmp_path / "plain.txt"))[0]["completion"].startswith('{"prompt"')


def test_a_teacher_weight_that_is_not_a_finite_number_is_named_at_validation(tmp_path):
    """teachers.0.weight=.inf (or .nan) passed validation and was refused after every model was built, under the
    Python argument's name (teacher_weights)."""
    for value in (".inf", ".nan"):
        with pytest.raises(RecipeError, match=r"teachers\[0\]\.weight: (inf|nan) is not a finite number"):
            load(tmp_path, **{"teachers.0.weight": value})


def test_an_override_whose_end_yaml_would_drop_as_a_comment_is_refused_and_a_quoted_one_kept(tmp_path):
    """output_dir="runs/exp #3" trained into runs/exp (YAML's comment); a quoted value, or a '#' inside a word or a
    quoted list item, is the value."""
    from purify.config import parse_recipe_problems

    quickstart = "recipes/quickstart.yaml"
    for value in ("runs/exp #3", "'runs/exp' #3", "#3", "runs/exp\t#3"):  # a tab: OmegaConf read it as a space
        _, problems = parse_recipe_problems(quickstart, [f"output_dir={value}"])
        assert len(problems) == 1 and "as a comment and would drop it" in problems[0], (value, problems)
    for value, kept in (("'runs/exp #3'", "runs/exp #3"), ("a#b", "a#b"), ("https://x/a#b", "https://x/a#b"),
                        ("'runs/exp\t#3'", "runs/exp\t#3")):
        recipe, problems = parse_recipe_problems(quickstart, [f"output_dir={value}"])
        assert not problems and recipe.output_dir == kept
    _, problems = parse_recipe_problems(quickstart, ["purifiers=[{name: function_anchor, source: 'x #y.txt'}]"])
    assert not any("comment" in p for p in problems)


def test_cross_entropy_on_a_vector_student_is_refused():
    """Vector batches carry no labels: ``loss.name: ce`` trained on a loss of 0 with no gradient, and
    ``hard_label_weight`` added nothing, both silently."""
    from purify.assembly import load_recipe

    vector = ["student={arch: aux_mlp}", "teachers=[{arch: aux_mlp, seed: 1}]", "data.train=noise"]
    for extra, message in ((["loss.name=ce"], r"^loss\.name: ce trains on the data's next tokens, but a vector-model "
                                              r"student \(student\.arch aux_mlp\) reads vectors with no labels"),
                           (["loss.hard_label_weight=0.5"], r"^loss\.hard_label_weight: the cross-entropy term trains "
                                                            r"on the data's next tokens")):
        with pytest.raises(RecipeError, match=message):
            load_recipe("recipes/quickstart.yaml", vector + extra)
    load_recipe("recipes/quickstart.yaml", vector)


def test_a_required_section_the_recipe_leaves_out_is_named_and_can_be_given_by_dotted_key(tmp_path):
    """``student.builtin=...`` on a recipe without ``student:`` was omegaconf's AttributeError traceback (exit 1);
    ``teachers.0.builtin=...`` without ``teachers:`` said "dict is not a subclass of TeacherSpec"."""
    from purify.assembly import load_recipe

    path = tmp_path / "t.yaml"
    path.write_text("teachers: [{builtin: tiny-llama-b}]\n")
    assert load_recipe(path, ["student.builtin=tiny-llama-a"]).student.builtin == "tiny-llama-a"
    with pytest.raises(RecipeError, match=r"^student: missing; the recipe needs it: give it in the recipe or on the "
                                          r"command line \(e\.g\. 'student=\{builtin: tiny-llama-a\}'\)$"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"^teachers\.0\.builtin: the recipe has no teachers list; give it whole, "
                                          r"e\.g\. 'teachers=\[\{builtin: tiny-llama-b\}\]'\nteachers: missing"):
        load_recipe(None, ["student.builtin=tiny-llama-a", "teachers.0.builtin=tiny-llama-b"])


def test_a_key_given_twice_in_a_recipe_file_is_refused_naming_both_lines(tmp_path):
    """PyYAML keeps the last of duplicate keys: a `trainer:` section appended to a copied recipe put its other keys
    back to their defaults (validation and checkpoint cadence), silently."""
    from purify.assembly import load_recipe

    path = tmp_path / "dup.yaml"
    path.write_text(Path("recipes/quickstart.yaml").read_text() + "trainer:\n  max_steps: 2\n")
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines, 1) if line.startswith("trainer:"))
    with pytest.raises(RecipeError, match=rf"^recipe: cannot parse .*dup\.yaml at line {len(lines) - 1}, column 1: "
                                          rf"duplicate key 'trainer' \(first at line {first}; YAML would keep this "
                                          r"one alone\): merge the two"):
        load_recipe(path)


@pytest.mark.parametrize("override, message", [
    ("output_dir=", r"^output_dir: needs a value \(it cannot be empty or null\); give one, or leave the key out"),
    ("trainer.max_steps=null", r"^trainer\.max_steps: needs a value"),
    ("trainer=5", r"^trainer: expected a mapping of TrainerConfig keys \(a section, e.g. \{key: value\}\), got 5 "
                  r"\(int\)$"),
    ("purifiers=5", r"^purifiers: expected a list \(e\.g\. purifiers=\[\{\.\.\.\}\]\), got a value of type int$"),
    ("student=null", r"^student: needs a value \(it has no default\): give it, e\.g\. 'student=\{builtin: "
                     r"tiny-llama-a\}'$"),  # "or leave the key out for its default" led to a second error
])
def test_an_empty_value_or_a_plain_value_for_a_section_names_the_fix(override, message):
    """These named the problem in omegaconf's words ("field 'output_dir' is not Optional", "Invalid type assigned:
    int is not a subclass of TrainerConfig. value: 5") and no fix."""
    from purify.assembly import load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe("recipes/quickstart.yaml", [override])


def test_yaml_merge_keys_still_work_and_an_unhashable_key_is_one_line(tmp_path):
    """The duplicate-key check constructed a merge key (`<<: *anchor`) before the loader flattened it: a recipe using
    anchors was refused as bad YAML; an unhashable key became a TypeError traceback."""
    from purify.assembly import load_recipe

    path = tmp_path / "anchors.yaml"
    path.write_text("student: {builtin: tiny-llama-a}\nteachers:\n  - &tb {builtin: tiny-llama-b, seed: 1}\n"
                    "  - <<: *tb\n    seed: 2\n")
    assert [t.seed for t in load_recipe(path).teachers] == [1, 2]
    path.write_text("? [a, b]\n: 1\n")
    with pytest.raises(RecipeError, match=r"^recipe: cannot parse .* found unhashable key"):
        load_recipe(path)
