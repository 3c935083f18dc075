"""Cross-tokenizer alignment as pure functions: token positions by character spans, vocabularies by token strings,
and universal logit distillation (ULD) between vocabularies that share nothing.

Positions. Both tokenizers split the same text; each token covers a character span ``[start, end)`` of it (special
tokens are zero-width: ``<bos>`` at ``(0, 0)``, ``<eos>`` at ``(L, L)``). Walking both span lists and closing a group
wherever the two tokenizations reach the same boundary (trl's ``_align_by_byte_offsets``) gives groups of 1:1, 1:k,
k:1 or k:m tokens. Only a 1:1 group pairs two next-token predictions that answer the same question: both models
have read exactly ``text[:start]`` and predict a token that is exactly ``text[start:end]``. In a longer group the
teacher's group-closing prediction is conditioned on more (or less) text than the student's (for ``" king"`` against
``" ", "k", "i", "n", "g"``: ``P(g | "The kin")`` against ``P(" king" | "The")``). A 1:1 group is a pair of tokens
with the same span, so :func:`align_positions` looks spans up directly and leaves every other token unaligned.

Vocabularies. :func:`vocab_map` maps a teacher token to the student token whose surface text (what the token adds
when it follows another token, e.g. ``" the"``) is identical; special tokens map by role. :func:`map_logprobs`
moves a teacher distribution onto the student vocabulary (mass of unmatched tokens is reported and dropped).

ULD. Boizard et al. 2024 ("Towards cross-tokenizer distillation: the universal logit distillation loss",
arXiv 2402.12030) compare the *sorted* probability vectors, zero-padded to a common length:
``W1(p, q) = Σ_k |p_(k) − q_(k)|`` with ``p_(1) ≥ p_(2) ≥ …`` (:func:`uld_loss`). It needs no vocabulary match and is
invariant to any permutation of either vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Span = tuple[int, int]


def char_spans(offsets: Tensor | Sequence[Sequence[int]]) -> list[Span | None]:
    """Character spans of a token sequence, ``None`` for padding rows (negative offsets).

    Args:
        offsets: ``(T, 2)`` ``[start, end)`` character offsets per token, ``-1`` on padding.

    Returns:
        ``T`` spans as ``(start, end)`` int pairs, or ``None``.
    """
    rows = offsets.tolist() if isinstance(offsets, Tensor) else offsets
    return [(int(a), int(b)) if a >= 0 and b >= a else None for a, b in rows]


def align_positions(student_offsets: Tensor | Sequence[Sequence[int]],
                    teacher_offsets: Tensor | Sequence[Sequence[int]]) -> Tensor:
    """For each student token, the teacher token covering exactly the same characters (a 1:1 group), else ``-1``.

    Args:
        student_offsets: ``(T_s, 2)`` student token spans (``-1`` on padding).
        teacher_offsets: ``(T_t, 2)`` teacher token spans of the same text.

    Returns:
        ``(T_s,)`` long: teacher token index ``j`` with ``span_t[j] == span_s[i]``, or ``-1``. Identical
        tokenizations give ``arange(T_s)``.
    """
    first: dict[Span, int] = {}
    for j, span in enumerate(char_spans(teacher_offsets)):
        if span is not None:
            first.setdefault(span, j)
    return torch.tensor([first.get(span, -1) if span is not None else -1 for span in char_spans(student_offsets)],
                        dtype=torch.long)


def target_positions(student_offsets: Tensor, teacher_offsets: Tensor) -> Tensor:
    """Teacher logit position for each student logit position (next-token predictions, already shifted).

    Student position ``p`` predicts student token ``p + 1``; it takes teacher position ``j − 1`` where teacher token
    ``j`` is aligned with student token ``p + 1`` by :func:`align_positions`.

    Args:
        student_offsets: ``(B, T_s, 2)`` student token spans.
        teacher_offsets: ``(B, T_t, 2)`` teacher token spans.

    Returns:
        ``(B, T_s − 1)`` long teacher logit positions in ``[0, T_t − 1)``, ``-1`` where nothing aligns.
    """
    rows = [align_positions(s, t)[1:] - 1 for s, t in zip(student_offsets.cpu(), teacher_offsets.cpu())]
    return torch.stack(rows).clamp_min(-1).to(student_offsets.device)


def token_strings(tokenizer: Any) -> list[str | None]:
    """Surface text of every token id when it follows another token (``"▁the"`` → ``" the"``).

    Decodes ``[anchor, id]`` and strips the anchor's own text, so that decoders that drop a leading space on the
    first token (Metaspace, SentencePiece) still show it. Special tokens, empty strings and partial UTF-8 bytes
    (``"\\ufffd"``) give ``None``.
    """
    special = set(tokenizer.all_special_ids)
    size = len(tokenizer)
    anchor = next(i for i in range(size) if i not in special)
    prefix = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    texts = tokenizer.batch_decode([[anchor, i] for i in range(size)], clean_up_tokenization_spaces=False)
    out: list[str | None] = []
    for i, text in enumerate(texts):
        s = text[len(prefix):] if text.startswith(prefix) else None
        out.append(None if i in special or not s or "\ufffd" in s else s)
    return out


@dataclass
class VocabMap:
    """Teacher → student token map.

    Attributes:
        index: ``(V_t,)`` long: the student id with the same surface text, ``-1`` for unmatched teacher tokens.
    """

    index: Tensor

    @property
    def coverage(self) -> float:
        """Fraction of the teacher's vocabulary that has a student match."""
        return float((self.index >= 0).float().mean())


