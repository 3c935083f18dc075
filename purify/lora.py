"""LoRA students through peft: wrap a pretrained causal LM in an adapter, and export the adapter or the merged model.

With ``student.lora`` (:class:`~purify.config.LoraSpec`) the student is ``peft.get_peft_model(base, LoraConfig)``:
every base weight is frozen and each targeted linear layer ``W`` gains ``ΔW = s · B A`` with ``A`` ``(r, n)``
random (seeded), ``B`` ``(m, r)`` zero and ``s = alpha / r`` (``alpha / √r`` with ``use_rslora``), so training starts
at the base model exactly. The Distiller's optimizer takes only parameters with ``requires_grad`` (the adapter, plus
``modules_to_save`` and trainable biases), and checkpoints hold the whole student (frozen base included), so a run
resumes exactly.

Purifiers: ``anchor`` pulls the *trainable* parameters toward their initial values, which under LoRA is
``‖A − A₀‖² + ‖B‖²`` — a pull of the adapter's update ``ΔW`` toward 0. ``delta_projection`` edits full weight
matrices, which are frozen here; validation refuses it with ``student.lora`` (its :class:`Contract` has
``edits_weights``).

Export (:func:`export_lora`): ``student/`` holds ``adapter_config.json`` + ``adapter_model.safetensors``, the tokenizer
and ``lineage.json``, loadable with ``peft.PeftModel.from_pretrained(base, dir)`` or
``peft.AutoPeftModelForCausalLM.from_pretrained(dir)`` (the config names the base's directory or hub name);
with ``export_merged`` also ``student-merged/``, ``ΔW`` folded into ``W``, loadable with plain
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from purify.config import LoraSpec, lora_spec_problems
from purify.lineage import write_lineage
from purify.storage import atomic_dir
from purify.types import RecipeError, first_line

__all__ = ["apply_lora", "export_lora", "is_lora", "lora_config", "trainable_counts"]


def lora_config(spec: LoraSpec, revision: str | None = None) -> Any:
    """The ``peft.LoraConfig`` a recipe's ``student.lora`` describes (causal-LM task)."""
    from peft import LoraConfig, TaskType

    targets: list[str] | str | None = spec.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's keyword: every linear layer except the output layer
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(targets) if isinstance(targets, list) else targets, bias=spec.bias,
                      modules_to_save=list(spec.modules_to_save) if spec.modules_to_save else None,
                      use_rslora=spec.use_rslora, revision=revision)


def _linear_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the model's linear layers (what ``target_modules`` may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(model: nn.Module, spec: LoraSpec, seed: int, revision: str | None = None,
               where: str = "student.lora") -> nn.Module:
    """Wrap ``model`` in a LoRA adapter; its base weights are frozen, only the adapter trains.

    Args:
        model: a transformers causal LM (``PreTrainedModel``).
        spec: the recipe's ``student.lora``.
        seed: seeds the adapter's random ``A`` matrices (the global RNG is left as it was).
        revision: the base's hub revision, recorded in the adapter config.
        where: the recipe key, for messages.

    Returns:
        A ``peft.PeftModelForCausalLM``.

    Raises:
        RecipeError: if the model is not a Hugging Face model or ``target_modules`` names no layer of it.
    """
    from peft import get_peft_model
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise RecipeError(f"{where}: LoRA needs a Hugging Face causal LM, got {type(model).__name__}; remove {where}")
    problems = lora_spec_problems(spec, where)  # a recipe's were checked already; a spec built in Python was not
    if problems:
        raise RecipeError(problems)
    names = [name for name, _ in model.named_modules()]
    # peft fails only when no target matches: a misspelt name beside a right one was dropped, though the adapter's
    # config and the lineage list it
    # (peft's rules: target_modules match a whole dotted suffix, modules_to_save any end of a name)
    unmatched = [f"{where}.target_modules: {t!r} names no module of this {type(model).__name__}; name layers of it: "
                 f"{', '.join(_linear_names(model))} (or [all-linear])" for t in spec.target_modules or []
                 if t != "all-linear" and not any(n == t or n.endswith(f".{t}") for n in names)]
    unmatched += [f"{where}.modules_to_save: {t!r} names no module of this {type(model).__name__}; name modules of it, "
                  "e.g. lm_head or embed_tokens" for t in spec.modules_to_save or [] if not any(n.endswith(t)
                                                                                               for n in names)]
    if unmatched:
        raise RecipeError(unmatched)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, lora_config(spec, revision))
    except ValueError as err:
        raise RecipeError(f"{where}.target_modules: {first_line(err).rstrip('.')}; name layers of this "
                          f"{type(model).__name__}: {', '.join(_linear_names(model))} (or [all-linear])") from None


def is_lora(module: nn.Module | None) -> bool:
    """Whether ``module`` is a peft model (peft is imported by then if it is one)."""
    if module is None or "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(module, PeftModel)


def trainable_counts(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def export_lora(module: nn.Module, directory: str | Path, record: dict[str, Any], tokenizer: Any | None = None,
                merged: str | Path | None = None) -> list[Path]:
    """Save a LoRA student's adapter into ``directory`` and, when ``merged`` is given, the merged model there.

    Each directory is written atomically and gets the tokenizer and ``lineage.json``. The merge runs on a copy,
    so ``module`` keeps its adapter (and its frozen base weights stay bit-identical).

    Args:
        module: the trained peft model.
        directory: the adapter's directory (``adapter_config.json``, ``adapter_model.safetensors``).
        record: the lineage record.
        tokenizer: the student's tokenizer, or ``None``.
        merged: directory of the merged model (``config.json``, ``model.safetensors``), or ``None``.

    Returns:
        The directories written.
    """
    written = []
    with atomic_dir(directory, replace=True) as tmp:
        module.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_lineage(tmp, record)
    written.append(Path(directory))
    if merged is not None:
        with atomic_dir(merged, replace=True) as tmp:
            plain = copy.deepcopy(module).merge_and_unload()
            plain.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_lineage(tmp, record)
            del plain
        written.append(Path(merged))
    return written
