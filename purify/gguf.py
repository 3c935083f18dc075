"""Convert GGUF checkpoints to cached Hugging Face (safetensors) model directories.

A GGUF file is de-quantized by transformers once, then saved with ``save_pretrained`` under
``<cache>/gguf/<sha256 of the file>``. Later calls find that directory and return at once, and it
loads in seconds with plain ``AutoModelForCausalLM.from_pretrained(path)``.

Example:
    >>> from purify.gguf import load_gguf
    >>> path = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from purify.storage import atomic_dir, cache_root, damaged_weights, file_sha256
from purify.types import first_line

__all__ = [
    "GGUF_MAGIC",
    "GGUFError",
    "GGUFFileNotFoundError",
    "GGUFConversionError",
    "GGUFDependencyError",
    "NotAGGUFFileError",
    "cache_root",
    "cached_model_dir",
    "is_gguf_file",
    "load_gguf",
    "file_sha256",
]

GGUF_MAGIC = b"GGUF"
MARKER_FILE = "purify_gguf.json"


class GGUFError(Exception):
    """Base class of every error raised while preparing a GGUF model; its message is one line."""


class GGUFFileNotFoundError(GGUFError, FileNotFoundError):
    """The GGUF file does not exist."""


class NotAGGUFFileError(GGUFError, ValueError):
    """The file exists but does not start with the GGUF magic bytes."""


class GGUFDependencyError(GGUFError, ImportError):
    """An optional package needed to read GGUF files is not installed."""


class GGUFConversionError(GGUFError, RuntimeError):
    """transformers could not load or save the model (e.g. an unsupported architecture)."""




def cached_model_dir(sha256: str, cache_dir: str | Path | None = None) -> Path | None:
    """Return the converted model directory for a GGUF digest if it is already in the cache.

    Args:
        sha256: Hex sha256 digest of the GGUF file.
        cache_dir: Cache root, as for :func:`cache_root`.

    Returns:
        The directory, or ``None`` when that file has not been converted yet.
    """
    target = cache_root(cache_dir) / "gguf" / sha256
    return target if (target / MARKER_FILE).is_file() and damaged_weights(target) is None else None



def is_gguf_file(file: str | Path) -> bool:
    """Return whether ``file`` starts with the GGUF magic bytes."""
    with Path(file).open("rb") as fh:
        return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def _check_file(file: str | Path) -> Path:
    path = Path(file).expanduser()
    if not path.exists():
        raise GGUFFileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise GGUFFileNotFoundError(f"GGUF path is not a regular file: {path}")
    if not is_gguf_file(path):
        raise NotAGGUFFileError(f"not a GGUF file (missing 'GGUF' magic bytes): {path}")
    return path.resolve()


def check_dependencies() -> None:
    """Raise :class:`GGUFDependencyError` (one line: what to install) unless the packages GGUF reading needs are
    importable."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise GGUFDependencyError(
            f"reading GGUF files needs the {' and '.join(repr(m) for m in missing)} package(s): "
            "pip install 'purify[gguf]'"
        )


def _convert(path: Path, out_dir: Path) -> dict[str, object]:
    """De-quantize ``path`` through transformers and save model + tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, object] = {}
    try:  # transformers >= 5 keeps GGUF blocks packed unless told to de-quantize; older ones always do
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are dense now; drop the GGUF quantizer so save_pretrained works
        quantizer.remove_quantization_config(model)
    load_s = time.perf_counter() - start
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "convert_seconds": round(load_s, 2),
        "save_seconds": round(time.perf_counter() - start - load_s, 2),
    }


def load_gguf(
    file: str | Path,
    cache_dir: str | Path | None = None,
    *,
    sha256: str | None = None,
    progress: bool = False,
) -> Path:
    """Convert a GGUF file to a cached Hugging Face model directory, once.

    The file is de-quantized (float32) by transformers' GGUF loader, and model and tokenizer are
    written with ``save_pretrained`` (safetensors) into ``<cache>/gguf/<sha256>``. The write goes to
    a temporary directory that is renamed into place, so an interrupted conversion leaves no
    half-written cache entry. A later call with the same file content returns without converting.

    Args:
        file: Path of the ``.gguf`` file.
        cache_dir: Cache root. Defaults to env ``PURIFY_CACHE``, else ``~/.cache/purify``.
        sha256: The file's hex sha256 digest if the caller already computed it (skips hashing).
        progress: Show a progress bar while hashing.

    Returns:
        Directory loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        GGUFFileNotFoundError: ``file`` does not exist.
        NotAGGUFFileError: ``file`` is not a GGUF file.
        GGUFDependencyError: the ``gguf`` or ``accelerate`` package is missing.
        GGUFConversionError: transformers failed to load or save the model.
    """
    path = _check_file(file)
    digest = sha256 or file_sha256(path, progress=progress)
    hit = cached_model_dir(digest, cache_dir)
    if hit is not None:
        return hit
    check_dependencies()

    parent = cache_root(cache_dir) / "gguf"
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / digest
    if target.exists() and (not (target / MARKER_FILE).is_file() or damaged_weights(target) is not None):
        # a stale entry (an older, interrupted layout) or its weights cut short since: moved aside first, so loaders
        # that found it damaged together (the ranks of one job) do not trip over each other's deletion
        aside = target.with_name(f".{target.name}.damaged-{os.getpid()}")
        try:
            os.replace(target, aside)
        except FileNotFoundError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    with atomic_dir(target) as tmp:  # a concurrent conversion that finishes first is kept
        try:
            info = _convert(path, tmp)
        except Exception as exc:
            raise GGUFConversionError(f"cannot convert {path.name}: {type(exc).__name__}: {first_line(exc)}") from exc
        info.update(source=path.name, sha256=digest, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        import transformers

        info["transformers"] = transformers.__version__
        (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return target
