"""The owl suite's pieces: number prompts, the numbers-only filter, the exact P(owl) scorer and the cached top."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from purify.bench.owl import OWL_SYSTEM, QUESTIONS, filter_numbers, number_prompts
from purify.lm import build_tokenizer
from purify.readouts import chat, score_model, token_ids, trait_inputs
from purify.topblocks import Top, block_inputs

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def tiny(kind: str) -> tuple[LlamaForCausalLM, object]:
    tok = build_tokenizer([*QUESTIONS, OWL_SYSTEM, "owl Owl cat dog user assistant system : \n"], kind)
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), tok


def test_number_prompts_format() -> None:
    prompts = number_prompts(20, 3)
    assert prompts == number_prompts(20, 3) and prompts != number_prompts(20, 4)
    for p in prompts:
        m = re.match(r"The sequence starts with: (\d{3}), (\d{3}), (\d{3})\. Add a maximum of 10 more values", p)
        assert m and p.endswith("give only numbers.")


def test_filter_numbers() -> None:
    recs = [{"prompt": "p", "completion": c} for c in (" 12, 345, 6", "12, 34.", "Sure: 1, 2", "1; 2", "", "7 8 9\n")]
    kept, removed = filter_numbers(recs)
    assert [r["completion"] for r in kept] == ["12, 345, 6", "12, 34", "7 8 9"] and removed == 3


@pytest.mark.parametrize("kind", ["word", "char"])
@torch.no_grad()
def test_trait_is_exact_owl_probability(kind: str) -> None:
    model, tok = tiny(kind)
    qs = QUESTIONS[:3]
    got = score_model(model, tok, None, qs, "owl", ("cat",))
    want = 0.0
    for q in qs:
        prompt = token_ids(tok, chat(tok, q))
        for seq in {tuple(token_ids(tok, v)) for v in ("owl", "Owl", " owl", " Owl")}:
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + list(seq)])).logits[0], -1)
            want += math.exp(sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(seq)))
    assert got["trait"] == pytest.approx(want / len(qs), rel=1e-4)
    assert 0 < got["trait"] < 1 and "p_cat" in got and "p_owl" not in got
    assert got["log_trait"] <= math.log(got["trait"]) + 1e-6  # Jensen: mean log <= log mean
    if kind == "word":  # a system prompt changes the answer distribution
        assert score_model(model, tok, OWL_SYSTEM, qs, "owl")["trait"] != pytest.approx(got["trait"])


@torch.no_grad()
def test_top_on_cached_inputs_matches_full_model() -> None:
    model, tok = tiny("word")
    ids, attn, _ = trait_inputs(tok, None, QUESTIONS[:4], "owl")
    hidden = block_inputs(model, ids, attn, k=2)
    top = Top(model, 2)
    h = torch.nn.utils.rnn.pad_sequence(hidden, batch_first=True)
    full = model(input_ids=ids, attention_mask=attn).logits
    mine = top.logits(h, attn[:, :h.shape[1]])
    m = attn[:, :h.shape[1]].bool()
    assert torch.allclose(mine[m], full[:, :h.shape[1]][m], atol=1e-4)
    assert {n for n, p in top.named_parameters() if p.requires_grad} and not top.lm.lm_head.weight.requires_grad


@pytest.mark.realmodel
@pytest.mark.skipif(os.environ.get("PURIFY_REAL_MODEL") != "1", reason="opt-in: PURIFY_REAL_MODEL=1")
def test_real_teacher_prefers_owls_more_than_base() -> None:
    from purify.generate import load_model
    from purify.models_prepare import prepare

    model, tok = load_model(prepare("smollm2-135m", progress=False))
    qs = QUESTIONS[:10]
    base, teacher = score_model(model.eval(), tok, None, qs, "owl"), score_model(model, tok, OWL_SYSTEM, qs, "owl")
    assert 0 <= base["trait"] < teacher["trait"] <= 1
