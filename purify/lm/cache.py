"""Where tiny models are cached, how their keys are computed, and how their directories are written atomically.

A cached model lives in ``<cache root>/<kind>/<name>-<key[:16]>/``: a ``save_pretrained`` model and tokenizer plus
``purify_lm.json`` (what it is, its key, and what training reported). A directory is built under a temporary name
beside its final one and renamed into place only once complete, so a crash never leaves a half-written model where a
later call would find it, and two processes racing to build the same model both end with one whole copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``final`` when the block exits without error.

    On an exception the temporary directory is removed and the exception propagates. If ``final`` appeared in the
    meantime (another process built it), the new copy is discarded and the existing one kept.

    Args:
        final: the directory to create; its parent is created if missing.

    Yields:
        The temporary directory to write into.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a cached model should be readable like any other directory
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
