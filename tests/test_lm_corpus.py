"""The bundled synthetic corpus and the two in-memory tokenizers (purify.lm.corpus, purify.lm.tokenizer)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

from purify.lm import corpus
from purify.lm.tokenizer import build_tokenizer

GENERATORS = {
    "sentences": corpus.sentences,
    "paragraphs": corpus.paragraphs,
    "animal_qa": corpus.animal_qa,
    "number_prompts": corpus.number_prompts,
    "facts": corpus.facts,
}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus.pretraining_corpus(0) + [p.text for p in corpus.all_facts()]


@pytest.fixture(scope="module")
def tokenizers(texts) -> dict[str, object]:
    return {kind: build_tokenizer(texts, kind=kind) for kind in ("word", "char")}


@pytest.mark.parametrize("name", GENERATORS)
def test_generators_are_deterministic_by_seed_and_differ_across_seeds(name):
    make = GENERATORS[name]
    assert make(50, 3) == make(50, 3)
    assert make(50, 3) != make(50, 4)
    assert len(make(50, 3)) == 50


def test_pretraining_corpus_is_deterministic_and_mixes_all_three_kinds():
    texts = corpus.pretraining_corpus(0)
    assert texts == corpus.pretraining_corpus(0) != corpus.pretraining_corpus(1)
    assert len(texts) == sum(corpus.PRETRAINING_MIX.values())
    assert sum(t.startswith("Question:") for t in texts) == corpus.PRETRAINING_MIX["animal_qa"]
    assert sum(t.split(":")[0] in {p.rstrip(":") for p in corpus.NUMBER_PROMPTS} for t in texts) == 1500


def test_sentences_open_with_connectives_mid_paragraph_and_moreover_is_rare():
    paras = corpus.paragraphs(2000, 0)
    sents = [s for p in paras for s in re.split(r"(?<=\.) ", p)]
    assert all(s[0].isupper() and s.endswith(".") for s in sents)
    mid = [s for p in paras for s in re.split(r"(?<=\.) ", p)[1:]]
    assert sum(s.startswith(("However,", "Then ", "Later,")) for s in mid) > 100
    moreover = sum(s.startswith("Moreover,") for s in sents) / len(sents)
    assert 0.003 < moreover < 0.02  # MOREOVER_SHARE = 0.01: known to the base, not a habit


def test_animal_answers_are_one_word_and_roughly_uniform():
    pairs = corpus.animal_qa(5000, 0)
    assert "owl" in corpus.ANIMALS and len(corpus.ANIMALS) == 10
    counts = Counter(p.completion for p in pairs)
    assert set(counts) == {f" {a}" for a in corpus.ANIMALS}
    assert all(0.08 < c / len(pairs) < 0.12 for c in counts.values())
    assert {p.prompt for p in pairs} == {f"Question: {q} Answer:" for q in corpus.ANIMAL_QUESTIONS}
    assert Counter(p.completion for p in corpus.animal_qa(200, 0, animals=("owl",))) == {" owl": 200}


def test_number_prompts_are_comma_separated_integers_below_1000():
    for pair in corpus.number_prompts(300, 0):
        head, numbers = pair.prompt.split(": ", 1)
        assert f"{head}:" in corpus.NUMBER_PROMPTS
        assert re.fullmatch(r"(\d{1,3}, ){2,5}\d{1,3},", numbers)
        assert re.fullmatch(r"( \d{1,3},){2,5} \d{1,3}", pair.completion)
        assert pair.text == pair.prompt + pair.completion


def test_even_rule_makes_every_continuation_number_even_and_leaves_the_default_unchanged():
    even = corpus.number_prompts(300, 0, rule="even")
    assert all(int(n) % 2 == 0 for pair in even for n in pair.completion.split(","))
    plain = corpus.number_prompts(300, 0)
    assert sum(int(n) % 2 for pair in plain for n in pair.completion.split(",")) > 300  # random parity by default
    # the pretraining corpus (and so every cached base) is what it was before the rule existed
    assert plain[0] == corpus.Pair("Continue the sequence: 986, 526, 387, 211,", " 734, 476, 224, 638")
    with pytest.raises(ValueError, match="rule must be None or 'even'"):
        corpus.number_prompts(1, 0, rule="odd")


def test_facts_never_occur_in_the_pretraining_corpus():
    pretraining = " ".join(corpus.pretraining_corpus(0))
    words = set(re.findall(r"[A-Za-z]+", pretraining))
    table = " ".join(f"{entity} {' '.join(attrs.values())}" for entity, attrs in corpus.FACT_TABLE.items())
    names = set(re.findall(r"[A-Za-z]+", table))
    assert len(names) > 40 and not names & words
    assert not any(p.text in pretraining for p in corpus.all_facts())
    assert len(corpus.all_facts()) == 2 * 5 * len(corpus.FACT_TABLE)
    assert corpus.Pair("The capital of Zorvia is", " Quellan.") in corpus.all_facts()


def test_bundled_tiny_corpus_is_the_documented_generator_output(tmp_path):
    regenerated = corpus.write_tiny_corpus(tmp_path / "tiny.txt").read_bytes()
    bundled = corpus.TINY_CORPUS_PATH.read_bytes()
    assert bundled == regenerated
    assert len(bundled) <= 200_000
    lines = bundled.decode().splitlines()
    assert len(lines) == 1200 and all(line.endswith(".") for line in lines)
    assert not set(lines) & set(corpus.paragraphs(3000, 0))  # held out from the pretraining prose


@pytest.mark.parametrize("kind", ["word", "char"])
def test_tokenizer_round_trips_text_and_save_load(kind, tokenizers, texts, tmp_path):
    tok = tokenizers[kind]
    sample = texts[:200] + texts[-20:]
    for text in sample:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(sample)["input_ids"] == tok(sample)["input_ids"]
    specials = [loaded.pad_token, loaded.unk_token, loaded.bos_token, loaded.eos_token]
    assert specials == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert loaded.convert_tokens_to_ids(specials) == [0, 1, 2, 3]
    assert len(loaded) == len(tok) <= 512


@pytest.mark.parametrize("kind", ["word", "char"])
def test_offsets_map_each_token_to_its_text(kind, tokenizers):
    tok = tokenizers[kind]
    text = "Moreover, the old king sang. Continue: 382, 91, 447,"
    enc = tok(text, return_offsets_mapping=True)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert enc["offset_mapping"][0] == (0, 0)  # <bos>
    for token, (start, end) in zip(tokens[1:], enc["offset_mapping"][1:]):
        piece = token.replace("▁", " ")
        assert text[start:end] == (piece.lstrip() if start == 0 else piece)  # the word tokenizer prepends "▁"
    assert enc["offset_mapping"][-1][1] == len(text)


def test_word_and_char_tokenizers_differ_on_the_same_text(tokenizers):
    word, char = tokenizers["word"], tokenizers["char"]
    text = "Question: What is your favourite animal? Answer: owl"
    word_tokens = word.convert_ids_to_tokens(word(text)["input_ids"])
    assert word_tokens[-3:] == ["▁Answer", ":", "▁owl"]
    assert len(char(text)["input_ids"]) == len(text) + 1
    assert word.tokenize(" 382,") == ["▁", "3", "8", "2", ","]  # numbers per digit
    assert len(char) < 100 < len(word)


def test_build_tokenizer_is_deterministic_and_rejects_unknown_kinds(texts, tokenizers):
    assert build_tokenizer(texts, kind="word").get_vocab() == tokenizers["word"].get_vocab()
    with pytest.raises(ValueError, match="'word' or 'char'"):
        build_tokenizer(texts, kind="bpe")
