"""Run a recipe: build student, teachers and purifiers, train with Lightning, export the student with lineage.

``output_dir`` receives ``checkpoints/`` (Lightning checkpoints for resuming, written atomically), ``student/``
(``save_pretrained`` export, safetensors), ``lineage.json`` beside both, ``recipe.yaml`` and ``logs/`` (CSV, and
TensorBoard when installed).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from purify.assembly import Run, build_run, resolve_strategy
from purify.checkpoint import VerifiedCheckpointIO, load_verified
from purify.config import Recipe, to_yaml
from purify.lineage import write_lineage
from purify.storage import atomic_dir, atomic_write_text
from purify.types import RecipeError


class LineageCallback(Callback):
    """Writes ``lineage.json`` (with the current metrics) beside the checkpoints at every save."""

    def __init__(self, record: dict[str, Any], directory: Path) -> None:
        self.record, self.directory = record, directory

    def snapshot(self, trainer: L.Trainer) -> dict[str, Any]:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        return {**self.record, "metrics": metrics, "step": trainer.global_step}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            write_lineage(self.directory, {**self.snapshot(trainer), "status": "checkpoint"})


def _loggers(output_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(output_dir, name="logs", version="")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger
    except ImportError:
        return loggers
    loggers.append(TensorBoardLogger(output_dir, name="logs", version="tensorboard"))
    return loggers


def make_trainer(recipe: Recipe, callbacks: list[Callback], output_dir: Path | None,
                 expected: Any = None) -> L.Trainer:
    """A Lightning Trainer from the recipe's ``trainer`` and ``strategy`` sections.

    Args:
        recipe: the validated recipe.
        callbacks: Lightning callbacks.
        output_dir: where logs and checkpoints go (``None``: neither).
        expected: zero-argument callable giving the ``{name: tensor}`` a resumed checkpoint must fit
            (:class:`~purify.checkpoint.VerifiedCheckpointIO`).
    """
    t = recipe.trainer
    strategy = resolve_strategy(recipe)
    return L.Trainer(
        max_steps=t.max_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val, precision=t.precision, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, deterministic=t.deterministic, enable_progress_bar=t.enable_progress_bar,
        strategy=strategy, callbacks=callbacks, logger=_loggers(output_dir) if output_dir else False,
        plugins=[VerifiedCheckpointIO(expected)] if recipe.strategy in ("auto", "ddp") else None,
        enable_checkpointing=output_dir is not None, default_root_dir=output_dir, use_distributed_sampler=False,
        enable_model_summary=False,
    )


def export_student(run: Run, directory: Path, record: dict[str, Any]) -> Path:
    """``save_pretrained`` the student (safetensors) with its tokenizer and lineage, atomically.

    A LoRA student (``student.lora``) saves its adapter here, and with ``export_merged`` the merged model into
    ``<directory>-merged`` (:func:`purify.lora.export_lora`).
    """
    lora = run.recipe.student.lora
    if lora is not None:
        from purify.lora import export_lora

        merged = directory.with_name(f"{directory.name}-merged") if lora.export_merged else None
        export_lora(run.student.module, directory, record, run.student.tokenizer, merged)  # type: ignore[arg-type]
        return directory
    with atomic_dir(directory, replace=True) as tmp:
        module = run.student.module
        if hasattr(module, "save_pretrained"):
            module.save_pretrained(tmp, safe_serialization=True)
            if run.student.tokenizer is not None:
                run.student.tokenizer.save_pretrained(tmp)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / "model.safetensors")
            atomic_write_text(tmp / "config.json", json.dumps({"arch": run.recipe.student.arch,
                                                               "kwargs": run.recipe.student.kwargs}, indent=2))
        write_lineage(tmp, record)
    return directory


def train(recipe: Recipe) -> Path:
    """Train a recipe end to end; returns the output directory.

    ``lineage.json`` in ``output_dir`` carries ``status``: ``running`` while training, ``finished`` once the student
    is exported, ``failed`` (with ``error``, one line) when anything raised — so a run that died never looks
    finished, to a reader or to ``purify lineage show``. Nothing is written before the recipe is validated, every
    model built, the data sets read, the trainer settings accepted by Lightning and a ``resume`` checkpoint
    verified; an ``output_dir`` that already holds a run is refused unless the recipe resumes.
    """
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # frozen teachers, by design
    run = build_run(recipe)
    output_dir = Path(recipe.output_dir)
    # only on the launch's first process: a DDP launch's other ranks start after it wrote lineage.json
    if recipe.resume is None and rank_zero_only.rank == 0 and (output_dir / "lineage.json").is_file():
        raise RecipeError(f"output_dir: {output_dir} already holds a run (lineage.json); give a new output_dir, or "
                          f"resume={output_dir / 'checkpoints' / 'last.ckpt'} to continue that one")
    if recipe.resume is not None and recipe.strategy in ("auto", "ddp"):
        _check_resume(recipe, run)
    run.datamodule.setup("fit")  # a bad data file fails here, before any write (fit reuses the data sets)
    record: dict[str, Any] = {**run.lineage, "status": "running"}
    ckpt_dir = output_dir / "checkpoints"
    lineage_cb = LineageCallback(record, ckpt_dir)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", auto_insert_metric_name=False,
                                 every_n_train_steps=recipe.trainer.checkpoint_every_n_steps, save_top_k=-1,
                                 save_last=True)
    try:  # Lightning's own checks of the trainer settings (precision, accelerator, devices, ...), before any write
        trainer = make_trainer(recipe, [checkpoint, lineage_cb], output_dir, expected=run.distiller.trained_state)
    except (MisconfigurationException, ValueError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RecipeError(f"trainer: {reason}") from None
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "recipe.yaml", to_yaml(recipe))
    write_lineage(output_dir, record)
    try:
        trainer.fit(run.distiller, datamodule=run.datamodule, ckpt_path=recipe.resume)
        with _full_weights(run.student.module, recipe.strategy == "deepspeed_stage_3"):  # collective under ZeRO-3
            if trainer.is_global_zero:
                final = {**lineage_cb.snapshot(trainer), "status": "finished"}
                if recipe.export:
                    export_student(run, output_dir / "student", final)
                write_lineage(output_dir, final)
    except BaseException as err:
        if trainer.is_global_zero:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            failed = {**lineage_cb.snapshot(trainer), "status": "failed", "error": f"{type(err).__name__}: {reason}"}
            write_lineage(output_dir, failed)
        raise
    return output_dir


def _check_resume(recipe: Recipe, run: Run) -> None:
    """Refuse ``resume`` before anything is written: a checkpoint that is damaged or of another model
    (:func:`purify.checkpoint.load_verified`), or one already at or past ``trainer.max_steps``."""
    # the student's tensors only: purifier heads are built at set-up (the load-time check covers them)
    step = int(load_verified(recipe.resume, run.distiller.trained_state(), scope="student.")["global_step"])
    if step >= recipe.trainer.max_steps:
        raise RecipeError(f"resume: {recipe.resume} is at step {step}, and trainer.max_steps is "
                          f"{recipe.trainer.max_steps}: nothing left to train; raise trainer.max_steps above {step}")


def _full_weights(module: torch.nn.Module, sharded: bool) -> Any:
    """Context in which ``module`` holds its full weights on every rank (gathers ZeRO-3 shards)."""
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
