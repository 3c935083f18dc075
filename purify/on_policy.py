"""On-policy distillation: the student learns from the teachers' judgement of its own samples.

Agarwal et al. 2024 ("On-policy distillation of language models: learning from self-generated mistakes", GKD;
TRL's ``GKDTrainer``): with probability ``λ`` a batch's completions are sampled from the student itself, from
each example's prompt, and the teachers score the sampled sequences; the loss (``loss.name: jsd`` with ``beta`` is
the paper's generalized JSD, :func:`purify.losses.generalized_jsd`) covers the sampled tokens only. ``λ = 0`` is
ordinary (off-policy) distillation on the data's completions.

Everything here works on a collated batch (:data:`~purify.types.Batch`): ``input_ids``/``attention_mask`` ``(B, T)``
right-padded, ``target_mask`` ``(B, T-1)`` with 1 where token ``j + 1`` is a completion token, ``labels``
``(B, T-1)``. The prompt of a row is its attended tokens before its first target token (a text with an empty prompt
keeps ``<bos>``; without a ``<bos>`` its first completion token becomes the prompt). The rebuilt batch is right-padded
with the same keys and alignment, so teachers, target purifiers and student purifiers see it as any other batch.

Cross-base teachers (``batch["teacher_batches"]``, each such teacher's own tokenization of the data's text, see
:class:`purify.data.TokenDataset` and :mod:`purify.purifiers.cross_base`): the student's row keeps exactly its prompt
and sampled ids, and its character ``offsets`` come from decoding them (:func:`decode_spans`); each cross-base teacher
gets its own tokenization of that decoded text, prompt and completion encoded as the data set encodes a record
(:func:`purify.data.encode_teacher`; ``<eos>`` only where the student ended its sample), so ``cross_base`` aligns the
positions of a sampled batch exactly as it aligns a batch of the data (:func:`cross_base_inputs`). The prompt's text
is the student's decode of its prompt tokens (the data's prompt string is not in the batch): for tokenizers whose
decoding restores the text (byte-level BPE, :mod:`purify.lm`'s) it is the data's prompt.

Determinism: whether optimizer step ``s`` is on-policy is a function of ``(seed, s)`` alone, and the samples of
micro-batch ``m`` of step ``s`` on rank ``r`` are drawn under ``torch`` RNG state seeded from ``(seed, s, m, r)``
(forked, so the training RNG stream is untouched); a resumed run therefore samples exactly what an uninterrupted
one does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from purify.config import OnPolicyConfig, on_policy_value_problems
from purify.data import TeacherTokenizer, collate_encoded, encode_teacher
from purify.models import logit_width
from purify.types import IGNORE_INDEX, Batch, RecipeError

__all__ = ["OnPolicySampler", "cross_base_inputs", "decode_spans", "is_on_policy_step", "prompt_lengths",
           "prompt_rows", "rebuild_batch", "sample_completions", "sampler_for"]


def is_on_policy_step(seed: int, step: int, lam: float) -> bool:
    """Whether optimizer step ``step`` trains on student samples: a uniform draw keyed on ``(seed, step)`` below
    ``lam`` (``lam = 0``: never, ``lam = 1``: always)."""
    if lam <= 0.0:
        return False
    return bool(np.random.default_rng([seed, step]).random() < lam)


def prompt_lengths(target_mask: Tensor) -> Tensor:
    """Tokens before each row's first target: ``(B,)`` from ``target_mask`` ``(B, T-1)``.

    Raises:
        ValueError: a row without any target position (no completion to replace).
    """
    has = target_mask > 0
    if not bool(has.any(dim=1).all()):
        raise ValueError("on_policy: a batch row has no completion token, so there is no prompt/completion split")
    return has.float().argmax(dim=1) + 1


def prompt_rows(batch: Batch, lengths: Tensor) -> list[Tensor]:
    """Each row's prompt tokens: the attended tokens among its first ``lengths[b]`` (a left-padded batch's leading
    padding is dropped)."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    return [ids[row, :n][attention[row, :n] > 0] for row, n in enumerate(lengths.tolist())]


