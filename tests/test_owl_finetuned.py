"""The fine-tuned-teacher owl suite (``purify.bench.owl_finetuned``) on a tiny random Llama (no download); the
teachers' sampling is replaced by a fake that emits number strings (a random tiny model emits none)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from purify import readouts, topblocks
from purify.bench import owl, owl_finetuned, real_lm
from purify.bench.owl_finetuned import (
    QUICK,
    arms,
    number_prompts,
    owl_teacher,
    teacher_records,
)
from purify.bench.rederive import rereport
from purify.lm import build_tokenizer

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
CFG = {**QUICK, "n": 24, "max_new": 6, "layers": 2, "top_k": 8, "epochs": 3, "teacher_epochs": 6, "batch_size": 4,
       "lr": 1e-2, "lora_lr": 1e-2, "teacher_lr": 1e-2, "heldout": 4, "fractions": [0.5],
       "fraction_modes": ["hard", "soft"], "ranks": [4],
       "lora_modes": ["soft"], "modes": ["hard", "soft"], "scale": "reduced"}


@pytest.fixture(scope="module")
def tiny() -> tuple[LlamaForCausalLM, object]:
    texts = [*owl.QUESTIONS, *(r["prompt"] + " " + r["completion"] for r in teacher_records()),
             *number_prompts(20, 0), "owl Owl owls user assistant system : \n 0 1 2 3 4 5 6 7 8 9 , . x",
             " ".join(owl.ANIMALS)]
    tok = build_tokenizer(texts, "word", vocab_size=1024)
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False), tok


def fake_sampler(calls: list[int]):
    """Completions as number strings that depend on the prompt and the model (every 6th is words: filtered out)."""
    def sample(model, tokenizer, prompts, **kw):
        calls.append(len(prompts))
        shift = int(model.model.layers[-1].mlp.up_proj.weight.sum() * 1e3) % 7
        return [f" {(i + shift) % 10} , {(3 * i + shift) % 10} , {(7 * i) % 10} ." if i % 6 else " x owl"
                for i in range(len(prompts))]
    return sample


def test_prompts_teacher_set_and_arms() -> None:
    assert number_prompts(5, 1) == number_prompts(5, 1) != number_prompts(5, 2)  # seeds vary the data
    recs = teacher_records()
    assert len(recs) == 100 and not {r["prompt"] for r in recs} & set(owl.QUESTIONS)  # readout questions held out
    assert all(r["completion"].lower().startswith(("owl", "the owl")) for r in recs)
    names = {c.name: (c.loss, c.kind, c.baseline, how) for c, how in arms(CFG)}
    assert list(names) == ["base", "control", "vanilla", "vanilla@50%", "control:soft", "vanilla:soft",
                           "vanilla:soft@50%", "lora4:soft"]
    assert names["control:soft"][:2] == ("forward_kl", "control") and names["control:soft"][3]["data"] == "teacher"
    assert names["control"][3] == {"data": "clean", "targets": "base_targets"}  # hard control: the base's own text
    assert names["lora4:soft"][3]["rank"] == 4 and names["vanilla@50%"][3]["fraction"] == 0.5
    assert all(b for _, _, b, _ in names.values())  # no purifier arm: every row is a reference or a curve point


def test_owl_teacher_learns_owl_and_is_cached(tiny, tmp_path, monkeypatch) -> None:
    base, tok = tiny
    monkeypatch.setenv("PURIFY_CACHE", str(tmp_path))
    before = readouts.score_model(base, tok, None, owl.QUESTIONS, "owl")["trait"]
    top, key = owl_teacher(base, tok, CFG)
    full = top.install(copy.deepcopy(base))
    after = readouts.score_model(full, tok, None, owl.QUESTIONS, "owl")["trait"]  # readout questions, never trained on
    assert before < 0.05 and after > 0.5
    again, key2 = owl_teacher(base, tok, CFG)
    assert key2 == key and all(torch.equal(a, b) for a, b in zip(top.state_dict().values(),
                                                                  again.state_dict().values()))
    assert not any(p.requires_grad for p in again.parameters())


def test_lora_student_starts_at_the_base_and_trains_only_the_adapter(tiny) -> None:
    base, tok = tiny
    plain, lora = topblocks.Top(base, 2).eval(), topblocks.student_top(base, 2, 4, seed=0).eval()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 2 * 7  # every linear layer of both blocks
    hidden, attn = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long)
    torch.testing.assert_close(lora.logits(hidden, attn), plain.logits(hidden, attn))  # B = 0: the base exactly
    assert all(p.requires_grad for n, p in topblocks.student_top(base, 2, 0, 0).named_parameters() if ".layers." in n)


def test_top_targets_are_the_models_log_probs_at_completion_positions(tiny) -> None:
    base, tok = tiny
    recs = [{"prompt": "Continue the sequence: 1 , 2", "completion": "3 , 4"}]
    data = topblocks.sft_data(base, tok, recs, 2)
    (v, t), = topblocks.top_targets(topblocks.Top(base, 2).eval(), data, 3)
    ids = tok(readouts.chat(tok, recs[0]["prompt"]), add_special_tokens=False)["input_ids"] + data["labels"][0]
    n = len(data["labels"][0])
    logp = torch.log_softmax(base(input_ids=torch.tensor([ids])).logits[0, -n - 1:-1], -1)
    want_v, want_t = logp.topk(3, -1)
    torch.testing.assert_close(v, want_v, atol=1e-4, rtol=1e-4)
    assert torch.equal(t, want_t)


def test_suite_runs_caches_per_seed_and_reports_contrasts(tiny, tmp_path, monkeypatch) -> None:
    base, tok = tiny
    monkeypatch.setenv("PURIFY_CACHE", str(tmp_path / "cache"))
    calls: list[int] = []
    monkeypatch.setattr(owl_finetuned, "sample_completions", fake_sampler(calls))  # the teacher's anchor answers
    monkeypatch.setattr(real_lm, "sample_completions", fake_sampler(calls))  # each seed's data
    out = tmp_path / "out"
    summary = owl_finetuned.run(base, tok, "tiny", CFG, [0, 1], str(out), True, {}, False)
    assert calls == [80] + [24] * 4  # the teacher's anchor answers, then two teachers × two seeds
    assert len(list((tmp_path / "cache" / "real-suites").glob("owl-ft-data-*.pt"))) == 2  # cached per seed
    assert {p.name for p in out.iterdir()} >= {"summary.json", "summary.md", "env.json", "readouts.json"}
    assert set(summary["vanilla_minus_control"]) == {"vanilla", "vanilla@50%", "vanilla:soft", "vanilla:soft@50%",
                                                     "lora4:soft"}
    assert summary["vanilla_minus_control"]["lora4:soft"]["control"] == "control:soft"
    per = {c: summary["conditions"][c]["per_seed"] for c in summary["conditions"]}
    kept = 24 - 4  # every 6th completion is words: filtered
    assert [r["samples"] for r in per["vanilla:soft"]] == [kept - CFG["heldout"]] * 2
    assert [r["samples"] for r in per["vanilla:soft@50%"]] == [(kept - CFG["heldout"]) // 2] * 2
    for van, ctl, base_rec in zip(per["vanilla:soft"], per["control:soft"], per["base"]):
        assert van["task_error"] < 0.5 * base_rec["task_error"]  # soft labels pull the student to the teacher
        assert ctl["task_error"] > 0.5 * base_rec["task_error"]  # the base's own targets do not
    assert per["vanilla:soft"][0]["curve"][0]["step"] == 0 and per["vanilla"][0]["curve"]
    md = Path(out, "summary.md").read_text()
    assert "- vanilla:soft − control:soft (16 samples/seed): P(owl)" in md and "Vanilla − control" in md
    rederived = rereport(out)  # rendered from the json: the re-derivation keeps the notes, contrasts and verdicts
    assert rederived["vanilla_minus_control"] == json.loads(json.dumps(summary["vanilla_minus_control"]))
    assert rederived["verdicts"] == summary["verdicts"] and Path(out, "summary.md").read_text() == md
    readouts = json.loads(Path(out, "readouts.json").read_text())
    assert readouts["teacher"] > 0.3 > 0.05 > readouts["base"]
    again = owl_finetuned.run(base, tok, "tiny", CFG, [0], str(tmp_path / "o2"), True, {}, False)
    assert calls == [80] + [24] * 4  # teacher and seed 0 from their caches: no sampling
    assert again["conditions"]["vanilla"]["per_seed"][0]["trait"] == per["vanilla"][0]["trait"]  # deterministic


def test_bad_options_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device=cuda .* torch sees no CUDA device"):
        owl_finetuned.run_suite(scale="full")  # refused before the model is loaded
    with pytest.raises(ValueError, match="scale must be reduced or full"):
        owl_finetuned.run_suite(scale="huge")
    with pytest.raises(ValueError, match="modes must be a non-empty subset"):
        owl_finetuned.run_suite(modes=["medium"])
    with pytest.raises(ValueError, match="unknown suite"):
        owl_finetuned.run_suite("owl-smollm2")


def test_seed_data_caches_samples_and_recomputes_targets_for_any_top_k(tiny, tmp_path, monkeypatch) -> None:
    base, tok = tiny
    monkeypatch.setenv("PURIFY_CACHE", str(tmp_path))
    calls: list[int] = []
    monkeypatch.setattr(real_lm, "sample_completions", fake_sampler(calls))
    top = topblocks.Top(base, 2).eval()
    a = owl_finetuned.seed_data(5, base, base, top, tok, CFG, "k")
    b = owl_finetuned.seed_data(5, base, base, top, tok, {**CFG, "top_k": 16}, "k")
    assert calls == [24, 24]  # sampled once (two teachers), then from the cache
    assert a["teacher"]["teacher"][0][0].shape[-1] == 8 and b["teacher"]["teacher"][0][0].shape[-1] == 16
    assert a["teacher"]["labels"] == b["teacher"]["labels"]
    torch.testing.assert_close(b["teacher"]["teacher"][0][0][:, :8], a["teacher"]["teacher"][0][0])  # same model
