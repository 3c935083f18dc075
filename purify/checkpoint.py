"""Checkpoints that are verified before anything is restored.

:class:`VerifiedCheckpointIO` (Lightning's checkpoint IO for ``purify train`` under ``auto``/``ddp``) writes each
checkpoint atomically with a sha256 of every tensor it holds, and on load refuses — with one
:class:`CheckpointError` line naming the file and what is wrong — a file that is truncated, has a damaged header or
damaged tensor bytes, is not a Lightning checkpoint, holds non-finite values, or was written for another model.
Loading stays ``weights_only`` (safe): the fix for a bad file is another checkpoint, never unsafe loading.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from purify.storage import atomic_path
from purify.types import RecipeError, first_line

INTEGRITY_KEY = "purify_integrity"
"""Checkpoint entry holding ``{"sha256": ..., "tensors": n}`` over every tensor of the checkpoint."""

_FIX = "resume from another checkpoint (an earlier step*.ckpt in the same directory) or start afresh"


class CheckpointError(RecipeError):
    """A checkpoint that cannot be restored, as one line naming the file and what is wrong."""


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested checkpoint structure, with a stable path, in a stable order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            if key != INTEGRITY_KEY:
                yield from _tensors(obj[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _tensors(item, f"{prefix}[{i}]")


def tensor_digest(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """sha256 over the names, dtypes, shapes and bytes of every tensor in ``checkpoint``."""
    digest, count = hashlib.sha256(), 0
    for name, t in _tensors(checkpoint):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        count += 1
    return {"sha256": digest.hexdigest(), "tensors": count}


def load_verified(path: str | Path, expected: dict[str, torch.Tensor] | None = None,
                  map_location: Any = "cpu", scope: str = "") -> dict[str, Any]:
    """Load a checkpoint and check it before anyone restores from it.

    Args:
        path: a ``.ckpt`` file.
        expected: the model's ``state_dict`` (or any ``{name: tensor}``) the checkpoint must fit: every checkpoint
            key must exist there with the same shape, and every model key must be in the checkpoint.
        map_location: passed to ``torch.load``.
        scope: compare only the checkpoint's tensors whose names start with it (e.g. ``"student."`` before training
            starts, when purifier heads built at set-up are not in ``expected`` yet).

    Returns:
        The checkpoint dictionary.

    Raises:
        CheckpointError: one line naming the file and what is wrong.
    """
    path = Path(path)
    if path.is_dir() and (path / "checkpoint").is_dir():  # DeepSpeed's sharded layout: <name>.ckpt/checkpoint/...
        raise CheckpointError(f"resume: {path} is a DeepSpeed checkpoint (a directory of shards); resume it with the "
                              "strategy that wrote it (strategy=deepspeed_stage_N, as in its run's recipe.yaml)")
    if not path.is_file():
        raise CheckpointError(f"resume: {path} is not a checkpoint file; {_FIX}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, damaged header, a pickle of foreign objects, not a torch file at all
        raise CheckpointError(f"resume: {path} cannot be read as a checkpoint ({type(err).__name__}: "
                              f"{first_line(err, 160)}); it is "
                              f"truncated, damaged or not a checkpoint; {_FIX}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "global_step" not in ckpt:
        raise CheckpointError(f"resume: {path} is not a Lightning checkpoint (no state_dict/global_step); give a "
                              "checkpoints/step*.ckpt or last.ckpt written by purify train")
    stored = ckpt.get(INTEGRITY_KEY)
    if stored is not None and tensor_digest(ckpt) != stored:
        raise CheckpointError(f"resume: {path} is damaged: its tensors do not match the sha256 recorded when it was "
                              f"written; {_FIX}")
    weights = {"state_dict": ckpt["state_dict"], "optimizer_states": ckpt.get("optimizer_states", [])}
    for name, t in _tensors(weights):  # not callbacks' state: a best score may be inf by design
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"resume: {path} holds non-finite values in {name}; {_FIX}")
    if expected is not None:
        state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(scope)}
        expected = {k: v for k, v in expected.items() if k.startswith(scope)}
        # a module's ``_extra_state`` (e.g. a purifier's input stream position) is its own business, not a weight
        foreign = [k for k in state if k not in expected or (not k.endswith("_extra_state")
                                                             and tuple(state[k].shape) != tuple(expected[k].shape))]
        missing = [k for k in expected if k not in state]
        _refuse_another_model(path, foreign, missing)
    return ckpt


def _refuse_another_model(path: Path, foreign: list[str], missing: list[str] | None = None) -> None:
    """Raise the one-line refusal of a checkpoint written for another model: tensors it holds that do not fit the
    model (``foreign``), else tensors the model has that it lacks (``missing``); nothing when both are empty."""
    if foreign or missing:
        what = f"{len(foreign)} tensors it holds do not fit" if foreign else f"{len(missing)} tensors are missing"
        example = (foreign or missing)[0]  # type: ignore[index]
        raise CheckpointError(f"resume: {path} was written for another model ({what}, e.g. {example}); resume a "
                              "checkpoint of this recipe's student and purifiers")


def deepspeed_step(path: str | Path, expected: dict[str, torch.Tensor] | None = None, scope: str = "",
                   record_key: str | None = None) -> tuple[int, Any]:
    """Check a DeepSpeed checkpoint directory (``<name>.ckpt/checkpoint/[zero_pp_rank_0_]mp_rank_00_model_states.pt``,
    every ZeRO stage) before anyone restores from it, and return its step and the entry ``record_key`` of the state
    the trainer stored with it (``None`` without one): it must hold the model states DeepSpeed writes and every
    rank's shards, and the shapes of the parameters it trained (``param_shapes``) must be those of ``expected`` (the
    model's ``state_dict``), else it was written for another model; ``scope``: compare only the names that start with
    it (``"student."`` where purifier heads are built later, inside the fit).

    Raises:
        CheckpointError: one line naming the directory and what is wrong.
    """
    path = Path(path)
    found = sorted((path / "checkpoint").glob("*mp_rank_00_model_states.pt")) if path.is_dir() else []
    states = found[0] if found else path / "checkpoint" / "mp_rank_00_model_states.pt"  # ZeRO-3: zero_pp_rank_0_...
    if path.is_file():
        raise CheckpointError(f"resume: {path} is a single-file checkpoint; a DeepSpeed strategy resumes only its own "
                              "sharded checkpoint directories")
    if not states.is_file():
        raise CheckpointError(f"resume: {path} is not a DeepSpeed checkpoint (no checkpoint/*model_states.pt in it); "
                              f"{_FIX}")
    try:
        ckpt = torch.load(states, map_location="cpu", weights_only=True, mmap=True)  # ZeRO-1/2: the whole model
        step = int(ckpt["global_step"])
        shapes = {k: tuple(v) for group in ckpt["param_shapes"] for k, v in group.items()}
        ranks = int(ckpt.get("dp_world_size") or 1)
        record = ckpt.get(record_key) if record_key is not None else None
    except Exception as err:  # damaged, truncated, or another kind of file under that name
        raise CheckpointError(f"resume: {states} cannot be read as a DeepSpeed checkpoint ({type(err).__name__}: "
                              f"{first_line(err, 160)}); {_FIX}") from None
    _check_shards(path, ranks)
    if expected is not None:
        foreign = [k for k, shape in shapes.items() if k.startswith(scope)
                   and (k not in expected or tuple(expected[k].shape) != shape)]
        _refuse_another_model(path, foreign)
    return step, record


def _check_shards(path: Path, ranks: int) -> None:
    """Refuse a DeepSpeed checkpoint directory written by ``ranks`` processes that lacks one of their optimizer
    shards (``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``; ZeRO-3 also ``zero_pp_rank_R_..._model_states.pt``)
    or holds one cut short (a kill during the save: torch's zip archive then has no central directory) — DeepSpeed
    finds either only on the rank that reads it, inside the fit, after the run's record was rewritten."""
    files = {p.name: p for p in (path / "checkpoint").iterdir()}
    zero3 = any(name.startswith("zero_pp_rank_") and name.endswith("_model_states.pt") for name in files)
    for rank in range(ranks):
        kinds = ("optim_states", *(("model_states",) if zero3 else ()))
        for kind in kinds:
            found = [p for name, p in files.items()
                     if re.fullmatch(rf"(bf16_)?zero_pp_rank_{rank}_mp_rank_\d+_?{kind}\.pt", name)]
            if not found:
                raise CheckpointError(f"resume: {path} lacks rank {rank}'s {kind.replace('_', ' ')} (checkpoint/"
                                      f"zero_pp_rank_{rank}_mp_rank_00_{kind}.pt; it was written by {ranks} "
                                      f"processes); {_FIX}")
            if not zipfile.is_zipfile(found[0]):
                raise CheckpointError(f"resume: {found[0]} is truncated or damaged (not a complete torch archive); "
                                      f"{_FIX}")


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes with a tensor sha256, verified loads (see the module docstring).

    Args:
        expected: a zero-argument callable giving the ``{name: tensor}`` a checkpoint must fit, or ``None``.
    """

    def __init__(self, expected: Any = None) -> None:
        super().__init__()
        self.expected = expected

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        checkpoint = {**checkpoint, INTEGRITY_KEY: tensor_digest(checkpoint)}
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        expected = self.expected() if self.expected is not None else None
        ckpt = load_verified(path, expected, map_location=map_location or "cpu")
        ckpt.pop(INTEGRITY_KEY, None)
        return ckpt

