"""In-memory tokenizers for the tiny bases: a word-level one and a character-level one over the same text.

Both are built with the ``tokenizers`` library and wrapped as :class:`transformers.PreTrainedTokenizerFast`, so they
save with ``save_pretrained``, load back with plain ``AutoTokenizer.from_pretrained`` and return offset mappings.
Two *different* tokenizations of one text are what the cross-base purifiers need to be tested against.

- ``"word"``: words carry their leading space as ``▁`` (Metaspace, like SentencePiece), punctuation is split off and
  numbers tokenize per digit (``" 382,"`` → ``▁ 3 8 2 ,``), so the vocabulary stays in the low hundreds.
- ``"char"``: one token per character.

Encoding prepends ``<bos>`` (never appends ``<eos>``, so prompts stay open for generation); ``<pad>``, ``<unk>`` and
``<eos>`` exist too. Decoding with ``skip_special_tokens=True`` restores the text exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TokenizerKind = Literal["word", "char"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
"""The special tokens of every tokenizer built here; they take ids 0-3 in this order."""


def _pre_tokenizer(kind: TokenizerKind) -> pre_tokenizers.PreTokenizer:
    if kind == "word":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
                pre_tokenizers.Punctuation(),
                pre_tokenizers.Digits(individual_digits=True),
            ]
        )
    if kind == "char":
        return pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raise ValueError(f"tokenizer kind must be 'word' or 'char', got {kind!r}")


def build_tokenizer(
    texts: Iterable[str], kind: TokenizerKind = "word", vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Build a word- or character-level tokenizer from texts, in memory.

    The vocabulary is every piece seen in ``texts`` (most frequent first, up to ``vocab_size`` including the four
    special tokens); anything else encodes as ``<unk>``.

    Args:
        texts: the texts whose pieces make up the vocabulary.
        kind: ``"word"`` (words, punctuation, single digits) or ``"char"`` (single characters).
        vocab_size: the largest vocabulary allowed.

    Returns:
        A fast tokenizer with ``<bos>`` prepended on encoding and ``padding_side="right"``.

    Raises:
        ValueError: on an unknown ``kind``.
    """
    pre_tokenizer = _pre_tokenizer(kind)
    tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizer
    if kind == "word":
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    else:
        tokenizer.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="right", **SPECIAL_TOKENS)
