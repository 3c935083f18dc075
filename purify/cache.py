"""Offline teacher-logit cache (``purify cache``): run a recipe's teachers once, train from their top-k later.

For every target position of the recipe's train and validation examples, each teacher's distribution is stored as
its ``k`` most probable token ids (``uint16`` when the vocabulary has fewer than 65536 entries, else ``int32``), their
log-probabilities (``float16``) and the remaining tail mass ``1 − Σ top-k`` (``float16``): ``4k + 2`` bytes per
position and teacher with ``uint16`` ids (34 at ``k = 8``). Layout of a cache directory::

    manifest.json              written last: teachers (name, source, state sha256, vocab size), k, tokenizer vocab
                               sha256, per-split data fingerprint (sha256 of the tokenized examples), version, sizes
    tokenizer/                 the tokenizer the data was tokenized with (save_pretrained)
    <split>/index.npy          (N, 4) int64 per example: shard, offset, length (target positions), example key
    <split>/shard-00000/       ids.npy (K, P, k), logp.npy (K, P, k), tail.npy (K, P), index.npy (n, 3): a block of
                               ``shard_size`` examples, written to a temporary directory and renamed into place

Writing (:mod:`purify.cache_writer`) is resumable: finished shards are kept and skipped on a re-run
(``.plan.json`` refuses a re-run with other teachers, data or k). Training reads the cache through
:class:`CachedTeacher` (recipe ``teachers: [{cache: DIR, teacher: 0}]``): an ``nn.Module`` whose ``forward(batch)``
rebuilds ``(B, T−1, V)`` log-probabilities for ``batch["index"]``: the top-k at their ids and the tail mass spread
uniformly over the other ``V − k`` tokens, so the distiller, ensembles and divergence masks work unchanged. Each batch
row is matched to its cached example by a key (a hash of its tokens and target positions), which also picks the split
and refuses data the cache was not written for. Non-target positions get a uniform distribution (their weight is 0).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from purify.config import ModelSpec, TeacherSpec
from purify.types import Batch, ModelOutput, RecipeError, first_line

VERSION = 1
MANIFEST, PLAN, SPLITS = "manifest.json", ".plan.json", ("train", "val")
ARRAYS = ("ids", "logp", "tail", "index")


class CacheError(RecipeError):
    """A cache that cannot serve a recipe or a batch, as one line saying which part differs."""


# ---------------------------------------------------------------- fingerprints
def example_keys(batch: Batch) -> np.ndarray:
    """One int64 key per batch row: blake2b of its real tokens and target positions (or of ``x``), padding-free."""
    keys = []
    if "input_ids" in batch:
        ids, attn = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        targets = (batch["target_mask"] > 0).cpu().numpy()
        for r in range(ids.shape[0]):
            h = hashlib.blake2b(ids[r][attn[r]].numpy().astype("<i8").tobytes(), digest_size=8)
            h.update(np.flatnonzero(targets[r]).astype("<i4").tobytes())
            keys.append(h.digest())
    else:
        keys = [hashlib.blake2b(row.float().numpy().tobytes(), digest_size=8).digest() for row in batch["x"].cpu()]
    return np.frombuffer(b"".join(keys), dtype="<i8").copy()


def dataset_keys(dataset: Any, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Keys and target-position counts of every example of a purify dataset (``item``/``collate``)."""
    keys, counts = [], []
    for start in range(0, len(dataset), chunk):
        batch = dataset.collate([dataset.item(i) for i in range(start, min(start + chunk, len(dataset)))])
        keys.append(example_keys(batch))
        counts.append((batch["target_mask"] > 0).sum(1).numpy())
    return np.concatenate(keys), np.concatenate(counts).astype(np.int64)


def data_fingerprint(keys: np.ndarray, counts: np.ndarray) -> str:
    """sha256 of a split's example keys and target counts, in dataset order."""
    return hashlib.sha256(keys.astype("<i8").tobytes() + counts.astype("<i8").tobytes()).hexdigest()


