"""From recipe to run: every cross-domain check and all construction, in one place.

:func:`load_recipe` parses a recipe (:mod:`purify.config`) and :func:`validate` checks it against the rest of
purify — model architectures and built-in bases, logit caches, each purifier's config and its
:class:`~purify.purifiers.Contract` with the others, the strategy and the global batch — collecting *every* problem
into one :class:`~purify.types.RecipeError` (one ``"<key>: <problem>; <fix>"`` line each). :func:`build_run` then
builds the student, teachers, purifiers, data module, Distiller and lineage record. ``purify train``, ``purify
cache``, the scripts and the benchmark's conditions all come through here, so a recipe is judged the same way
everywhere.

Layering: types → config → models / data / purifiers / cache / strategy → **assembly** → train / bench / cli.
"""

from __future__ import annotations

import difflib
import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors import SafetensorError

from purify.align import differing_tokenizers
from purify.cache import (
    CacheError,
    cache_record,
    cache_spec_problems,
    check_cache,
    holds_whole_vocabulary,
    read_manifest,
)
from purify.config import (
    Recipe,
    cache_problems,
    logit_slice_problem,
    parse_recipe_problems,
    recipe_problems,
    to_dict,
)
from purify.data import DataError, DistillDataModule, TeacherTokenizer, load_records
from purify.lineage import build_lineage
from purify.lm.bases import BASES
from purify.models import (
    ARCHITECTURES,
    LoadedModel,
    arch_parameters,
    build_model,
    logit_width,
    spec_problems,
    state_sha256,
)
from purify.models_prepare import KNOWN_MODELS
from purify.module import Distiller
from purify.purifiers import PurifierConfig, build_purifier
from purify.purifiers.checks import contract_problems, purifier_configs, purifier_problems, unaligned_teachers
from purify.storage import cache_root
from purify.strategy import build_strategy, check_global_batch, world_size
from purify.types import RecipeError, first_line