def _left_padded(prompts: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """``prompts`` left-padded to the longest: ``(ids, attention_mask)``, each ``(B, P)``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=prompts[0].dtype, device=prompts[0].device)
    attention = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        attention[row, width - len(p):] = 1
    return ids, attention


def sample_completions(model: nn.Module, prompts: list[Tensor], config: OnPolicyConfig, *, pad_id: int,
                       eos_id: int | None, seed: int, vocab_limit: int | None = None,
                       position_limit: int | None = None) -> tuple[Tensor, Tensor]:
    """The student's own completions of each prompt (``generate`` under ``no_grad``, KV cache on).

    The model samples in ``eval()`` mode (no dropout) and is put back in the mode it was in. Sampling uses only the
    temperature and nucleus ``top_p`` of ``config`` (an explicit generation config: no top-k cut, no repetition
    penalty or other defaults from the model's own ``generation_config``), under RNG state seeded by ``seed``
    (forked: the caller's RNG streams are untouched). With an ``eos_id`` the first sampled token is never
    ``eos_id`` (``min_new_tokens=1``), so every row has a completion to learn from.

    Args:
        model: a Hugging Face causal LM (a peft model around one included).
        prompts: ``B`` 1-D tensors of prompt token ids (each >= 1 token).
        config: sampling settings (``temperature``, ``top_p``, ``max_new_tokens``).
        pad_id: padding token id.
        eos_id: end-of-text token id; a row stops after sampling it (``None``: every row samples
            ``max_new_tokens``).
        seed: seeds the sampling.
        vocab_limit: never sample an id at or past it (a student whose output layer is padded past a teacher's:
            those rows are ids no token has, which the teacher could not read).
        position_limit: the most positions a sampled row may take, prompt included (the student's and its
            same-tokenizer teachers' position limit): ``max_new_tokens`` is cut to what the longest prompt leaves
            (a row past a learned position table crashed in an embedding lookup, a rotary model ran on unseen
            positions).

    Raises:
        ValueError: the longest prompt leaves no position to sample in.

    Returns:
        ``(tokens, counts)``: ``tokens`` ``(B, N)`` the sampled ids (padded with ``pad_id`` after a row's end),
        ``counts`` ``(B,)`` each row's sampled tokens up to and including its first ``eos_id`` (always >= 1).
    """
    ids, attention = _left_padded(prompts, pad_id)
    new = config.max_new_tokens
    if position_limit is not None:
        new = min(new, position_limit - ids.shape[1])
        if new < 1:
            raise ValueError(f"on_policy: a prompt of {ids.shape[1]} tokens leaves no room to sample within the "
                             f"models' {position_limit} positions; shorten data.max_length (or the prompts)")
    generation = GenerationConfig(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0,
                                  max_new_tokens=new, min_new_tokens=1 if eos_id is not None else 0,
                                  use_cache=True, pad_token_id=pad_id, eos_token_id=eos_id)
    width = logit_width(model) or 0  # ZeRO-3 partitions the head: its full shape is kept aside
    if vocab_limit is not None and width > vocab_limit:
        generation.suppress_tokens = list(range(vocab_limit, width))
    # generate() fills every unset field from the model's own generation_config (a hub model's repetition penalty,
    # top-k, ...): hide it for the call, so only the fields above (and transformers' neutral defaults) apply.
    holder = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    saved = getattr(holder, "generation_config", None)
    devices = [ids.device] if ids.device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        if saved is not None:
            holder.generation_config = GenerationConfig()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=attention, generation_config=generation,
                                 synced_gpus=synced_generation(model))
    finally:
        model.train(was_training)
        if saved is not None:
            holder.generation_config = saved
    tokens = out[:, ids.shape[1]:]
    n = tokens.shape[1]
    if eos_id is None:
        counts = torch.full((tokens.shape[0],), n, dtype=torch.long, device=tokens.device)
    else:
        is_eos = tokens == eos_id
        last = torch.full((tokens.shape[0],), n - 1, dtype=torch.long, device=tokens.device)
        counts = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), last) + 1
    keep = torch.arange(n, device=tokens.device)[None, :] < counts[:, None]
    return tokens.masked_fill(~keep, pad_id), counts


def rebuild_batch(batch: Batch, prompts: list[Tensor], tokens: Tensor, counts: Tensor, pad_id: int) -> Batch:
    """``batch`` with row ``b`` rebuilt as ``prompts[b] + tokens[b, :counts[b]]``; targets on the sampled tokens.

    Rows are right-padded with ``pad_id``; ``target_mask[b, j] = 1`` exactly where token ``j + 1`` is a sampled one
    and ``labels[b, j]`` is that token (``IGNORE_INDEX`` elsewhere), as the collator aligns them. Keys other than
    ``input_ids``, ``attention_mask``, ``target_mask`` and ``labels`` are kept as they are (``num_items`` is the
    caller's, see :meth:`OnPolicySampler.__call__`).

    Args:
        batch: the collated batch.
        prompts: each row's prompt tokens (:func:`prompt_rows`).
        tokens: ``(B, N)`` sampled ids.
        counts: ``(B,)`` sampled tokens kept per row.
        pad_id: padding token id.
    """
    lengths = [len(p) for p in prompts]
    rows, width = len(prompts), max(p + c for p, c in zip(lengths, counts.tolist()))
    device = batch["input_ids"].device
    ids = torch.full((rows, width), pad_id, dtype=batch["input_ids"].dtype, device=device)
    attention = torch.zeros((rows, width), dtype=batch["attention_mask"].dtype, device=device)
    completion = torch.zeros((rows, width), dtype=torch.bool, device=device)
    for row, (p, c) in enumerate(zip(lengths, counts.tolist())):
        ids[row, :p] = prompts[row]
        ids[row, p:p + c] = tokens[row, :c]
        attention[row, :p + c] = 1
        completion[row, p:p + c] = True
    target_mask = completion[:, 1:].to(batch["target_mask"].dtype)
    labels = ids[:, 1:].masked_fill(~completion[:, 1:], IGNORE_INDEX)
    return {**batch, "input_ids": ids, "attention_mask": attention, "target_mask": target_mask, "labels": labels}


def decode_spans(tokenizer: Any, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``ids`` and each token's character span in it, from decoding the prefixes of ``ids``.

    ``text_k`` is the decode of ``ids[:k]`` (special tokens skipped, no clean-up of spaces); token ``k`` spans
    ``[b_{k-1}, b_k)`` where ``b_k`` is the length of the common prefix of ``text_k`` and the whole text (never
    below ``b_{k-1}``). Decoding in context keeps the leading space of a word that a decoder drops at the start of a
    text (Metaspace, SentencePiece); special tokens are zero-width (``<bos>`` at ``(0, 0)``, a final ``<eos>`` at
    ``(L, L)``, as :func:`purify.data.encode` places them), and so is a byte that only starts a character (its
    ``"\\ufffd"`` is not in the text: the byte that completes the character gets its span).

    Args:
        tokenizer: a Hugging Face tokenizer (slow ones decode too).
        ids: token ids.

    Returns:
        ``(text, spans)``: the decoded text and ``len(ids)`` ``(start, end)`` spans in it.
    """
    texts = tokenizer.batch_decode([ids[:k] for k in range(1, len(ids) + 1)], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
    text = texts[-1] if texts else ""
    spans, start = [], 0
    for prefix in texts:
        end = max(start, len(os.path.commonprefix([prefix, text])))
        spans.append((start, end))
        start = end
    return text, spans


def cross_base_inputs(rows: list[list[int]], prompt_lengths: list[int], ended: list[bool], tokenizer: Any,
                      teachers: Mapping[int, TeacherTokenizer], width: int) -> tuple[Tensor, dict[int, Batch]]:
    """What the ``cross_base`` purifier reads, rebuilt for rows of student token ids (prompt + sampled tokens).

    Row ``b``'s text is the decode of ``rows[b]`` (:func:`decode_spans`), its prompt the text of its first
    ``prompt_lengths[b]`` tokens. Each teacher ``i`` of ``teachers`` gets its own tokenization of the row's prompt
    and completion text (:func:`purify.data.encode_teacher`: ``<bos>``, prompt and completion encoded apart, cut to
    the teacher's ``max_length`` and to the characters the row covers), with ``<eos>`` where ``ended[b]``.

    Args:
        rows: each row's student token ids, unpadded.
        prompt_lengths: each row's prompt tokens (>= 1, ``<bos>`` included).
        ended: whether each row ends with the student's ``<eos>``.
        tokenizer: the student's tokenizer.
        teachers: the cross-base teachers' tokenizers, by teacher index.
        width: the student batch's sequence length.

    Returns:
        ``(offsets, teacher_batches)``: ``offsets`` ``(B, width, 2)`` the student's character spans (``-1`` on
        padding) and ``teacher_batches[i]`` = ``{"input_ids", "attention_mask", "offsets"}``, as
        :meth:`purify.data.TokenDataset.collate` builds them (on the CPU).
    """
    offsets = torch.full((len(rows), width, 2), -1, dtype=torch.long)
    encoded: dict[int, list[Any]] = {i: [] for i in teachers}
    for row, (ids, p, end) in enumerate(zip(rows, prompt_lengths, ended)):
        text, spans = decode_spans(tokenizer, ids)
        offsets[row, :len(ids)] = torch.tensor(spans, dtype=torch.long).reshape(-1, 2)
        cut = spans[p - 1][1]
        for i, teacher in teachers.items():
            encoded[i].append(encode_teacher(teacher, text[:cut], text[cut:], spans[-1][1], eos=end))
    return offsets, {i: collate_encoded(teachers[i].tokenizer, encoded[i]) for i in teachers}


def synced_generation(model: nn.Module) -> bool:
    """Whether ``generate`` must keep every process stepping until all have finished (transformers'
    ``synced_gpus``): under ZeRO-3 with several processes each forward all-gathers the partitioned weights, so a
    process whose rows all ended would stop answering the others' gathers. transformers turns it on only through
    its own DeepSpeed config object, which Lightning's strategy never creates."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                and any(hasattr(p, "ds_id") for p in model.parameters()))


class OnPolicySampler:
    """Decides which optimizer steps are on-policy and replaces their batches' completions by student samples.

    Args:
        config: the recipe's ``on_policy`` section.
        seed: the run's seed (step decisions and samples are keyed on it).
        pad_id: padding token id of the student's tokenizer.
        eos_id: end-of-text token id (``None``: rows always sample ``max_new_tokens``).
        student_tokenizer: the student's tokenizer; with ``teacher_tokenizers``, needed for batches with cross-base
            ``teacher_batches`` (decoding the samples).
        teacher_tokenizers: the teachers' own tokenizers, by teacher index (re-tokenising the samples for each
            teacher in the batch's ``teacher_batches``).

    Attributes:
        last_metrics: what the last call did: ``on_policy`` (1.0 or 0.0), ``on_policy_fraction`` (share of steps
            ``0..step`` that are on-policy), and on sampled steps ``sampled_tokens`` and ``sampled_tokens_per_s``.
    """

    def __init__(self, config: OnPolicyConfig, seed: int, pad_id: int, eos_id: int | None,
                 student_tokenizer: Any | None = None,
                 teacher_tokenizers: Mapping[int, TeacherTokenizer] | None = None) -> None:
        self.config, self.seed, self.pad_id, self.eos_id = config, seed, pad_id, eos_id
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizers = dict(teacher_tokenizers or {})
        self._counted, self._on = 0, 0  # decisions counted for steps [0, _counted): _on of them on-policy
        self._step, self._micro = -1, 0
        self.last_metrics: dict[str, float] = {}
        self.vocab_limit: int | None = None  # the Distiller's shared vocabulary width, where output layers differ
        self.position_limit: int | None = None  # the student's and same-tokenizer teachers' (position_limit)

    def limit_teachers(self, teachers: Sequence[nn.Module]) -> None:
        """Give each teacher tokenizer without a ``max_length`` its model's position limit
        (``config.max_position_embeddings``), as :func:`purify.assembly.cross_base_teachers` does for the data."""
        for i, teacher in self.teacher_tokenizers.items():
            if teacher.max_length is None and i < len(teachers):
                teacher.max_length = getattr(getattr(teachers[i], "config", None), "max_position_embeddings", None)

    def decide(self, step: int) -> bool:
        """Whether optimizer step ``step`` is on-policy (:func:`is_on_policy_step`)."""
        return is_on_policy_step(self.seed, step, self.config.lam)

    def fraction(self, step: int) -> float:
        """Share of the optimizer steps ``0..step`` that are on-policy (exact, also after a resume)."""
        if step + 1 < self._counted:
            self._counted, self._on = 0, 0
        while self._counted <= step:
            self._on += self.decide(self._counted)
            self._counted += 1
        return self._on / (step + 1)

    def __call__(self, model: nn.Module, batch: Batch, step: int, rank: int = 0,
                 count_scale: float = 1.0) -> Batch:
        """The micro-batch to train on at optimizer step ``step``: ``batch`` itself on an off-policy step, else a
        rebuilt batch whose completions are ``model``'s samples.

        Successive calls with the same ``step`` are its accumulation micro-batches (each samples under its own
        seed). On a sampled batch, ``num_items`` (when ``batch`` has it) becomes ``count_scale`` × the batch's
        sampled target count: the caller passes the factor by which its loss divides ``num_items``
        (accumulation steps × data-parallel processes), so each sampled micro-batch is a mean over its own tokens,
        averaged over the accumulated and data-parallel micro-batches (the global sampled count is unknown until
        every micro-batch has sampled).

        A batch with cross-base ``teacher_batches`` gets them, and the student's ``offsets``, rebuilt for the
        samples (:func:`cross_base_inputs`); its student rows hold exactly the sampled ids.

        Raises:
            ValueError: the batch carries cross-base ``teacher_batches`` but the sampler lacks the student's
                tokenizer or one of those teachers' tokenizers.
            purify.data.DataError: a cross-base teacher's tokenizer is slow (no character offsets).
        """
        if step != self._step:
            self._step, self._micro = step, 0
        else:
            self._micro += 1
        on = self.decide(step)
        self.last_metrics = {"on_policy": float(on), "on_policy_fraction": self.fraction(step)}
        if not on:
            return batch
        cross = sorted(batch.get("teacher_batches") or {})
        missing = [f"teachers[{i}]" for i in cross if i not in self.teacher_tokenizers]
        if cross and (self.student_tokenizer is None or missing):
            what = ", ".join(["the student's"] * (self.student_tokenizer is None) + missing)
            raise ValueError(f"on_policy: the batch has cross-base teachers' own tokenizations (teacher_batches "
                             f"{cross}); re-tokenising the student's samples for them needs the tokenizers of {what}: "
                             "pass Distiller(student_tokenizer=..., teacher_tokenizers=[...])")
        prompts = prompt_rows(batch, prompt_lengths(batch["target_mask"]))
        seed = int(np.random.SeedSequence([self.seed, step, self._micro, rank]).generate_state(1)[0])
        start = time.perf_counter()
        tokens, counts = sample_completions(model, prompts, self.config, pad_id=self.pad_id, eos_id=self.eos_id,
                                            seed=seed, vocab_limit=self.vocab_limit,
                                            position_limit=self.position_limit)
        elapsed = max(time.perf_counter() - start, 1e-9)
        out = rebuild_batch(batch, prompts, tokens, counts, self.pad_id)
        if cross:
            rows = [p.tolist() + tokens[row, :c].tolist() for row, (p, c) in enumerate(zip(prompts, counts.tolist()))]
            ended = [self.eos_id is not None and ids[-1] == self.eos_id for ids in rows]
            offsets, teacher_batches = cross_base_inputs(rows, [len(p) for p in prompts], ended,
                                                         self.student_tokenizer,
                                                         {i: self.teacher_tokenizers[i] for i in cross},
                                                         out["input_ids"].shape[1])
            device = out["input_ids"].device
            out["offsets"] = offsets.to(device)
            out["teacher_batches"] = {i: {k: v.to(device) for k, v in tb.items()} for i, tb in teacher_batches.items()}
        if "num_items" in batch:
            out["num_items"] = out["target_mask"].sum().float() * count_scale
        sampled = float(counts.sum())
        self.last_metrics.update(sampled_tokens=sampled, sampled_tokens_per_s=sampled / elapsed)
        return out


def sampler_for(config: OnPolicyConfig | None, seed: int, tokenizer: Any | None, model: nn.Module,
                teacher_tokenizers: Sequence[Any] = ()) -> OnPolicySampler | None:
    """An :class:`OnPolicySampler` for ``model`` with pad/eos ids from ``tokenizer`` (else the model's config);
    ``None`` when ``config`` is ``None``.

    ``teacher_tokenizers`` (one per teacher: a tokenizer, a :class:`~purify.data.TeacherTokenizer` or ``None``) are
    what cross-base teachers' batches are re-tokenised with on sampled steps."""
    if config is None:
        return None
    problems = on_policy_value_problems(config)
    if problems:  # what a recipe's validation says, for a config given in Python
        raise RecipeError(problems)
    mcfg = getattr(model, "config", None)

    def token(name: str) -> int | None:
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        return value if value is not None else getattr(mcfg, name, None)

    eos = token("eos_token_id")
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    pad = token("pad_token_id")
    teachers = {i: t if isinstance(t, TeacherTokenizer) else TeacherTokenizer(t)
                for i, t in enumerate(teacher_tokenizers) if t is not None}
    return OnPolicySampler(config, seed, pad if pad is not None else (eos if eos is not None else 0), eos,
                           student_tokenizer=tokenizer, teacher_tokenizers=teachers)
