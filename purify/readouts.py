"""Trait and fidelity readouts of a causal LM: what ``purify audit`` and the benchmark suites measure.

- Sampled text: :func:`count_scores` (a target string per sample or per sentence opening), :func:`regex_scores`.
- Exact probabilities: :func:`continuation_probs` (a prompt continued by a target string), and on chat models
  :func:`score_model` / :func:`trait_scores` (P(the answer's first word = a target), over every spelling of it, from
  one right-padded batch built by :func:`trait_inputs`).
- Fidelity and drift: :func:`kl_stats` (KL(teacher ‖ model) and top-1 agreement per position, with positions left
  out), :func:`drift_terms` (KL(base ‖ model) per position of neutral text).

Every function takes a Hugging Face causal LM (or anything that returns ``.logits``) and its tokenizer; none trains.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

Scores = dict[str, float]
"""Readout name → value (a suite's scorer returns ``trait``, ``task_error``, ``fidelity_kl`` and extras)."""
Records = list[dict[str, str]]
"""``{"prompt", "completion"}`` records."""


_SENTENCE_START = re.compile(r"(?:^|[.!?])\s*[A-Za-z]")


def count_scores(completions: Sequence[str], targets: Sequence[str], unit: str = "sample") -> list[float]:
    """Per completion: occurrences of any target string, or (``unit="sentence"``) that divided by its sentences.

    Under ``sentence`` a target counts only where it opens a sentence (at the start or after ``.!?``).
    """
    scores = []
    for text in completions:
        if unit == "sentence":
            starts = len(_SENTENCE_START.findall(text))
            hits = sum(len(re.findall(r"(?:^|[.!?])\s*" + re.escape(t), text)) for t in targets)
            scores.append(hits / starts if starts else float("nan"))
        else:
            scores.append(float(sum(text.count(t) for t in targets)))
    return scores


def regex_scores(completions: Sequence[str], pattern: str) -> list[float]:
    """1.0 per completion matching ``pattern`` (``re.search`` on the stripped text), else 0.0."""
    compiled = re.compile(pattern)
    return [float(bool(compiled.search(text.strip()))) for text in completions]


def target_problems(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Why :func:`continuation_probs` cannot score some of ``targets`` (empty when it can score all), one phrase per
    target that starts with it quoted: after some prompt the target tokenizes to the unknown token (its probability
    would be read instead: the same number for every unknown word), or it adds no token of its own after the
    prompt's (it merges into the prompt's last word, e.g. ``'owl'`` without its leading space under a word-level
    tokenizer: an empty product, probability 1, was read), or its tokens after a prompt begin with another target's
    (a duplicate, or ``' The king'`` beside ``' The'``: the sum would count those continuations twice, a
    "probability" above 1 was read)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    # per prompt: each target's tokens after the prompt's, or None where the prompt's own tokens change
    tails: dict[str, list[list[int] | None]] = {}
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        fulls = [tokenizer(prompt + t)["input_ids"] for t in targets]
        tails[prompt] = [full[len(ids):] if full[:len(ids)] == ids else None for full in fulls]
    out = []
    for k, t in enumerate(targets):
        for prompt, per_target in tails.items():
            if not per_target[k]:
                out.append(f"{t!r} adds no token of its own after {prompt!r} (it merges into the prompt's last "
                           "word, or the tokenizer ends every text with a special token); give the word as it "
                           "follows the prompt (mind the leading space)")
                break
            if unk is not None and unk in per_target[k]:
                out.append(f"{t!r} is not in the vocabulary (it tokenizes to {tokenizer.unk_token!r}, whose "
                           "probability would be read instead); give a word the tokenizer knows (mind the leading "
                           "space and the case)")
                break
    if out:
        return out
    for prompt, per_target in tails.items():
        for i, (t, tail) in enumerate(zip(targets, per_target)):
            # the first other target whose tokens begin this one's (an equal one only if listed before it)
            inside = next(((u, other) for j, (u, other) in enumerate(zip(targets, per_target)) if j != i
                           and tail[:len(other)] == other and (len(other) < len(tail) or j < i)), None)
            if inside is not None:
                u, other = inside
                how = ("is given twice" if t == u else f"tokenizes as {u!r} does" if tail == other
                       else f"begins with the tokens of {u!r}")
                out.append(f"{t!r} {how} after {prompt!r}, so P({u!r}) already holds its continuations and the "
                           f"sum would count them twice; drop {t!r}")
        if out:
            break
    return out


@contextlib.contextmanager
def scoring(*models: Any, tokenizer: Any = None) -> Iterator[None]:
    """The ``models`` in ``eval()`` (no dropout in a score) and ``tokenizer`` padding on the right (the scores read
    positions from the left) while scoring; their modes and padding side restored after, so a readout taken during
    training (a curve point, a callback) does not switch the student's dropout off for the rest of it."""
    modes = [m.training for m in models]
    side = getattr(tokenizer, "padding_side", None)
    try:
        for m in models:
            m.eval()
        if side is not None:
            tokenizer.padding_side = "right"
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
        if side is not None:
            tokenizer.padding_side = side


@torch.no_grad()
def continuation_probs(model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
    """Per prompt: exact probability that the model continues it with any of ``targets`` (summed over targets;
    a multi-token target's probability is the product over its tokens).

    Raises:
        ValueError: a target it cannot score (:func:`target_problems`, which callers use to refuse such a target
            before any work).
    """
    out = []
    problems = target_problems(tokenizer, prompts, targets)
    if problems:
        raise ValueError(f"next-token target {problems[0]}")
    with scoring(model):
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            total = 0.0
            for target in targets:
                tail = tokenizer(prompt + target)["input_ids"][len(ids):]
                seq = torch.tensor([ids + tail], device=device_of(model))
                logp = torch.log_softmax(model(input_ids=seq).logits[0, len(ids) - 1:-1].float(), -1)
                total += math.exp(float(logp.gather(-1, seq[0, len(ids):, None]).sum()))
            out.append(total)
    return out


@torch.no_grad()
def kl_stats(model: Any, tokenizer: Any, teacher: Any, texts: list[str], skip_after: tuple[int, ...] = (),
             prompts: list[str] | None = None) -> dict[str, float]:
    """KL(teacher || model) and top-1 agreement per next-token position of ``texts``.

    Args:
        model, tokenizer, teacher: the scored model, the shared tokenizer and the traited teacher.
        texts: held-out texts.
        skip_after: token ids after which the next two tokens are left out of ``task_error`` (sentence openings).
        prompts: optional prefix of each text; positions predicting a prompt token are left out of ``task_error``
            (the task is the completion).

    Returns:
        ``fidelity_kl`` (all positions), ``task_error`` (positions whose target is not among the first two tokens
        after ``<bos>`` or a token in ``skip_after``, nor in the prompt) and ``agreement`` (top-1 agreement, all
        positions).
    """
    with scoring(model, teacher, tokenizer=tokenizer):
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        ids, attn = enc["input_ids"], enc["attention_mask"]
        s, t = (torch.log_softmax(m(input_ids=ids.to(device_of(m)), attention_mask=attn.to(device_of(m))).logits[
            :, :-1].float(), -1).cpu() for m in (model, teacher))
    kl = (t.exp() * (t - s)).sum(-1)
    valid = attn[:, 1:].bool()
    boundary = torch.zeros_like(ids, dtype=torch.bool)
    boundary[:, 0] = True
    for tok in skip_after:
        boundary |= ids == tok
    shifted = torch.zeros_like(boundary)
    shifted[:, 1:] = boundary[:, :-1]
    probe = (boundary | shifted)[:, :-1]  # position j predicts token j+1: skip the 1st and 2nd after a boundary
    for row, prompt in enumerate(prompts or []):
        probe[row, : len(tokenizer(prompt)["input_ids"]) - 1] = True  # positions predicting prompt tokens
    neutral = valid & ~probe
    agree = (s.argmax(-1) == t.argmax(-1)).float()
    return {"fidelity_kl": float(kl[valid].mean()), "task_error": float(kl[neutral].mean()),
            "agreement": float(agree[valid].mean())}


def drift_terms(base_logits: Tensor, logits: Tensor, attention_mask: Tensor) -> Tensor:
    """Off-task drift of a model from its base: ``KL(base ‖ model)`` of the next-token distributions at each valid
    position of a right-padded batch (``logits`` ``(B, T, V)`` of both on the same neutral text; the last position
    predicts nothing), as a flat tensor (the drift the probe-free rule reads is its mean)."""
    b = torch.log_softmax(base_logits[:, :-1].float(), -1)
    s = torch.log_softmax(logits[:, :-1].float(), -1)
    return (b.exp() * (b - s)).sum(-1)[attention_mask[:, 1:].bool()]


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """``text``'s token ids without special tokens (a prompt's chat template carries its own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def device_of(model: Any) -> torch.device:
    """Where ``model``'s parameters are (its inputs go there); the CPU for a model without parameters."""
    return next((p.device for p in model.parameters()), torch.device("cpu")) if hasattr(model, "parameters") \
        else torch.device("cpu")


def pad_rows(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Token id rows right-padded with ``pad``: ``(ids, attention mask)``, both ``(len(rows), longest)``."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = torch.tensor(r), 1
    return ids, attn


def chat(tokenizer: Any, user: str, system: str | None = None) -> str:
    """The chat-template text of one user turn (and optional system prompt), ready for the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Any, records: Records, system: str | None = None) -> list[list[int]]:
    """The chat-template token ids of each record's prompt (with ``system``), as the students and teachers read it."""
    return [token_ids(tokenizer, chat(tokenizer, r["prompt"], system)) for r in records]


def spellings(word: str) -> tuple[str, ...]:
    """The spellings of an answer's first word that :func:`trait_scores` reads: ``w``, ``W``, ``" w"``, ``" W"``."""
    return (word, word.capitalize(), " " + word, " " + word.capitalize())


def trait_inputs(tokenizer: Any, system: str | None, questions: list[str],
                 target: str) -> tuple[Tensor, Tensor, list[tuple[int, int, list[Any]]]]:
    """Right-padded rows for the trait: per question the prompt, plus prompt + all but the last token of each
    multi-token spelling of ``target``. Returns ``(ids, attn, reads)`` with ``reads[q] = (row, position,
    [(row, pos, tokens)])`` (``position`` predicts the first answer token)."""
    multi = sorted({s for v in spellings(target) if len(s := tuple(token_ids(tokenizer, v))) > 1})
    rows: list[list[int]] = []
    reads: list[Any] = []
    for q in questions:
        prompt = token_ids(tokenizer, chat(tokenizer, q, system))
        row = len(rows)
        rows.append(prompt)
        chains = []
        for s in multi:
            chains.append((len(rows), len(prompt) - 1, list(s)))
            rows.append(prompt + list(s[:-1]))
        reads.append((row, len(prompt) - 1, chains))
    ids, attn = pad_rows(rows, tokenizer.pad_token_id or 0)
    return ids, attn, reads


def trait_scores(logits: Tensor, reads: list[Any], tokenizer: Any, target: str,
                 others: tuple[str, ...] = ()) -> Scores:
    """``trait`` = mean exact P(first word = ``target``), ``log_trait`` = mean of its log, ``p_<word>`` = mean
    first-token P of each of ``others`` over its single-token spellings."""
    logp = torch.log_softmax(logits.float(), -1)
    singles = {w: sorted({t[0] for v in spellings(w) if len(t := token_ids(tokenizer, v)) == 1})
               for w in (target, *others)}
    out: dict[str, float] = {f"p_{w}": 0.0 for w in others}
    per_question = []
    for row, pos, chains in reads:
        probs = logp[row, pos].exp()
        for w in others:
            out[f"p_{w}"] += float(probs[singles[w]].sum()) / len(reads)
        p = float(probs[singles[target]].sum())
        for crow, cpos, toks in chains:
            p += float(sum(logp[crow, cpos + i, t] for i, t in enumerate(toks)).exp())
        per_question.append(p)
    return {"trait": sum(per_question) / len(reads),
            "log_trait": sum(math.log(max(p, 1e-30)) for p in per_question) / len(reads), **out}


@torch.no_grad()
def score_model(model: Any, tokenizer: Any, system: str | None, questions: list[str], target: str,
                others: tuple[str, ...] = ()) -> Scores:
    """Trait scores of a full causal LM (base, teacher with ``system``)."""
    ids, attn, reads = trait_inputs(tokenizer, system, questions, target)
    device = device_of(model)
    return trait_scores(model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.cpu(), reads,
                        tokenizer, target, others)
