"""Trait-agnostic purifiers, one module each, and the name → (config, class) table recipes choose from."""

from __future__ import annotations

from typing import Any

from purify.purifiers.base import (
    Contract,
    ParameterPurifier,
    Purifier,
    PurifierConfig,
    PurifierContext,
    StudentPurifier,
    TargetPurifier,
)
from purify.types import ModelOutput, RecipeError, Targets

PURIFIERS: dict[str, tuple[type, type[Purifier]]] = {}
"""Recipe name → (config dataclass, purifier class). The class is built as ``cls(config)``. Filled explicitly
below (no registration by import side effects)."""

# --- target-side purifiers ---
from purify.purifiers.divergence_mask import DivergenceMask, DivergenceMaskConfig  # noqa: E402
from purify.purifiers.ensemble import Ensemble, EnsembleConfig  # noqa: E402
from purify.purifiers.tail_truncation import TailTruncation, TailTruncationConfig  # noqa: E402

PURIFIERS["ensemble"] = (EnsembleConfig, Ensemble)
PURIFIERS["divergence_mask"] = (DivergenceMaskConfig, DivergenceMask)
PURIFIERS["tail_truncation"] = (TailTruncationConfig, TailTruncation)
# --- student-side and parameter-side purifiers ---
from purify.purifiers.adversary import Adversary, AdversaryConfig  # noqa: E402
from purify.purifiers.anchor import Anchor, AnchorConfig  # noqa: E402
from purify.purifiers.delta_projection import DeltaProjection, DeltaProjectionConfig  # noqa: E402
from purify.purifiers.fingerprint import FingerprintAdversary, FingerprintAdversaryConfig  # noqa: E402
from purify.purifiers.function_anchor import FunctionAnchor, FunctionAnchorConfig  # noqa: E402

PURIFIERS["adversary"] = (AdversaryConfig, Adversary)
PURIFIERS["anchor"] = (AnchorConfig, Anchor)
PURIFIERS["delta_projection"] = (DeltaProjectionConfig, DeltaProjection)
PURIFIERS["function_anchor"] = (FunctionAnchorConfig, FunctionAnchor)
PURIFIERS["fingerprint_adversary"] = (FingerprintAdversaryConfig, FingerprintAdversary)
# --- cross-base ---
from purify.purifiers.cross_base import CrossBase, CrossBaseConfig  # noqa: E402

PURIFIERS["cross_base"] = (CrossBaseConfig, CrossBase)


def build_purifier(config: Any) -> Purifier:
    """Build a purifier from its validated config dataclass (``config.name`` picks the class)."""
    if isinstance(config, dict):
        raise RecipeError("build_purifier: takes a config dataclass (e.g. AnchorConfig(weight=0.01)); build from "
                          "recipe-style dicts with build_purifiers([{'name': ..., ...}])")
    name = getattr(config, "name", None)
    if name not in PURIFIERS:
        raise RecipeError(f"build_purifier: {name!r} is no purifier; give the config of one of {', '.join(PURIFIERS)}")
    kind, cls = PURIFIERS[name]
    if not isinstance(config, kind):  # AnchorConfig(name="ensemble") built an Ensemble from an anchor's settings
        raise RecipeError(f"build_purifier: {type(config).__name__}(name={name!r}); give {kind.__name__}(...) for "
                          f"{name}, or leave the name at its default")
    return cls(config)


def build_purifiers(entries: Any) -> list[Purifier]:
    """The purifiers of ``{"name": ..., **options}`` entries (a recipe's ``purifiers`` list, checked by
    :func:`purify.purifiers.checks.purifier_problems`), each built from its config class of :data:`PURIFIERS`."""
    return [build_purifier(PURIFIERS[p["name"]][0](**p)) for p in entries]


__all__ = [
    "PURIFIERS",
    "Adversary", "AdversaryConfig", "Anchor", "AnchorConfig", "CrossBase", "CrossBaseConfig", "DeltaProjection",
    "DeltaProjectionConfig", "DivergenceMask", "DivergenceMaskConfig", "Ensemble", "EnsembleConfig",
    "FingerprintAdversary", "FingerprintAdversaryConfig", "FunctionAnchor", "FunctionAnchorConfig", "TailTruncation",
    "TailTruncationConfig",
    "build_purifiers",
    "Contract",
    "ModelOutput",
    "ParameterPurifier",
    "Purifier",
    "PurifierConfig",
    "PurifierContext",
    "StudentPurifier",
    "TargetPurifier",
    "Targets",
    "build_purifier",
]
