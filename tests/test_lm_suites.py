"""Smoke test of the LM suites: ``run_suite(..., quick=True)`` writes every output file with the shared schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from purify.bench.lm_suites import run_suite


@pytest.mark.parametrize("suite", ["style-tic", "hidden-preference"])
def test_quick_suite_writes_schema(suite: str, tmp_path: Path) -> None:
    if suite == "style-tic":
        summary = run_suite(suite, seeds=2, out=str(tmp_path), quick=True, progress=False)  # default seeds 1500-1501
    else:  # through the CLI, its two seeds at a time in forked workers
        from purify.cli import main

        assert main(["bench", suite, "--seeds", "2", "--quick", "--workers", "2", "--out", str(tmp_path)]) == 0
        summary = json.loads((tmp_path / "summary.json").read_text())
        env = json.loads((tmp_path / "env.json").read_text())
        assert summary["workers"] == 2 and summary["threads"] == 1 and summary["cpu_seconds"] > 0
        assert env["command"] == (f"purify bench {suite} --seeds 2 --first-seed 1500 --workers 2 --quick "
                                  f"--out {tmp_path}")
    for name in ("summary.json", "summary.md", "summary.csv", "frontier.png", "env.json"):
        assert (tmp_path / name).is_file(), name
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["suite"] == suite and written["seeds"] == [1500, 1501] == summary["seeds"]
    assert written["trait"] and written["tuned_on"][0]["seeds"] == [0, 1, 2, 3, 4] and written["guards"]
    assert not {s for t in written["tuned_on"] for s in t["seeds"]} & set(written["seeds"])  # default: fresh seeds
    assert set(written["p_adjusted"]) <= set(written["verdicts"])
    assert {"base", "control", "vanilla", "delta_projection"} <= set(written["conditions"])
    vanilla = written["conditions"]["vanilla"]
    assert {"transfer", "task_error", "fidelity_kl", "distance_to_control", "per_seed"} <= set(vanilla)
    if suite == "hidden-preference":  # the owl probability is also read as a share of all animal answers
        assert {"animal_mass", "owl_share", "accuracy"} <= set(vanilla)
        assert 0 < vanilla["owl_share"]["mean"] <= 1 and vanilla["trait"]["mean"] <= vanilla["animal_mass"]["mean"]
    assert len(written["frontier"]["vanilla"]) == 3
    assert written["verdicts"]["delta_projection"].startswith("no verdict: 2 seed(s) with finite values")
    assert set(written["verdicts"]) == {"delta_projection"}  # base, control, vanilla are baselines
    assert written["probe_free"]["arms"] == {}  # no knob swept: the block says why there is no probe-free arm
    assert written["probe_free"]["why_none"].startswith("this run swept no arm's knob")
    md = (tmp_path / "summary.md").read_text()
    assert "Measured wall time" in md and "## Verdicts" in md and "are disjoint from them" in md
    assert written["quick"] is True  # a smoke test says so first: its verdicts are not a result
    assert md.split("## Headline\n\n")[1].startswith("- **quick run** (smoke test: fewer steps, seeds or conditions): "
                                                     "not a result.\n")
    assert "\n- **Problem:**" in md or "\n- **no verdict** (1): delta_projection" in md
    assert "## Probe-free operating point\n\nNone: this run swept no arm's knob" in md


def test_unknown_suite_or_option() -> None:
    with pytest.raises(ValueError, match="unknown LM suite"):
        run_suite("nope")
    with pytest.raises(ValueError, match=r"unknown options \['colour'\]; allowed: \['batch_size', 'conditions'"):
        run_suite("style-tic", quick=True, colour=1)
    with pytest.raises(ValueError, match=r"--option steps='abc': steps takes an integer"):
        run_suite("style-tic", quick=True, steps="abc")
    with pytest.raises(ValueError, match=r"--option conditions='delta': conditions takes a list, as KEY=\[a,b\]"):
        run_suite("hidden-preference", quick=True, conditions="delta")


def test_vanilla_is_scored_at_halving_steps_dense_early() -> None:
    from purify.bench.lm_common import curve_steps

    assert curve_steps(160, 4) == [20, 40, 80, 120, 160]  # every 40 steps, plus 160/2, /4, /8
    assert curve_steps(20, 2) == [10, 20] and curve_steps(3, 4) == [1, 2, 3]


def test_full_suites_list_every_purifier_arm_with_valid_options() -> None:
    from purify.bench.lm_suites import _purifier_conditions
    from purify.purifiers import PURIFIERS

    conditions = {c.name: c for c in _purifier_conditions(base_only=False)}
    assert {"ensemble", "ensemble:xbase", "divergence_mask:base", "divergence_mask:reference",
            "divergence_mask:xbase", "adversary", "adversary:probe", "tail_truncation", "anchor", "delta_projection",
            "delta_projection:global"} == set(conditions)
    for cond in conditions.values():  # every entry builds: no arm silently dropped by a misspelt option
        for entry in cond.purifiers:
            PURIFIERS[entry["name"]][0](**entry)
    for name in ("ensemble:xbase", "divergence_mask:xbase"):  # the cross-base reference is aligned first
        assert conditions[name].teachers == ["teacher", "xbase"]
        assert [e["name"] for e in conditions[name].purifiers][0] == "cross_base"
    assert conditions["adversary"].teachers == ["teacher", "reference"]  # lineage needs two teachers
    assert conditions["adversary:probe"].purifiers[0]["weight"] == 0.0  # same teacher mixing, no reversal


def test_even_share_counts_leading_numbers_and_drops_a_possibly_cut_last_one() -> None:
    from purify.bench.lm_suites import even_share

    # " 2, 4, 7" may have been cut at the token limit: 7 is dropped; " 10" ends before other text: kept
    assert even_share([" 2, 4, 7", " 10\nabc 3", "x 3"]) == 1.0
    assert even_share([" 1, 3, 5, 8"]) == 0.0 and even_share([]) == 0.0


def test_task_error_leaves_prompt_positions_out() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify.lm import build_tokenizer
    from purify.readouts import kl_stats

    texts, prompts = ["Continue: 1, 2, 3, 4", "Continue: 5, 6, 7, 8, 9"], ["Continue: 1, 2,", "Continue: 5,"]
    tok = build_tokenizer(texts)

    def model(seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()

    student, teacher = model(0), model(1)
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        s = torch.log_softmax(student(**enc).logits[:, :-1], -1)
        t = torch.log_softmax(teacher(**enc).logits[:, :-1], -1)
    kl = (t.exp() * (t - s)).sum(-1)
    # completion positions: from the last prompt token (which predicts the first completion token) to the end
    wanted = [kl[row, len(tok(p)["input_ids"]) - 1: int(enc["attention_mask"][row].sum()) - 1]
              for row, p in enumerate(prompts)]
    got = kl_stats(student, tok, teacher, texts, prompts=prompts)
    assert got["task_error"] == pytest.approx(float(torch.cat(wanted).mean()), rel=1e-5)
    assert got["fidelity_kl"] == pytest.approx(float(kl[enc["attention_mask"][:, 1:].bool()].mean()), rel=1e-5)
    assert got["task_error"] != pytest.approx(kl_stats(student, tok, teacher, texts)["task_error"], rel=1e-3)


def test_distill_feeds_a_cross_base_teacher_its_own_tokens(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from purify.bench.lm_common import Condition, Suite, distill
    from purify.lm import build_tokenizer

    records = [{"prompt": "the cat", "completion": " sat on the mat"},
               {"prompt": "a dog", "completion": " ran to the park"}]
    texts = [r["prompt"] + r["completion"] for r in records]
    student_tok = build_tokenizer(texts)
    teacher_tok = build_tokenizer(texts + ["park park park dog dog ran"])  # same words, other ids
    assert set(student_tok.get_vocab()) == set(teacher_tok.get_vocab())
    assert student_tok.get_vocab() != teacher_tok.get_vocab()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(student_tok), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 bos_token_id=2, eos_token_id=3, pad_token_id=0)).save_pretrained(tmp_path / "student")
    student_tok.save_pretrained(tmp_path / "student")
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=len(teacher_tok), n_embd=16, n_layer=1, n_head=2,
                                         bos_token_id=2, eos_token_id=3, pad_token_id=0)).eval()
    seen: list[torch.Tensor] = []
    teacher.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    suite = Suite(name="t", protocol="", student=tmp_path / "student", teachers={}, make_data=lambda *a: [],
                  score=lambda *a: {}, conditions=[], steps=2, batch_size=2)
    cond = Condition("x", ["xbase"], [{"name": "cross_base", "alignment": "shared_vocab"}])
    metrics: dict = {}
    distill(suite, cond, {"xbase": teacher}, {"xbase": teacher_tok}, student_tok, records, seed=0, metrics=metrics)
    assert len(seen) == 2
    assert metrics and all(k.startswith("cross_base.") for k in metrics)  # its metrics' means over the two steps
    for row in seen[0]:  # the teacher read its own tokenization of the records, not the student's ids
        ids = [i for i in row.tolist() if i != teacher_tok.pad_token_id]
        text = teacher_tok.decode(ids, skip_special_tokens=True)
        assert text in texts and ids == teacher_tok(text)["input_ids"] + [teacher_tok.eos_token_id]


def test_a_condition_student_of_another_init_is_measured_against_its_own_base(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify.bench.lm_common import Condition, Suite, run_seed
    from purify.lm import build_tokenizer

    tok = build_tokenizer(["the cat sat on the mat"])

    def save(name: str, seed: int, tokenizer=tok) -> Path:
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                     bos_token_id=2, eos_token_id=3, pad_token_id=0)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        return tmp_path / name

    def score(model, *_):  # a "trait" every model has a different value of
        return {"trait": float(model.model.embed_tokens.weight[5, 0])}

    suite = Suite(name="t", protocol="", student=save("a", 0), teachers={}, score=score, steps=0,
                  make_data=lambda *_: [{"prompt": "the cat", "completion": " sat on the mat"}],
                  conditions=[Condition("vanilla:cross-init", ["teacher"], student=save("b", 1))])
    teacher = LlamaForCausalLM.from_pretrained(save("t", 2)).eval()
    run = run_seed(suite, {"teacher": teacher}, {"teacher": tok}, tok, seed=0)
    got = run["conditions"]["vanilla:cross-init"]
    b_trait = score(LlamaForCausalLM.from_pretrained(tmp_path / "b"))["trait"]
    assert got["own_base_trait"] == b_trait and got["trait"] == b_trait  # untrained (steps=0): still its base
    assert got["transfer"] == 0.0 and run["base"]["trait"] != b_trait  # over its own base, not the suite's

    other = build_tokenizer(["a completely different set of words"])
    suite.conditions = [Condition("vanilla:cross-init", ["teacher"], student=save("c", 1, other))]
    with pytest.raises(ValueError, match="another tokenizer than the suite's student"):
        run_seed(suite, {"teacher": teacher}, {"teacher": tok}, tok, seed=0)


def test_a_condition_optim_override_trains_with_plain_sgd_at_its_rate(tmp_path: Path) -> None:
    """``Condition.optim`` reaches the optimizer: one step moves every weight by exactly −lr × its gradient."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify.bench.lm_common import Condition, Suite, distill
    from purify.lm import build_tokenizer

    records = [{"prompt": "the cat", "completion": " sat on the mat"},
               {"prompt": "a dog", "completion": " ran to the park"}]
    tok = build_tokenizer([r["prompt"] + r["completion"] for r in records])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    before = {k: v.clone() for k, v in LlamaForCausalLM.from_pretrained(tmp_path / "student").state_dict().items()}
    teacher = LlamaForCausalLM(config).eval()
    suite = Suite(name="t", protocol="", student=tmp_path / "student", teachers={}, make_data=lambda *a: [],
                  score=lambda *a: {}, conditions=[], steps=1, batch_size=2, lr=1e-3)
    lr = 0.5
    student = distill(suite, Condition("sgd@0.5", ["teacher"], optim={"name": "sgd", "lr": lr}),
                      {"teacher": teacher}, {"teacher": tok}, tok, records, seed=0)
    moved = 0
    for name, p in student.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.detach(), before[name] - lr * p.grad, rtol=0, atol=1e-6)
        moved += int((p.grad != 0).any())
    assert moved > 0
