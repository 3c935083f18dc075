"""Run a recipe: build student, teachers and purifiers, train with Lightning, export the student with lineage.

``output_dir`` receives ``checkpoints/`` (Lightning checkpoints for resuming, written atomically), ``student/``
(``save_pretrained`` export, safetensors), ``lineage.json`` beside both, ``recipe.yaml`` and ``logs/`` (CSV, and
TensorBoard when installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from purify.config import Recipe, RecipeError, to_dict, to_yaml, validate
from purify.data import DistillDataModule, TeacherTokenizer
from purify.lineage import atomic_write_text, build_lineage, write_lineage
from purify.models import LoadedModel, build_model, same_tokenizer, state_sha256
from purify.module import Distiller
from purify.purifiers import build_purifier
from purify.storage import atomic_path
from purify.purifiers.cross_base import resolve_teachers


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temporary file and renames it, so a crash mid-save leaves the
    previous checkpoint intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning checkpoints hold optimizer state and plain containers; weights_only keeps loading safe.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


@dataclass
class Run:
    """Everything built from a recipe, before training."""

    recipe: Recipe
    distiller: Distiller
    datamodule: DistillDataModule
    student: LoadedModel
    teachers: list[LoadedModel]
    lineage: dict[str, Any]


def build_run(recipe: Recipe) -> Run:
    """Validate a recipe and build its models, purifiers, data module and lineage record (no training).

    Under ``deepspeed_stage_3`` the teachers are only described here (name, tokenizer, config): the Distiller builds
    them in ``configure_model`` and partitions them across ranks there, and their lineage ``sha256`` is filled in
    then (before the first checkpoint and the final lineage record). Under any DeepSpeed stage with a bf16
    ``trainer.precision`` the frozen teachers are cast to bf16 (ZeRO-1/2: one bf16 replica per rank; ZeRO-3: bf16
    shards); the student's precision is the strategy's business.
    """
    purifier_configs = validate(recipe)
    resolve_strategy(recipe)  # fail on an impossible strategy before any model is built
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    student = build_model(recipe.student, recipe.seed)
    sharded = recipe.strategy == "deepspeed_stage_3"
    teachers = [build_model(spec, recipe.seed, deferred=True) if sharded else build_model(spec, recipe.seed)
                for spec in recipe.teachers]
    cross = _cross_base_teachers(purifier_configs, student, teachers)
    purifiers = [build_purifier(c) for c in purifier_configs]
    records = [{"name": t.name, "source": t.source, "tokenizer": t.tokenizer_source, "weight": s.weight,
                "sha256": state_sha256(t.module) if t.module is not None else None}
               for t, s in zip(teachers, recipe.teachers)]

    def build_teachers() -> list[torch.nn.Module]:
        """The deferred teachers, built; their hashes go into the lineage record (shared with the callback)."""
        for t, record in zip(teachers, records):
            record["sha256"] = state_sha256(t.build())
        return [t.module for t in teachers]  # type: ignore[misc]

    bf16 = recipe.strategy.startswith("deepspeed") and recipe.trainer.precision.startswith("bf16")
    distiller = Distiller(student.module, build_teachers if sharded else [t.module for t in teachers],
                          loss=recipe.loss, purifiers=purifiers, optim=recipe.optim, scheduler=recipe.scheduler,
                          teacher_names=[t.name for t in teachers],
                          teacher_weights=[s.weight for s in recipe.teachers], total_steps=recipe.trainer.max_steps,
                          student_tokenizer=student.tokenizer, teacher_tokenizers=[t.tokenizer for t in teachers],
                          teacher_dtype=torch.bfloat16 if bf16 else None)
    datamodule = DistillDataModule(recipe.data, student.tokenizer, recipe.seed, recipe.trainer.accumulate_grad_batches,
                                   teacher_tokenizers=cross or None)
    caches = [(i, spec) for i, spec in enumerate(recipe.teachers) if spec.cache is not None]
    if caches:  # refuse a cache written for other data or another tokenizer before training starts
        from purify.cache import check_cache

        datamodule.setup("fit")
        splits = {"train": datamodule.train_dataset, "val": datamodule.val_dataset}
        for i, spec in caches:
            check_cache(spec.cache, student.tokenizer, splits, f"teachers[{i}].cache")
    lineage = build_lineage(
        student={"name": student.name, "source": student.source, "tokenizer": student.tokenizer_source,
                 "init_sha256": state_sha256(student.module)},
        teachers=records,
        data=[recipe.data.train] + ([recipe.data.val] if recipe.data.val else []),
        purifiers=[to_dict(c) for c in purifier_configs],
        recipe=to_dict(recipe),
    )
    return Run(recipe, distiller, datamodule, student, teachers, lineage)


def _cross_base_teachers(purifier_configs: list[Any], student: LoadedModel,
                         teachers: list[LoadedModel]) -> dict[int, TeacherTokenizer]:
    """The teachers whose tokenizer differs from the student's, each with its tokenizer and position limit.

    Raises:
        RecipeError: if such a teacher is not aligned by a ``cross_base`` purifier.
    """
    differing = [i for i, t in enumerate(teachers) if not same_tokenizer(student.tokenizer, t.tokenizer)]
    where = next((k for k, c in enumerate(purifier_configs) if c.name == "cross_base"), None)
    for i in differing:
        if where is None:
            raise RecipeError(f"teachers[{i}].tokenizer: differs from the student's tokenizer; use the same "
                              "tokenizer or add a cross_base purifier to align vocabularies")
        if i not in resolve_teachers(purifier_configs[where].teachers, [t.name for t in teachers], differing):
            raise RecipeError(f"teachers[{i}].tokenizer: differs from the student's tokenizer but purifiers[{where}] "
                              f"(cross_base) does not align it; add {i} to purifiers[{where}].teachers or leave "
                              "teachers unset to align every such teacher")
    limits = {i: getattr(teachers[i].config, "max_position_embeddings", None) for i in differing}
    return {i: TeacherTokenizer(teachers[i].tokenizer, limits[i]) for i in differing}


class LineageCallback(Callback):
    """Writes ``lineage.json`` (with the current metrics) beside the checkpoints at every save."""

    def __init__(self, record: dict[str, Any], directory: Path) -> None:
        self.record, self.directory = record, directory

    def snapshot(self, trainer: L.Trainer) -> dict[str, Any]:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        return {**self.record, "metrics": metrics, "step": trainer.global_step}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            write_lineage(self.directory, self.snapshot(trainer))


def _loggers(output_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(output_dir, name="logs", version="")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger
    except ImportError:
        return loggers
    loggers.append(TensorBoardLogger(output_dir, name="logs", version="tensorboard"))
    return loggers


def resolve_strategy(recipe: Recipe) -> Any:
    """The Lightning ``strategy=`` for the recipe; impossible settings raise :class:`RecipeError`."""
    from purify.strategy import build_strategy

    t = recipe.trainer
    try:
        return build_strategy(recipe.strategy, offload_optimizer=recipe.deepspeed.offload_optimizer,
                              offload_parameters=recipe.deepspeed.offload_parameters,
                              deepspeed_config=recipe.deepspeed.config, accelerator=t.accelerator,
                              devices=t.devices, logging_batch_size_per_gpu=recipe.data.batch_size,
                              exclude_frozen_parameters=True)  # teachers are rebuilt from the recipe
    except ValueError as err:
        raise RecipeError(str(err)) from None


def make_trainer(recipe: Recipe, callbacks: list[Callback], output_dir: Path | None) -> L.Trainer:
    """A Lightning Trainer from the recipe's ``trainer`` and ``strategy`` sections."""
    t = recipe.trainer
    strategy = resolve_strategy(recipe)
    return L.Trainer(
        max_steps=t.max_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val, precision=t.precision, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, deterministic=t.deterministic, enable_progress_bar=t.enable_progress_bar,
        strategy=strategy, callbacks=callbacks, logger=_loggers(output_dir) if output_dir else False,
        plugins=[AtomicCheckpointIO()] if recipe.strategy == "auto" or recipe.strategy == "ddp" else None,
        enable_checkpointing=output_dir is not None, default_root_dir=output_dir, use_distributed_sampler=False,
        enable_model_summary=False,
    )


