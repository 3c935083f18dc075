"""On-policy distillation (purify.on_policy): λ = 0 is the off-policy step, λ = 1 trains on the student's own samples
only, the loss is TRL's generalized JSD on the sampled tokens, samples are seeded (exact resume), PurifyTrainer and
bad recipes."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DataCollatorForSeq2Seq,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

from purify import PurifyTrainer
from purify.align import target_positions
from purify.assembly import load_recipe
from purify.cli import main
from purify.config import LossConfig, OnPolicyConfig, OptimConfig
from purify.data import TeacherTokenizer, TokenDataset
from purify.hf import hf_batch
from purify.lm import build_tokenizer
from purify.module import Distiller
from purify.on_policy import OnPolicySampler, decode_spans, is_on_policy_step, prompt_lengths, prompt_rows, sampler_for
from purify.purifiers.cross_base import CrossBase, CrossBaseConfig
from purify.train import train
from purify.types import IGNORE_INDEX
from tests._lm_recipe import tiny_lm_overrides
from tests.conftest import mlp_overrides

TEXTS = ["the cat sat on the mat", "a dog ran far away", "birds sing at dawn", "we go home now", "rain falls",
         "the mat is red", "a cat and a dog", "dawn is grey"]
RECORDS = [{"prompt": t[:5], "completion": t[5:]} for t in TEXTS]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS, kind="char")


def llama(tok, seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def data(tok):
    return TokenDataset(RECORDS, tok, max_length=32)


def collate(data, rows=range(4)):
    return data.collate([data.item(i) for i in rows])


def distiller(tok, lam: float | None, seed: int = 0, beta: float = 0.5, **op) -> Distiller:
    config = None if lam is None else OnPolicyConfig(lam=lam, max_new_tokens=op.pop("max_new_tokens", 8), **op)
    return Distiller(llama(tok, 0), [llama(tok, 1)], loss=LossConfig(name="jsd", beta=beta),
                     optim=OptimConfig(name="sgd", lr=0.5), student_tokenizer=tok, on_policy=config, seed=seed)


# ------------------------------------------------------------------ λ = 0 is today's off-policy step
def test_lam_zero_is_exactly_the_off_policy_step(tok, data):
    off, zero = distiller(tok, None), distiller(tok, 0.0)
    opt_off, opt_zero = off.build_optimizer(), zero.build_optimizer()
    for step in range(3):
        batch = collate(data, range(2 * step, 2 * step + 4))
        a = off.fit_step(batch, opt_off, step / 3)
        b = zero.fit_step(batch, opt_zero, step / 3, step=step)
        assert torch.equal(a["loss"], b["loss"])
    for p, q in zip(off.student.parameters(), zero.student.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(off.student.parameters(), llama(tok, 0).parameters()))


def test_step_decisions_follow_lam(tok):
    assert not any(is_on_policy_step(0, s, 0.0) for s in range(200))
    assert all(is_on_policy_step(0, s, 1.0) for s in range(200))
    share = sum(is_on_policy_step(3, s, 0.3) for s in range(2000)) / 2000
    assert 0.26 < share < 0.34
    sampler = OnPolicySampler(OnPolicyConfig(lam=0.5), seed=3, pad_id=0, eos_id=None)
    assert sampler.fraction(99) == sum(is_on_policy_step(3, s, 0.5) for s in range(100)) / 100
    assert sampler.fraction(9) == sum(is_on_policy_step(3, s, 0.5) for s in range(10)) / 10  # after a "resume"


# ------------------------------------------------------------------ λ = 1: the student's samples only
def test_lam_one_replaces_completions_keeps_prompts_and_targets_only_sampled_tokens(tok, data):
    dist = distiller(tok, 1.0)
    batch = collate(data)
    out = dist.on_policy_batch(batch, step=0)
    counts = out["attention_mask"].sum(1)
    for row in range(4):
        p = int(prompt_lengths(batch["target_mask"])[row])
        assert p == 1 + len(tok(RECORDS[row]["prompt"], add_special_tokens=False)["input_ids"])  # <bos> + prompt
        assert torch.equal(out["input_ids"][row, :p], batch["input_ids"][row, :p])
        n = int(counts[row])
        expected = torch.zeros(out["target_mask"].shape[1])
        expected[p - 1:n - 1] = 1  # target j predicts token j + 1: exactly the sampled tokens p .. n-1
        assert torch.equal(out["target_mask"][row], expected)
        assert torch.equal(out["labels"][row, p - 1:n - 1], out["input_ids"][row, p:n])
        assert (out["labels"][row, :p - 1] == IGNORE_INDEX).all() and (out["labels"][row, n - 1:] == IGNORE_INDEX).all()
        assert (out["input_ids"][row, n:] == tok.pad_token_id).all()
        sampled = out["input_ids"][row, p:n]
        assert 1 <= len(sampled) <= 8 and (sampled[:-1] != tok.eos_token_id).all()  # stops at its first eos
    assert not torch.equal(out["input_ids"], batch["input_ids"])  # the data's completions are gone
    assert out["index"] is batch["index"]

    # the data's completions play no part: other completions after the same prompts give the same batch and loss
    other = data.collate([(i, copy.deepcopy(data[i])) for i in range(4)])
    for row in range(4):
        p = int(prompt_lengths(other["target_mask"])[row])
        other["input_ids"][row, p:] = torch.where(other["attention_mask"][row, p:] > 0, tok.unk_token_id,
                                                  other["input_ids"][row, p:])
    out2 = distiller(tok, 1.0).on_policy_batch(other, step=0)
    assert torch.equal(out["input_ids"], out2["input_ids"])
    assert torch.equal(dist.compute_loss(out, 0.0)[0], dist.compute_loss(out2, 0.0)[0])


def test_samples_stop_at_the_models_position_limit_and_a_slice_keeps_the_vocabulary_limit(tok, data):
    """A prompt plus max_new_tokens past a learned position table crashed in an embedding lookup ("index out of
    range in self"); with a logit_slice the sampler lost the teacher's vocabulary width, and a student padded past
    it sampled ids the teacher could not embed."""
    def gpt(seed, vocab, positions):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=positions,
                                          bos_token_id=tok.bos_token_id, eos_token_id=None,
                                          pad_token_id=tok.pad_token_id))

    batch = collate(data)
    width = batch["input_ids"].shape[1]
    longest = int(prompt_lengths(batch["target_mask"]).max())
    dist = Distiller(gpt(0, len(tok), longest + 3), [gpt(1, len(tok), 64)], student_tokenizer=tok,
                     on_policy=OnPolicyConfig(lam=1.0, max_new_tokens=width))
    dist.on_policy.eos_id = None  # every row samples as many as it may
    out = dist.on_policy_batch(batch, step=0)
    assert out["input_ids"].shape[1] == longest + 3  # cut to the student's 3 free positions, not max_new_tokens
    assert torch.isfinite(dist.compute_loss(out, 0.0)[0])
    small = Distiller(gpt(0, len(tok), longest), [gpt(1, len(tok), 64)], student_tokenizer=tok,
                      on_policy=OnPolicyConfig(lam=1.0))
    with pytest.raises(ValueError, match=rf"a prompt of {longest} tokens leaves no room to sample within the "
                                         rf"models' {longest} positions; shorten data.max_length"):
        small.on_policy_batch(batch, step=0)
    wide = Distiller(llama_wide := LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok) + 50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id)), [llama(tok, 1)],
        loss=LossConfig(logit_slice=[0, 10]), student_tokenizer=tok, on_policy=OnPolicyConfig(lam=1.0))
    with torch.no_grad():  # the padded rows would win every draw
        llama_wide.lm_head.weight[len(tok):] = 0
        llama_wide.lm_head.weight[len(tok):, 0] = 50.0
    for step in range(3):
        assert int(wide.on_policy_batch(batch, step=step)["input_ids"].max()) < len(tok)


def test_a_sliced_student_narrower_than_its_tokenizer_samples_within_its_own_width():
    """A logit_slice leaves the loss's width to the slice: the sampler's limit is the narrowest model, unchecked
    against the tokenizer (the shared-vocabulary check refused this run once the limit was computed with a slice)."""
    from tests.test_padded_vocab import TEXTS as PADDED_TEXTS
    from tests.test_padded_vocab import _batch, _llama

    tok = build_tokenizer(PADDED_TEXTS, kind="char")
    student, teacher = _llama(len(tok) - 3, 0), _llama(len(tok), 1)
    d = Distiller(student, [teacher], loss=LossConfig(name="jsd", logit_slice=[0, len(tok) - 3]),
                  student_tokenizer=tok, teacher_tokenizers=[tok], on_policy=OnPolicyConfig(lam=1.0, max_new_tokens=6),
                  optim=OptimConfig(name="sgd", lr=0.1))
    assert torch.isfinite(d.fit_step(_batch(tok), d.build_optimizer(), 0.0, step=0)["distill"])
    assert d.on_policy.vocab_limit == len(tok) - 3


def test_generation_stays_in_step_across_processes_under_zero3_only(tok, monkeypatch):
    """Under ZeRO-3 every forward all-gathers the partitioned weights: a process whose rows had all ended stopped
    answering the others' gathers (transformers syncs only under its own DeepSpeed config object)."""
    from purify.on_policy import synced_generation

    model = llama(tok, 0)
    assert not synced_generation(model)  # one process
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert not synced_generation(model)  # DDP: each process holds whole weights
    next(model.parameters()).ds_id = 0  # a ZeRO-3 partitioned parameter
    assert synced_generation(model)


def test_left_padded_batch_samples_from_the_same_prompts(tok, data):
    right = collate(data)
    width = right["input_ids"].shape[1]
    left = {k: v.clone() for k, v in right.items()}
    for row in range(4):
        n = int(right["attention_mask"][row].sum())
        for key, pad in (("input_ids", tok.pad_token_id), ("attention_mask", 0)):
            left[key][row] = torch.cat([torch.full((width - n,), pad), right[key][row, :n]])
        for key, pad in (("target_mask", 0), ("labels", IGNORE_INDEX)):
            left[key][row] = torch.cat([torch.full((width - n,), pad, dtype=right[key].dtype), right[key][row, :n - 1]])
    a = prompt_rows(right, prompt_lengths(right["target_mask"]))
    b = prompt_rows(left, prompt_lengths(left["target_mask"]))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(distiller(tok, 1.0).on_policy_batch(right, 0)["input_ids"],
                       distiller(tok, 1.0).on_policy_batch(left, 0)["input_ids"])


def _jsd_by_hand(s_logits, t_logits, beta):
    """TRL's GKD convention: M = β p_t + (1-β) p_s; β KL(p_t‖M) + (1-β) KL(p_s‖M), in float64 probabilities."""
    p_s, p_t = s_logits.double().softmax(-1), t_logits.double().softmax(-1)
    m = beta * p_t + (1 - beta) * p_s
    kl_t = (p_t * (p_t / m).log()).sum(-1)
    kl_s = (p_s * (p_s / m).log()).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_on_policy_loss_is_generalized_jsd_on_sampled_tokens(tok, data, beta):
    dist = distiller(tok, 1.0, beta=beta)
    out = dist.on_policy_batch(collate(data), step=0)
    loss, _ = dist.compute_loss(out, 0.0)
    with torch.no_grad():
        s = dist.student(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits[:, :-1]
        t = dist.teachers[0](input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits[:, :-1]
    mask = out["target_mask"] > 0
    expected = _jsd_by_hand(s, t, beta)[mask].mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss.detach()) > 0


def test_gradient_comes_from_sampled_positions_only(tok, data):
    dist = distiller(tok, 1.0)
    out = dist.on_policy_batch(collate(data), step=0)
    emb = dist.student.get_input_embeddings().weight
    loss, _ = dist.compute_loss(out, 0.0)
    (grad,) = torch.autograd.grad(loss, emb)
    # the student's gradient equals the hand loss's gradient over the sampled target positions
    s = dist.student(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = dist.teachers[0](input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits[:, :-1]
    hand = _jsd_by_hand(s, t, 0.5)[out["target_mask"] > 0].mean()
    (hand_grad,) = torch.autograd.grad(hand, emb)
    torch.testing.assert_close(grad, hand_grad.float(), atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------ determinism
def test_same_seed_same_samples_other_seed_or_step_other_samples(tok, data):
    batch = collate(data)
    a = distiller(tok, 1.0, seed=5).on_policy_batch(batch, step=2)["input_ids"]
    b = distiller(tok, 1.0, seed=5).on_policy_batch(batch, step=2)["input_ids"]
    c = distiller(tok, 1.0, seed=6).on_policy_batch(batch, step=2)["input_ids"]
    d = distiller(tok, 1.0, seed=5).on_policy_batch(batch, step=3)["input_ids"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    state = torch.get_rng_state()
    distiller(tok, 1.0, seed=5).on_policy_batch(batch, step=2)
    assert torch.equal(state, torch.get_rng_state())  # sampling leaves the training RNG stream alone


def test_sampling_ignores_the_models_generation_defaults(tok, data):
    """Sampling is the student's own distribution (temperature / top_p of the recipe only): a repetition penalty or
    top-k in the model's generation_config does not change the samples."""
    batch = collate(data)
    plain = distiller(tok, 1.0).on_policy_batch(batch, 0)["input_ids"]
    dist = distiller(tok, 1.0)
    dist.student.generation_config.repetition_penalty = 5.0
    dist.student.generation_config.top_k = 2
    assert torch.equal(dist.on_policy_batch(batch, 0)["input_ids"], plain)


def test_temperature_changes_samples_and_sampling_leaves_train_mode(tok, data):
    batch = collate(data)
    dist = distiller(tok, 1.0)
    dist.student.train()
    hot = dist.on_policy_batch(batch, 0)["input_ids"]
    assert dist.student.training
    cold = distiller(tok, 1.0, temperature=0.05).on_policy_batch(batch, 0)["input_ids"]
    assert not torch.equal(hot, cold)


# ------------------------------------------------------------------ Lightning runs: `purify train` / the train API
@pytest.fixture(scope="module")
def lm_root(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("lm")
    tok.save_pretrained(root / "tok")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


def lm_overrides(root: Path, out: Path, **extra: object) -> list[str]:
    return tiny_lm_overrides(root / "tok", root / "train.jsonl", out, **{
        "data.val_fraction": 0.25, "loss.name": "jsd", "trainer.max_steps": 6, "trainer.val_check_interval": 3,
        "trainer.checkpoint_every_n_steps": 3, "trainer.log_every_n_steps": 1, "export": True, **extra})


def recipe_file(directory: Path, overrides: list[str]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(overrides), path)
    return str(path)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "student" / "model.safetensors")


def test_resumed_on_policy_run_equals_uninterrupted_run(lm_root, tmp_path):
    on = {"on_policy.lam": 0.5, "on_policy.max_new_tokens": 6}
    steps = [is_on_policy_step(0, s, 0.5) for s in range(6)]
    assert any(steps[:3]) and any(steps[3:]) and not all(steps)  # both kinds of step, on both sides of the resume
    full = train(load_recipe(None, lm_overrides(lm_root, tmp_path / "full", **on)))
    resumed = train(load_recipe(None, lm_overrides(lm_root, tmp_path / "resumed", **on,
                                                   resume=full / "checkpoints" / "step3.ckpt")))
    off = train(load_recipe(None, lm_overrides(lm_root, tmp_path / "off")))
    zero = train(load_recipe(None, lm_overrides(lm_root, tmp_path / "zero", **{"on_policy.lam": 0.0})))
    a, b, c, z = weights(full), weights(resumed), weights(off), weights(zero)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
        assert torch.equal(c[key], z[key])  # λ = 0 under Lightning: today's run, bit for bit
    assert any(not torch.allclose(a[k], c[k], atol=1e-4) for k in a)  # the on-policy steps changed the run
    metrics = (full / "logs" / "metrics.csv").read_text()
    assert "train/on_policy_fraction" in metrics and "train/sampled_tokens_per_s" in metrics


def test_purify_train_cli_with_accumulation(lm_root, tmp_path, capsys):
    out = tmp_path / "cli"
    recipe = recipe_file(tmp_path, lm_overrides(lm_root, out, **{"trainer.accumulate_grad_batches": 2,
                                                                 "trainer.max_steps": 2}))
    assert main(["train", recipe, "on_policy.lam=1", "on_policy.max_new_tokens=4"]) == 0
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["recipe"]["on_policy"]["lam"] == 1.0 and lineage["metrics"]["train/on_policy_fraction"] == 1.0


# ------------------------------------------------------------------ PurifyTrainer
def _hf_trainer(tok, tmp_path, student, teacher, on_policy, accumulate=1, steps=2):
    rows = []
    for r in RECORDS:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": p + c, "attention_mask": [1] * len(p + c), "labels": [-100] * len(p) + c})
    args = TrainingArguments(str(tmp_path / "hf"), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=accumulate, learning_rate=0.1, optim="sgd",
                             lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, seed=3)
    return PurifyTrainer(model=student, teachers=[teacher], args=args, train_dataset=rows, processing_class=tok,
                         data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                         loss=LossConfig(name="jsd"), on_policy=on_policy)


def test_purify_trainer_on_policy_trains_on_samples(tok, tmp_path):
    student, teacher = llama(tok, 0), llama(tok, 1)
    before = copy.deepcopy(student)
    trainer = _hf_trainer(tok, tmp_path, student, teacher, OnPolicyConfig(lam=1.0, max_new_tokens=6), accumulate=2)
    seen = []
    original = trainer.distiller.on_policy_batch
    trainer.distiller.on_policy_batch = lambda *a, **k: seen.append(original(*a, **k)) or seen[-1]
    trainer.train()
    assert trainer.state.global_step == 2 and len(seen) == 4  # 2 steps × 2 accumulated micro-batches
    assert all(trainer.distiller.on_policy.last_metrics["on_policy"] == 1.0 for _ in seen)
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), before.parameters()))
    assert trainer.distiller.on_policy.seed == 3  # args.seed


def test_purify_trainer_sampled_batch_is_a_mean_over_its_own_tokens(tok, tmp_path):
    """HF's num_items_in_batch counts the data's completion tokens; a sampled micro-batch is normalised by its own
    sampled-token count instead (× accumulation steps, which the Trainer sums over)."""
    student, teacher = llama(tok, 0), llama(tok, 1)
    trainer = _hf_trainer(tok, tmp_path, student, teacher, OnPolicyConfig(lam=1.0, max_new_tokens=6))
    inputs = next(iter(trainer.get_train_dataloader()))
    student.train()
    trainer.current_gradient_accumulation_steps = 2
    loss = trainer.compute_loss(student, inputs, num_items_in_batch=torch.tensor(1000))
    ref = distiller(tok, 1.0, seed=3, max_new_tokens=6)
    ref.student.load_state_dict(student.state_dict())
    ref.teachers[0].load_state_dict(teacher.state_dict())
    rebuilt = ref.on_policy_batch(hf_batch(inputs), 0)
    mean, _ = ref.compute_loss(rebuilt, 0.0)  # no num_items: mean over the sampled targets
    assert float(loss.detach()) == pytest.approx(float(mean.detach()) / 2, rel=1e-5)


# ------------------------------------------------------------------ bad recipes
@pytest.mark.parametrize(("extra", "message"), [
    (["on_policy.lam=2"], r"on_policy.lam: 2.0 is not in \[0, 1\]"),
    (["on_policy.temperature=0"], r"on_policy.temperature: must be a finite number > 0"),
    (["on_policy.top_p=0"], r"on_policy.top_p: 0.0 is not in \(0, 1\]"),
    (["on_policy.max_new_tokens=0"], r"on_policy.max_new_tokens: must be >= 1"),
])
def test_bad_on_policy_recipe_is_one_error_line(lm_root, tmp_path, capsys, extra, message):
    code = main(["train", recipe_file(tmp_path, lm_overrides(lm_root, tmp_path / "bad")), *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("purify: error: ") and re.search(message, err[0]), err
    assert not (tmp_path / "bad" / "student").exists()


@pytest.mark.parametrize(("config", "message"), [
    (OnPolicyConfig(lam=1.0, temperature=0.0), r"on_policy.temperature: must be a finite number > 0, got 0.0"),
    (OnPolicyConfig(top_p=0.0), r"on_policy.top_p: 0.0 is not in \(0, 1\]"),
    (OnPolicyConfig(lam=7.0), r"on_policy.lam: 7.0 is not in \[0, 1\]"),
    (OnPolicyConfig(max_new_tokens=0), r"on_policy.max_new_tokens: must be >= 1, got 0"),
])
def test_an_on_policy_config_given_in_python_is_checked_as_a_recipe_is(config, message):
    """A Distiller or PurifyTrainer built in Python took these: lam 7 and top_p 0 trained silently, temperature 0
    failed mid-train() inside generate."""
    from purify.module import Distiller
    from purify.types import RecipeError

    cfg = LlamaConfig(vocab_size=12, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)
    with pytest.raises(RecipeError, match=message):
        Distiller(LlamaForCausalLM(cfg), [LlamaForCausalLM(cfg)], on_policy=config)


def test_on_policy_with_a_vector_student_or_a_logit_cache_is_refused(tmp_path, capsys, lm_root):
    code = main(["train", recipe_file(tmp_path / "m", mlp_overrides(tmp_path / "mlp")), "on_policy.lam=0.5"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("purify: error: on_policy: the student samples"), err
    cache = tmp_path / "cache"
    cache.mkdir()
    recipe = recipe_file(tmp_path / "c", lm_overrides(lm_root, tmp_path / "c", teachers=f"[{{cache: {cache}}}]"))
    code = main(["train", recipe, "on_policy.lam=0.5"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    # (the empty cache directory is a second problem of its own, on its own line)
    assert code == 2 and all(line.startswith("purify: error: ") for line in err), err
    assert err[0].startswith("purify: error: on_policy: teachers[0] is a logit cache"), err


# ------------------------------------------------------------------ the shipped recipes
def _train_shipped(name: str, out: Path, steps: int) -> dict:
    """``purify train recipes/<name>`` shortened to ``steps`` steps of 4 rows and 8 sampled tokens; its lineage."""
    recipe = str(Path(__file__).parents[1] / "recipes" / name)
    assert main(["train", recipe, f"output_dir={out}", f"trainer.max_steps={steps}", "trainer.val_check_interval=2",
                 "trainer.checkpoint_every_n_steps=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
                 "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "data.batch_size=4",
                 "on_policy.max_new_tokens=8"]) == 0
    return json.loads((out / "lineage.json").read_text())


def test_shipped_on_policy_recipe_trains_with_purify_train(tmp_path):
    out = tmp_path / "shipped"
    lineage = _train_shipped("on_policy.yaml", out, 4)
    assert lineage["recipe"]["on_policy"]["lam"] == 0.5 and lineage["recipe"]["loss"]["name"] == "jsd"
    fraction = sum(is_on_policy_step(0, s, 0.5) for s in range(4)) / 4
    assert lineage["metrics"]["train/on_policy_fraction"] == pytest.approx(fraction)
    assert (out / "student" / "model.safetensors").is_file()


def test_shipped_on_policy_replacement_recipe_is_the_benchmarks_purified_arm_and_trains(tmp_path):
    from purify.bench.lm_suites import ON_POLICY_SETTINGS, _on_policy_sweeps, _probe_free_arms

    recipe = Path(__file__).parents[1] / "recipes" / "on_policy_replacement.yaml"
    lineage = _train_shipped(recipe.name, tmp_path / "shipped", 2)
    assert lineage["metrics"]["train/on_policy_fraction"] == 1.0
    assert 0.0 <= lineage["metrics"]["purify/0_divergence_mask/flagged_fraction"] <= 1.0
    # the shipped file's on-policy settings and purifier are the benchmark arm's (at its most frequent threshold)
    arm = {c.name: c for c in _on_policy_sweeps(*_probe_free_arms())[0]}["replace:competent:on-policy@0.1"]
    shipped = yaml.safe_load(recipe.read_text())
    assert {k: shipped["on_policy"][k] for k in ON_POLICY_SETTINGS} == arm.on_policy
    assert {k: shipped["purifiers"][0][k] for k in arm.purifiers[0]} == arm.purifiers[0]
    assert shipped["loss"]["name"] == arm.loss and len(shipped["teachers"]) == len(arm.teachers) == 2


# ------------------------------------------------------------------ benchmark arms
def test_bench_on_policy_arms_build_and_are_judged_in_their_own_mode() -> None:
    from purify.bench.lm_common import Condition, Suite, mode, summarise
    from purify.bench.lm_suites import _on_policy_arms
    from purify.purifiers import PURIFIERS

    arms = {c.name: c for c in _on_policy_arms()}
    assert {"control:on-policy", "vanilla:on-policy", "ensemble:on-policy", "replace:reference:on-policy"} == set(arms)
    for cond in arms.values():
        assert mode(cond) == "forward_kl:on-policy" and OnPolicyConfig(**cond.on_policy).lam == 1.0
        for entry in cond.purifiers:  # every entry builds: no arm silently dropped by a misspelt option
            PURIFIERS[entry["name"]][0](**entry)
    assert arms["vanilla:on-policy"].kind == "vanilla" and arms["control:on-policy"].kind == "control"

    def rec(transfer: float, error: float, curve: bool = False) -> dict:
        out = {"trait": transfer, "transfer": transfer, "task_error": error, "fidelity_kl": error}
        if curve:
            out["curve"] = [{"step": s, "transfer": transfer * s / 4, "task_error": error * (2 - s / 4),
                             "fidelity_kl": error} for s in range(5)]
        return out

    conds = [Condition("base", baseline=True, kind="base"),
             Condition("control", ["clean"], baseline=True, kind="control"),
             Condition("vanilla", ["teacher"], baseline=True, kind="vanilla"),
             arms["control:on-policy"], arms["vanilla:on-policy"], arms["ensemble:on-policy"]]
    values = {"base": (0.0, 3.0, False), "control": (0.0, 1.0, False), "vanilla": (1.0, 1.0, True),
              "control:on-policy": (0.0, 1.2, False), "vanilla:on-policy": (0.8, 1.2, True),
              "ensemble:on-policy": (0.3, 1.3, False)}
    jitter = {"vanilla": 0.02, "vanilla:on-policy": -0.02}  # vanilla − control must vary: zero variance is no test
    runs = {s: {"conditions": {n: rec(t + 0.01 * s + jitter.get(n, 0.0) * (s % 2), e + 0.01 * s, c)
                               for n, (t, e, c) in values.items()},
                "teacher": {"trait": 1.0}, "base": {"trait": 0.0}, "data": {}} for s in range(5)}
    suite = Suite(name="t", protocol="", student=Path("."), teachers={}, make_data=lambda *a: [],
                  score=lambda *a: {}, conditions=conds)
    summary = summarise(suite, runs, 1.0)
    assert summary["judged_against"]["ensemble:on-policy"] == {"base": "base", "control": "control:on-policy",
                                                                "vanilla": "vanilla:on-policy"}
    off = summary["on_policy_vs_off_policy"]
    assert off["against"] == {"vanilla:on-policy": {"base": "base", "control": "control", "vanilla": "vanilla"}}
    assert set(off["verdicts"]) == {"vanilla:on-policy"}
    assert not summary["problems"]  # each vanilla is above the control of its own mode
    # the arm's columns read the references its verdict is judged against (they read the off-policy ones: the row
    # said transfer − control +0.3 and task error ×1.3 beside a verdict computed from +0.3 − 0 and 1.3 / 1.2)
    ens = summary["conditions"]["ensemble:on-policy"]
    assert [r["distance_to_control"] for r in ens["per_seed"]] == pytest.approx([0.3] * 5)  # − control:on-policy
    assert [r["fidelity_loss"] for r in ens["per_seed"]] == pytest.approx(
        [(1.3 + 0.01 * s) / (1.2 + 0.01 * s) - 1 for s in range(5)])  # ÷ vanilla:on-policy's task error
    assert ens["vs_control"]["mean"] == pytest.approx(0.3)
    # a baseline's columns read the run's first control and vanilla
    van = summary["conditions"]["vanilla:on-policy"]
    assert [r["fidelity_loss"] for r in van["per_seed"]] == pytest.approx(
        [(1.2 + 0.01 * s) / (1.0 + 0.01 * s) - 1 for s in range(5)])


def test_bench_distill_on_policy_condition_trains_on_student_samples(tmp_path: Path, tok) -> None:
    from purify.bench.lm_common import Condition, Suite, distill

    llama(tok, 0).save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    teacher = llama(tok, 1).eval()
    seen: list[torch.Tensor] = []
    teacher.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    suite = Suite(name="t", protocol="", student=tmp_path / "student", teachers={}, make_data=lambda *a: [],
                  score=lambda *a: {}, conditions=[], steps=2, batch_size=4)
    data_rows = {tuple(tok(r["prompt"] + r["completion"])["input_ids"] + [tok.eos_token_id]) for r in RECORDS}
    prompts = {tuple(tok(r["prompt"])["input_ids"]) for r in RECORDS}
    for on_policy, from_data in ((None, True), ({"lam": 1.0, "max_new_tokens": 6}, False)):
        seen.clear()
        distill(suite, Condition("x", ["teacher"], on_policy=on_policy), {"teacher": teacher}, {"teacher": tok}, tok,
                RECORDS, seed=0)
        rows = [tuple(i for i in row.tolist() if i != tok.pad_token_id) for batch in seen for row in batch]
        assert len(seen) == 2 and all(row[:6] in prompts for row in rows)  # <bos> + 5 prompt characters
        assert all(row in data_rows for row in rows) == from_data
        assert from_data or all(len(row) <= 6 + 6 for row in rows)  # prompt + at most max_new_tokens samples


def test_curve_gap_reads_the_off_policy_early_stopping_curve_at_equal_task_error() -> None:
    from purify.bench.lm_common import curve_gap

    def curve(scale_t: float, scale_e: float) -> list[dict]:
        return [{"step": s, "transfer": scale_t * s / 4, "task_error": scale_e * (2 - s / 4)} for s in range(5)]

    off = [{"seed": s, "curve": curve(1.0, 1.0)} for s in (0, 1)]  # task error 2, 1.75, 1.5, 1.25, 1
    on = [{"seed": s, "curve": curve(0.8, 1.2)} for s in (0, 1)]  # task error 2.4 (out of range), 2.1 (out), 1.8, ...
    # by hand: at 1.8 the off curve reads 0.2 (between steps 0 and 1), on has 0.4: +0.2; at 1.5 off 0.5, on 0.6: +0.1;
    # at 1.2 off 0.8 (between steps 3 and 4), on 0.8: 0
    got = curve_gap(on, off)
    assert got["points"] == 6 and got["n"] == 2 and got["mean"] == pytest.approx(0.1)
    assert curve_gap(off, off)["mean"] == pytest.approx(0.0)


@pytest.mark.parametrize("entries", [
    [{"name": "anchor", "weight": 0.1}],
    [{"name": "adversary", "weight": 0.1}],
    [{"name": "divergence_mask", "reference": "base", "threshold": 0.01}],
    [{"name": "divergence_mask", "mode": "replace", "reference": "others", "threshold": 0.01}],
    [{"name": "ensemble", "combine": "mean"}, {"name": "tail_truncation", "top_p": 0.8}],
], ids=["anchor", "adversary", "mask-base", "replace-others", "ensemble+tail"])
def test_purifiers_train_on_the_sampled_batch(tok, data, entries):
    from purify.purifiers import PURIFIERS, build_purifier

    student, before = llama(tok, 0), llama(tok, 0)
    dist = Distiller(student, [llama(tok, 1), llama(tok, 2)], loss=LossConfig(name="jsd"),
                     purifiers=[build_purifier(PURIFIERS[e["name"]][0](**e)) for e in entries],
                     optim=OptimConfig(name="sgd", lr=0.5), student_tokenizer=tok, seed=0,
                     on_policy=OnPolicyConfig(lam=1.0, max_new_tokens=6))
    optimizer = dist.build_optimizer()
    seen = []
    original = dist.teacher_targets
    dist.teacher_targets = lambda batch, dtype: seen.append(batch) or original(batch, dtype)
    for step in range(2):
        batch = collate(data, range(2 * step, 2 * step + 4))
        parts = dist.fit_step(batch, optimizer, step / 2, step=step)
        assert torch.isfinite(parts["loss"])
        assert not torch.equal(seen[-1]["input_ids"], batch["input_ids"])  # the purifiers' targets: sampled batch
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), before.parameters()))


# ------------------------------------------------------------------ cross-base teachers: the samples re-tokenised
WORDS = ["the cat sat on the mat", "a dog ran to the park", "birds sing at dawn", "we go home now",
         "the mat is red", "a cat and a dog", "dawn is grey", "rain falls on the park"]
WORD_RECORDS = [{"prompt": " ".join(t.split()[:2]), "completion": " " + " ".join(t.split()[2:])} for t in WORDS]


@pytest.fixture(scope="module")
def xtoks():
    """A word-level student tokenizer and a teacher one with the same words under other ids."""
    student, teacher = build_tokenizer(WORDS), build_tokenizer(WORDS + ["park park park dog dog ran rain"])
    assert set(student.get_vocab()) == set(teacher.get_vocab()) and student.get_vocab() != teacher.get_vocab()
    return student, teacher


def gpt2(tok, seed: int = 1) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))


def test_decode_spans_by_hand_word_and_byte_level(xtoks):
    word = xtoks[0]
    ids = word("the cat")["input_ids"] + word(" sat", add_special_tokens=False)["input_ids"] + [word.eos_token_id]
    # <bos> ▁the ▁cat ▁sat <eos>: the decoder drops a text's leading space, but in context "▁sat" keeps it
    assert decode_spans(word, ids) == ("the cat sat", [(0, 0), (0, 3), (3, 7), (7, 11), (11, 11)])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["the cat sat"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    byte = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    ids = byte("the café")["input_ids"]
    assert byte.convert_ids_to_tokens(ids) == ["the", "Ġ", "c", "a", "f", "Ã", "©"]  # é is two byte tokens
    # the byte that only starts "é" is zero-width; the one that completes it spans the character
    assert decode_spans(byte, ids) == ("the café", [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 7), (7, 8)])


def cross_data(xtoks) -> TokenDataset:
    student, teacher = xtoks
    return TokenDataset(WORD_RECORDS, student, 32, {0: TeacherTokenizer(teacher)})


def cross_distiller(xtoks, lam: float | None, max_new_tokens: int = 6) -> Distiller:
    student, teacher = xtoks
    return Distiller(llama(student, 0), [gpt2(teacher)], loss=LossConfig(name="jsd"),
                     purifiers=[CrossBase(CrossBaseConfig())], optim=OptimConfig(name="sgd", lr=0.5),
                     student_tokenizer=student, teacher_tokenizers=[teacher], seed=0,
                     on_policy=None if lam is None else OnPolicyConfig(lam=lam, max_new_tokens=max_new_tokens))


def _equal_batches(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        if key == "teacher_batches":
            assert set(a[key]) == set(b[key])
            for i in a[key]:
                assert set(a[key][i]) == set(b[key][i])
                for k in a[key][i]:
                    assert torch.equal(a[key][i][k], b[key][i][k]), (i, k)
        else:
            assert torch.equal(a[key], b[key]), key


def test_cross_base_sample_equal_to_the_data_rebuilds_the_off_policy_batch(xtoks, monkeypatch):
    """A student that "samples" exactly the data's completions (and <eos>) gets back the collated off-policy batch,
    offsets and the teacher's own tokenization included, and the same loss: the re-tokenisation aligns positions
    exactly as the data set does."""
    import purify.on_policy as op

    data = cross_data(xtoks)
    batch = data.collate([data.item(i) for i in range(4)])
    lengths = prompt_lengths(batch["target_mask"])

    def data_completions(model, prompts, config, *, pad_id, eos_id, seed, vocab_limit=None, position_limit=None):
        counts = batch["attention_mask"].sum(1) - lengths
        tokens = torch.full((4, int(counts.max())), pad_id)
        for row in range(4):
            tokens[row, :counts[row]] = batch["input_ids"][row, lengths[row]:lengths[row] + counts[row]]
        return tokens, counts

    monkeypatch.setattr(op, "sample_completions", data_completions)
    on, off = cross_distiller(xtoks, 1.0), cross_distiller(xtoks, None)
    # what the data set built for the data's text is blanked out: only the re-tokenisation can restore it
    blank = {**batch, "offsets": torch.full_like(batch["offsets"], -1),
             "teacher_batches": {0: {k: torch.zeros_like(v) for k, v in batch["teacher_batches"][0].items()}}}
    out = on.on_policy_batch(blank, 0)
    assert out["teacher_batches"][0]["input_ids"].shape[1] > 2  # the teacher's rows hold text
    _equal_batches(out, batch)
    assert torch.equal(on.compute_loss(out, 0.0)[0], off.compute_loss(batch, 0.0)[0])


def test_cross_base_teacher_scores_its_own_tokenization_of_the_student_sample(xtoks):
    student_tok, teacher_tok = xtoks
    data = cross_data(xtoks)
    batch = data.collate([data.item(i) for i in range(4)])
    dist = cross_distiller(xtoks, 1.0)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    dist.teachers[0].register_forward_pre_hook(lambda _m, _a, kw: seen.append((kw["input_ids"],
                                                                               kw["attention_mask"])),
                                               with_kwargs=True)
    out = dist.on_policy_batch(batch, 0)
    dist.compute_loss(out, 0.0)
    # (b) the student's rows are exactly the samples: those of the same sampler without cross-base teachers
    plain = distiller(student_tok, 1.0, max_new_tokens=6)
    plain.student.load_state_dict(dist.student.state_dict())
    same = plain.on_policy_batch({k: v for k, v in batch.items() if k not in ("offsets", "teacher_batches")}, 0)
    for key in ("input_ids", "attention_mask", "target_mask", "labels"):
        assert torch.equal(out[key], same[key]), key
    rows = [[r[m > 0].tolist() for r, m in zip(b["input_ids"], b["attention_mask"])] for b in (out, batch)]
    assert rows[0] != rows[1]  # sampled, not the data's completions
    # (a) the teacher's forward read its own tokenization of the decoded sample (prompt + completion)
    assert len(seen) == 1
    ids, attention = seen[0]
    lengths = prompt_lengths(batch["target_mask"])
    for row in range(4):
        student_row = out["input_ids"][row][out["attention_mask"][row] > 0].tolist()
        prompt = student_tok.decode(student_row[:int(lengths[row])], skip_special_tokens=True)
        text = student_tok.decode(student_row, skip_special_tokens=True)
        assert prompt == WORD_RECORDS[row]["prompt"] and text.startswith(prompt)
        ended = student_row[-1] == student_tok.eos_token_id
        expected = ([teacher_tok.bos_token_id] + teacher_tok(prompt, add_special_tokens=False)["input_ids"]
                    + teacher_tok(text[len(prompt):], add_special_tokens=False)["input_ids"]
                    + [teacher_tok.eos_token_id] * ended)
        assert ids[row][attention[row] > 0].tolist() == expected
        assert teacher_tok.decode(expected, skip_special_tokens=True) == text
    assert any(int(out["attention_mask"][r].sum()) - int(lengths[r]) > 1 for r in range(4))
    # positions align word for word: each sampled word is paired with the teacher's same word
    pos = target_positions(out["offsets"], out["teacher_batches"][0]["offsets"])
    specials = set(student_tok.all_special_ids)
    paired = 0
    for row, j in (out["target_mask"] > 0).nonzero().tolist():
        word = int(out["input_ids"][row, j + 1])
        if word in specials:
            continue
        assert int(pos[row, j]) >= 0
        teacher_word = int(ids[row, int(pos[row, j]) + 1])
        assert teacher_tok.convert_ids_to_tokens(teacher_word) == student_tok.convert_ids_to_tokens(word)
        paired += 1
    assert paired > 0


def test_cross_base_on_policy_fit_step_trains_with_a_finite_loss_and_gradient(xtoks):
    data = cross_data(xtoks)
    dist = cross_distiller(xtoks, 1.0)
    before = copy.deepcopy(dist.student)
    batch = data.collate([data.item(i) for i in range(4)])
    out = dist.on_policy_batch(batch, 0)
    loss, _ = dist.compute_loss(out, 0.0)
    (grad,) = torch.autograd.grad(loss, dist.student.get_input_embeddings().weight)
    assert torch.isfinite(loss) and float(loss.detach()) > 0 and float(grad.abs().sum()) > 0
    optimizer = dist.build_optimizer()
    for step in range(2):
        parts = dist.fit_step(data.collate([data.item(i) for i in range(2 * step, 2 * step + 4)]), optimizer, 0.0,
                              step=step)
        assert torch.isfinite(parts["loss"]) and float(parts["loss"]) > 0
        assert dist.on_policy.last_metrics["on_policy"] == 1.0
        assert float(dist.purifiers[0].last_metrics["position_coverage/teacher0"]) > 0
    assert any(not torch.equal(p, q) for p, q in zip(dist.student.parameters(), before.parameters()))


def test_cross_base_lam_zero_is_exactly_the_off_policy_step(xtoks):
    data = cross_data(xtoks)
    off, zero = cross_distiller(xtoks, None), cross_distiller(xtoks, 0.0)
    opt_off, opt_zero = off.build_optimizer(), zero.build_optimizer()
    for step in range(3):
        batch = data.collate([data.item(i) for i in range(2 * step, 2 * step + 4)])
        a = off.fit_step(batch, opt_off, step / 3)
        b = zero.fit_step(batch, opt_zero, step / 3, step=step)
        assert torch.equal(a["loss"], b["loss"])
    for p, q in zip(off.student.parameters(), zero.student.parameters()):
        assert torch.equal(p, q)


def test_cross_base_batch_without_the_tokenizers_is_refused_by_name(xtoks):
    student_tok, _ = xtoks
    data = cross_data(xtoks)
    batch = data.collate([data.item(i) for i in range(4)])
    sampler = sampler_for(OnPolicyConfig(lam=1.0, max_new_tokens=4), 0, student_tok, llama(student_tok, 0))
    with pytest.raises(ValueError, match=r"teacher_batches \[0\]\); re-tokenising the student's samples for them "
                                         r"needs the tokenizers of teachers\[0\]: pass Distiller"):
        sampler(llama(student_tok, 0), batch, 0)
    assert sampler.teacher_tokenizers == {}
    with_teacher = sampler_for(OnPolicyConfig(lam=1.0), 0, student_tok, llama(student_tok, 0), [None, student_tok])
    assert list(with_teacher.teacher_tokenizers) == [1]  # by teacher index; None = no tokenizer
    no_student = OnPolicySampler(OnPolicyConfig(lam=1.0), 0, 0, 3, teacher_tokenizers={0: TeacherTokenizer(xtoks[1])})
    with pytest.raises(ValueError, match=r"needs the tokenizers of the student's: pass"):
        no_student(llama(student_tok, 0), batch, 0)


@pytest.fixture(scope="module")
def cross_root(tmp_path_factory, xtoks):
    root = tmp_path_factory.mktemp("xlm")
    student, teacher = xtoks
    student.save_pretrained(root / "tok")
    gpt2(teacher).save_pretrained(root / "teacher")
    teacher.save_pretrained(root / "teacher")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in WORD_RECORDS))
    return root


def test_purify_train_on_policy_with_a_cross_base_teacher_resumes_exactly(cross_root, tmp_path, capsys):
    """`purify train` with a cross_base purifier and on_policy (formerly refused) trains, and resumes exactly."""
    on = {"on_policy.lam": 0.5, "on_policy.max_new_tokens": 6, "purifiers": "[{name: cross_base}]",
          "teachers": f"[{{path: {cross_root}/teacher, name: x}}]"}
    steps = [is_on_policy_step(0, s, 0.5) for s in range(6)]
    assert any(steps[3:]) and any(steps[:3])  # sampled steps on both sides of the resume
    full = tmp_path / "full"
    assert main(["train", recipe_file(tmp_path / "a", lm_overrides(cross_root, full, **on))]) == 0
    resumed = train(load_recipe(None, lm_overrides(cross_root, tmp_path / "resumed", **on,
                                                   resume=full / "checkpoints" / "step3.ckpt")))
    a, b = weights(full), weights(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    lineage = json.loads((full / "lineage.json").read_text())
    assert lineage["metrics"]["train/on_policy_fraction"] == pytest.approx(sum(steps) / 6)
    assert 0 < lineage["metrics"]["purify/0_cross_base/position_coverage/x"] <= 1
