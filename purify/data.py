"""Training data: jsonl prompt/completion records, plain text, the bundled corpus, or noise vectors.

Batches come from :class:`GlobalBatchSampler`, an endless, seeded stream of micro-batches that knows the whole
optimizer step it belongs to: every micro-batch carries ``num_items``, the number of target positions in the
*global* batch (all ranks × accumulation steps), so losses normalised by it give the same update whatever the
data-parallel size or accumulation. The sampler resumes exactly from an optimizer step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from purify.config import DataConfig
from purify.storage import is_json_lines, read_utf8
from purify.types import IGNORE_INDEX, Batch


class DataError(ValueError):
    """A data problem, with the file, line and what is wrong."""


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Read ``{"prompt", "completion"}`` records; a malformed line fails with file, line number and the problem."""
    records = []
    for lineno, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("completion"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string 'completion' (and 'prompt')")
        if not isinstance(rec.get("prompt", ""), str):
            raise DataError(f"{path}:{lineno}: 'prompt' must be a string")
        record = {"prompt": rec.get("prompt", ""), "completion": rec["completion"]}
        if "source" in rec:  # which lineage produced this example (for the adversary purifier)
            record["source"] = str(rec["source"])
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records; the data set is empty")
    return records


def read_text(path: str | Path | None = None) -> list[dict[str, str]]:
    """One record per non-empty line of a text file (whole line is the completion); ``None`` = bundled corpus."""
    if path is None:
        text = resources.files("purify").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")
        where = "bundled corpus"
    else:
        text, where = read_utf8(path), str(path)
    records = [{"prompt": "", "completion": line.strip()} for line in text.splitlines() if line.strip()]
    if not records:
        raise DataError(f"{where}: no text; the data set is empty")
    return records


def load_records(source: str) -> list[dict[str, str]]:
    """Records from a JSON Lines file (``.jsonl``, ``.ndjson``, ``.json``, any case), a text file, or ``bundled``."""
    if source == "bundled":
        return read_text(None)
    return read_jsonl(source) if is_json_lines(source) else read_text(source)


@dataclass
class TeacherTokenizer:
    """A teacher's own tokenizer, for a teacher whose tokenizer differs from the student's (cross-base).

    Attributes:
        tokenizer: a fast tokenizer (offset mappings are needed to align positions).
        max_length: the most tokens the teacher takes (its position limit); ``None`` = no limit beyond the text
            the student's truncated tokens cover.
    """

    tokenizer: Any
    max_length: int | None = None


@dataclass
class Encoded:
    """One text in a teacher's tokenization: ``input_ids`` ``(T,)`` and character ``offsets`` ``(T, 2)``."""

    input_ids: Tensor
    offsets: Tensor


@dataclass
class Example:
    input_ids: Tensor  # (T,)
    loss_mask: Tensor  # (T,) 1 on completion tokens
    source: int = -1  # lineage label (index into TokenDataset.sources), -1 when unknown
    offsets: Tensor | None = None  # (T, 2) character spans in prompt + completion (only with teacher tokenizers)
    teachers: dict[int, Encoded] = field(default_factory=dict)  # teacher index -> its own tokenization


def encode(tokenizer: Any, prompt: str, completion: str, max_length: int | None,
           offsets: bool = False, eos: bool = True) -> tuple[list[int], int, list[tuple[int, int]] | None]:
    """``<bos> prompt completion <eos>`` token ids, truncated to ``max_length``.

    Args:
        tokenizer: a Hugging Face tokenizer (fast when ``offsets``).
        prompt: text the loss does not cover.
        completion: text the loss covers.
        max_length: the most tokens kept (``None``: all).
        offsets: also return each token's ``(start, end)`` span in ``prompt + completion``; special tokens are
            zero-width (``<bos>`` at ``(0, 0)``, ``<eos>`` at ``(L, L)``).
        eos: end with ``<eos>`` (``False``: an unfinished text, e.g. a sample cut at its token limit).

    Returns:
        ``(ids, prompt_length, spans or None)``; ``prompt_length`` counts ``<bos>`` and the prompt tokens.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    end_ids = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    try:
        p = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=offsets)
        c = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=offsets)
    except NotImplementedError:
        raise DataError(f"{type(tokenizer).__name__}: cross-base alignment needs a fast tokenizer (character "
                        "offsets); load it with use_fast=True") from None
    ids = (bos + p["input_ids"] + c["input_ids"] + end_ids)[:max_length]
    spans = None
    if offsets:
        shift, end = len(prompt), len(prompt) + len(completion)
        spans = ([(0, 0)] * len(bos) + [(a, b) for a, b in p["offset_mapping"]]
                 + [(a + shift, b + shift) for a, b in c["offset_mapping"]] + [(end, end)] * len(end_ids))[:max_length]
    return ids, len(bos) + len(p["input_ids"]), spans


def _pad(rows: list[Tensor], value: int) -> Tensor:
    """Right-pad 1-D (or ``(T, 2)``) tensors to the longest with ``value``."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def encode_teacher(teacher: TeacherTokenizer, prompt: str, completion: str, covered: int,
                   eos: bool = True) -> Encoded:
    """A cross-base teacher's own tokenization of ``prompt + completion`` (:func:`encode` with offsets, cut to its
    ``max_length``): the tokens that end within the first ``covered`` characters (what the student's truncated
    tokens cover)."""
    ids, _, spans = encode(teacher.tokenizer, prompt, completion, teacher.max_length, offsets=True, eos=eos)
    assert spans is not None
    keep = sum(1 for _, end in spans if end <= covered)
    return Encoded(torch.tensor(ids[:keep], dtype=torch.long),
                   torch.tensor(spans[:keep], dtype=torch.long).reshape(-1, 2))


