"""Trait-agnostic purifiers, one module each, and the name → (config, class) table recipes choose from."""

from __future__ import annotations

from typing import Any

from purify.purifiers.base import (
    ModelOutput,
    ParameterPurifier,
    Purifier,
    PurifierContext,
    StudentPurifier,
    TargetPurifier,
    Targets,
)

PURIFIERS: dict[str, tuple[type, type[Purifier]]] = {}
"""Recipe name → (config dataclass, purifier class). The class is built as ``cls(config)``. Filled explicitly
below (no registration by import side effects)."""

# --- target-side purifiers ---
# --- student-side and parameter-side purifiers ---
# --- cross-base ---


def build_purifier(config: Any) -> Purifier:
    """Build a purifier from its validated config dataclass (``config.name`` picks the class)."""
    return PURIFIERS[config.name][1](config)


__all__ = [
    "PURIFIERS",
    "ModelOutput",
    "ParameterPurifier",
    "Purifier",
    "PurifierContext",
    "StudentPurifier",
    "TargetPurifier",
    "Targets",
    "build_purifier",
]
