"""Tiny causal LMs for the language-model benchmarks: a bundled synthetic corpus, tokenizers, cached bases.

- :mod:`purify.lm.corpus` — deterministic generators (prose, animal QA, number sequences, held-out facts).
- :mod:`purify.lm.tokenizer` — word- and character-level tokenizers built in memory.
- :mod:`purify.lm.bases` — named bases (:data:`BASES`) pretrained in seconds and cached by :func:`resolve_base`.
- :mod:`purify.lm.finetuning` — :func:`finetune` a saved model on texts, cached by a hash of its inputs.

Example:
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from purify.lm import resolve_base
    >>> path = resolve_base("tiny-llama-a")  # ~30 s the first time, then instant
    >>> model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
"""

from purify.lm.bases import BASES, BaseSpec, base_tokenizer, resolve_base
from purify.lm.cache import read_meta
from purify.storage import cache_root
from purify.lm.corpus import (
    ANIMAL_QUESTIONS,
    ANIMALS,
    FACT_TABLE,
    Pair,
    all_facts,
    animal_qa,
    facts,
    number_prompts,
    paragraphs,
    pretraining_corpus,
    sentences,
    write_tiny_corpus,
)
from purify.lm.finetuning import finetune
from purify.lm.tokenizer import build_tokenizer

__all__ = [
    "ANIMALS",
    "ANIMAL_QUESTIONS",
    "BASES",
    "FACT_TABLE",
    "BaseSpec",
    "Pair",
    "all_facts",
    "animal_qa",
    "base_tokenizer",
    "build_tokenizer",
    "cache_root",
    "facts",
    "finetune",
    "number_prompts",
    "paragraphs",
    "pretraining_corpus",
    "read_meta",
    "resolve_base",
    "sentences",
    "write_tiny_corpus",
]