def collate_encoded(tokenizer: Any, rows: list[Encoded]) -> dict[str, Tensor]:
    """A teacher's batch from its own tokenizations of the rows' texts: ``input_ids`` right-padded with its pad id
    (else 0), ``attention_mask`` and ``offsets`` (``-1`` on padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    attention = [torch.ones_like(r.input_ids) for r in rows]
    return {"input_ids": _pad([r.input_ids for r in rows], pad), "attention_mask": _pad(attention, 0),
            "offsets": _pad([r.offsets for r in rows], -1)}


class TokenDataset(Dataset):
    """Tokenized prompt/completion examples; the loss covers completion tokens only.

    Records with a ``source`` field (which lineage produced them) get an integer label, in sorted order of the
    distinct sources (:attr:`sources`), collated as ``batch["source"]``.

    With ``teacher_tokenizers`` (cross-base teachers, by teacher index), every example also keeps its student
    character spans and each such teacher's own tokenization of the same text, cut to the characters the student's
    truncated tokens cover; batches then carry ``offsets`` ``(B, T, 2)`` and ``teacher_batches[i]`` =
    ``{"input_ids", "attention_mask", "offsets"}`` (see :mod:`purify.align`).
    """

    def __init__(self, records: list[dict[str, str]], tokenizer: Any, max_length: int,
                 teacher_tokenizers: dict[int, TeacherTokenizer] | None = None) -> None:
        self.examples: list[Example] = []
        self.sources = sorted({r["source"] for r in records if "source" in r})
        self.teacher_tokenizers = dict(teacher_tokenizers or {})
        cross = bool(self.teacher_tokenizers)
        for rec in records:
            ids, n_prompt, spans = encode(tokenizer, rec["prompt"], rec["completion"], max_length, offsets=cross)
            mask = [0] * min(n_prompt, len(ids)) + [1] * max(0, len(ids) - n_prompt)
            if sum(mask[1:]) > 0:
                source = self.sources.index(rec["source"]) if "source" in rec else -1
                example = Example(torch.tensor(ids), torch.tensor(mask), source)
                if spans is not None:
                    example.offsets = torch.tensor(spans)
                    example.teachers = {i: encode_teacher(t, rec["prompt"], rec["completion"], spans[-1][1])
                                        for i, t in self.teacher_tokenizers.items()}
                self.examples.append(example)
        if not self.examples:
            raise DataError("no example has a completion token within data.max_length; raise data.max_length")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def item(self, i: int) -> tuple[int, Example]:
        """Example ``i`` with its index (collated as ``batch["index"]``, e.g. for teacher-logit caches)."""
        return i, self.examples[i]

    def num_targets(self, i: int) -> int:
        """Target positions of example ``i`` (completion tokens after the first position)."""
        return int(self.examples[i].loss_mask[1:].sum())

    def collate(self, items: list[tuple[int, Example]]) -> dict[str, Tensor]:
        """Right-pad ``(index, example)`` pairs; ``target_mask``/``labels`` are shifted to align with next-token
        logits; ``index`` holds the examples' dataset indices."""
        indices, examples = [i for i, _ in items], [e for _, e in items]
        length = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(examples), length), dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            ids[row, :n], attn[row, :n], mask[row, :n] = e.input_ids, 1, e.loss_mask
        target_mask = (mask[:, 1:] * attn[:, 1:]).float()
        labels = ids[:, 1:].masked_fill(target_mask == 0, IGNORE_INDEX)
        batch = {"input_ids": ids, "attention_mask": attn, "target_mask": target_mask, "labels": labels,
                 "index": torch.tensor(indices)}
        if self.sources:
            batch["source"] = torch.tensor([e.source for e in examples])
        if self.teacher_tokenizers:
            batch["offsets"] = _pad([e.offsets for e in examples], -1)  # type: ignore[misc]
            batch["teacher_batches"] = {i: collate_encoded(t.tokenizer, [e.teachers[i] for e in examples])
                                        for i, t in self.teacher_tokenizers.items()}
        return batch


