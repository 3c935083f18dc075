"""Offline teacher-logit cache: exact top-k reconstruction, k=V loss parity, resumability, refusals, bytes/token."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from purify import cache, cache_writer
from purify.assembly import build_run, load_recipe
from purify.cache import CachedTeacher, CacheError, check_cache
from purify.cache_writer import write_cache
from purify.config import RecipeError, TeacherSpec, to_dict
from purify.data import DistillDataModule, read_text
from purify.lm.tokenizer import build_tokenizer
from purify.models import build_model, model_forward, spec_tokenizer, state_sha256
from purify.module import Distiller

LLAMA = ("{model_type: llama, hidden_size: %d, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
         "num_key_value_heads: 2, max_position_embeddings: 64, initializer_range: 0.3}")
SHARD, BATCH = 16, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A word tokenizer, a 60-line text file and a recipe with two tiny random-init teachers (2 s to cache)."""
    root = tmp_path_factory.mktemp("cache")
    lines = [r["completion"] for r in read_text(None)[:60]]
    build_tokenizer(lines).save_pretrained(root / "tok")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "other.txt").write_text("\n".join(reversed(lines)) + "\n")
    model = "{config: %s, tokenizer: %s, seed: %d, name: %s}"
    teachers = [model % (LLAMA % 32, root / "tok", seed, name) for seed, name in ((1, "a"), (2, "b"))]
    items = {"student": model % (LLAMA % 16, root / "tok", 0, "student"), "teachers": f"[{', '.join(teachers)}]",
             "data.train": root / "train.txt", "data.max_length": 24, "data.batch_size": BATCH,
             "data.val_fraction": 0.2, "output_dir": root / "run"}
    overrides = [f"{k}={v}" for k, v in items.items()]
    recipe = load_recipe(None, overrides)
    (root / "recipe.yaml").write_text(OmegaConf.to_yaml(to_dict(recipe)))
    return root, recipe


