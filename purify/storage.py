"""Where purify keeps files it builds (tiny bases, fine-tunes, converted GGUF models, bench data) and how it hashes
them. Standard library only, so the command line can import it without loading torch or transformers."""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from purify.types import first_line


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$PURIFY_CACHE``, else ``~/.cache/purify`` (not created)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PURIFY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "purify"


def damaged_weights(directory: str | Path) -> str | None:
    """The first ``*.safetensors`` file of ``directory`` whose header or length is broken (a copy cut short, a full
    disk: safetensors checks the data the header promises is there), as ``"<file>: <why>"``; ``None`` if all open."""
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # noqa: BLE001 - safetensors' errors are its own types (SafetensorError, OSError)
            return f"{path.name}: {first_line(err)}"
    return None


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool) -> None:
    """Give a temporary file (0600) or directory (0700) — and, for a directory, everything written into it by
    libraries that make private files — the mode a plain ``open``/``mkdir`` would: the umask's."""
    mask = _umask()
    path.chmod((0o777 if directory else 0o666) & ~mask)
    if directory:
        for inner in path.rglob("*"):
            if not inner.is_symlink():
                inner.chmod((0o777 if inner.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; it replaces ``path`` only if the block completes.

    On any exception (a kill included) the temporary file is removed and ``path`` keeps its previous content, so a
    crash mid-write never leaves a half-written checkpoint, result or record. The file gets the mode the umask
    gives a new file (``mkstemp`` would leave it private). A link to a file is written through (the link stays).

    Raises:
        NotAFileError: ``path`` exists and is no regular file (a device such as ``/dev/stdout``, a pipe, a
            directory): the rename would have replaced it by a file.
    """
    path = Path(path)
    if problem := not_a_file(path):
        raise NotAFileError(f"{path} {problem}; give the path of a file to write")
    path = path.resolve() if path.is_symlink() else path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        if Path(tmp).exists():
            _publish_mode(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


@contextmanager
def atomic_dir(final: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final`` that becomes ``final`` when the block exits without error.

    On an exception the temporary directory is removed and the exception propagates; ``final`` is untouched. The
    directory gets the mode the umask gives a new directory (``mkdtemp`` would leave it private).

    Args:
        final: the directory to create; its parent is created if missing.
        replace: replace an existing ``final`` (an export written again). Without it, a ``final`` that exists by
            the end (another process built the same cache entry) is kept and the new copy discarded.

    Yields:
        The temporary directory to write into.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        if replace and final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(final: str | Path) -> list[Path]:
    """Remove what an :func:`atomic_dir` of ``final`` left beside it when its process was killed outright (SIGKILL, an
    out-of-memory kill: no ``finally`` runs): ``.<name>.tmp-*`` (a complete-looking copy, for good) and
    ``.<name>.old-*``. Only for a ``final`` one writer owns (a run's export under its launch's claim): a cache entry
    another process may be building at the same moment keeps its temporaries. Returns what was removed."""
    final = Path(final)
    gone = [p for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*") for p in final.parent.glob(pattern)]
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return gone


class NotAFileError(ValueError):
    """An output path that exists and is no regular file (:func:`atomic_path`)."""


class NotUTF8Error(ValueError):
    """A text input (recipe, data, prompts, probes) that is not UTF-8."""


def jsonable(obj: Any) -> Any:
    """Plain JSON types: NaN/inf become ``null``, tuples lists, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    try:
        value = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return value if math.isfinite(value) else None


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as strict JSON (:func:`jsonable`: no NaN a parser would refuse), indented, written atomically."""
    atomic_write_text(path, json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n")


def held_by_a_process(directory: str | Path) -> bool | None:
    """Whether some process holds the ``flock`` that ``purify train`` keeps on a run directory while it runs;
    ``None`` where that cannot be told (no such directory, a file system without ``flock``)."""
    import errno
    import fcntl

    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        return True if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def peek_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint file's top-level dict, memory-mapped (its small fields read, the tensors not), loaded with
    ``weights_only``; ``None`` for a directory (DeepSpeed's shards), a missing file, or one torch cannot read so
    (damaged, or holding classes ``weights_only`` refuses)."""
    import pickle

    import torch

    if not Path(path).is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


JSON_LINES = (".jsonl", ".ndjson", ".json")
"""File endings read as JSON Lines (one object a line), in any case: ``gen.JSONL`` or ``gen.json`` was read as plain
text and its records trained on as raw JSON."""


def is_json_lines(path: str | Path) -> bool:
    """Whether ``path`` names a JSON Lines file (:data:`JSON_LINES`)."""
    return str(path).lower().endswith(JSON_LINES)


def read_utf8(path: str | Path) -> str:
    """``path``'s text, or a :class:`NotUTF8Error` naming the file and the first byte that is not UTF-8. A leading
    byte-order mark (Windows editors write one) is dropped: it stayed in a text file's first record, and a JSON
    Lines file's first line was "not a JSON object"."""
    data = Path(path).read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:  # the offset in the file, the mark included
        raise NotUTF8Error(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                           f"{bom + err.start}); save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text gave them


def not_a_file(path: str | Path) -> str | None:
    """Why a file cannot be written at ``path`` by replacing it: ``"is not a regular file (...)"`` when it exists
    and is a device (``/dev/stdout``), pipe or directory, else ``None``. Checked by :func:`atomic_path`, and before
    a long run that writes there at its end."""
    p = Path(path)
    return "is not a regular file (a device, pipe or directory)" if p.exists() and not p.is_file() else None


def cannot_write_under(path: str | Path) -> str | None:
    """Why a directory cannot be written at ``path`` (created if missing): :func:`not_a_directory`'s reason, or
    ``"cannot create anything in <x> (...)"`` when its first existing ancestor refuses a new entry (read-only, no
    permission, ``/proc``), found by creating and removing an empty directory there. For commands that write their
    result at the end of a long run (a benchmark, a cache, an audit), so they are refused before it."""
    blocked = not_a_directory(path)
    if blocked:
        return blocked
    existing = next((q for q in (Path(path), *Path(path).parents) if q.exists()), Path("."))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".purify-probe-", dir=existing))
    except OSError as err:
        return f"cannot create anything in {existing} ({err.strerror or err})"
    return None


def not_a_directory(path: str | Path) -> str | None:
    """Why ``path`` cannot be (or be created as) a directory: ``"<x> is an existing file"`` for the first existing
    file among it and its parents, else ``None``. Checked before a run, so it does not fail at its end."""
    p = Path(path)
    for part in (p, *p.parents):
        if part.exists():
            return None if part.is_dir() else f"{part} is an existing file"
    return None