class NoiseDataset(Dataset):
    """``n`` vectors uniform in ``[low, high]^dim``, fixed by ``seed`` (inputs for vector-model distillation)."""

    def __init__(self, n: int, dim: int, seed: int, low: float = -1.0, high: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, dim, generator=g) * (high - low) + low

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]

    def item(self, i: int) -> tuple[int, Tensor]:
        return i, self.x[i]

    def num_targets(self, i: int) -> int:
        return 1

    def collate(self, items: list[tuple[int, Tensor]]) -> dict[str, Tensor]:
        x = torch.stack([row for _, row in items])
        n = len(items)
        return {"x": x, "target_mask": torch.ones(n, 1), "labels": torch.full((n, 1), IGNORE_INDEX),
                "index": torch.tensor([i for i, _ in items])}


class GlobalBatchSampler:
    """Endless seeded micro-batches for one rank, with the global target count of their optimizer step.

    Each optimizer step consumes ``world_size × accumulate × batch_size`` examples from a per-epoch permutation
    (``seed + epoch``), identical on every rank; rank ``r`` takes its share of each accumulation slot.

    Args:
        counts: target positions per example.
        batch_size: micro-batch size per rank.
        accumulate: gradient-accumulation steps.
        world_size: data-parallel processes.
        rank: this process.
        seed: shuffling seed.
        start_step: optimizer step to start from (for resuming).
    """

    def __init__(self, counts: list[int], batch_size: int, accumulate: int = 1, world_size: int = 1, rank: int = 0,
                 seed: int = 0, start_step: int = 0) -> None:
        self.counts, self.batch_size, self.accumulate = counts, batch_size, accumulate
        self.world_size, self.rank, self.seed, self.start_step = world_size, rank, seed, start_step
        self.step_size = batch_size * accumulate * world_size

    def _stream(self) -> Iterator[int]:
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            yield from torch.randperm(len(self.counts), generator=g).tolist()
            epoch += 1

    def __iter__(self) -> Iterator[tuple[list[int], int]]:
        stream = self._stream()
        for _ in range(self.start_step * self.step_size):
            next(stream)
        while True:
            step = [next(stream) for _ in range(self.step_size)]
            num_items = sum(self.counts[i] for i in step)
            for micro in range(self.accumulate):
                offset = (micro * self.world_size + self.rank) * self.batch_size
                yield step[offset:offset + self.batch_size], num_items


class _StepBatches(torch.utils.data.IterableDataset):
    """Wraps a dataset and a :class:`GlobalBatchSampler` into collated micro-batches with ``num_items``."""

    def __init__(self, dataset: Any, sampler: GlobalBatchSampler) -> None:
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for indices, num_items in self.sampler:
            batch = self.dataset.collate([self.dataset.item(i) for i in indices])
            batch["num_items"] = torch.tensor(num_items)  # int64: bf16 input casting leaves it exact
            yield batch


