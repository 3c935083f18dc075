"""Lineage: the provenance record (``lineage.json``) written beside every checkpoint and export (DESIGN §6).

It names the student's base (source and sha256 of its initial weights), each teacher (name, source, sha256), the
data files (sha256), the purifiers with their parameters, the resolved recipe, metrics at save, package versions
and the git commit. Files are written atomically: a crash never leaves a half-written record.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from purify.storage import atomic_write_text, file_sha256, peek_checkpoint

PACKAGES = ("purify", "torch", "lightning", "transformers", "torchmetrics", "omegaconf", "deepspeed")
LINEAGE_FILE = "lineage.json"



def versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter for reproducing a run."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha(cwd: str | Path | None = None) -> str | None:
    """The current commit (``-dirty`` when the tree has changes), or ``None`` outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def build_lineage(*, student: dict[str, Any], teachers: list[dict[str, Any]], data: list[str | Path],
                  purifiers: list[dict[str, Any]], recipe: dict[str, Any] | None = None,
                  metrics: dict[str, float] | None = None, step: int | None = None) -> dict[str, Any]:
    """Assemble a lineage record.

    Args:
        student: ``{"name", "source", "init_sha256", ...}`` of the student's base (a LoRA student: also
            ``base_sha256``, the base's weights without the adapter that ``init_sha256`` includes).
        teachers: one ``{"name", "source", "sha256", "weight", ...}`` per teacher.
        data: data files to hash (``bundled``/``noise`` are recorded as such).
        purifiers: purifier configs as dicts.
        recipe: the resolved recipe.
        metrics: metrics at save time.
        step: optimizer step at save time.
    """
    files = []
    for item in data:
        if str(item) == "bundled":  # the package's synthetic corpus
            from importlib import resources

            bundled = resources.files("purify").joinpath("data/tiny_corpus.txt")
            files.append({"path": "bundled", "sha256": hashlib.sha256(bundled.read_bytes()).hexdigest()})
        elif Path(str(item)).is_file():
            files.append({"path": str(item), "sha256": file_sha256(item)})
        else:
            files.append({"path": str(item), "sha256": None})
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "step": step,
        "student": student,
        "teachers": teachers,
        "data": files,
        "purifiers": [_with_source_sha256(p) for p in purifiers],
        "recipe": recipe,
        "metrics": metrics or {},
        "versions": versions(),
        "git": git_sha(Path(__file__).resolve().parent),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()},
    }


def _with_source_sha256(purifier: dict[str, Any]) -> dict[str, Any]:
    """A purifier entry, with ``source_sha256`` where its ``source`` is a file (a function anchor's or fingerprint
    adversary's neutral text): what the student was held to is recorded by content, not by path alone."""
    source = purifier.get("source") if isinstance(purifier, dict) else None
    if isinstance(source, str) and Path(source).expanduser().is_file():
        return {**purifier, "source_sha256": file_sha256(Path(source).expanduser())}
    return purifier


def write_lineage(directory: str | Path, record: dict[str, Any]) -> Path:
    """Write ``lineage.json`` into ``directory`` atomically; returns its path."""
    path = Path(directory) / LINEAGE_FILE
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    return path


FORMAT = "purify.lineage/1"
"""The record format this purify writes and reads."""


class LineageError(ValueError):
    """A lineage file that exists but cannot be read as a lineage record (one line naming it)."""


