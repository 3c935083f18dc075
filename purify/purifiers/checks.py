"""Checks of a purifier stack: each entry on its own, against the run it sits in, and the entries' contracts with
one another (:class:`~purify.purifiers.base.Contract`) — the one set of rules for a recipe (:mod:`purify.assembly`),
the benchmark's conditions and a :class:`~purify.module.Distiller` built in Python.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any

from purify.config import DataConfig, LoraSpec, LossConfig, ModelSpec, Recipe, TeacherSpec, structured
from purify.purifiers import PURIFIERS
from purify.purifiers.base import PurifierConfig, number_problems
from purify.types import RecipeError


def purifier_configs(recipe: Recipe) -> tuple[list[PurifierConfig], list[str]]:
    """Each ``purifiers[i]`` entry as its config dataclass, and every problem of the entries on their own."""
    configs, problems = [], []
    for i, entry in enumerate(recipe.purifiers):
        where = f"purifiers[{i}]"
        name = entry.get("name") if isinstance(entry, dict) else None
        if name is None:
            problems.append(f"{where}.name: missing; every purifier entry needs a name, one of "
                            f"{', '.join(sorted(PURIFIERS))}")
            continue
        if name not in PURIFIERS:
            close = difflib.get_close_matches(str(name), list(PURIFIERS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"{where}.name: unknown purifier {name!r}; {hint}allowed: {', '.join(sorted(PURIFIERS))}")
            continue
        try:
            cfg = structured(PURIFIERS[name][0], entry, prefix=f"{where}.")
        except RecipeError as err:
            problems += err.problems
            continue
        problems += entry_problems(i, cfg, recipe)
        configs.append(cfg)
    return configs, problems


def entry_problems(i: int, cfg: PurifierConfig, recipe: Recipe | None = None) -> list[str]:
    """``purifiers[i]``'s problems: its own (number fields, :meth:`PurifierConfig.problems`) and, given the run it
    sits in, :meth:`PurifierConfig.recipe_problems`."""
    own = number_problems(cfg) or cfg.problems()
    return [f"purifiers[{i}].{p}" for p in own + (cfg.recipe_problems(recipe) if recipe is not None else [])]


def contract_problems(configs: list[PurifierConfig], recipe: Recipe) -> list[str]:
    """Purifier combinations that cannot work or would silently lose a purifier's effect, from their contracts.

    Args:
        configs: the validated purifier configs, in recipe order.
        recipe: the recipe (loss, student, teachers).
    """
    contracts = [c.contract() for c in configs]
    loss, out = recipe.loss, []
    partial_ok = loss.name == "forward_kl" or (loss.name == "jsd" and loss.beta < 1.0) or loss.name == "ce"
    # a purifier that must come first and sets the targets, beside one that rebuilds them from the raw outputs:
    # each order is refused by the other's rule (the two messages sent the user back and forth): said once
    setters = [j for j, ct in enumerate(contracts) if ct.first and ct.edits_targets]
    rebuilders = [j for j, ct in enumerate(contracts) if ct.rebuilds_targets]
    clash = {setters[0], rebuilders[0]} if setters and rebuilders else set()
    if clash:
        f, r = setters[0], rebuilders[0]
        out.append(f"purifiers[{max(f, r)}].name: {configs[f].name} (purifiers[{f}]) must set the targets first and "
                   f"{configs[r].name} (purifiers[{r}]) rebuilds them from the raw teacher outputs: the two do not "
                   "combine in either order; use one of them")
    for i, (cfg, ct) in enumerate(zip(configs, contracts)):
        where = f"purifiers[{i}].name"
        if ct.first and i > 0 and i not in clash:
            out.append(f"{where}: {cfg.name} must be the first purifier (it is at position {i}): later purifiers "
                       "read what it sets; move it to the front")
        editors = [f"{configs[j].name} (purifiers[{j}])" for j in range(i) if contracts[j].edits_targets]
        if ct.rebuilds_targets and editors and i not in clash:
            out.append(f"{where}: {cfg.name} rebuilds the targets from the raw teacher outputs, which would silently "
                       f"discard what {', '.join(editors)} did; put {cfg.name} before them")
        own_vocab = [f"purifiers[{j}]" for j in range(i) if contracts[j].keeps_own_vocab]
        if ct.reads_teachers and own_vocab:
            out.append(f"{where}: {cfg.name} reads teacher outputs in the student's vocabulary, but {own_vocab[0]} "
                       "(cross_base with alignment: uld) keeps a teacher in its own; use alignment: shared_vocab")
        if ct.needs_full_support and not partial_ok:
            used = "jsd with beta 1" if loss.name == "jsd" else loss.name
            out.append(f"{where}: {cfg.name} gives some tokens zero target mass, which loss.name: {used} cannot use; "
                       "use loss.name: forward_kl or jsd with beta < 1")
        if ct.needs_tokenizer and (recipe.student.arch is not None or loss.logit_slice is not None):
            out.append(f"{where}: {cfg.name} aligns tokenizers of language models; the student has no tokenizer "
                       "or loss.logit_slice is set")
        index = getattr(cfg, "teacher_index", 0)
        if ct.needs_teacher_weights and 0 <= index < len(recipe.teachers) and recipe.teachers[index].cache:
            out.append(f"{where}: {cfg.name} needs teachers[{index}]'s weights, but it is a logit cache; give the "
                       "teacher as a model (path, builtin, gguf, config)")
        if ct.keeps_own_vocab and loss.fused_linear:
            out.append(f"{where}: {cfg.name} with alignment: uld reads the student's logits, which loss.fused_linear "
                       "never builds; use alignment: shared_vocab or turn fused_linear off")
        if recipe.student.lora is not None:
            out += frozen_by_lora(i, cfg)
    return out


def unaligned_teachers(configs: Sequence[PurifierConfig | None], teacher_names: Sequence[str],
                       differing: Sequence[int]) -> list[str]:
    """The teachers in ``differing`` (their tokenizer is not the student's) that no ``cross_base`` purifier aligns:
    such a teacher would score the student's token ids as its own."""
    from purify.purifiers.cross_base import resolve_teachers

    where = next((k for k, c in enumerate(configs) if c is not None and c.name == "cross_base"), None)
    if where is None:
        return [f"teachers[{i}].tokenizer: differs from the student's tokenizer; use the same tokenizer or add a "
                "cross_base purifier to align vocabularies" for i in differing]
    aligned = resolve_teachers(configs[where].teachers, list(teacher_names), list(differing))  # type: ignore[union-attr]
    return [f"teachers[{i}].tokenizer: differs from the student's tokenizer but purifiers[{where}] (cross_base) does "
            f"not align it; add {i} to purifiers[{where}].teachers or leave teachers unset to align every such "
            "teacher" for i in differing if i not in aligned]


def frozen_by_lora(i: int, cfg: PurifierConfig) -> list[str]:
    """``purifiers[i]`` of a LoRA student, if it edits the full weights the adapter keeps frozen
    (:attr:`Contract.edits_weights`)."""
    return [f"purifiers[{i}].name: {cfg.name} edits the student's full weights, which student.lora freezes (only the "
            "adapter trains); remove the purifier or student.lora"] if cfg.contract().edits_weights else []


def purifier_problems(entries: Sequence[dict[str, Any] | PurifierConfig], teachers: Sequence[str], *,
                      loss: str | LossConfig = "forward_kl", vector_student: bool = False,
                      logit_slice: list[int] | None = None) -> list[str]:
    """The problems ``purify train`` would report for these purifier entries, for code that assembles runs
    itself (the benchmark's conditions): each entry on its own and the contracts of the list, against a recipe
    with these teacher names, this loss and this kind of student.

    Args:
        entries: ``{"name": ..., **options}`` purifier entries or registered purifier config dataclasses, in order.
        teachers: teacher names, primary first.
        loss: the loss name, or the whole loss config.
        vector_student: the student is a vector model (``arch``) rather than a language model.
        logit_slice: ``loss.logit_slice`` (with a loss name), where the condition distils only some logits.
    """
    items = [e if isinstance(e, dict) else dataclasses.asdict(e) for e in entries]
    full = loss if isinstance(loss, LossConfig) else LossConfig(name=loss, logit_slice=logit_slice)
    recipe = stand_in(teachers, full, vector_student=vector_student)
    recipe.purifiers = items
    configs, problems = purifier_configs(recipe)
    if len(configs) == len(items):
        problems += contract_problems(configs, recipe)
    return problems


def config_problems(configs: Sequence[PurifierConfig], recipe: Recipe) -> list[str]:
    """The problems of purifier config *instances* (a :class:`~purify.module.Distiller`'s, each already checked
    against its own type at construction): each against ``recipe`` (:meth:`PurifierConfig.recipe_problems`, a user's
    own config class included) and the contracts of the list."""
    entries = [p for i, c in enumerate(configs) for p in entry_problems(i, c, recipe)]
    return entries + contract_problems(list(configs), recipe)


def stand_in(teachers: Sequence[str], loss: LossConfig, *, vector_student: bool = False,
             teacher_weights: Sequence[float] | None = None, lora: bool = False, data: str = "bundled") -> Recipe:
    """A recipe standing in for a run assembled without one, for the purifier checks: these teachers (names and
    weights), this loss, a vector or language-model student (with a LoRA adapter), ``data`` as ``data.train``."""
    source = {"arch": "aux_mlp"} if vector_student else {"builtin": "tiny-llama-a"}
    weights = list(teacher_weights) if teacher_weights is not None else [1.0] * len(teachers)
    return Recipe(student=ModelSpec(**source, lora=LoraSpec() if lora else None),
                  teachers=[TeacherSpec(**source, name=t, weight=w) for t, w in zip(teachers, weights)], loss=loss,
                  data=DataConfig(train=data))
