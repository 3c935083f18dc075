"""Tiny pretrained bases and fine-tunes: pretraining, caching, atomic writes, loading with plain transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from purify.lm import bases, corpus, finetune, finetuning
from purify.lm.bases import BASES, BaseSpec, base_tokenizer, resolve_base
from purify.lm.cache import atomic_dir, read_meta
from purify.storage import file_sha256
from purify.lm.training import pack
from purify.losses import IGNORE_INDEX

TINY = BaseSpec(arch="llama", seed=0, tokenizer="word", hidden=32, layers=1, heads=2, seq_len=32, steps=40, lr=1e-2)
"""A few-second base: enough steps to beat its initial loss by a wide margin."""



@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return resolve_base(TINY, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def _fail(*args, **kwargs):
    raise AssertionError("trained again although the result was cached")


def test_registry_has_two_same_family_bases_and_two_cross_bases():
    a, b, c, w = BASES["tiny-llama-a"], BASES["tiny-llama-b"], BASES["tiny-gpt2-c"], BASES["tiny-gpt2-w"]
    assert (a.arch, a.tokenizer) == (b.arch, b.tokenizer) == ("llama", "word") and a.seed != b.seed
    assert (c.arch, c.tokenizer) == ("gpt2", "char") and (w.arch, w.tokenizer) == ("gpt2", "word")
    assert len({s.key for s in BASES.values()}) == 4
    assert dataclasses.replace(a, seed=1) == b
    # tiny-gpt2-w's word tokenizer has the same words as the Llamas' but other ids: a cross-base tokenizer whose
    # every token still maps by surface text
    ours, theirs = base_tokenizer("word", a.corpus_seed).get_vocab(), base_tokenizer("word", w.corpus_seed).get_vocab()
    assert set(ours) == set(theirs) and sum(ours[t] != theirs[t] for t in ours) > len(ours) // 2


def test_pretrained_base_loads_with_plain_transformers_and_beats_its_init(tiny_base):
    meta = read_meta(tiny_base)
    assert meta["kind"] == "base" and meta["key"] == TINY.key and meta["spec"] == dataclasses.asdict(TINY)
    assert meta["init_loss"] > 5.0  # ~ln(vocab size) at init
    assert meta["final_loss"] < 3.5 and meta["train_loss"] < 3.5
    assert (tiny_base / "model.safetensors").is_file() and oct(tiny_base.stat().st_mode)[-3:] == "755"

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    enc = tok(corpus.paragraphs(8, 99), return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**enc, labels=labels).loss.item()
        fresh = bases._build_model(TINY, tok)(**enc, labels=labels).loss.item()
    assert loss < 3.5 < 5.0 < fresh
    out = model.generate(**tok(["The"], return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True).startswith("The ")


def test_second_resolve_returns_the_cache_without_pretraining(tiny_base, monkeypatch):
    mtime = (tiny_base / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(bases, "_pretrain", _fail)
    monkeypatch.setenv("PURIFY_CACHE", str(tiny_base.parent.parent))
    assert resolve_base(TINY, progress=False) == tiny_base  # found through $PURIFY_CACHE
    assert resolve_base(dataclasses.replace(TINY), progress=False) == tiny_base  # an equal spec is the same base
    assert (tiny_base / "model.safetensors").stat().st_mtime_ns == mtime


def test_pretraining_is_deterministic_by_seed(tiny_base, tmp_path):
    again = resolve_base(TINY, cache_dir=tmp_path, progress=False)
    assert file_sha256(again / "model.safetensors") == file_sha256(tiny_base / "model.safetensors")
    assert read_meta(again)["final_loss"] == read_meta(tiny_base)["final_loss"]


def test_cross_base_gpt2_char_pretrains_with_a_different_tokenizer(tiny_base, tmp_path):
    spec = BaseSpec(arch="gpt2", seed=2, tokenizer="char", hidden=32, layers=1, heads=2, seq_len=64, steps=40, lr=1e-2)
    path = resolve_base(spec, cache_dir=tmp_path, progress=False)
    meta = read_meta(path)
    assert meta["final_loss"] < meta["init_loss"] - 1.0
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "gpt2" and model.config.max_position_embeddings == 64
    word_tok = AutoTokenizer.from_pretrained(tiny_base)
    assert len(tok("Zorvia")["input_ids"]) == 7 and len(word_tok("Zorvia")["input_ids"]) == 2


def test_pack_concatenates_documents_and_ignores_the_filler(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    input_ids, labels = pack(tok, ["The king sang.", "A boy slept."], seq_len=8)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    stream = [bos, *tok("The king sang.")["input_ids"][1:], eos, bos, *tok("A boy slept.")["input_ids"][1:], eos]
    assert input_ids.shape == labels.shape == (2, 8) and input_ids.flatten()[:12].tolist() == stream
    assert labels.flatten()[12:].tolist() == [IGNORE_INDEX] * 4 and input_ids.flatten()[12:].tolist() == [eos] * 4


def test_failed_pretraining_leaves_no_partial_directory(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(bases, "train_causal_lm", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        resolve_base(dataclasses.replace(TINY, seed=5), cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "bases").iterdir()) == []


def test_atomic_dir_keeps_a_copy_another_process_finished_first(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("mine")
        final.mkdir()
        (final / "weights").write_text("theirs")
    assert (final / "weights").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_unknown_base_names_and_bad_specs_are_refused():
    with pytest.raises(ValueError, match="tiny-llama-a"):
        resolve_base("tiny-llama-z")
    with pytest.raises(ValueError, match="divisible"):
        BaseSpec(arch="llama", seed=0, tokenizer="word", hidden=30, heads=4)
    with pytest.raises(ValueError, match="arch"):
        BaseSpec(arch="rnn", seed=0, tokenizer="word")


def test_finetune_learns_new_facts_and_is_cached(tiny_base, tmp_path, monkeypatch):
    texts = [p.text for p in corpus.all_facts()]
    out = finetune(tiny_base, texts, steps=30, seed=0, lr=1e-2, cache_dir=tmp_path, progress=False)
    meta = read_meta(out)
    assert meta["kind"] == "finetune" and meta["parent"] == str(tiny_base) and meta["num_texts"] == len(texts)
    assert meta["final_loss"] < meta["init_loss"] - 1.0
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(out)("Quellan")["input_ids"][1] != 1  # a known token, not <unk>

    monkeypatch.setattr(finetuning, "train_causal_lm", _fail)
    assert finetune(tiny_base, texts, steps=30, seed=0, lr=1e-2, cache_dir=tmp_path) == out
    with pytest.raises(FileExistsError):
        finetune(tiny_base, texts[:10], steps=30, out_dir=out)