def cli(root: Path, out: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    cache_writer.add_arguments(parser)
    return cache_writer.run(parser.parse_args([str(root / "recipe.yaml"), "--out", str(out), "--shard-size", str(SHARD),
                                        *extra]))


@pytest.fixture(scope="module")
def written(setup):
    root, recipe = setup
    assert cli(root, root / "k8") == 0
    return root / "k8"


def datasets(recipe, tokenizer):
    dm = DistillDataModule(recipe.data, tokenizer, recipe.seed)
    dm.setup()
    return {"train": dm.train_dataset, "val": dm.val_dataset}


def test_reconstruction_is_the_teachers_top_k_and_sums_to_one(setup, written):
    root, recipe = setup
    student = build_model(recipe.student, 0)
    teacher = build_model(recipe.teachers[1], 0).module.eval()
    for ds in datasets(recipe, student.tokenizer).values():  # train and val batches both find their targets
        batch = ds.collate([ds.item(i) for i in (0, 5, len(ds) - 1)])
        real = batch["target_mask"] > 0
        with torch.no_grad():
            top = F.log_softmax(model_forward(teacher, batch).logits[real], -1).topk(8)
        cached = CachedTeacher(written, teacher=1)(batch).logits[real]
        vocab = cached.shape[-1]
        assert vocab == len(student.tokenizer)
        torch.testing.assert_close(cached.exp().sum(-1), torch.ones(len(cached)), atol=1e-5, rtol=0)
        torch.testing.assert_close(cached.gather(-1, top.indices), top.values, atol=4e-3, rtol=2e-3)  # float16
        others = torch.ones_like(cached, dtype=torch.bool).scatter(-1, top.indices, False)
        rest = cached[others].view(len(cached), vocab - 8)  # the tail, spread uniformly over the V - k others
        torch.testing.assert_close(rest.amax(-1), rest.amin(-1))
        torch.testing.assert_close(rest.exp().sum(-1), 1 - top.values.exp().sum(-1), atol=2e-3, rtol=0)


def test_loss_from_a_full_vocabulary_cache_equals_the_online_loss(setup, tmp_path):
    root, recipe = setup
    assert cli(root, tmp_path / "full", "--top-k", "100000") == 0  # capped at V: the whole distribution
    cached_recipe = load_recipe(root / "recipe.yaml", [f"teachers=[{{cache: {tmp_path / 'full'}}}]"])
    run = build_run(cached_recipe)  # config → models → train: the cache source end to end
    assert isinstance(run.distiller.teachers[0], CachedTeacher) and run.teachers[0].name == "a"
    online = Distiller(copy.deepcopy(run.student.module), [build_model(recipe.teachers[0], 0).module])
    # the lineage names the teacher that wrote the cache (it was the sha256 of no bytes: the reader has no weights)
    assert run.lineage["teachers"][0]["sha256"] == state_sha256(online.teachers[0])
    run.datamodule.setup()
    batch = next(iter(run.datamodule.train_dataloader()))
    with torch.no_grad():
        cached_loss, _ = run.distiller.compute_loss(batch, 0.0)
        online_loss, _ = online.compute_loss(batch, 0.0)
    assert abs(cached_loss.item() - online_loss.item()) < 1e-3 * max(1.0, online_loss.item())


def test_an_interrupted_write_resumes_to_the_same_bytes(setup, written, tmp_path, monkeypatch):
    root, recipe = setup
    out, real_write, calls = tmp_path / "resumed", cache_writer._write_shard, []

    def crash_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(real_write(*args, **kwargs))

    monkeypatch.setattr(cache_writer, "_write_shard", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        write_cache(recipe, out, shard_size=SHARD)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-00000"]  # no partial shard, no manifest
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(cache_writer, "_write_shard", real_write)
    write_cache(recipe, out, shard_size=SHARD)
    files = sorted(p.relative_to(written) for p in written.rglob("*") if p.is_file() and "tokenizer" not in p.parts)
    assert len(files) > 10 and files == sorted(p.relative_to(out) for p in out.rglob("*")
                                               if p.is_file() and "tokenizer" not in p.parts)
    assert all((written / f).read_bytes() == (out / f).read_bytes() for f in files)
    with pytest.raises(CacheError, match=r"--out .*other k, shard_size"):
        write_cache(recipe, out, top_k=4, shard_size=4)


def test_a_cache_for_other_data_or_tokenizer_is_refused_naming_which(setup, written):
    root, recipe = setup
    tokenizer = build_model(recipe.student, 0).tokenizer
    check_cache(written, tokenizer, datasets(recipe, tokenizer), "teachers[0].cache")  # the recipe's own: accepted
    other_tok = build_tokenizer(["completely different words here"])
    with pytest.raises(RecipeError, match=r"^teachers\[0\]\.cache: the recipe's tokenizer differs"):
        check_cache(written, other_tok, {}, "teachers[0].cache")
    other = copy.deepcopy(recipe)
    other.data.train = str(root / "other.txt")
    with pytest.raises(RecipeError, match=r"^teachers\[0\]\.cache: the recipe's train data differ"):
        check_cache(written, tokenizer, datasets(other, tokenizer), "teachers[0].cache")
    ds = datasets(other, tokenizer)["train"]
    with pytest.raises(CacheError, match="match none of the cached train/val examples"):
        CachedTeacher(written)(ds.collate([ds.item(i) for i in range(4)]))


@pytest.mark.parametrize("student, teacher, message", [
    ("{cache: %s}", "{cache: %s}", r"^student\.cache: a logit cache holds teacher outputs"),
    ("{arch: aux_mlp}", "{cache: %s, teacher: 2}", r"^teachers\[0\]\.teacher: 2 is not in \[0, 2\)"),
    ("{arch: aux_mlp}", "{cache: %s/missing}", r"^teachers\[0\]\.cache: no finished logit cache in .*json missing"),
])
def test_bad_cache_entries_fail_recipe_validation(written, student, teacher, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, ["student=" + student.replace("%s", str(written)), f"teachers=[{teacher % written}]"])


def test_bytes_per_token_at_k8(written):
    manifest = cache.read_manifest(written)
    positions = sum(manifest["data"][s]["positions"] for s in ("train", "val"))
    arrays = sum(np.load(p, mmap_mode="r").nbytes for s in ("train", "val")
                 for d in (written / s).glob("shard-*") for p in d.glob("[ilt]*.npy") if p.name != "index.npy")
    assert manifest["k"] == 8 and manifest["id_dtype"] == "uint16"
    assert arrays / (positions * 2) == 8 * 2 + 8 * 2 + 2  # ids, log-probs, tail: 34 bytes per token and teacher
    assert manifest["bytes_per_token_per_teacher"] <= 64  # on disk, with .npy headers and both indexes


@pytest.mark.parametrize("damage", ["train/shard-00001/logp.npy", "train/index.npy"])
def test_a_truncated_cache_fails_recipe_validation(written, tmp_path, damage):
    """A cut array file was a traceback while building (index) or mid-training (a shard's memory map)."""
    import shutil

    copy_ = tmp_path / "cache"
    shutil.copytree(written, copy_)
    target = copy_ / damage
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(RecipeError, match=rf"^teachers\[0\]\.cache: .*{damage} is damaged \(truncated or not a numpy "):
        load_recipe(None, ["student={arch: aux_mlp}", f"teachers=[{{cache: {copy_}}}]"])


@pytest.mark.parametrize("damage, message", [
    ("delete", r"train/shard-00001/ids\.npy is damaged \(missing\)"),
    ("short", r"train/shard-00001/logp\.npy is damaged \(shape \(2, 3, 8\), but the index needs 2 teachers × \d+ "
              r"positions\)"),
    # a cache without its val split passed, then failed at the first validation as "written for other data"
    ("noval", r"val/index\.npy is damaged \(missing, though the manifest lists the val split\)"),
])
def test_a_missing_or_short_shard_fails_recipe_validation(written, tmp_path, damage, message):
    """A deleted shard failed mid-training ("No such file"); a shard array shorter than the index says trained to the
    end on other positions' targets (the slice past its end came back short and was scattered anyway)."""
    import shutil

    copy_ = tmp_path / "cache"
    shutil.copytree(written, copy_)
    if damage == "delete":
        (copy_ / "train/shard-00001/ids.npy").unlink()
    elif damage == "noval":
        shutil.rmtree(copy_ / "val")
    else:
        path = copy_ / "train/shard-00001/logp.npy"
        np.save(path, np.load(path)[:, :3])
    with pytest.raises(RecipeError, match=rf"^teachers\[0\]\.cache: .*{message}; rerun purify cache"):
        load_recipe(None, ["student={arch: aux_mlp}", f"teachers=[{{cache: {copy_}}}]"])


def test_a_cache_of_a_teacher_with_a_padded_output_layer_is_read_on_the_shared_vocabulary(setup, written, tmp_path):
    """Same tokenizer, an output layer of another size (Qwen2.5-7B's 152064 rows against 0.5B's 151936): the loss
    failed at the first batch with a size mismatch, after the run directory was written. A wider cache now builds (the
    Distiller cuts it to the student's width); one narrower than the tokenizer is refused before anything is
    written."""
    import json
    import shutil

    root, recipe = setup

    def with_width(delta: int, name: str):
        copy_ = tmp_path / name
        shutil.copytree(written, copy_)
        manifest = json.loads((copy_ / "manifest.json").read_text())
        manifest["teachers"][0]["vocab_size"] += delta
        (copy_ / "manifest.json").write_text(json.dumps(manifest))
        other = copy.deepcopy(recipe)
        other.teachers = [TeacherSpec(cache=str(copy_), teacher=0)]
        other.output_dir = str(tmp_path / f"run-{name}")
        return other, manifest["teachers"][0]["vocab_size"] - delta

    wider, width = with_width(45, "wider")
    run = build_run(wider)
    run.distiller.setup_purifiers()
    assert run.distiller._shared_width == width
    narrower, width = with_width(-5, "narrower")
    with pytest.raises(RecipeError, match=rf"^teachers: the student and its teachers return logits of different "
                                          rf"widths \(student {width}, teachers\[0\] {width - 5}\)"):
        build_run(narrower)
    assert not (tmp_path / "run-narrower").exists()


def test_a_padded_teacher_is_cached_on_the_tokenizers_ids_only(setup, tmp_path):
    """The top-k was taken over the padded output layer: slots went to ids no token has, which the Distiller then cut
    away (59% of a top-8 in a review's toy), leaving a target further from the live one than the top-k promises."""
    root, recipe = setup
    padded = copy.deepcopy(recipe)
    tokens = len(spec_tokenizer(recipe.student))
    config = LLAMA.replace("{model_type: llama,", f"{{model_type: llama, vocab_size: {tokens + 40},") % 32
    padded.teachers = [TeacherSpec(config=OmegaConf.to_container(OmegaConf.create(config)),
                                   tokenizer=str(root / "tok"), seed=1)]
    manifest = write_cache(padded, tmp_path / "padded", top_k=8, shard_size=SHARD)
    assert manifest["teachers"][0]["vocab_size"] == tokens  # the padded 40 rows are left out
    teacher = CachedTeacher(tmp_path / "padded")
    dm = DistillDataModule(padded.data, spec_tokenizer(recipe.student), padded.seed)
    dm.setup()
    batch = dm.train_dataset.collate([dm.train_dataset.item(i) for i in range(4)])
    live = build_model(padded.teachers[0], padded.seed).module
    with torch.no_grad():
        want = F.log_softmax(model_forward(live, batch).logits[..., :tokens], -1)  # what the Distiller reads
    assert model_forward(live, batch).logits.shape[-1] == tokens + 40
    got = teacher(batch).logits
    real = batch["target_mask"] > 0
    top = want[real].topk(8, -1)
    torch.testing.assert_close(got[real].gather(-1, top.indices), top.values, atol=2e-3, rtol=0)


def test_a_damaged_plan_of_a_partial_cache_is_one_line(setup, tmp_path):
    """Outside damage to a partial cache's .plan.json was a JSONDecodeError traceback."""
    root, _ = setup
    out = tmp_path / "partial"
    out.mkdir()
    (out / ".plan.json").write_text('{"version": 1, "k": 8')
    with pytest.raises(CacheError, match=r"^--out .*partial: its \.plan\.json cannot be read \(.*\), so what the "
                                         r"partial cache there was written for is unknown; remove it"):
        cli(root, out)


def test_a_damaged_manifest_fails_recipe_validation(written, tmp_path):
    """A hand-edited or cut manifest.json was a JSONDecodeError traceback."""
    import shutil

    copy_ = tmp_path / "cache"
    shutil.copytree(written, copy_)
    (copy_ / "manifest.json").write_text('{"version": ')
    with pytest.raises(RecipeError, match=r"manifest.json cannot be read \(.*\); rewrite the cache with `purify "
                                          r"cache RECIPE --out "):
        load_recipe(None, ["student={arch: aux_mlp}", f"teachers=[{{cache: {copy_}}}]"])
    # one that parses but lacks what a reader needs was a KeyError ('teachers', 'vocab_size') in load_recipe/build_run
    import json

    full = json.loads((written / "manifest.json").read_text())
    for manifest, named in (({"version": full["version"]}, r"lacks k, tokenizer_sha256, data, teachers"),
                            ({**full, "teachers": [{"name": "a"}]}, r"lacks teachers\[0\]\.vocab_size, "
                                                                    r"teachers\[0\]\.source, teachers\[0\]\.sha256")):
        (copy_ / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(RecipeError, match=named + r": not a manifest purify cache wrote"):
            load_recipe(None, ["student={arch: aux_mlp}", f"teachers=[{{cache: {copy_}}}]"])


def test_a_vector_models_cache_reads_back_and_a_whole_vocabulary_cache_serves_a_slice_exactly(tmp_path):
    """A review of the refusals above: a vector (arch) model's cache records no tokenizer (None), which the manifest
    check took for a damaged file; and a cache of every logit (k >= the width) is exact under a logit_slice (or a
    temperature), which were refused with it."""
    from tests.conftest import mlp_overrides

    recipe = load_recipe(None, mlp_overrides(tmp_path / "unused"))
    whole = write_cache(recipe, tmp_path / "whole", top_k=10_000)  # 13 outputs: all of them
    part = write_cache(recipe, tmp_path / "part", top_k=4)
    assert whole["tokenizer_sha256"] is None and whole["k"] == whole["teachers"][0]["vocab_size"] == 13
    student = mlp_overrides(tmp_path / "run")[0]
    slice_ = "loss.logit_slice=[10, 13]"
    for extra in ([slice_], [slice_, "loss.temperature=2.0"]):
        load_recipe(None, [student, f"teachers=[{{cache: {tmp_path / 'whole'}}}]", "data.train=noise",
                           "data.noise_dim=16", *extra])  # accepted: exact
    with pytest.raises(RecipeError, match=r"loss\.logit_slice: a logit-cache teacher \(teachers\[0\]\) keeps the "
                                          r"top-k"):
        load_recipe(None, [student, f"teachers=[{{cache: {tmp_path / 'part'}}}]", "data.train=noise",
                           "data.noise_dim=16", slice_])
    assert part["k"] == 4


def test_a_cached_teacher_outside_purifys_data_module_is_refused_by_name(written):
    """PurifyTrainer's batches (and a hand-made one) carry no example index: a bare KeyError 'index' at the first
    step."""
    from purify import PurifyTrainer

    teacher = CachedTeacher(written)
    with pytest.raises(ValueError, match=r"PurifyTrainer: teachers\[0\] is a logit cache, read by each example's "
                                         "index in purify's data module"):
        PurifyTrainer(model=torch.nn.Linear(2, 2), teachers=[teacher])
    with pytest.raises(CacheError, match=r"the batch has no 'index' \(it has \['input_ids', 'target_mask'\]\)"):
        teacher({"input_ids": torch.zeros(1, 3, dtype=torch.long), "target_mask": torch.ones(1, 2)})


def test_a_cache_rewritten_with_another_k_stops_an_in_place_continuation(setup, written, tmp_path):
    """The record held the teacher's hash alone (the same for a cache of that teacher with another k): a run
    continued in place after its cache was rewritten from top-8 to top-4, and read as one teacher throughout."""
    import shutil

    from purify.lineage import read_lineage
    from purify.train import train

    root, recipe = setup
    cache, out = shutil.copytree(written, tmp_path / "cache"), tmp_path / "run"
    run = copy.deepcopy(recipe)
    run.teachers, run.output_dir = [TeacherSpec(cache=str(cache), teacher=0)], str(out)
    run.trainer.max_steps, run.trainer.val_check_interval, run.trainer.checkpoint_every_n_steps = 2, 2, 2
    run.trainer.enable_progress_bar = False
    train(run)
    (entry,) = read_lineage(out / "lineage.json")["teachers"]
    assert entry["cache"]["k"] == 8 and len(entry["cache"]["manifest_sha256"]) == 64
    shutil.rmtree(cache)
    write_cache(recipe, cache, top_k=4, shard_size=SHARD)
    more = copy.deepcopy(run)
    more.trainer.max_steps, more.resume = 4, str(out / "checkpoints" / "last.ckpt")
    with pytest.raises(RecipeError, match=r"resume: teachers\[0\]'s logit cache .*cache changed since .*run was "
                                          r"trained"):
        train(more)


def test_tail_truncation_keeping_more_than_the_cache_holds_is_refused(setup, written):
    """top_k 16 over a top-8 cache kept 8 arbitrary tied tail ids as targets, without a word."""
    root, recipe = setup
    base = ["student=" + "{config: %s, tokenizer: %s}" % (LLAMA % 16, root / "tok"),
            f"teachers=[{{cache: {written}}}]", f"data.train={root / 'train.txt'}", "data.max_length=24",
            "data.val_fraction=0.2"]
    with pytest.raises(RecipeError, match=r"purifiers\[0\]\.top_k: 16 exceeds teachers\[0\]'s logit cache, which "
                                          r"holds each position's top 8 tokens"):
        load_recipe(None, [*base, "purifiers=[{name: tail_truncation, top_k: 16}]"])
    load_recipe(None, [*base, "purifiers=[{name: tail_truncation, top_k: 8}]"])  # within the cache: accepted


def test_a_temperature_on_a_cached_teacher_is_refused_in_a_recipe_and_a_distiller(setup, written):
    """The cache spreads the tail mass evenly; tempering that tail gives it far more mass than the teacher's own
    (a peaked teacher's tempered top-8 kept 0.83 of the mass at T = 2, its cached copy 0.42): training went on
    silently towards another target."""
    from purify import Distiller
    from purify.config import LossConfig

    root, recipe = setup
    base = [f"student={{config: {LLAMA % 16}, tokenizer: {root / 'tok'}}}",
            f"teachers=[{{config: {LLAMA % 16}, tokenizer: {root / 'tok'}}}, {{cache: {written}}}]",
            f"data.train={root / 'train.txt'}", "data.max_length=24", "data.val_fraction=0.2"]
    message = (r"^loss\.temperature: 2\.0 with a logit-cache teacher \(teachers\[1\]\), which keeps the top-k "
               r"log-probabilities and spreads the rest evenly: a temperature turns that into another target")
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [*base, "loss.temperature=2.0"])
    load_recipe(None, [*base, "loss.temperature=2.0", "loss.name=ce"])  # no teacher distribution is read
    load_recipe(None, base)  # temperature 1: the cached distribution itself
    student = torch.nn.Linear(2, 2)
    with pytest.raises(RecipeError, match=message):
        Distiller(student, [torch.nn.Linear(2, 2), CachedTeacher(written)], loss=LossConfig(temperature=2.0))
    # mse regressed onto the cached log-probabilities (10 x the live loss with a cache of the whole vocabulary), a
    # logit_slice read mostly the even tail, an on-policy Distiller failed at its first sample naming other data
    others = {"loss.name=mse": r"^loss\.name: mse compares raw logits, but a logit-cache teacher \(teachers\[1\]\) "
                               "holds log-probabilities",
              "loss.logit_slice=[0,4]": r"^loss\.logit_slice: a logit-cache teacher \(teachers\[1\]\) keeps the top-k "
                                        "of all its outputs"}
    for override, refused in others.items():
        with pytest.raises(RecipeError, match=refused):
            load_recipe(None, [*base, override])
    from purify.config import OnPolicyConfig

    for kwargs, refused in ((dict(loss=LossConfig(name="mse")), others["loss.name=mse"]),
                            (dict(loss=LossConfig(logit_slice=[0, 4])), others["loss.logit_slice=[0,4]"]),
                            (dict(on_policy=OnPolicyConfig(lam=1.0)), r"on_policy: teachers\[1\] is a logit cache")):
        with pytest.raises(RecipeError, match=refused):
            Distiller(student, [torch.nn.Linear(2, 2), CachedTeacher(written)], **kwargs)