def read_lineage(path: str | Path) -> dict[str, Any]:
    """Read a lineage record from a file, or from a run/export/checkpoint directory that holds one."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / LINEAGE_FILE, path / "student" / LINEAGE_FILE]
    if path.suffix == ".ckpt":  # a checkpoint file, or DeepSpeed's directory of shards
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}; give one of its run's checkpoints/*.ckpt, the run "
                                    "directory or a lineage.json")
        candidates = [path.parent / LINEAGE_FILE, path.parent.parent / LINEAGE_FILE]
    for candidate in candidates:
        if candidate.is_file():
            try:
                record = json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise LineageError(f"{candidate}: damaged, not valid JSON ({type(err).__name__}); the run's "
                                   "checkpoints/lineage.json or student/lineage.json may still be whole") from None
            if not isinstance(record, dict) or not {"student", "teachers"} <= set(record):
                raise LineageError(f"{candidate}: not a purify lineage record (no student and teachers entries)")
            if record.get("format") != FORMAT:
                raise LineageError(f"{candidate}: record format {record.get('format')!r}, this purify reads "
                                   f"{FORMAT!r}; read it with the purify that wrote it (its versions entry)")
            return record
    raise FileNotFoundError(f"no {LINEAGE_FILE} at {path}; give a run directory, an export or a lineage.json")


def checkpoint_lineage(path: str | Path) -> dict[str, Any] | None:
    """The record a checkpoint file carries (``purify_lineage``: its run's record at that step, metrics left out),
    or ``None`` for a DeepSpeed directory, a checkpoint without one or a file torch cannot read with
    ``weights_only`` (a single-file DeepSpeed export holding other classes).

    Raises:
        LineageError: the record is of another format than this purify reads."""
    path = Path(path)
    checkpoint = peek_checkpoint(path) if path.suffix == ".ckpt" else None
    record = checkpoint.get("purify_lineage") if checkpoint is not None else None
    if not (isinstance(record, dict) and {"student", "teachers"} <= set(record)):
        return None
    if record.get("format") != FORMAT:
        raise LineageError(f"{path}: record format {record.get('format')!r}, this purify reads {FORMAT!r}; read it "
                           "with the purify that wrote it (its versions entry)")
    return record


def format_lineage(record: dict[str, Any]) -> str:
    """Human-readable summary of a lineage record.

    Raises:
        LineageError: a field not as purify writes it (a record edited by hand).
    """
    try:
        return _format(record)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LineageError(f"a field of the record is not as purify writes it ({type(err).__name__}: "
                           f"{str(err)[:120]}): edited by hand? restore it, or read it with --json") from None


def _format(record: dict[str, Any]) -> str:
    lines = [f"lineage ({record.get('format')}) created {record.get('created')} at step {record.get('step')}"]
    if record.get("status"):
        lines.append(f"status: {record['status']}" + (f"  ({record['error']})" if record.get("error") else ""))
    s = record["student"]
    lines.append(f"student: {s.get('name')}  source={s.get('source')}  init_sha256={s.get('init_sha256')}")
    recipe = record.get("recipe") if isinstance(record.get("recipe"), dict) else {}
    lora = (recipe.get("student") or {}).get("lora") if isinstance(recipe.get("student"), dict) else None
    if isinstance(lora, dict):  # the export is an adapter on that base (init_sha256: base + fresh adapter; base_sha256
        # the base alone)
        shown = ", ".join(f"{k}={v}" for k, v in lora.items() if v not in (None, False))
        base = f"  on base sha256={s['base_sha256']}" if s.get("base_sha256") else ""
        seed = recipe["student"].get("seed")  # the adapter's seed: the student's own where set, else the run's
        lines.append(f"student LoRA adapter: {shown}  (seed {recipe.get('seed') if seed is None else seed}){base}")
    for t in record["teachers"]:
        lines.append(f"teacher: {t.get('name')}  source={t.get('source')}  sha256={t.get('sha256')}  "
                     f"weight={t.get('weight')}")
    for d in record["data"]:
        lines.append(f"data: {d['path']}  sha256={d['sha256']}")
    lines.append("purifiers: " + (", ".join(json.dumps(p, sort_keys=True) for p in record["purifiers"]) or "none"))
    loss = recipe.get("loss")
    if isinstance(loss, dict):
        lines.append("loss: " + ", ".join(f"{k}={v}" for k, v in loss.items() if v not in (None, False)))
    for seg in record.get("segments") or []:  # a run continued in place: its launches
        lines.append(f"launch: from step {seg.get('from_step')} (max_steps {seg.get('max_steps')})"
                     + (f", resumed from {seg['resume']}" if seg.get("resume") else ", from the start"))
    came = record.get("resumed_from")
    if isinstance(came, dict):  # its first steps were another run's
        src = came.get("run_lineage") if isinstance(came.get("run_lineage"), dict) else {}
        teachers = ", ".join(str(t.get("source")) for t in src.get("teachers") or [] if isinstance(t, dict))
        src_recipe = src.get("recipe") if isinstance(src.get("recipe"), dict) else {}
        src_loss = (src_recipe.get("loss") or {}).get("name") if isinstance(src_recipe.get("loss"), dict) else None
        lines.append(f"resumed from: {came.get('checkpoint')} (step {came.get('step')}"
                     + (f" of run {came['run']}" if came.get("run") else "")
                     + (f"; trained there with teacher(s) {teachers}" if teachers else "")
                     + (f", loss {src_loss}" if src_loss else "") + ")")
    if record.get("metrics"):
        at = record.get("validated_at_step")
        lines.append("metrics: " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(record["metrics"].items()))
                     + (f"  (val/* from the validation at step {at})" if at is not None and at != record.get("step")
                        else ""))
    vers = record.get("versions", {})
    lines.append("versions: " + ", ".join(f"{k}={v}" for k, v in vers.items() if v))
    lines.append(f"git: {record.get('git')}")
    return "\n".join(lines)