def tokenizer_sha256(tokenizer: Any | None) -> str | None:
    """sha256 of a tokenizer's vocabulary and special tokens (``None`` for vector models)."""
    if tokenizer is None:
        return None
    blob = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens})
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------- reconstruction
def reconstruct(ids: Tensor, logp: Tensor, tail: Tensor, vocab_size: int) -> Tensor:
    """Dense log-probabilities from top-k entries: ``logp`` at ``ids``, ``log(tail / (V − k))`` elsewhere.

    Args:
        ids: ``(P, k)`` token ids.
        logp: ``(P, k)`` their log-probabilities.
        tail: ``(P,)`` probability mass outside the top-k (floored at 1e-12 so every log-probability is finite).
        vocab_size: ``V``.

    Returns:
        ``(P, V)`` float32 log-probabilities, renormalised so each row sums to 1 exactly (a correction of the order
        of float16 rounding).
    """
    rest = vocab_size - ids.shape[-1]
    fill = torch.log(tail.float().clamp_min(1e-12) / max(rest, 1))
    out = fill[:, None].expand(-1, vocab_size).clone()
    out.scatter_(1, ids.long(), logp.float())
    return out - out.logsumexp(-1, keepdim=True)


# ---------------------------------------------------------------- reading
def cache_record(directory: str | Path) -> dict[str, Any]:
    """What a run's ``lineage.json`` records of a logit-cache teacher beyond its teacher's hash: the cache's
    directory, its top-k and the sha256 of its manifest (another k or other contents at the same path change it)."""
    path = Path(directory).expanduser() / MANIFEST
    return {"path": str(directory), "k": read_manifest(directory)["k"],
            "manifest_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a finished cache; raises :class:`CacheError` when there is none."""
    path = Path(directory).expanduser() / MANIFEST
    if not path.is_file():
        raise CacheError(f"no finished logit cache in {directory} ({MANIFEST} missing); write one with "
                         f"`purify cache RECIPE --out {directory}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path} cannot be read ({first_line(err)}); rewrite the cache with `purify cache RECIPE "
                         f"--out {directory}`") from None
    version = manifest.get("version") if isinstance(manifest, dict) else None
    if version != VERSION:
        raise CacheError(f"{directory}: cache version {version} is not {VERSION}; rewrite it")
    missing = _manifest_gaps(manifest)
    if missing:  # a KeyError later (load_recipe, build_run)
        raise CacheError(f"{path} lacks {', '.join(missing)}: not a manifest purify cache wrote; rewrite the cache "
                         f"with `purify cache RECIPE --out {directory}`")
    return manifest


def holds_whole_vocabulary(manifest: dict[str, Any], teacher: int) -> bool:
    """Whether the cache keeps every logit of ``teacher`` (its k at least the teacher's width): its rows are then the
    teacher's log-probabilities exactly, which a temperature or a ``logit_slice`` may read
    (:func:`purify.config.cache_problems`)."""
    return manifest["k"] >= manifest["teachers"][teacher]["vocab_size"]


def _manifest_gaps(manifest: dict[str, Any]) -> list[str]:
    """The fields a reader needs that ``manifest`` lacks or holds as another type."""
    teachers = manifest.get("teachers")
    gaps = [key for key, kind in (("k", int), ("tokenizer_sha256", (str, type(None))), ("data", dict))
            if key not in manifest or not isinstance(manifest[key], kind)]  # None: a vector model's, no tokenizer
    if not (isinstance(teachers, list) and teachers):
        return [*gaps, "teachers"]
    return gaps + [f"teachers[{i}].{key}" for i, t in enumerate(teachers) for key, kind in
                   (("vocab_size", int), ("name", str), ("source", str), ("sha256", str))
                   if not isinstance(t, dict) or not isinstance(t.get(key), kind)]


class _Split:
    """One split's index and lazily memory-mapped shards."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.index = directory, np.load(directory / "index.npy")
        self.shards: dict[int, dict[str, np.ndarray]] = {}

    def matches(self, rows: np.ndarray, keys: np.ndarray) -> bool:
        return bool(((rows >= 0) & (rows < len(self.index))).all() and np.array_equal(self.index[rows, 3], keys))

    def gather(self, rows: np.ndarray, teacher: int) -> tuple[np.ndarray, ...]:
        """``ids (P, k)``, ``logp (P, k)``, ``tail (P,)`` of the examples ``rows``, concatenated in order."""
        parts: list[list[np.ndarray]] = [[], [], []]
        for shard, offset, length, _ in self.index[rows]:
            if shard not in self.shards:
                path = self.directory / f"shard-{shard:05d}"
                self.shards[shard] = {n: np.load(path / f"{n}.npy", mmap_mode="r") for n in ARRAYS[:3]}
            arrays = self.shards[shard]
            for j, name in enumerate(ARRAYS[:3]):
                parts[j].append(arrays[name][teacher, offset:offset + length])
        return tuple(np.concatenate(p) for p in parts)


class CachedTeacher(nn.Module):
    """A teacher read from a logit cache: ``forward(batch)`` gives ``ModelOutput((B, T−1, V) log-probabilities)``.

    Args:
        directory: a cache written by :func:`write_cache`.
        teacher: which cached teacher (recipe order of the recipe that wrote the cache).
    """

    def __init__(self, directory: str | Path, teacher: int = 0) -> None:
        super().__init__()
        self.directory = Path(directory).expanduser()
        self.manifest = read_manifest(self.directory)
        if not 0 <= teacher < len(self.manifest["teachers"]):
            raise CacheError(f"{directory}: teacher {teacher} out of range; it holds {len(self.manifest['teachers'])}")
        self.teacher, self.vocab_size = teacher, int(self.manifest["teachers"][teacher]["vocab_size"])
        self.splits = {s: _Split(self.directory / s) for s in SPLITS if (self.directory / s / "index.npy").is_file()}

    @property
    def logit_count(self) -> int:
        """The teacher's logits per position (:func:`purify.models.logit_width`), as its manifest records them."""
        return self.vocab_size

    @property
    def recorded_sha256(self) -> str | None:
        """The sha256 of the teacher that wrote these logits, as its cache's manifest records it (this module has no
        weights of its own to hash)."""
        return self.manifest["teachers"][self.teacher].get("sha256")

    def forward(self, batch: Batch, hidden: bool = False) -> ModelOutput:
        if hidden:
            raise CacheError(f"{self.directory}: a cached teacher has no hidden states")
        if "index" not in batch:  # a KeyError: batches not of purify's data module (PurifyTrainer's, a hand-made one)
            raise CacheError(f"{self.directory}: the batch has no 'index' (it has {sorted(batch)}): a logit cache is "
                             "read by each example's index in purify's data (DistillDataModule, purify train)")
        rows, keys = batch["index"].cpu().numpy(), example_keys(batch)
        split = next((s for s in self.splits.values() if s.matches(rows, keys)), None)
        if split is None:
            raise CacheError(f"{self.directory}: batch examples {rows[:4].tolist()} match none of the cached "
                             f"{'/'.join(self.splits)} examples; the cache was written for other data (or tokenizer, "
                             "max_length, seed); rerun `purify cache` for this recipe")
        real = batch["target_mask"] > 0
        ids, logp, tail = (torch.from_numpy(a.astype(np.int64 if a.dtype.kind in "iu" else np.float32)).to(real.device)
                           for a in split.gather(rows, self.teacher))
        out = torch.zeros(*real.shape, self.vocab_size, device=real.device)
        out[real] = reconstruct(ids, logp, tail, self.vocab_size)
        return ModelOutput(logits=out)


def cache_spec_problems(spec: ModelSpec, where: str) -> list[str]:
    """Recipe validation of a ``cache`` source: teachers only, a finished cache, a teacher index it holds."""
    if not isinstance(spec, TeacherSpec):
        return [f"{where}.cache: a logit cache holds teacher outputs; give the student a model source"]
    try:
        manifest = read_manifest(spec.cache)  # type: ignore[arg-type]
    except CacheError as err:
        return [f"{where}.cache: {err}"]
    count = len(manifest["teachers"])
    if not 0 <= spec.teacher < count:
        return [f"{where}.teacher: {spec.teacher} is not in [0, {count}): the cache holds {count} teachers"]
    listed = [s for s, info in (manifest.get("data") or {}).items() if isinstance(info, dict) and info.get("examples")]
    damaged = _damaged_file(Path(spec.cache), count, listed)  # type: ignore[arg-type]
    return [f"{where}.cache: {damaged[0]} is damaged ({damaged[1]}); rerun purify cache into a new directory"
            ] if damaged else []


def _damaged_file(directory: Path, teachers: int, listed: Sequence[str] = ()) -> tuple[Path, str] | None:
    """The first array file of a finished cache that is missing, does not open as the numpy array its header
    declares (a truncated copy: the memory map is checked against the file size; nothing is read) or holds fewer
    teachers or positions than the split's index points into, with what is wrong; else ``None``. (A missing shard
    failed mid-training; a short one gave other positions' targets, silently.) A split the manifest lists with
    examples (``listed``) must have its index (a missing val/ failed at the first validation as "other data")."""
    for split in SPLITS:
        index_path = directory / split / "index.npy"
        if not index_path.is_file():
            if split in listed:
                return index_path, f"missing, though the manifest lists the {split} split"
            continue
        try:
            index = np.load(index_path, mmap_mode="r")
        except (OSError, ValueError):
            return index_path, "truncated or not a numpy array"
        if index.ndim != 2 or index.shape[1] != 4 or index.dtype.kind not in "iu":
            return index_path, f"shape {tuple(index.shape)} {index.dtype}, not the (examples, 4) integer index"
        ends = np.zeros(int(index[:, 0].max()) + 1 if len(index) else 0, dtype=np.int64)
        np.maximum.at(ends, index[:, 0].astype(np.int64), (index[:, 1] + index[:, 2]).astype(np.int64))
        for shard, end in ((int(k), int(ends[k])) for k in np.unique(index[:, 0])):
            for name in ARRAYS[:3]:
                path = directory / split / f"shard-{shard:05d}" / f"{name}.npy"
                if not path.is_file():
                    return path, "missing"
                try:
                    array = np.load(path, mmap_mode="r")
                except (OSError, ValueError):
                    return path, "truncated or not a numpy array"
                if array.ndim < 2 or array.shape[0] < teachers or array.shape[1] < end:
                    return path, (f"shape {tuple(array.shape)}, but the index needs {teachers} teachers × {end} "
                                  "positions")
    return None


def check_cache(directory: str | Path, tokenizer: Any | None, datasets: dict[str, Any], where: str = "cache") -> None:
    """Refuse a cache whose tokenizer or tokenized data differ from the recipe's, naming which.

    Args:
        directory: the cache.
        tokenizer: the recipe's (student's) tokenizer.
        datasets: ``{"train": ..., "val": ...}`` the recipe's datasets (e.g. a set-up ``DistillDataModule``'s).
        where: the recipe key for messages, e.g. ``"teachers[0].cache"``.

    Raises:
        RecipeError: one line naming the tokenizer or the split whose data differ.
    """
    manifest = read_manifest(directory)
    ours = tokenizer_sha256(tokenizer)
    if ours != manifest["tokenizer_sha256"]:
        raise RecipeError(f"{where}: the recipe's tokenizer differs from the one {directory} was written with (vocab "
                          f"sha256 {str(ours)[:12]} vs {str(manifest['tokenizer_sha256'])[:12]}); rerun purify cache")
    for split, dataset in datasets.items():
        ours, theirs = data_fingerprint(*dataset_keys(dataset)), manifest["data"][split]["fingerprint"]
        if ours != theirs:
            raise RecipeError(f"{where}: the recipe's {split} data differ from those {directory} was written for "
                              f"(tokenized data sha256 {ours[:12]} vs {theirs[:12]}); rerun purify cache")


def iter_teacher_specs(directory: str | Path) -> Iterator[TeacherSpec]:
    """One recipe entry ``{cache: directory, teacher: i}`` per cached teacher, named as when cached."""
    for i, entry in enumerate(read_manifest(directory)["teachers"]):
        yield TeacherSpec(cache=str(directory), teacher=i, name=entry["name"])