def export_student(run: Run, directory: Path, record: dict[str, Any]) -> Path:
    """``save_pretrained`` the student (safetensors) with its tokenizer and lineage, atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
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
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def train(recipe: Recipe) -> Path:
    """Train a recipe end to end; returns the output directory."""
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # frozen teachers, by design
    run = build_run(recipe)
    output_dir = Path(recipe.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "recipe.yaml", to_yaml(recipe))
    write_lineage(output_dir, run.lineage)
    ckpt_dir = output_dir / "checkpoints"
    lineage_cb = LineageCallback(run.lineage, ckpt_dir)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", auto_insert_metric_name=False,
                                 every_n_train_steps=recipe.trainer.checkpoint_every_n_steps, save_top_k=-1,
                                 save_last=True)
    trainer = make_trainer(recipe, [checkpoint, lineage_cb], output_dir)
    trainer.fit(run.distiller, datamodule=run.datamodule, ckpt_path=recipe.resume)
    with _full_weights(run.student.module, recipe.strategy == "deepspeed_stage_3"):  # collective under ZeRO-3
        if trainer.is_global_zero:
            record = lineage_cb.snapshot(trainer)
            write_lineage(output_dir, record)
            if recipe.export:
                export_student(run, output_dir / "student", record)
    return output_dir


def _full_weights(module: torch.nn.Module, sharded: bool) -> Any:
    """Context in which ``module`` holds its full weights on every rank (gathers ZeRO-3 shards)."""
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