def vocab_map(student_tok: Any, teacher_tok: Any) -> VocabMap:
    """Map teacher tokens to student tokens with identical surface text (:func:`token_strings`).

    Special tokens map by identical token text, and ``bos``/``eos``/``pad``/``unk`` by role whatever their text,
    so identical tokenizers map every id to itself. When several student tokens share a text, the lowest id wins.

    Args:
        student_tok: the student's tokenizer.
        teacher_tok: the teacher's tokenizer.
    """
    student_ids: dict[str, int] = {}
    for i, s in enumerate(token_strings(student_tok)):
        if s is not None:
            student_ids.setdefault(s, i)
    index = torch.tensor([student_ids.get(s, -1) if s is not None else -1 for s in token_strings(teacher_tok)])
    special = dict(zip(student_tok.all_special_tokens, student_tok.all_special_ids))
    for token, t_id in zip(teacher_tok.all_special_tokens, teacher_tok.all_special_ids):
        index[t_id] = special.get(token, -1)
    for role in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        s_id, t_id = getattr(student_tok, role, None), getattr(teacher_tok, role, None)
        if s_id is not None and t_id is not None:
            index[t_id] = s_id
    return VocabMap(index=index)


def map_logprobs(teacher_logits: Tensor, vmap: VocabMap, student_vocab: int) -> tuple[Tensor, Tensor]:
    """Move a teacher distribution onto the student vocabulary and renormalise over matched tokens.

    ``m = Σ_{v matched} p_t(v)``; ``q(s) = Σ_{v → s} p_t(v) / m`` (``−inf`` log-probability on unmatched student
    tokens). Teacher logits wider than the map (padded embedding rows) count as unmatched.

    Args:
        teacher_logits: ``(..., V_t')`` teacher logits.
        vmap: the teacher → student map.
        student_vocab: ``V_s``, the student's logit width.

    Returns:
        ``(log q (..., V_s), m (...))``, float32; where ``m = 0``, ``log q`` is ``−inf`` everywhere.
    """
    probs = F.softmax(teacher_logits.float(), dim=-1)
    index = vmap.index.to(probs.device)
    width = min(index.numel(), probs.shape[-1])
    matched = (index[:width] >= 0).nonzero().squeeze(-1)
    moved = probs.new_zeros(*probs.shape[:-1], student_vocab)
    moved.index_add_(-1, index[matched], probs[..., matched])
    mass = moved.sum(-1)
    return moved.log() - mass.clamp_min(torch.finfo(moved.dtype).tiny).log()[..., None], mass


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Universal logit distillation: mean over positions of ``W1`` between sorted probability vectors.

    ``W1(p_s, p_t) = Σ_k |sort↓(p_s)_k − sort↓(p_t)_k|``, the shorter vector zero-padded (Boizard et al. 2024), then
    ``Σ_pos mask · W1 / Σ_pos mask``. Gradients reach the student through the sorted values.

    Args:
        student_logits: ``(..., V_s)`` student logits.
        teacher_logits: ``(..., V_t)`` teacher logits at the aligned positions.
        mask: ``(...)`` non-negative weights (0 = not a target).

    Returns:
        Scalar loss (0 when the mask is empty).
    """
    p = F.softmax(student_logits.float(), dim=-1).sort(dim=-1, descending=True).values
    q = F.softmax(teacher_logits.float(), dim=-1).sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p, q = F.pad(p, (0, width - p.shape[-1])), F.pad(q, (0, width - q.shape[-1]))
    w1 = (p - q).abs().sum(-1)
    return (w1 * mask).sum() / mask.sum().clamp_min(1e-12)


ENCODING_PROBES = ("The quick brown fox jumps over the lazy dog.", " owl", "Hello, World!\n\tTwo  spaces",
                   "ÉCOLE naïve café 123 4567 3.14", "why? Because-it's 'quoted'")
"""Texts two tokenizers of one vocabulary must encode alike: one that lower-cases first (or, where the special
tokens it adds count, adds no BOS) maps them to other ids."""


def same_tokenizer(a: Any, b: Any, special_tokens: bool = False) -> bool:
    """Whether two tokenizers map every string to the same ids: the same vocabulary and special tokens, and the same
    ids for each of :data:`ENCODING_PROBES` — as purify's training encodes text (``special_tokens=False``: it adds
    BOS/EOS itself, so a tokenizer that would add none is the same there), or with the special tokens each adds
    (``True``: the audit, which samples each model through its own tokenizer)."""
    if a is None or b is None or a is b:
        return a is b
    if a.get_vocab() != b.get_vocab() or a.all_special_tokens != b.all_special_tokens:
        return False
    return all(a(text, add_special_tokens=special_tokens)["input_ids"]
               == b(text, add_special_tokens=special_tokens)["input_ids"] for text in ENCODING_PROBES)


def differing_tokenizers(student: Any, teachers: Sequence[Any]) -> list[int]:
    """The indices of ``teachers``' tokenizers that are not the ``student``'s (:func:`same_tokenizer`); a teacher
    given no tokenizer (``None``) is taken to share the student's."""
    return [i for i, tok in enumerate(teachers) if tok is not None and not same_tokenizer(student, tok)]
