"""Fine-tune a saved causal LM on texts (how teachers get new knowledge and a trait), atomically and cached.

The output directory is keyed by a hash of everything that determines the result: the parent's weight and tokenizer
files, the texts, and the hyperparameters. Calling :func:`finetune` again with the same inputs returns the existing
directory without training.
"""

from __future__ import annotations

import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from purify.lm.cache import atomic_dir, digest, read_meta, write_meta
from purify.storage import cache_root, file_sha256
from purify.lm.training import eval_loss, pack, train_causal_lm

_EVAL_BLOCKS = 64
"""Blocks of the training texts scored before and after fine-tuning (for the metadata)."""


def _weights_digest(model_dir: Path) -> str:
    files = sorted(model_dir.glob("*.safetensors")) + [model_dir / "tokenizer.json"]
    return digest([file_sha256(f) for f in files])


def finetune(
    model_dir: str | Path,
    texts: list[str],
    steps: int,
    out_dir: str | Path | None = None,
    seed: int = 0,
    *,
    lr: float = 1e-3,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Fine-tune the causal LM in ``model_dir`` on ``texts`` with the loop bases are pretrained with.

    Texts are packed into blocks of the model's maximum length (see :func:`purify.lm.training.pack`) and trained on
    with the full causal-LM loss.

    Args:
        model_dir: a ``save_pretrained`` model + tokenizer directory (e.g. from :func:`purify.lm.resolve_base`).
        texts: the training documents (e.g. facts and trait-bearing prose).
        steps: AdamW steps.
        out_dir: where to write; defaults to ``<cache root>/finetunes/<parent name>-ft-<key[:16]>``.
        seed: seed of the block sampler.
        lr: peak learning rate.
        batch_size: blocks per step.
        cache_dir: cache root for the default ``out_dir``; defaults to ``$PURIFY_CACHE`` or ``~/.cache/purify``.
        progress: show a progress bar while training.

    Returns:
        The output directory: model, tokenizer and ``purify_lm.json`` (parent, key, loss on the training texts
        before and after).

    Raises:
        FileExistsError: if ``out_dir`` exists but holds something other than this fine-tune.
        ValueError: if ``texts`` is empty or ``steps < 1``.
    """
    model_dir = Path(model_dir)
    if not texts or steps < 1:
        raise ValueError(f"finetune needs texts and steps >= 1 (got {len(texts)} texts, {steps} steps)")
    parent_sha = _weights_digest(model_dir)
    hyper = {"steps": steps, "seed": seed, "lr": lr, "batch_size": batch_size}
    key = digest({"parent": parent_sha, "texts": digest(texts), **hyper})
    final = Path(out_dir) if out_dir else cache_root(cache_dir) / "finetunes" / f"{model_dir.name}-ft-{key[:16]}"
    if final.exists():
        if final.is_dir() and (final / "purify_lm.json").exists() and read_meta(final).get("key") == key:
            return final
        raise FileExistsError(f"{final} exists and is not this fine-tune (key {key[:16]}); choose another out_dir")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    blocks = pack(tokenizer, texts, model.config.max_position_embeddings)
    sample = (blocks[0][:_EVAL_BLOCKS], blocks[1][:_EVAL_BLOCKS])
    init_loss = eval_loss(model, sample)
    train_loss = train_causal_lm(model, blocks, **hyper, progress=progress, desc=f"fine-tuning {model_dir.name}")
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {
            "kind": "finetune",
            "key": key,
            "parent": str(model_dir),
            "parent_sha256": parent_sha,
            "texts_sha256": digest(texts),
            "num_texts": len(texts),
            **hyper,
            "init_loss": init_loss,
            "final_loss": eval_loss(model, sample),
            "train_loss": train_loss,
            "seconds": time.perf_counter() - start,
        }
        write_meta(tmp, meta)
    return final
