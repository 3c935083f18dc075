"""purify: distillation that passes on task knowledge, not the teacher's behavioral fingerprint.

Public API (importable from ``purify``): losses, the purifier protocol and purifiers, the Distiller
LightningModule, recipes. Heavy submodules load lazily on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # losses
    "forward_kl": "purify.losses", "reverse_kl": "purify.losses", "generalized_jsd": "purify.losses",
    "logit_mse": "purify.losses", "hard_label_ce": "purify.losses", "reduce_loss": "purify.losses",
    "distillation_loss": "purify.losses", "fused_linear_distillation_loss": "purify.losses_fused",
    # shared types
    "IGNORE_INDEX": "purify.types", "Batch": "purify.types", "ModelOutput": "purify.types", "Targets": "purify.types",
    "RecipeError": "purify.types", "DivergedError": "purify.types", "TrainingStopped": "purify.types",
    # purifier protocol
    "Purifier": "purify.purifiers.base", "TargetPurifier": "purify.purifiers.base",
    "StudentPurifier": "purify.purifiers.base", "ParameterPurifier": "purify.purifiers.base",
    "PurifierContext": "purify.purifiers.base", "PurifierConfig": "purify.purifiers.base",
    "Contract": "purify.purifiers.base", "PURIFIERS": "purify.purifiers",
    "build_purifier": "purify.purifiers",
    # purifiers (each also usable as a plain nn.Module / function)
    "Ensemble": "purify.purifiers.ensemble", "EnsembleConfig": "purify.purifiers.ensemble",
    "combine": "purify.purifiers.ensemble",
    "DivergenceMask": "purify.purifiers.divergence_mask", "DivergenceMaskConfig": "purify.purifiers.divergence_mask",
    "divergence": "purify.purifiers.divergence_mask", "mask_weights": "purify.purifiers.divergence_mask",
    "TailTruncation": "purify.purifiers.tail_truncation", "TailTruncationConfig": "purify.purifiers.tail_truncation",
    "truncate": "purify.purifiers.tail_truncation", "keep_mask": "purify.purifiers.tail_truncation",
    "GradientReversal": "purify.purifiers.grl", "dann_lambda": "purify.purifiers.grl",
    "DiscriminatorHead": "purify.purifiers.adversary", "Adversary": "purify.purifiers.adversary",
    "AdversaryConfig": "purify.purifiers.adversary",
    "Anchor": "purify.purifiers.anchor", "AnchorConfig": "purify.purifiers.anchor",
    "anchor_penalty": "purify.purifiers.anchor",
    "DeltaProjection": "purify.purifiers.delta_projection",
    "DeltaProjectionConfig": "purify.purifiers.delta_projection",
    "delta_subspaces": "purify.purifiers.delta_projection",
    "project_displacement": "purify.purifiers.delta_projection",
    "FunctionAnchor": "purify.purifiers.function_anchor", "FunctionAnchorConfig": "purify.purifiers.function_anchor",
    "FingerprintAdversary": "purify.purifiers.fingerprint",
    "FingerprintAdversaryConfig": "purify.purifiers.fingerprint",
    "CrossBase": "purify.purifiers.cross_base", "CrossBaseConfig": "purify.purifiers.cross_base",
    "PurifyTrainer": "purify.hf",
    # training
    "Distiller": "purify.module", "FidelityMetrics": "purify.metrics",
    "Recipe": "purify.config", "load_recipe": "purify.assembly", "validate": "purify.assembly",
    "train": "purify.train", "build_run": "purify.assembly", "CheckpointError": "purify.checkpoint",
    "AuxMLP": "purify.models", "model_forward": "purify.models", "decoder_hidden": "purify.models",
    "output_layer": "purify.models",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'purify' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's own names plus the lazily exported ones, so ``dir(purify)`` and tab completion list them."""
    return sorted(set(globals()) | set(__all__))