__all__ = ["Run", "build_run", "contract_problems", "load_recipe", "purifier_problems", "resolve_strategy",
           "validate"]


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe with ``key=value`` overrides, convert and validate it completely.

    Raises:
        RecipeError: every problem found, one line each.
    """
    recipe, problems = parse_recipe_problems(path, overrides)
    if recipe is not None:
        problems += _problems(recipe)[1]
    if problems or recipe is None:
        raise RecipeError(problems)
    return recipe


def _source_problems(spec: Any, where: str) -> list[str]:
    """Checks of a model source against what purify provides (architectures, built-in bases, caches)."""
    if spec.arch is not None and spec.arch not in ARCHITECTURES:
        return [f"{where}.arch: unknown architecture {spec.arch!r}; allowed: {', '.join(ARCHITECTURES)}"]
    if spec.packaged is not None and spec.packaged not in KNOWN_MODELS:
        return [f"{where}.packaged: unknown packaged model {spec.packaged!r}; allowed: {', '.join(KNOWN_MODELS)}"]
    if spec.builtin is not None and spec.builtin not in BASES:
        close = difflib.get_close_matches(spec.builtin, list(BASES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return [f"{where}.builtin: unknown base {spec.builtin!r}; {hint}allowed: {', '.join(BASES)}"]
    if spec.cache is not None:
        return cache_spec_problems(spec, where)
    misspelt = spec_problems(spec, where)  # unknown config keys, kwargs an arch does not take: every model's at once
    if misspelt:
        return misspelt
    if spec.config is not None:  # transformers' own checks of the values (types, heads dividing the width, ...)
        from transformers import AutoConfig

        try:
            AutoConfig.for_model(**dict(spec.config))
        except Exception as err:  # noqa: BLE001 - whatever transformers refuses in the user's values is theirs to fix
            return [f"{where}.config: {first_line(err, lines=2)}; "
                    "see the model type's transformers config for its fields"]
    return []


def _batch_problems(recipe: Recipe) -> list[str]:
    """Derive ``data.batch_size`` from ``data.global_batch_size`` (world size × accumulation must divide it)."""
    t = recipe.trainer
    if recipe.data.global_batch_size is None:
        return []
    try:
        world = world_size(t.accelerator, t.devices, t.num_nodes)
    except (TypeError, ValueError):
        return [f"trainer.devices: cannot count processes for {t.devices!r}; give a count, a list of device indices, "
                "'auto' or -1"]
    try:
        recipe.data.batch_size = check_global_batch(recipe.data.global_batch_size, world, t.accumulate_grad_batches)
    except ValueError as err:
        return [str(err)]
    return []


def resolve_strategy(recipe: Recipe) -> Any:
    """The Lightning ``strategy=`` for the recipe; impossible settings raise :class:`RecipeError`."""
    t = recipe.trainer
    try:
        return build_strategy(recipe.strategy, offload_optimizer=recipe.deepspeed.offload_optimizer,
                              offload_parameters=recipe.deepspeed.offload_parameters,
                              deepspeed_config=recipe.deepspeed.config, accelerator=t.accelerator,
                              devices=t.devices, logging_batch_size_per_gpu=recipe.data.batch_size,
                              exclude_frozen_parameters=True)  # teachers are rebuilt from the recipe
    except ValueError as err:
        raise RecipeError(str(err)) from None


def validate(recipe: Recipe) -> list[PurifierConfig]:
    """Check a converted recipe against everything purify knows; return the validated purifier configs.

    Raises:
        RecipeError: every problem found (config values, sources, purifier entries and contracts, batch, strategy).
    """
    configs, problems = _problems(recipe)
    if problems:
        raise RecipeError(problems)
    return configs


def _problems(recipe: Recipe) -> tuple[list[PurifierConfig], list[str]]:
    """The validated purifier configs and every problem of a converted recipe."""
    problems = recipe_problems(recipe) + _cache_loss_problems(recipe)
    problems += _source_problems(recipe.student, "student")
    for i, teacher in enumerate(recipe.teachers):
        problems += _source_problems(teacher, f"teachers[{i}]")
    configs, entry_problems = purifier_configs(recipe)
    problems += entry_problems
    if len(configs) == len(recipe.purifiers):  # every entry parsed: positions match the recipe's
        problems += contract_problems(configs, recipe)
        if not entry_problems:
            problems += _label_problems(configs, recipe)
            if not any(p.startswith("teachers") for p in problems):
                problems += _truncation_problems(configs, recipe)
    problems += _batch_problems(recipe)
    t = recipe.trainer
    if str(t.precision) in ("16-mixed", "16") and t.accelerator == "cpu":  # ("auto" is decided where the run starts)
        problems.append(f"trainer.precision: {t.precision} on CPU runs bfloat16 autocast (Lightning's substitute), "
                        "not float16, while the record would say 16-mixed; give bf16-mixed (or 32-true)")
    if not any(p.startswith(("strategy", "trainer.devices")) for p in problems):
        try:
            resolve_strategy(recipe)
        except RecipeError as err:
            problems += err.problems
    return configs, problems


def _cache_loss_problems(recipe: Recipe) -> list[str]:
    """The loss and on-policy settings a logit-cache teacher cannot serve (:func:`purify.config.cache_problems`),
    read against its manifest: a cache of the whole vocabulary is exact under a temperature or a logit_slice."""
    for i, spec in enumerate(recipe.teachers):
        if spec.cache is not None:
            try:
                whole = holds_whole_vocabulary(read_manifest(spec.cache), spec.teacher)
            except (CacheError, IndexError, TypeError):  # said by its source's problems; here what holds anyway
                whole = True
            return cache_problems(recipe.loss, f"teachers[{i}]", recipe.on_policy is not None, whole)
    return []


def _truncation_problems(configs: list[PurifierConfig], recipe: Recipe) -> list[str]:
    """A ``tail_truncation`` keeping more tokens (``top_k``) than the primary teacher's logit cache holds, where the
    targets are that teacher's (no ensemble before it): a cached row has mass on its top-k ids only, so the rest of
    the kept tokens would be tied tail ids picked arbitrarily. (``top_p`` can reach into that tail too; it depends on
    the data, so it is documented, not refused.)"""
    primary = recipe.teachers[0] if recipe.teachers else None
    if primary is None or primary.cache is None:
        return []
    k = read_manifest(primary.cache)["k"]
    mixed = [j for j, c in enumerate(configs) if c.name == "ensemble"]
    return [f"purifiers[{j}].top_k: {c.top_k} exceeds teachers[0]'s logit cache, which holds each position's top {k} "
            f"tokens (the rest are tied tail ids); give top_k <= {k}, or a cache of more (purify cache --top-k)"
            for j, c in enumerate(configs) if c.name == "tail_truncation" and getattr(c, "top_k", None)
            and c.top_k > k and not any(m < j for m in mixed)]


def _label_problems(configs: list[PurifierConfig], recipe: Recipe) -> list[str]:
    """An ``adversary`` with ``target: source`` against the training data it will read: records with no ``source``
    field at all, or more distinct sources than ``num_sources`` (each was a ValueError at the first training step,
    after the run directory was written). Validation data are not read for it (validation never uses the labels).
    Reads the file only for such a purifier."""
    wants = [(i, c) for i, c in enumerate(configs) if c.name == "adversary" and getattr(c, "target", "") == "source"]
    if not wants:
        return []
    path = recipe.data.train
    try:
        sources = sorted({r["source"] for r in load_records(path) if "source" in r}) if path != "noise" else []
    except (OSError, DataError, ValueError):
        return []  # unreadable data is reported where the data are checked
    out = []
    for i, cfg in wants:
        if not sources:
            out.append(f"purifiers[{i}].target: source needs data records with a 'source' field (which lineage "
                       f"produced each); data.train {path} has none: add it, or use target: lineage with 2+ teachers")
        elif len(sources) > cfg.num_sources:
            shown = ", ".join(map(repr, sources[:5])) + (", ..." if len(sources) > 5 else "")
            out.append(f"purifiers[{i}].num_sources: {cfg.num_sources}, but data.train has {len(sources)} distinct "
                       f"sources ({shown}); give num_sources: {len(sources)}")
    return out


@dataclass
class Run:
    """Everything built from a recipe, before training."""

    recipe: Recipe
    distiller: Distiller
    datamodule: DistillDataModule
    student: LoadedModel
    teachers: list[LoadedModel]
    lineage: dict[str, Any]


def cross_base_teachers(configs: list[PurifierConfig], student: LoadedModel,
                        teachers: list[LoadedModel]) -> dict[int, TeacherTokenizer]:
    """The teachers whose tokenizer differs from the student's, each with its tokenizer and position limit.

    Raises:
        RecipeError: if such a teacher is not aligned by a ``cross_base`` purifier.
    """
    differing = differing_tokenizers(student.tokenizer, [t.tokenizer for t in teachers])
    problems = unaligned_teachers(configs, [t.name for t in teachers], differing)
    if problems:
        raise RecipeError(problems)
    limits = {i: getattr(teachers[i].config, "max_position_embeddings", None) for i in differing}
    return {i: TeacherTokenizer(teachers[i].tokenizer, limits[i]) for i in differing}


def _built(spec: Any, where: str, seed: int, deferred: bool = False) -> LoadedModel:
    """:func:`purify.models.build_model`, with what transformers cannot load (a hub name without network, a damaged
    ``config.json``, a directory without weights) and what an ``arch`` builder refuses in its ``kwargs`` (a wrong
    type or value) as one line naming the recipe key; unknown ``config`` keys and ``kwargs`` names are refused
    first, at validation (:func:`purify.models.spec_problems`, every model's at once)."""
    try:
        return build_model(spec, seed, deferred=True) if deferred else build_model(spec, seed)
    except RecipeError:
        raise
    except (TypeError, ValueError, RuntimeError) as err:
        if spec.arch is None or isinstance(err, torch.OutOfMemoryError):
            raise
        raise RecipeError(f"{where}.kwargs: {spec.arch} cannot be built from {dict(spec.kwargs)} "
                          f"({type(err).__name__}: {first_line(err)}); {spec.arch} accepts "
                          f"{arch_parameters(spec.arch)}") from None
    except (OSError, SafetensorError) as err:
        source = next((f"{k} {getattr(spec, k)}" for k in ("path", "builtin", "gguf", "packaged", "tokenizer")
                       if getattr(spec, k, None) is not None), "its source")
        fix = "give a local model directory, or make the hub reachable"
        if isinstance(err, SafetensorError):  # a truncated or damaged weights file (a copy cut short, a full disk)
            fix = ("its weights file is truncated or damaged: give a sound copy" if spec.path is not None else
                   f"its weights in purify's cache ({cache_root()}) are truncated or damaged: delete that entry "
                   "(purify builds or converts it again)")
        elif isinstance(err, PermissionError) or err.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
            fix = (f"purify builds and converts models into its cache, {cache_root()}: set PURIFY_CACHE to a writable "
                   "directory with space" if spec.path is None else "set HF_HOME (transformers' cache) to a writable "
                   "directory with space")
        raise RecipeError(f"{where}: cannot load {source} ({first_line(err)}); {fix}") from None


def build_run(recipe: Recipe) -> Run:
    """Validate a recipe and build its models, purifiers, data module and lineage record (no training).

    Under ``deepspeed_stage_3`` the teachers are only described here (name, tokenizer, config): the Distiller builds
    them in ``configure_model`` and partitions them across ranks there, and their lineage ``sha256`` is filled in
    then (before the first checkpoint and the final lineage record). Under any DeepSpeed stage with a bf16
    ``trainer.precision`` the frozen teachers are cast to bf16 (ZeRO-1/2: one bf16 replica per rank; ZeRO-3: bf16
    shards); the student's precision is the strategy's business.
    """
    configs = validate(recipe)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    sharded = recipe.strategy == "deepspeed_stage_3"
    student = _built(recipe.student, "student", recipe.seed)
    teachers = [_built(spec, f"teachers[{i}]", recipe.seed, deferred=sharded) for i, spec in enumerate(recipe.teachers)]
    for where, model in (("student", student.module), *((f"teachers[{i}]", t.module) for i, t in enumerate(teachers))):
        width = None if model is None else logit_width(model)
        problem = None if width is None else logit_slice_problem(recipe.loss.logit_slice, width,
                                                                  f"{where} ({type(model).__name__})")
        if problem:  # before anything is written (a model that does not say its width: at its first forward)
            raise RecipeError(problem)
    # training draws (dropout, purifier heads) from a stream that does not depend on how much the build drew: a
    # builtin base pretrained on a cold PURIFY_CACHE drew a lot, a cached one nothing (the "same" run differed by node)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    cross = cross_base_teachers(configs, student, teachers)
    purifiers = [build_purifier(c) for c in configs]
    records = [{"name": t.name, "source": t.source, "tokenizer": t.tokenizer_source, "weight": s.weight,
                "sha256": None if t.module is None else getattr(t.module, "recorded_sha256", None)
                or state_sha256(t.module),  # a cached teacher: the hash of the teacher that wrote the cache
                **({"cache": cache_record(s.cache)} if s.cache is not None else {})}
               for t, s in zip(teachers, recipe.teachers)]

    def build_teachers() -> list[torch.nn.Module]:
        """The deferred teachers, built; their hashes go into the lineage record (shared with the callback)."""
        for t, record in zip(teachers, records):
            record["sha256"] = state_sha256(t.build())
        return [t.module for t in teachers]  # type: ignore[misc]

    bf16 = recipe.strategy.startswith("deepspeed") and recipe.trainer.precision.startswith("bf16")
    distiller = Distiller(student.module, build_teachers if sharded else [t.module for t in teachers],
                          loss=recipe.loss, purifiers=purifiers, optim=recipe.optim, scheduler=recipe.scheduler,
                          teacher_names=[t.name for t in teachers],
                          teacher_weights=[s.weight for s in recipe.teachers], total_steps=recipe.trainer.max_steps,
                          student_tokenizer=student.tokenizer, teacher_tokenizers=[t.tokenizer for t in teachers],
                          teacher_dtype=torch.bfloat16 if bf16 else None, on_policy=recipe.on_policy,
                          seed=recipe.seed)
    distiller.shared_vocabulary()  # same tokenizer, output layers padded to other sizes: refused before any write
    datamodule = DistillDataModule(recipe.data, student.tokenizer, recipe.seed, recipe.trainer.accumulate_grad_batches,
                                   teacher_tokenizers=cross or None, val_batches=recipe.trainer.limit_val_batches)
    caches = [(i, spec) for i, spec in enumerate(recipe.teachers) if spec.cache is not None]
    if caches:  # refuse a cache written for other data or another tokenizer before training starts
        datamodule.setup("fit")
        splits = {"train": datamodule.train_dataset, "val": datamodule.val_dataset}
        for i, spec in caches:
            check_cache(spec.cache, student.tokenizer, splits, f"teachers[{i}].cache")
    lineage = build_lineage(
        student={"name": student.name, "source": student.source, "tokenizer": student.tokenizer_source,
                 "init_sha256": state_sha256(student.module),
                 **({"base_sha256": student.module.base_sha256} if hasattr(student.module, "base_sha256") else {})},
        teachers=records,
        data=[recipe.data.train] + ([recipe.data.val] if recipe.data.val else []),
        purifiers=[to_dict(c) for c in configs],
        recipe=to_dict(recipe),
    )
    return Run(recipe, distiller, datamodule, student, teachers, lineage)