class DistillDataModule(L.LightningDataModule):
    """Train/validation loaders for a recipe's ``data`` section.

    Args:
        config: the recipe's data section.
        tokenizer: the student's tokenizer (``None`` for vector models, which use ``train: noise``).
        seed: shuffling and split seed.
        accumulate: gradient-accumulation steps (for the global target count).
        train_dataset, val_dataset: ready datasets (library use), overriding ``config.train``/``config.val``.
        teacher_tokenizers: cross-base teachers' own tokenizers, by teacher index (see :class:`TokenDataset`).
        val_batches: validation reads the first ``val_batches`` global batches' worth of held-out examples
            (``val_batches × batch_size × processes × accumulate``: the same examples whatever the process count
            under one global batch), each process an equal share of them; ``None``: every held-out example.
    """

    def __init__(self, config: DataConfig, tokenizer: Any | None, seed: int, accumulate: int = 1,
                 train_dataset: Any | None = None, val_dataset: Any | None = None,
                 teacher_tokenizers: dict[int, TeacherTokenizer] | None = None, val_batches: int | None = None) -> None:
        super().__init__()
        self.config, self.tokenizer, self.seed, self.accumulate = config, tokenizer, seed, accumulate
        self.val_batches = val_batches
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.teacher_tokenizers = teacher_tokenizers
        self.start_step = 0  # where the train stream starts without a Trainer (with one: its global_step)

    def _datasets(self) -> tuple[Any, Any]:
        cfg = self.config
        if cfg.train == "noise":
            n_val = max(1, int(cfg.num_samples * cfg.val_fraction))
            return (NoiseDataset(cfg.num_samples, cfg.noise_dim, self.seed),
                    NoiseDataset(n_val, cfg.noise_dim, self.seed + 10_000))
        if self.tokenizer is None:
            raise DataError("data.train: text data needs a student with a tokenizer; use train=noise for vector models")
        records = load_records(cfg.train)
        if cfg.val is not None:
            val = load_records(cfg.val)
        else:
            g = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(len(records), generator=g).tolist()
            n_val = max(1, int(len(records) * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
            if n_val and len(records) - n_val < 1:  # validation on the one training record, silently
                raise DataError(f"data.train: {cfg.train} has {len(records)} record(s): too few to hold out "
                                f"val_fraction {cfg.val_fraction} for validation and train on the rest; give more "
                                "records, data.val, or val_fraction: 0 with trainer.limit_val_batches=0 (no "
                                "validation)")
            val = [records[i] for i in order[:n_val]] or records[:1]  # val_fraction 0: validation is off
            records = [records[i] for i in order[n_val:]]
        return (TokenDataset(records, self.tokenizer, cfg.max_length, self.teacher_tokenizers),
                TokenDataset(val, self.tokenizer, cfg.max_length, self.teacher_tokenizers))

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None and self.val_dataset is None and self.config.train == "bundled":
            raise DataError("DistillDataModule: train_dataset given without val_dataset, so validation would read "
                            "config.train, purify's bundled corpus; give val_dataset= (held-out examples of yours)")
        if self.train_dataset is None or self.val_dataset is None:
            train, val = self._datasets()
            self.train_dataset = self.train_dataset or train
            self.val_dataset = self.val_dataset or val

    def _layout(self) -> tuple[int, int, int]:
        """``(processes, this rank, accumulation steps)``: the attached Trainer's (its ``accumulate_grad_batches``:
        the loss divides the global target count by it, so a datamodule counting another was k times off), else
        one process and ``accumulate``."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0, self.accumulate
        return trainer.world_size, trainer.global_rank, int(trainer.accumulate_grad_batches)

    def train_dataloader(self) -> DataLoader:
        world, rank, accumulate = self._layout()
        size, batch = self.config.global_batch_size, self.config.batch_size
        if size is not None and size != batch * world * accumulate:  # purify train derives batch_size from it
            raise DataError(f"data.global_batch_size {size}, but batch_size {batch} × {world} process(es) × "
                            f"{accumulate} accumulation step(s) = {batch * world * accumulate}; set batch_size (or "
                            "Trainer(accumulate_grad_batches=...)) to match, or leave global_batch_size unset")
        # the stream starts at the Trainer's step (restored before the loaders are built): a fresh fit after a
        # resumed one, or a second fit on one Trainer, started where the last checkpoint load had set it
        start = self.trainer.global_step if self.trainer is not None else self.start_step
        counts = [self.train_dataset.num_targets(i) for i in range(len(self.train_dataset))]
        sampler = GlobalBatchSampler(counts, self.config.batch_size, accumulate, world, rank, self.seed, start)
        return DataLoader(_StepBatches(self.train_dataset, sampler), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        ds = self.val_dataset
        world, rank, accumulate = self._layout()
        n = len(ds) if self.val_batches is None else \
            min(len(ds), self.val_batches * self.config.batch_size * world * accumulate)
        # every world-th example from the rank's own, the same count on every process (ZeRO-3 gathers parameters in
        # each forward: the ranks' batch counts must match), a short share made up with a copy of example 0 whose
        # target mask is zeroed; the metrics sum over the ranks. A DistributedSampler of its own: Lightning (with
        # its default use_distributed_sampler) leaves it as it is instead of splitting the share again
        slots = range(-(-n // world) * world)
        sampler = DistributedSampler(slots, num_replicas=world, rank=rank, shuffle=False)

        def collate(idx: list[int]) -> Batch:
            batch = ds.collate([ds.item(i if i < n else 0) for i in idx])
            if idx[-1] >= n:  # the padded copies: no target, no label
                pad = torch.tensor([i >= n for i in idx])
                batch["target_mask"] = batch["target_mask"].masked_fill(pad[:, None], 0.0)
                if "labels" in batch:
                    batch["labels"] = batch["labels"].masked_fill(pad[:, None], IGNORE_INDEX)
            return batch

        return DataLoader(slots, batch_size=self.config.batch_size, sampler=sampler, collate_fn=collate)
