"""Where tiny models are cached, how their keys are computed, and how their directories are written atomically.

A cached model lives in ``<cache root>/<kind>/<name>-<key[:16]>/``: a ``save_pretrained`` model and tokenizer plus
``purify_lm.json`` (what it is, its key, and what training reported). A directory is built under a temporary name
beside its final one and renamed into place only once complete, so a crash never leaves a half-written model where a
later call would find it, and two processes racing to build the same model both end with one whole copy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from purify.storage import atomic_dir

__all__ = ["META_FILE", "atomic_dir", "digest", "read_meta", "write_meta"]

META_FILE = "purify_lm.json"
"""Name of the metadata file written beside every cached model."""


def digest(obj: Any) -> str:
    """SHA-256 hex digest of a JSON-serialisable object, independent of dict order.

    Args:
        obj: the object to hash.

    Returns:
        64 hex characters.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()



def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """Read the ``purify_lm.json`` metadata of a cached model.

    Args:
        model_dir: a directory written by :func:`purify.lm.resolve_base` or :func:`purify.lm.finetune`.

    Returns:
        The metadata dict.
    """
    return json.loads((Path(model_dir) / META_FILE).read_text())


def write_meta(model_dir: str | Path, meta: dict[str, Any]) -> None:
    """Write ``purify_lm.json`` metadata into a model directory.

    Args:
        model_dir: the directory.
        meta: JSON-serialisable metadata.
    """
    (Path(model_dir) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
