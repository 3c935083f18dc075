"""Where purify keeps files it builds (tiny bases, fine-tunes, converted GGUF models, bench data) and how it hashes
them. Standard library only, so the command line can import it without loading torch or transformers."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$PURIFY_CACHE``, else ``~/.cache/purify`` (not created)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PURIFY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "purify"


def file_sha256(path: str | Path, progress: bool = False) -> str:
    """sha256 of a file, read in 4 MiB chunks; ``progress`` shows a tqdm bar in bytes (for large model files)."""
    from tqdm.auto import tqdm

    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"sha256 {path.name}", disable=not progress) as bar:
        while block := fh.read(4 << 20):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; it replaces ``path`` only if the block completes.

    On any exception (a kill included) the temporary file is removed and ``path`` keeps its previous content, so a
    crash mid-write never leaves a half-written checkpoint, result or record.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
