"""Named tiny causal-LM bases, pretrained in seconds on CPU from the bundled synthetic corpus and cached.

:func:`resolve_base` turns a name from :data:`BASES` (or a :class:`BaseSpec`) into a directory that loads with plain
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``, pretraining the
base on first use. The two ``tiny-llama`` bases share an architecture, tokenizer and data and differ only in seed
(same family, different initialisation); ``tiny-gpt2-c`` and ``tiny-gpt2-w`` have another architecture and another
tokenizer (the cross-base case: characters, or words with other ids, pretrained on another corpus sample). Every
base of one ``corpus_seed`` and tokenizer kind has the same vocabulary, built from the pretraining corpus plus the
words of :func:`purify.lm.corpus.all_facts`, so that fine-tuning on facts needs no new tokens although the base
never trains on them.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from purify.lm import corpus
from purify.lm.cache import atomic_dir, digest, write_meta
from purify.storage import cache_root
from purify.lm.tokenizer import TokenizerKind, build_tokenizer
from purify.lm.training import eval_loss, pack, train_causal_lm

TRAINING_VERSION = 1
"""Version of the pretraining procedure; part of every cached base's key (bump when the loop changes)."""


@dataclass(frozen=True)
class BaseSpec:
    """Everything that determines a tiny base; its hash (with the corpus version) is the cache key.

    Attributes:
        arch: ``"llama"`` (RoPE, SwiGLU, RMSNorm) or ``"gpt2"`` (learned positions, GELU, LayerNorm).
        seed: seed of the initial weights and of the batch order.
        tokenizer: ``"word"`` or ``"char"`` (see :mod:`purify.lm.tokenizer`).
        hidden: model width; the MLP is ``4 * hidden`` wide.
        layers: transformer blocks.
        heads: attention heads.
        seq_len: training block length, also the model's maximum number of positions.
        steps: AdamW steps of pretraining.
        batch_size: blocks per step.
        lr: peak learning rate.
        corpus_seed: seed of :func:`purify.lm.corpus.pretraining_corpus` (and of the tokenizer's vocabulary).
    """

    arch: Literal["llama", "gpt2"]
    seed: int
    tokenizer: TokenizerKind
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    seq_len: int = 128
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    corpus_seed: int = 0

    def __post_init__(self) -> None:
        issues = []
        if self.arch not in ("llama", "gpt2"):
            issues.append(f"arch must be 'llama' or 'gpt2', got {self.arch!r}")
        if self.tokenizer not in ("word", "char"):
            issues.append(f"tokenizer must be 'word' or 'char', got {self.tokenizer!r}")
        if self.hidden % self.heads:
            issues.append(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if min(self.steps, self.batch_size, self.seq_len, self.layers) < 1:
            issues.append("steps, batch_size, seq_len and layers must be >= 1")
        if issues:
            raise ValueError("; ".join(issues))

    @property
    def key(self) -> str:
        """SHA-256 of the spec, the corpus version and the training version."""
        return digest({"spec": asdict(self), "corpus": corpus.CORPUS_VERSION, "training": TRAINING_VERSION})


BASES: dict[str, BaseSpec] = {
    "tiny-llama-a": BaseSpec(arch="llama", seed=0, tokenizer="word"),
    "tiny-llama-b": BaseSpec(arch="llama", seed=1, tokenizer="word"),
    "tiny-gpt2-c": BaseSpec(arch="gpt2", seed=2, tokenizer="char", steps=1200, lr=5e-3),
    "tiny-gpt2-w": BaseSpec(arch="gpt2", seed=3, tokenizer="word", corpus_seed=1),
}
"""The named bases: two same-family Llama bases (different seeds) and two cross-base GPT-2s: ``tiny-gpt2-c`` with
a char tokenizer (few positions align with a word-level student) and ``tiny-gpt2-w`` with a word tokenizer built
from another corpus sample (same words, 155 of 255 ids differ; every position and token aligns by surface text)."""


def base_tokenizer(kind: TokenizerKind, corpus_seed: int = 0) -> PreTrainedTokenizerFast:
    """The tokenizer every base of this ``kind`` and ``corpus_seed`` uses.

    Args:
        kind: ``"word"`` or ``"char"``.
        corpus_seed: seed of the pretraining corpus the vocabulary is built from.

    Returns:
        A tokenizer over the pretraining corpus plus the words of every fact.
    """
    texts = corpus.pretraining_corpus(corpus_seed) + [p.text for p in corpus.all_facts()]
    return build_tokenizer(texts, kind=kind)


def _build_model(spec: BaseSpec, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if spec.arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden,
            intermediate_size=4 * spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=spec.seq_len,
            tie_word_embeddings=True,
            **ids,
        )
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=spec.hidden,
            n_layer=spec.layers,
            n_head=spec.heads,
            n_positions=spec.seq_len,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(**ids)
    return model


def _pretrain(spec: BaseSpec, name: str, out: Path, progress: bool) -> None:
    """Pretrain ``spec`` and save model, tokenizer and metadata into ``out``."""
    start, cpu_start = time.perf_counter(), time.process_time()
    tokenizer = base_tokenizer(spec.tokenizer, spec.corpus_seed)
    train_blocks = pack(tokenizer, corpus.pretraining_corpus(spec.corpus_seed), spec.seq_len)
    heldout_blocks = pack(tokenizer, corpus.pretraining_corpus(spec.corpus_seed + 1)[:300], spec.seq_len)
    model = _build_model(spec, tokenizer)
    init_loss = eval_loss(model, heldout_blocks)
    train_loss = train_causal_lm(
        model,
        train_blocks,
        steps=spec.steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        seed=spec.seed,
        progress=progress,
        desc=f"pretraining {name}",
    )
    final_loss = eval_loss(model, heldout_blocks)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {
        "kind": "base",
        "name": name,
        "spec": asdict(spec),
        "key": spec.key,
        "corpus_version": corpus.CORPUS_VERSION,
        "training_version": TRAINING_VERSION,
        "init_loss": init_loss,
        "final_loss": final_loss,
        "train_loss": train_loss,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "machine": platform.machine(),
    }
    write_meta(out, meta)


def resolve_base(name: str | BaseSpec, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Return the directory of a pretrained tiny base, pretraining and caching it on first use.

    Args:
        name: a key of :data:`BASES`, or a :class:`BaseSpec` (e.g. a few-step one for tests).
        cache_dir: cache root; defaults to ``$PURIFY_CACHE`` or ``~/.cache/purify``.
        progress: show a progress bar while pretraining.

    Returns:
        ``<root>/bases/<name>-<key[:16]>``, holding ``save_pretrained`` model and tokenizer files and
        ``purify_lm.json`` (spec, key, held-out loss before and after pretraining, wall and CPU seconds taken).

    Raises:
        ValueError: if ``name`` is not in :data:`BASES`.
    """
    if isinstance(name, BaseSpec):
        named = [n for n, s in BASES.items() if s == name]
        spec, label = name, named[0] if named else f"{name.arch}-{name.tokenizer}-s{name.seed}"
    elif name in BASES:
        spec, label = BASES[name], name
    else:
        raise ValueError(f"unknown base {name!r}; known bases: {', '.join(BASES)} (or pass a BaseSpec)")
    final = cache_root(cache_dir) / "bases" / f"{label}-{spec.key[:16]}"
    if not final.is_dir():
        with atomic_dir(final) as tmp:
            _pretrain(spec, label, tmp, progress)
    return final
