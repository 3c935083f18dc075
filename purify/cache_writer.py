"""Writing a teacher-logit cache (``purify cache``): the teachers' top-k over a recipe's data, resumably.

The layout, the reading side and the command line are in :mod:`purify.cache`. A cache is written shard by shard
(``shard_size`` examples each, to a temporary directory renamed into place), so a re-run skips finished shards; its
``.plan.json`` refuses a re-run with other teachers, data, tokenizer or k, and ``manifest.json`` is written last.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from purify.align import same_tokenizer
from purify.assembly import load_recipe
from purify.cache import (
    ARRAYS,
    MANIFEST,
    PLAN,
    SPLITS,
    VERSION,
    CacheError,
    data_fingerprint,
    dataset_keys,
    example_keys,
    tokenizer_sha256,
)
from purify.config import Recipe
from purify.models import LoadedModel, build_model, freeze, model_forward, spec_tokenizer, state_sha256
from purify.storage import atomic_dir, atomic_path, atomic_write_text, cannot_write_under
from purify.types import RecipeError, first_line, positive_int


def _top_k(logits: Tensor, k: int, chunk: int = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k ids, their log-probabilities and the tail mass of ``(P, V)`` logits, ``chunk`` rows at a time."""
    parts = []
    for rows in logits.split(chunk):
        top = F.log_softmax(rows.float(), dim=-1).topk(k, dim=-1)
        parts.append((top.indices, top.values, (-torch.expm1(top.values.logsumexp(-1))).clamp(0.0, 1.0)))
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def _save_arrays(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``.npy`` files into a temporary directory beside ``directory`` and rename it into place."""
    with atomic_dir(directory) as tmp:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)


def _write_shard(directory: Path, teachers: Sequence[nn.Module], dataset: Any, indices: range, k: int,
                 id_dtype: str, batch_size: int, device: torch.device, widths: Sequence[int]) -> None:
    """Run the teachers over ``indices`` and save their top-k, over each one's first ``widths`` logits, as one
    shard."""
    parts: dict[str, list[Any]] = {name: [] for name in ARRAYS}
    for start in range(indices.start, indices.stop, batch_size):
        batch = dataset.collate([dataset.item(i) for i in range(start, min(start + batch_size, indices.stop))])
        real = batch["target_mask"] > 0
        parts["index"].append(np.stack([real.sum(1).numpy(), example_keys(batch)], axis=1))
        batch = {key: value.to(device) for key, value in batch.items()}
        with torch.no_grad():
            tops = [_top_k(model_forward(t, batch).logits[real.to(device)][:, :w], k) for t, w in zip(teachers, widths)]
        for name, j in (("ids", 0), ("logp", 1), ("tail", 2)):
            parts[name].append(torch.stack([top[j] for top in tops]).cpu())
    index = np.concatenate(parts["index"]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(index[:, 0])[:-1]])
    _save_arrays(directory, {"ids": torch.cat(parts["ids"], 1).numpy().astype(id_dtype),
                             "logp": torch.cat(parts["logp"], 1).numpy().astype(np.float16),
                             "tail": torch.cat(parts["tail"], 1).numpy().astype(np.float16),
                             "index": np.column_stack([offsets, index])})


def _claim(out: Path, plan: dict[str, Any]) -> None:
    """Record what ``out`` is being written for, or refuse a directory that holds a cache of something else."""
    path = out / PLAN
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise CacheError(f"--out {out}: its {PLAN} cannot be read ({first_line(err)}), so what the partial cache "
                             "there was written for is unknown; remove it or pick another --out") from None
        if not isinstance(old, dict):
            raise CacheError(f"--out {out}: its {PLAN} is not a JSON object; remove the partial cache or pick another "
                             "--out")
        differs = sorted(key for key in set(old) | set(plan) if old.get(key) != plan.get(key))
        if differs:
            raise CacheError(f"--out {out}: holds a cache written with other {', '.join(differs)}; remove it or "
                             "pick another --out")
    else:
        atomic_write_text(path, json.dumps(plan, indent=2, sort_keys=True))


def _online_teachers(recipe: Recipe, tokenizer: Any | None) -> list[LoadedModel]:
    """Build the recipe's teachers, refusing caches and teachers outside the student's vocabulary."""
    loaded = []
    for i, spec in enumerate(recipe.teachers):
        if spec.cache is not None:
            raise CacheError(f"teachers[{i}].cache: this teacher is already a cache; cache its online source")
        teacher = build_model(spec, recipe.seed, where=f"teachers[{i}]")
        if not same_tokenizer(tokenizer, teacher.tokenizer):
            raise CacheError(f"teachers[{i}].tokenizer: differs from the student's; only teachers in the student's "
                             "vocabulary can be cached")
        loaded.append(teacher)
    return loaded


def write_cache(recipe: Recipe, out: str | Path, top_k: int = 8, shard_size: int = 1024,
                batch_size: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Cache the top-k of every teacher of ``recipe`` on its train and validation data; resumes a partial cache.

    Args:
        recipe: a validated recipe whose teachers are online models in the student's vocabulary.
        out: the cache directory.
        top_k: token ids kept per position (capped at the vocabulary size).
        shard_size: examples per shard (the unit of resumption).
        batch_size: examples per teacher forward (default ``recipe.data.batch_size``).
        device: where teachers run (default ``cuda`` when available).

    Returns:
        The manifest.
    """
    from purify.data import DistillDataModule

    out, dev = Path(out), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = spec_tokenizer(recipe.student)
    teachers = _online_teachers(recipe, tokenizer)
    modules = [freeze(t.module).to(dev) for t in teachers]
    datamodule = DistillDataModule(recipe.data, tokenizer, recipe.seed)
    datamodule.setup()
    datasets = {"train": datamodule.train_dataset, "val": datamodule.val_dataset}
    probe = {key: value.to(dev) for key, value in datasets["train"].collate([datasets["train"].item(0)]).items()}
    with torch.no_grad():
        vocab = [int(model_forward(m, probe).logits.shape[-1]) for m in modules]
    if tokenizer is not None:  # an output layer padded past the tokenizer: rows no token has (the Distiller cuts
        vocab = [min(v, len(tokenizer)) for v in vocab]  # them away; top-k slots spent there were lost)
    k = min(top_k, *vocab)
    keys = {split: dataset_keys(ds) for split, ds in datasets.items()}
    plan = {"version": VERSION, "k": k, "shard_size": shard_size, "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "id_dtype": "uint16" if max(vocab) < 65536 else "int32",
            "teachers": [{"name": t.name, "source": t.source, "sha256": state_sha256(t.module), "vocab_size": v}
                         for t, v in zip(teachers, vocab)],
            "data": {split: {"fingerprint": data_fingerprint(*keys[split]), "examples": len(keys[split][0]),
                             "positions": int(keys[split][1].sum())} for split in SPLITS}}
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, plan)
    if tokenizer is not None and not (out / "tokenizer").is_dir():
        with atomic_dir(out / "tokenizer") as tmp:
            tokenizer.save_pretrained(tmp)
    for split, dataset in datasets.items():
        for shard in range(math.ceil(len(dataset) / shard_size)):
            directory = out / split / f"shard-{shard:05d}"
            if not directory.is_dir():
                indices = range(shard * shard_size, min((shard + 1) * shard_size, len(dataset)))
                _write_shard(directory, modules, dataset, indices, k, plan["id_dtype"],
                             batch_size or recipe.data.batch_size, dev, vocab)
        _write_index(out / split, keys[split][0])
    payload = sum(f.stat().st_size for s in SPLITS for f in (out / s).rglob("*.npy"))
    positions = sum(plan["data"][s]["positions"] for s in SPLITS)
    manifest = {**plan, "bytes": payload, "bytes_per_token": payload / max(positions, 1),
                "bytes_per_token_per_teacher": payload / max(positions * len(modules), 1)}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _write_index(directory: Path, keys: np.ndarray) -> None:
    """``index.npy``: shard, offset, length and key of every example, checked against the planned keys."""
    rows = [np.column_stack([np.full(len(ix), s), ix]) for s, ix in
            enumerate(np.load(d / "index.npy") for d in sorted(directory.glob("shard-*")))]
    index = np.concatenate(rows).astype(np.int64)
    if not np.array_equal(index[:, 3], keys):
        raise CacheError(f"{directory}: its shards do not match the recipe's examples; remove the directory")
    with atomic_path(directory / "index.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, index)


# ---------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``purify cache RECIPE [key=value ...] --out DIR [--top-k 8]``."""
    parser.add_argument("recipe", help="recipe YAML whose teachers and data are cached")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value overrides (omegaconf dotlist)")
    parser.add_argument("--out", required=True, help="cache directory (re-running resumes a partial cache)")
    parser.add_argument("--top-k", type=positive_int, default=8, help="token ids kept per position (default 8)")
    parser.add_argument("--shard-size", type=positive_int, default=1024, help="examples per shard (default 1024)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="examples per forward (default data.batch_size)")
    parser.add_argument("--device", default=None, help="where teachers run (default cuda when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Write the cache; print where, its size and bytes per token. Returns the exit code."""
    blocked = cannot_write_under(args.out)
    if blocked:
        raise RecipeError(f"--out: {blocked}; give a cache directory")
    if (Path(args.out) / "lineage.json").is_file():  # a training run or export: the cache would be written into it
        raise RecipeError(f"--out: {args.out} holds a training run (lineage.json); give a directory of its own for "
                          "the cache")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise RecipeError(f"--device: unknown device {args.device!r}; give cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):  # meta, mps, ...: a RuntimeError traceback from the first forward
            raise RecipeError(f"--device: {args.device!r} is not a device purify caches on; give cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RecipeError(f"--device {args.device}: no CUDA device on this machine; give cpu or leave it out")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise RecipeError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                              "give cuda:N with N below that")
    recipe = load_recipe(args.recipe, args.overrides)
    m = write_cache(recipe, args.out, args.top_k, args.shard_size, args.batch_size, args.device)
    positions = sum(m["data"][s]["positions"] for s in SPLITS)
    print(f"purify: cached {len(m['teachers'])} teacher(s), k={m['k']}, {positions} positions in {args.out} "
          f"({m['bytes'] / 2**20:.1f} MiB, {m['bytes_per_token_per_teacher']:.1f} bytes/token/teacher)")
    entries = ", ".join(f"{{cache: {args.out}, teacher: {i}}}" for i in range(len(m["teachers"])))
    print(f"purify: train from it with teachers: [{entries}]")  # every teacher: an ensemble needs them all
    return 0
