"""Run a recipe: build student, teachers and purifiers, train with Lightning, export the student with lineage.

``output_dir`` receives ``checkpoints/`` (Lightning checkpoints for resuming, written atomically), ``student/``
(``save_pretrained`` export, safetensors), ``lineage.json`` beside both, ``recipe.yaml`` and ``logs/`` (CSV, and
TensorBoard when installed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from purify.assembly import Run, build_run, resolve_strategy
from purify.cache import MANIFEST, PLAN
from purify.checkpoint import INTEGRITY_KEY, CheckpointError, VerifiedCheckpointIO, deepspeed_step, load_verified
from purify.config import Recipe, to_yaml
from purify.lineage import LineageError, read_lineage, write_lineage
from purify.lora import is_lora
from purify.stopping import sigterm_stops
from purify.storage import atomic_dir, atomic_write_text, cannot_write_under, peek_checkpoint, remove_leftovers
from purify.types import RecipeError, TrainingStopped, first_line

CHECKPOINT_LINEAGE = "purify_lineage"
"""Checkpoint key of the record of the run that wrote it (its lineage.json at the time, without metrics)."""


class LineageCallback(Callback):
    """Writes ``lineage.json`` (with the current metrics) beside the checkpoints at every save."""

    def __init__(self, record: dict[str, Any], directory: Path) -> None:
        self.record, self.directory = record, directory
        self.validated_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step

    def snapshot(self, trainer: L.Trainer) -> dict[str, Any]:
        """The record with the latest metrics and the step; ``val/*`` metrics are the latest validation's, whose step
        ``validated_at_step`` gives (a checkpoint is written before the validation of its own step)."""
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if not metrics:  # nothing logged by this launch yet: the run's metrics so far, if the record holds them
            return {"metrics": {}, **self.record, "step": trainer.global_step}
        validated = {"validated_at_step": self.validated_at} if any(k.startswith("val/") for k in metrics) else {}
        earlier = {k: v for k, v in self.record.items() if k not in ("metrics", "validated_at_step")}
        return {**earlier, "metrics": metrics, **validated, "step": trainer.global_step}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        snapshot = self.snapshot(trainer)
        # the checkpoint carries its run's record: a copy elsewhere still says which run trained it (resumed_from)
        checkpoint[CHECKPOINT_LINEAGE] = {k: v for k, v in snapshot.items() if k != "metrics"}
        if trainer.is_global_zero:
            write_lineage(self.directory, {**snapshot, "status": "checkpoint"})


class SigtermAtStepEnd(Callback):
    """A SIGTERM stops every rank at the same step, without a collective inside a signal handler.

    Lightning's SIGTERM handler broadcasts from rank 0 inside the handler, which pairs with whatever collective the
    other ranks are in: a SIGTERM that reaches rank 0 while it writes a checkpoint (the other ranks wait at the
    barrier after it) hangs the job for good. This callback puts its own handler in Lightning's place (in ``setup``,
    before Lightning registers it): it records the signal and forwards it to the processes Lightning launched, as
    Lightning's does; one process sets Lightning's ``received_sigterm`` at once (Lightning's behaviour); several
    all-reduce the flag at the end of each training step (where every rank takes part) and, if any rank was
    signalled, all set ``received_sigterm`` together, so Lightning's loop stops them at the same step
    (``SIGTERMException``). :attr:`signalled` also tells a caller about a signal that came after the last step."""

    def __init__(self) -> None:
        self.signalled = False
        self.arm: Callable[[], None] | None = None  # purify's own handler until Lightning's: _sigterm_raises'

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.arm is not None:  # the processes have met: the set-up that follows (models, restore) may take minutes
            self.arm()
        connector = trainer._signal_connector

        def record(signum: int, frame: Any) -> None:
            if not self.signalled and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)  # the ranks this process launched
            self.signalled = True
            if trainer.world_size < 2:
                connector.received_sigterm = True

        connector._sigterm_notifier_fn = record  # what Lightning registers for SIGTERM (restored at its teardown)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.world_size < 2 or not torch.distributed.is_initialized():
            return
        flag = torch.tensor([1.0 if self.signalled else 0.0], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            trainer._signal_connector.received_sigterm = True  # read by Lightning's loop at this step's end


def _loggers(output_dir: Path, resume: bool = False) -> list[Logger]:
    """CSV (``logs/metrics.csv``) and TensorBoard when installed. A resumed run that finds ``logs/metrics.csv`` writes
    its rows to ``logs/resumed-<k>/metrics.csv`` (the first unused ``k``): Lightning's CSV logger would otherwise
    delete the rows logged before the checkpoint."""
    version = ""
    if resume and (output_dir / "logs" / "metrics.csv").is_file():
        version = next(f"resumed-{k}" for k in range(1, 10_000) if not (output_dir / "logs" / f"resumed-{k}").exists())
    loggers: list[Logger] = [CSVLogger(output_dir, name="logs", version=version)]
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
    plugins: list[Any] = [VerifiedCheckpointIO(expected)] if recipe.strategy in ("auto", "ddp") else []
    if SLURMEnvironment.detect():  # purify resumes its runs (resume=, its checks): Lightning's requeue on SIGUSR1
        plugins.append(SLURMEnvironment(auto_requeue=False))  # wrote hpc_ckpt_*.ckpt into the run, which no resume took
    return L.Trainer(
        max_steps=t.max_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches, check_val_every_n_epoch=None,
        limit_val_batches=1.0 if t.limit_val_batches else 0, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val, precision=t.precision, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, deterministic=t.deterministic, enable_progress_bar=t.enable_progress_bar,
        strategy=strategy, callbacks=callbacks,
        logger=_loggers(output_dir, recipe.resume is not None) if output_dir else False,
        plugins=plugins or None,
        enable_checkpointing=output_dir is not None, default_root_dir=output_dir, use_distributed_sampler=False,
        enable_model_summary=False,
    )


def export_student(run: Run, directory: Path, record: dict[str, Any]) -> Path:
    """``save_pretrained`` the student (safetensors) with its tokenizer and lineage, atomically.

    A LoRA student (``student.lora``) saves its adapter here, and with ``export_merged`` the merged model into
    ``<directory>-merged`` (:func:`purify.lora.export_lora`).
    """
    lora = run.recipe.student.lora
    for final in (directory, directory.with_name(f"{directory.name}-merged")):  # a launch killed while exporting
        remove_leftovers(final)
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
    with _slurm_usr1_as_sigterm():  # a Slurm job's pre-emption notice, from the models' build to the export
        return _train(recipe)


def _train(recipe: Recipe) -> Path:
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # frozen teachers, by design
    blocked = rank_zero_only.rank == 0 and cannot_write_under(recipe.output_dir)
    if blocked:  # a read-only file system was an OSError traceback after every model was built
        raise RecipeError(f"output_dir: {blocked}; give a directory you can write (created if missing)")
    # a SIGTERM before anything is written (a first use pretraining a base into purify's cache, a resume check hashing
    # a checkpoint, the data tokenised) ends here with one line (the launch's first process says it), temporary
    # directories removed; from the fit's set-up on, _sigterm_raises and Lightning's handler stop the run
    first = rank_zero_only.rank == 0
    with sigterm_stops(f"before training; nothing was written to {recipe.output_dir}", report=first):
        run = build_run(recipe)
        output_dir = Path(recipe.output_dir)
        # what the run directory holds is read by the launch's first process only: a DDP launch's other ranks start
        # after it rewrote lineage.json. A run left unfinished there (stopped or killed while exporting) may be
        # resumed at max_steps to export it.
        held = _held_in_place(output_dir, recipe.resume) if first else None
        finishing = held.get("status") != "finished" if held is not None else not first
        step, digest, written_by = _check_resume(recipe, run, finishing) if recipe.resume is not None else (None,) * 3
        cache = next((name for name in (MANIFEST, PLAN) if (output_dir / name).is_file()), None) if first else None
        if cache:  # `purify cache` refuses the reverse
            raise RecipeError(f"output_dir: {output_dir} holds a logit cache ({cache}); give the run a directory of "
                              "its own (the cache could no longer be resumed or rewritten there)")
        existed = first and (output_dir / "lineage.json").is_file()
        if existed:
            _check_existing_run(output_dir, recipe, step, run.lineage)
        run.datamodule.setup("fit")  # a bad data file fails here, before any write (fit reuses the data sets)
        record: dict[str, Any] = {**run.lineage, "status": "running"}
        if held is not None and step is not None:  # continued in place (_check_existing_run let it through)
            record["segments"] = _segments(held, recipe, step)
            if "resumed_from" in held:  # where its first launch started
                record["resumed_from"] = held["resumed_from"]
            # what the run measured up to here, until this launch logs its own: a launch that only exports (its export
            # was stopped) keeps them in each record it writes, so a second stopped export no longer loses them
            record.update(_trained_metrics(held, output_dir / "checkpoints", step))
        elif step is not None:  # another run's checkpoint continued here: what it was, before it moves on
            record["segments"] = [{"resume": recipe.resume, "from_step": step, "max_steps": recipe.trainer.max_steps}]
            record["resumed_from"] = _resumed_from(Path(recipe.resume), step, digest, written_by)
        ckpt_dir = output_dir / "checkpoints"
        lineage_cb = LineageCallback(record, ckpt_dir)
        # a resumed run continues its own checkpoints (no `-v1` copies beside them): _check_existing_run allows resuming
        # into a run's directory only from its latest checkpoint, so nothing older is rewritten
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", auto_insert_metric_name=False,
                                     every_n_train_steps=recipe.trainer.checkpoint_every_n_steps, save_top_k=-1,
                                     save_last=True, enable_version_counter=False)
        try:  # Lightning's own checks of the trainer settings (precision, accelerator, devices, ...), before any write
            sigterm = SigtermAtStepEnd()
            trainer = make_trainer(recipe, [checkpoint, lineage_cb, sigterm], output_dir,
                                   expected=run.distiller.trained_state)
        except (MisconfigurationException, ValueError, TypeError, ImportError) as err:  # ImportError: a precision
            raise RecipeError(f"trainer: {first_line(err)}") from None  # plugin's package (transformer-engine)
        asked, ran = str(recipe.trainer.precision), str(trainer.precision)
        if asked in ("16", "16-mixed") and ran != "16-mixed":  # accelerator auto on a CPU: Lightning substitutes bf16
            device = type(trainer.accelerator).__name__
            raise RecipeError(f"trainer.precision: {asked} runs as {ran} on this machine ({device}: no float16 "
                              "autocast), while the record would say 16-mixed; give bf16-mixed (or 32-true) here")
    output_dir.mkdir(parents=True, exist_ok=True)
    claim = _claim(output_dir) if first else None  # held until this launch ends: one launch at a time writes a run
    try:
        if first and not existed and (output_dir / "lineage.json").is_file():  # a launch started beside this one
            _check_existing_run(output_dir, recipe, step, run.lineage)        # wrote it after the check above
        atomic_write_text(output_dir / "recipe.yaml", to_yaml(recipe))
        write_lineage(output_dir, record)
    except BaseException:
        _release(claim)
        raise
    trained = False
    try:
        # Lightning's handler comes at the end of the fit's set-up (strategy, configure_model, the checkpoint's
        # restore: minutes for a large model): a SIGTERM before it killed the run silently, its record "running";
        # purify's is armed once the processes have met (SigtermAtStepEnd.setup)
        with _sigterm_raises(trainer, armed=False) as sigterm.arm:
            trainer.fit(run.distiller, datamodule=run.datamodule, ckpt_path=recipe.resume)
        if sigterm.signalled:  # after the last step (final validation or checkpoint): stop before exporting
            raise SIGTERMException()
        trained = True
        # a SIGTERM while the run is exported stops it as during the fit (Lightning's handler is gone by now)
        with _sigterm_raises(trainer), _full_weights(run.student.module, recipe.strategy == "deepspeed_stage_3"):
            if trainer.is_global_zero:
                final = {**lineage_cb.snapshot(trainer), "status": "finished"}  # exported without training: the
                # metrics of the launch that trained it, which the record carries (_trained_metrics)
                if recipe.export:
                    export_student(run, output_dir / "student", final)
                write_lineage(output_dir, final)
    except BaseException as err:
        signum = _stop_signal(err)
        reason = f"stopped by {signal.Signals(signum).name}" if signum else \
            f"{type(err).__name__}: {first_line(err)}"
        at = max(trainer.global_step, step or 0)  # stopped before the checkpoint's restore: the step it resumes
        said = f"{output_dir / 'lineage.json'} says status: failed"
        if trainer.is_global_zero:
            try:
                write_lineage(output_dir, {**lineage_cb.snapshot(trainer), "step": at, "status": "failed",
                                           "error": reason})
            except OSError as unwritten:  # the full disk that stopped the run refuses its record too: said below
                if not (signum or isinstance(err, OSError)):
                    raise
                said = f"{output_dir / 'lineage.json'} could not be rewritten ({unwritten.strerror or unwritten})"
        latest = latest_checkpoint(ckpt_dir)
        where = (f"while exporting (training had finished, step {at})" if trained else f"at step {at}")
        todo = "to export it" if trained else "to continue"
        if signum:  # Lightning ends a signalled fit with SystemExit (SIGTERM: no code, i.e. a success to the shell)
            raise TrainingStopped(f"train: {reason} {where}; {said}; " + (f"resume={latest} {todo}" if latest else
                                                                        "no checkpoint was written yet"),
                                  128 + signum, report=trainer.is_global_zero) from None
        if isinstance(err, OSError) and err.errno in WRITE_FAILURES:  # a full disk: a traceback before
            what = f"{err.filename}: " if err.filename else ""
            then = f"resume={latest} {todo}" if latest else "start it again (no checkpoint was written yet)"
            raise TrainingStopped(f"train: cannot write ({what}{err.strerror}) {where}; {said}; free space or fix the "
                                  f"file system, then {then}", 1, report=trainer.is_global_zero) from None
        raise
    finally:
        _release(claim)
    return output_dir


WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})
"""The ``errno`` of a write the file system refused (full, over quota, read-only, failing): one line naming the
checkpoint to resume from. Any other ``OSError`` (a data file gone) keeps its traceback."""


def _trained_metrics(held: dict[str, Any] | None, ckpt_dir: Path, step: int) -> dict[str, Any]:
    """``metrics`` and ``validated_at_step`` of a run continued in place from ``step``, until the new launch logs its
    own (one that only exports, its export having been stopped, never does): those of the record the run left at
    ``step`` — its own ``lineage.json`` (``held``; written as it stopped, after the last validation) before the
    record its last checkpoint wrote (as the save began, so its ``val/*`` are an earlier validation's, which
    ``validated_at_step`` says: it was dropped, and they read as the final step's)."""
    records = [held or {}] + ([read_lineage(ckpt_dir / "lineage.json")] if (ckpt_dir / "lineage.json").is_file()
                              else [])
    for record in records:
        if record.get("metrics") and record.get("step") == step:
            return {key: record[key] for key in ("metrics", "validated_at_step") if key in record}
    return {}


def _claim(output_dir: Path) -> int | None:
    """An exclusive lock on ``output_dir`` (``flock`` on the directory itself: no file left behind, released when
    the process ends, however it ends), held by a launch's first process while it writes the run. Two launches
    started together (a requeued job beside its old allocation, a job array sharing a directory) both passed the
    existing-run checks and wrote one directory: one recipe.yaml beside the other's lineage.json.

    Returns the locked descriptor, or ``None`` on a file system that does not lock (the launch goes on unclaimed).

    Raises:
        RecipeError: another launch holds it.
    """
    import errno
    import fcntl

    fd = os.open(output_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # a file system without flock (some
            return None                                                        # Lustre/NFS mounts): no claim
        raise RecipeError(f"output_dir: another launch is writing {output_dir} right now; wait for it to end (then "
                          "resume= its latest checkpoint to continue it), or give a new output_dir") from None
    return fd


def _release(claim: int | None) -> None:
    if claim is not None:
        os.close(claim)  # closing the descriptor drops the lock


@contextlib.contextmanager
def _sigterm_raises(trainer: L.Trainer, armed: bool = True) -> Iterator[Callable[[], None]]:
    """Within: SIGTERM raises Lightning's ``SIGTERMException`` (read by :func:`_stop_signal`) instead of killing the
    process with ``lineage.json`` saying ``running``, after forwarding it to the ranks ``trainer`` launched (they may
    be waiting in a collective, e.g. ZeRO-3's gather of the weights). While Lightning's own handler is installed
    (which calls the handler it found, this one, after its own) it does nothing: that handler stops the fit at a
    step's end. Only on the main thread (where Python takes signals).

    Args:
        armed: install it at once; else when the yielded ``arm()`` is called — the fit's, from
            :class:`SigtermAtStepEnd`'s ``setup``, after the processes' rendezvous, where a Python handler cannot run
            (a launch whose ranks never meet waited out the rendezvous timeout; the default action ends it).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def stop(signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGTERM) is not stop:  # called by Lightning's handler, which is in charge
            return
        if trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)
        raise SIGTERMException()

    def arm() -> None:
        signal.signal(signal.SIGTERM, stop)

    previous = signal.getsignal(signal.SIGTERM)
    if armed:
        arm()
    try:
        yield arm
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _slurm_usr1_as_sigterm() -> Iterator[None]:
    """Inside a Slurm job, within: SIGUSR1 (``--signal=USR1@90``, the pre-emption notice Lightning's docs set up) is
    a SIGTERM, which stops the fit at a step's end. With Lightning's auto-requeue off (:func:`make_trainer`) nothing
    else handles it, and its default action killed the run without a line, its record ``running``. Main thread only;
    a handler the user installed stays."""
    import threading

    if (not SLURMEnvironment.detect() or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL):
        yield
        return
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _stop_signal(err: BaseException) -> int | None:
    """The signal that stopped a fit: SIGTERM (Lightning's ``SIGTERMException``, e.g. a scheduler's preemption) or
    SIGINT (Ctrl-C, which Lightning turns into ``SystemExit(1)``); ``None`` for any other failure."""
    if isinstance(err, SIGTERMException):
        return int(signal.SIGTERM)
    if isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and isinstance(err.__context__,
                                                                                          KeyboardInterrupt)):
        return int(signal.SIGINT)
    return None


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """A run's checkpoint to continue from (:func:`_resumable`'s path): ``last.ckpt``, unless a ``step<N>.ckpt`` is
    further on (a kill between Lightning's two writes leaves ``last.ckpt`` one checkpoint behind: advising it looped,
    as resuming from it is refused); ``None`` when there is none."""
    found = _resumable(ckpt_dir)
    return found[1] if found else None


def _resumable(ckpt_dir: Path) -> tuple[int | None, Path] | None:
    """The furthest whole checkpoint in ``ckpt_dir`` and its step, ``last.ckpt`` on a tie. A file checkpoint is
    written whole (``step<N>.ckpt`` by its name, ``last.ckpt`` by its own step; a ``last.ckpt`` whose step cannot be
    read is taken, step ``None``, and its load says what is wrong); a DeepSpeed directory is written a shard at a
    time, so it counts only when :func:`purify.checkpoint.deepspeed_step` finds it sound (``last.ckpt``, then from the
    furthest ``step<N>`` down: usually one or two memory-mapped reads of its model states). One reading for the
    advice and for the resume check: they named ``last.ckpt`` of a DeepSpeed run that a further ``step<N>``
    directory made the check refuse."""
    named = sorted(((int(m.group(1)), p) for p in ckpt_dir.glob("step*.ckpt")
                    if (m := re.fullmatch(r"step(\d+)\.ckpt", p.name))), key=lambda item: item[0], reverse=True)
    furthest = None
    for at, path in named:
        if path.is_file() or _sound(path) is not None:
            furthest = (at, path)
            break
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        at = _saved_step(last)
        if at is None or furthest is None or at >= furthest[0]:
            return at, last
    elif last.is_dir() and (at := _sound(last)) is not None and (furthest is None or at >= furthest[0]):
        return at, last
    return furthest


def _sound(path: Path) -> int | None:
    """The step of a DeepSpeed checkpoint directory that :func:`purify.checkpoint.deepspeed_step` finds whole."""
    try:
        return deepspeed_step(path)[0]
    except CheckpointError:
        return None


def _saved_step(path: Path) -> int | None:
    """The ``global_step`` a checkpoint file holds (:func:`purify.storage.peek_checkpoint`: not read in full);
    ``None`` for a DeepSpeed directory or a file that cannot be read so."""
    step = (peek_checkpoint(path) or {}).get("global_step")
    return step if isinstance(step, int) else None


CONTINUABLE = ("resume", "export", "trainer.max_steps", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
               "trainer.val_check_interval", "trainer.limit_val_batches", "trainer.checkpoint_every_n_steps")
"""Recipe keys a run continued in its own directory may change (how long it trains, what it logs and saves); any
other change would make its ``recipe.yaml`` and ``lineage.json`` describe training it did not have."""


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def _changed_keys(output_dir: Path, recipe: Recipe) -> list[str]:
    """The recipe keys outside :data:`CONTINUABLE` whose values differ from the run's stored ``recipe.yaml`` (with
    ``data.global_batch_size`` set, the process count too may change: the samples per step stay the same)."""
    # output_dir: the directory the run is in, however it is spelt (relative, absolute, through a link, moved)
    # data.batch_size is derived from it then (per process): it changes with the process count
    continuable = CONTINUABLE + ("output_dir",) + (("trainer.devices", "trainer.num_nodes", "data.batch_size")
                                                   if recipe.data.global_batch_size else ())
    stored_file = output_dir / "recipe.yaml"
    if not stored_file.is_file():
        return []
    try:
        stored = _flat(yaml.safe_load(stored_file.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RecipeError(f"resume: {stored_file} cannot be read ({first_line(err)}); it records the run being "
                          "continued: restore it, or give a new output_dir") from None
    now = _flat(yaml.safe_load(to_yaml(recipe)))
    return sorted(k for k in stored.keys() | now.keys()
                  if stored.get(k) != now.get(k) and not any(k == c or k.startswith(c + ".") for c in continuable))


def _segments(before: dict[str, Any], recipe: Recipe, step: int) -> list[dict[str, Any]]:
    """A run continued in place: its launches so far and this one, each as ``{"resume", "from_step", "max_steps"}``
    (a launch trains from ``from_step`` to the next one's; ``max_steps`` is what its learning-rate schedule and
    purifier ramps were planned over, so a run given more ``trainer.max_steps`` says that its first steps followed the
    shorter plan). The first launch's ``from_step`` is 0; where it resumed another run's checkpoint, its record
    already lists it (with that checkpoint's step), or — a run recorded before that — it has no ``from_step``."""
    first = before.get("recipe") or {}
    earlier = before.get("segments") or [{"resume": first.get("resume"),
                                          **({"from_step": 0} if first.get("resume") is None else {}),
                                          "max_steps": (first.get("trainer") or {}).get("max_steps")}]
    return [*earlier, {"resume": recipe.resume, "from_step": step, "max_steps": recipe.trainer.max_steps}]


def _check_existing_run(output_dir: Path, recipe: Recipe, step: int | None,
                        built: dict[str, Any] | None = None) -> None:
    """Refuse, before anything is written, a launch that would overwrite the run ``output_dir`` already holds: a
    fresh start; a ``resume`` from another directory's checkpoint; one from an earlier step than the run's furthest
    whole checkpoint on disk (:func:`_resumable`; ``checkpoints/lineage.json``'s step only where none says; ``step``
    is the checkpoint's); or one whose recipe differs from the run's beyond :data:`CONTINUABLE` (teachers, loss,
    seed, data…: its record would describe training it did not have), or whose data, teachers, purifier source files
    or student base at the same paths now hold other contents (their sha256 in ``built``, this launch's lineage
    record, against the run's ``lineage.json``). Resuming from the latest
    checkpoint — an interrupted run, or a finished one given more ``trainer.max_steps`` — with the same recipe and
    inputs continues the run in place."""
    resume = recipe.resume
    ckpt_dir = output_dir / "checkpoints"
    # the run's furthest step is its furthest checkpoint on disk (read once: a DeepSpeed one loads its model states):
    # checkpoints/lineage.json is written as a save begins, so a launch killed mid-save (or a full disk) left it one
    # save ahead of every file, and it refused each resume, its advice (resume= the latest checkpoint) included; the
    # record's step only where no file says
    last, latest = _resumable(ckpt_dir) or (None, None)
    to_continue = f"resume={latest} to continue that one" if latest else \
        "it has no checkpoint to continue from (remove it to start again)"
    if resume is None:
        raise RecipeError(f"output_dir: {output_dir} already holds a run (lineage.json); give a new output_dir, or "
                          f"{to_continue}")
    if not _in_place(output_dir, resume):
        raise RecipeError(f"resume: {resume} is not a checkpoint of {output_dir}, which already holds another run; "
                          f"give a new output_dir to continue from {resume}, or {to_continue}")
    recorded = ckpt_dir / "lineage.json"
    if last is None and recorded.is_file():
        last = read_lineage(recorded).get("step")
    if step is not None and isinstance(last, int) and step < last:
        raise RecipeError(f"resume: {resume} is at step {step}, but {output_dir} holds that run up to step {last}; "
                          f"resuming there would overwrite it: give a new output_dir to replay from step {step}, or "
                          f"{to_continue}")
    changed = _changed_keys(output_dir, recipe)
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise RecipeError(f"resume: the recipe differs from the one {output_dir} was trained with ({shown}); "
                          "continuing in place would record one run that never was: give a new output_dir (with this "
                          f"resume=) for the changed recipe, or keep {output_dir / 'recipe.yaml'} (only "
                          "trainer.max_steps and logging/checkpoint settings may change; the process count too where "
                          "data.global_batch_size is set)")
    stale = [p.name for p in (output_dir / "student", output_dir / "student-merged") if p.exists()]
    if stale and not recipe.export:  # the old export would sit beside a record of a later step, marked finished
        raise RecipeError(f"export: false would leave {output_dir}'s {' and '.join(stale)} (an earlier step's export) "
                          "beside the continued run's record; keep export: true, or move it out first")
    swapped = _changed_contents(read_lineage(output_dir / "lineage.json"), built or {})
    if swapped:
        raise RecipeError(f"resume: {', '.join(swapped)} changed since {output_dir} was trained (same path, other "
                          "contents: the sha256 differs from its lineage.json); continuing in place would record one "
                          "run that never was: restore them, or give a new output_dir (with this resume=)")


def _changed_contents(held: dict[str, Any], built: dict[str, Any]) -> list[str]:
    """What a lineage record names by sha256 — data files, teachers, logit caches, purifiers' source files, the
    student's initial weights — whose hash in ``built`` differs from ``held``'s (a hash missing on either side, e.g.
    a ZeRO-3 teacher not yet built, is not compared)."""
    def hashes(record: dict[str, Any]) -> dict[str, Any]:
        out = {f"data file {d.get('path')}": d.get("sha256") for d in record.get("data") or [] if isinstance(d, dict)}
        out |= {f"teachers[{i}] ({t.get('name')})": t.get("sha256")
                for i, t in enumerate(record.get("teachers") or []) if isinstance(t, dict)}
        out |= {f"teachers[{i}]'s logit cache {t['cache'].get('path')}":
                t["cache"].get("manifest_sha256") for i, t in enumerate(record.get("teachers") or [])
                if isinstance(t, dict) and isinstance(t.get("cache"), dict)}
        out |= {f"purifiers[{i}]'s source {p.get('source')}": p.get("source_sha256")  # a neutral-text file
                for i, p in enumerate(record.get("purifiers") or []) if isinstance(p, dict)}
        out["the student's initial weights"] = (record.get("student") or {}).get("init_sha256")
        return out
    before, now = hashes(held), hashes(built)
    return [k for k, v in before.items() if v and now.get(k) and now[k] != v]


def _in_place(output_dir: Path, resume: str) -> bool:
    """Whether checkpoint ``resume`` is one of ``output_dir``'s own (the run would continue in place)."""
    return Path(resume).resolve().parent == (output_dir / "checkpoints").resolve()


def _held_in_place(output_dir: Path, resume: str | None) -> dict[str, Any] | None:
    """The ``lineage.json`` record of the run ``resume`` continues in place, read once (whether it finished — one
    stopped or killed while exporting is ``failed`` or still ``running`` —, and its launches so far); ``None`` when
    the launch does not continue a run of ``output_dir``."""
    record = output_dir / "lineage.json"
    if resume is None or not record.is_file() or not _in_place(output_dir, resume):
        return None
    return read_lineage(record)


def _resumed_from(checkpoint: Path, step: int, digest: str | None,
                  written_by: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run started from another run's checkpoint: the checkpoint (path, step, the sha256 of its tensors as recorded
    when it was written — a ``last.ckpt`` is rewritten as its run goes on) and that run's own record at the time
    (its ``lineage.json``: teachers, loss, data, its own ``resumed_from``), so the new record describes every step.
    That record is the one the checkpoint carries (``written_by``), else — a checkpoint written before they carried
    one, or a DeepSpeed directory — the one of the run directory it sits in (a copy in another run's directory was
    credited to that run)."""
    if written_by is not None:
        recipe = written_by.get("recipe")
        run_dir, source = recipe.get("output_dir") if isinstance(recipe, dict) else None, written_by
    else:
        run_dir = checkpoint.resolve().parent.parent
        try:  # a damaged or missing record there does not stop the resume: the checkpoint itself was verified
            source = read_lineage(run_dir / "lineage.json") if (run_dir / "lineage.json").is_file() else None
        except (LineageError, OSError):
            source = None
        run_dir = run_dir if source is not None else None
    return {"checkpoint": str(checkpoint.resolve()), "step": step, "tensors_sha256": digest,
            "run": str(run_dir) if run_dir else None,
            "run_lineage": {k: v for k, v in (source or {}).items() if k != "metrics"} or None}


def _check_resume(recipe: Recipe, run: Run, finishing: bool = False) -> tuple[int, str | None, dict[str, Any] | None]:
    """Refuse ``resume`` before anything is written: a checkpoint that is damaged or of another model
    (:func:`purify.checkpoint.load_verified`; a DeepSpeed checkpoint directory: :func:`purify.checkpoint.
    deepspeed_step`), or one already at or past ``trainer.max_steps`` — but for ``finishing`` an unfinished run in
    place from a checkpoint at ``trainer.max_steps`` (stopped or killed while exporting: nothing is trained, the
    student is exported). Returns its step, the sha256 of its tensors recorded when it was written (``None`` for a
    DeepSpeed checkpoint directory) and the record of the run that wrote it (:data:`CHECKPOINT_LINEAGE`; ``None``
    for a checkpoint written without one). A LoRA student's DeepSpeed checkpoint, which leaves the frozen base out,
    must record the starting weights of this build."""
    if recipe.strategy.startswith("deepspeed"):  # its parameters' names and shapes, and its step, without the shards
        if recipe.strategy != "deepspeed_stage_3":
            run.distiller.setup_purifiers()  # (ZeRO-3 builds its teachers and purifiers inside the fit)
        step, written_by = deepspeed_step(recipe.resume, run.distiller.trained_state(),
                                          scope="student." if recipe.strategy == "deepspeed_stage_3" else "",
                                          record_key=CHECKPOINT_LINEAGE)
        digest, written_by = None, written_by if isinstance(written_by, dict) else None
        student = (written_by or {}).get("student")
        started = student.get("init_sha256") if isinstance(student, dict) else None
        now = run.lineage["student"]["init_sha256"]
        if is_lora(run.distiller.student) and started != now:
            # DeepSpeed leaves frozen parameters out of its checkpoints: the adapter is paired with this build's base
            raise RecipeError(f"resume: {recipe.resume} holds a LoRA adapter without its frozen base (DeepSpeed "
                              "checkpoints leave frozen weights out), and "
                              + ("it records no starting weights to check this recipe's student against"
                                 if started is None else "its run's student started from other weights "
                                 f"(sha256 {started[:12]}…, this recipe's {now[:12]}…)")
                              + "; resume with that run's student, LoRA settings and seed")
    else:
        run.distiller.setup_purifiers()  # what Lightning's setup would do next: builds the heads, so they are checked
        ckpt = load_verified(recipe.resume, run.distiller.trained_state())
        step, digest = int(ckpt["global_step"]), (ckpt.get(INTEGRITY_KEY) or {}).get("sha256")
        written_by = ckpt.get(CHECKPOINT_LINEAGE) if isinstance(ckpt.get(CHECKPOINT_LINEAGE), dict) else None
    if step > recipe.trainer.max_steps or (step == recipe.trainer.max_steps and not finishing):
        raise RecipeError(f"resume: {recipe.resume} is at step {step}, and trainer.max_steps is "
                          f"{recipe.trainer.max_steps}: nothing left to train; raise trainer.max_steps above {step}")
    return step, digest, written_by


def _full_weights(module: torch.nn.Module, sharded: bool) -> Any:
    """Context in which ``module`` holds its full weights on every rank (gathers ZeRO-3 shards)."""
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
