"""Dotlist overrides of a tiny language-model recipe (1-layer Llama student and teacher on a saved tokenizer), shared
by the tests that drive ``purify train`` end to end."""

from __future__ import annotations

from pathlib import Path

MODEL = ("{config: {model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
         "num_attention_heads: 2, num_key_value_heads: 2}, tokenizer: %s, seed: %d}")


def tiny_lm_overrides(tokenizer: Path, train: Path, out: Path, **items: object) -> list[str]:
    """``key=value`` overrides: student (seed 0) and one teacher (seed 1) on ``tokenizer``, ``data.train``, batch 2 ×
    32 tokens, no progress bar, ``output_dir``; ``items`` add or replace keys."""
    base: dict[str, object] = {"student": MODEL % (tokenizer, 0), "teachers": f"[{MODEL % (tokenizer, 1)}]",
                               "data.train": train, "data.batch_size": 2, "data.max_length": 32,
                               "trainer.enable_progress_bar": False, "output_dir": out}
    return [f"{k}={v}" for k, v in {**base, **items}.items()]
