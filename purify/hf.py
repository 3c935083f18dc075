"""Hugging Face integration: ``PurifyTrainer``, a ``transformers.Trainer`` that distils with purifiers.

Use it where you would use ``Trainer`` for a causal-LM fine-tune: the batches your collator produces
(``input_ids``, ``attention_mask``, ``labels`` with ``-100`` on prompt/padding) become distillation batches, the
student is ``model``, and the objective, teachers and purifiers are purify's own (the same
:class:`~purify.module.Distiller` code that ``purify train`` runs). Purifier heads join the Trainer's optimizer as
their own parameter group; parameter-side purifiers run around each optimizer step through a callback.

Example::

    trainer = PurifyTrainer(model=student, args=TrainingArguments("out", max_steps=100), train_dataset=ds,
                            data_collator=collator, teachers=[teacher], purifiers=[Anchor(AnchorConfig(weight=1e-3))])
    trainer.train()
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from purify.align import differing_tokenizers
from purify.cache import CachedTeacher
from purify.config import LossConfig, OnPolicyConfig
from purify.losses import distillation_loss
from purify.models import model_forward
from purify.module import Distiller
from purify.on_policy import sampler_for
from purify.purifiers.base import Purifier
from purify.types import IGNORE_INDEX, ModelOutput

PURIFIER_STATE = "purifiers.pt"
"""The purifiers' state dict in a ``PurifyTrainer`` checkpoint, beside the model."""


def hf_batch(inputs: dict[str, Any]) -> dict[str, Any]:
    """Convert a Hugging Face causal-LM batch (``labels`` with ``-100``) into a purify batch (shifted targets)."""
    if "labels" not in inputs:
        raise ValueError(f"PurifyTrainer: the batch has no 'labels' (it has {sorted(inputs)}); the labelled positions "
                         "are the ones distilled: give labels = input_ids with -100 on prompt and padding, e.g. "
                         "data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)")
    labels = inputs["labels"][:, 1:]
    attention = inputs.get("attention_mask")
    if attention is None:
        attention = torch.ones_like(inputs["input_ids"])
    positions = inputs.get("position_ids")
    if positions is not None and bool(((positions != torch.arange(positions.shape[-1], device=positions.device))
                                       & (attention > 0)).any()):
        raise ValueError("PurifyTrainer: the batch's position_ids are not 0, 1, 2, ... (packed sequences, e.g. "
                         "DataCollatorWithFlattening): purify runs the student and teachers on input_ids and "
                         "attention_mask, so packed sequences would attend to each other; use a padding collator "
                         "(DataCollatorForSeq2Seq)")
    target_mask = ((labels != IGNORE_INDEX) & (attention[:, 1:] > 0)).float()
    batch = {"input_ids": inputs["input_ids"], "attention_mask": attention, "target_mask": target_mask,
             "labels": labels.masked_fill(target_mask == 0, IGNORE_INDEX)}
    if "source" in inputs:
        batch["source"] = inputs["source"]
    return batch


def average_across_processes(params: Sequence[nn.Parameter]) -> None:
    """Average ``params``' gradients over the data-parallel processes, in place (a missing gradient counts as 0).

    The purifier heads live outside the model Trainer wraps in DDP, so nothing else averages their gradients: each
    rank's head would drift apart, and clipping the student together with them would scale the student's (averaged)
    gradients by a different factor on each rank. A no-op in one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


class _ParameterPurifierCallback(TrainerCallback):
    def __init__(self, distiller: Distiller) -> None:
        self.distiller = distiller
        self.before_done = False  # the parameter purifiers' before_step ran this step (in PurifyTrainer's clipping)

    def before_step(self) -> None:
        """The heads' gradients averaged over processes, then the parameter purifiers' ``before_step``, once per
        optimizer step."""
        if not self.before_done:
            average_across_processes(list(self.distiller.purifiers.parameters()))
            self.distiller.on_before_optimizer_step()
            self.before_done = True

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.before_step()  # without gradient clipping (max_grad_norm 0) it runs here

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.before_done = False
        self.distiller.after_optimizer_step()
        # Trainer zeroes the model's gradients only (model.zero_grad()): the heads' would add up over every step
        for p in self.distiller.purifiers.parameters():
            p.grad = None


class PurifyTrainer(Trainer):
    """``transformers.Trainer`` whose loss is purify's distillation objective.

    Behaves like ``Trainer`` for a causal-LM fine-tune: gradient accumulation is normalised by the token count of
    the whole accumulated (and, with ``average_tokens_across_devices``, all-device) batch — transformers'
    ``num_items_in_batch`` — so ``8 × 1`` and ``4 × 2`` give the same update; ``evaluate()`` and ``eval_strategy``
    report the distillation objective against the primary teacher on the evaluation set, without purifiers, as
    ``eval_loss`` (evaluating leaves the purifiers' state and random streams as they were; it passes the student's
    logits to ``compute_metrics`` unless ``prediction_loss_only``: every position, as the model returns them, so
    position ``t`` predicts ``label_ids[:, t + 1]``). Student-side purifier terms are averaged over the accumulation
    steps, as under ``purify train``. Batches keep a ``source`` column (the adversary's ``target: source``) though
    the model's ``forward`` does not take it.

    Args:
        teachers: frozen teachers sharing the student's tokenizer (``teachers[0]`` is the primary target).
        purifiers: purifiers in order; empty = vanilla distillation.
        loss: the objective (default forward KL).
        on_policy: on-policy distillation (:mod:`purify.on_policy`): with probability ``lam`` per optimizer step the
            student's own samples (pad/eos ids from ``processing_class``, else the model's config; seeded by
            ``args.seed``) replace the batch's completions; ``None`` = off-policy. Sampled micro-batches are
            normalised by their own sampled-token count (then averaged over accumulation steps and devices).
        head_lr: learning rate of the purifier heads' parameter groups (``purify train``'s ``optim.head_lr``);
            ``None`` = ``args.learning_rate``. The Trainer's scheduler scales it like the student's.
        teacher_tokenizers: each teacher's tokenizer (or ``None``): one that differs from the student's is refused
            (``cross_base``, which aligns such a teacher, needs batches Trainer does not build: use ``purify
            train``); the student's is ``processing_class`` (purifiers with text sources, e.g. ``function_anchor``,
            tokenize with it).
        *args, **kwargs: passed to ``transformers.Trainer`` (``model`` is the student).
    """

    def __init__(self, *args: Any, teachers: Sequence[nn.Module], purifiers: Sequence[Purifier] = (),
                 loss: LossConfig | None = None, on_policy: OnPolicyConfig | None = None,
                 head_lr: float | None = None, teacher_tokenizers: Sequence[Any] | None = None,
                 **kwargs: Any) -> None:
        if head_lr is not None and not (isinstance(head_lr, (int, float)) and 0 < head_lr < math.inf):
            raise ValueError(f"head_lr: must be a finite number > 0, or None for args.learning_rate, got {head_lr!r}")
        student_tokenizer = kwargs.get("processing_class")
        if student_tokenizer is not None and teacher_tokenizers:  # said here: the Distiller's own line would send a
            # PurifyTrainer user to cross_base, refused below
            other = differing_tokenizers(student_tokenizer, teacher_tokenizers)
            if other:
                raise ValueError(f"PurifyTrainer: teachers[{other[0]}]'s tokenizer differs from the student's "
                                 "(processing_class): a teacher of another tokenizer is aligned by cross_base, which "
                                 "needs batches Trainer does not build; use purify train or the Lightning Distiller "
                                 "with DistillDataModule(teacher_tokenizers=...)")
        cached = [i for i, t in enumerate(teachers) if isinstance(t, CachedTeacher)]
        if cached:  # a KeyError 'index' at the first step
            raise ValueError(f"PurifyTrainer: teachers[{cached[0]}] is a logit cache, read by each example's index in "
                             "purify's data module, which Trainer's batches do not carry; give the teacher as a model, "
                             "or use purify train (or the Distiller with DistillDataModule)")
        aligning = [i for i, p in enumerate(purifiers) if getattr(getattr(p, "config", None), "name", None)
                    == "cross_base"]
        if aligning:
            raise ValueError(f"PurifyTrainer: purifiers[{aligning[0]}] (cross_base) needs each example also in the "
                             "teacher's tokenization (teacher_batches), which Trainer's collated batches do not "
                             "carry; use purify train or the Lightning Distiller with DistillDataModule("
                             "teacher_tokenizers=...), which build them")
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError(f"label_smoothing_factor: {self.args.label_smoothing_factor} smooths Trainer's own "
                             "cross-entropy, which PurifyTrainer replaces by the distillation objective (loss=...); "
                             "set it to 0")
        self.head_lr = head_lr
        self._distiller_settings = {"teachers": teachers, "loss": loss, "purifiers": purifiers,
                                    "teacher_tokenizers": teacher_tokenizers, "on_policy": on_policy}
        # a resumed run's checkpoint and the purifier state it holds (None: none saved), loaded once they are set up
        self._resumed: tuple[str, dict[str, Any] | None] | None = None
        self._in_checkpoint = False  # set while Trainer writes a checkpoint: _save adds the purifiers' state
        self._evaluating = False  # inside evaluate(): a batch without labels is refused (predict() takes it)
        # Let Trainer count the target tokens of the accumulated batch (labels[..., 1:] != -100) and not divide the
        # loss by the accumulation steps: the distillation term is normalised by that count instead.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.loss_is_scaled_for_ga = True  # compute_loss does the accumulation scaling itself
        self._purifier_hooks = _ParameterPurifierCallback(self._new_distiller(self.model))
        self.add_callback(self._purifier_hooks)

    def _new_distiller(self, model: nn.Module) -> Distiller:
        """The :class:`~purify.module.Distiller` of ``model`` (``self.distiller``): built here and again for each
        model ``model_init`` makes (``train()`` and every ``hyperparameter_search`` trial call it anew; the
        purifiers, their heads and base copy included, then follow the model Trainer trains and evaluates)."""
        cfg = self._distiller_settings
        self.distiller = Distiller(model, cfg["teachers"], loss=cfg["loss"], purifiers=cfg["purifiers"],
                                   total_steps=max(1, self.args.max_steps), student_tokenizer=self.processing_class,
                                   teacher_tokenizers=cfg["teacher_tokenizers"])
        self.distiller.to(self.args.device)
        # the purifiers' base is the student as given, before train(resume_from_checkpoint=...) loads a checkpoint
        self.distiller.snapshot_base()
        self.distiller.on_policy = sampler_for(cfg["on_policy"], self.args.seed, self.processing_class, model,
                                               self.distiller.tokenizers["teacher_tokenizers"])
        if hasattr(self, "_purifier_hooks"):
            self._purifier_hooks.distiller = self.distiller
        return self.distiller

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """Trainer's ``model_init`` call; the purifiers and ``evaluate()`` follow the new model (they kept the first
        one: an anchor held the student to a model nobody trained, ``eval_loss`` scored the untrained model)."""
        model = super().call_model_init(trial)
        if hasattr(self, "_distiller_settings") and model is not self.distiller.student:
            self._new_distiller(model)
        return model

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Trainer's ``evaluate()`` (``eval_loss``: the class docstring); rows without ``labels`` are refused, with
        ``compute_metrics`` too (:meth:`prediction_step`)."""
        self._evaluating = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._evaluating = False

    def _set_signature_columns_if_needed(self) -> None:
        """The columns Trainer keeps (``remove_unused_columns``): the model's ``forward`` arguments, plus ``source``,
        which :func:`hf_batch` passes on to purifiers (the adversary's ``target: source``)."""
        super()._set_signature_columns_if_needed()
        if "source" not in self._signature_columns:
            self._signature_columns.append("source")

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer plus each purifier head as its own group (no weight decay; learning rate ``head_lr``,
        default ``args.learning_rate``).

        The purifiers are set up first: heads such as the adversary's discriminator are built in their ``setup``
        (otherwise lazily on the first ``compute_loss``, after this, and never trained), with the run's planned
        optimizer steps (``state.max_steps``, which ``train()`` computes from ``max_steps`` or the epochs before it
        creates the optimizer) for their schedules. The groups are added before ``create_scheduler``, so the
        learning-rate schedule covers them too.
        """
        if self.state.max_steps > 0:  # set by train(); a run sized by num_train_epochs has args.max_steps = -1
            self.distiller.total_steps = self.state.max_steps
        self.distiller.setup_purifiers()
        if self._resumed is not None:  # the heads as the checkpoint saved them
            checkpoint, saved = self._resumed
            self._resumed = None
            if saved is None and self.distiller.purifiers.state_dict():
                raise ValueError(f"resume_from_checkpoint: {checkpoint} holds no {PURIFIER_STATE} for this run's "
                                 "purifier heads (saved by another trainer, or before purify saved them); resuming "
                                 "would restart the heads from scratch under a restored optimizer: start afresh")
            if saved is not None:
                self.distiller.purifiers.load_state_dict(saved)
        optimizer = super().create_optimizer(model)
        for purifier in self.distiller.purifiers:
            for group in purifier.param_groups():
                if not any(p is q for g in optimizer.param_groups for p in group["params"] for q in g["params"]):
                    if self.lr_scheduler is not None:  # the user's, built for the groups the optimizer had
                        raise ValueError(f"PurifyTrainer: {type(purifier).__name__}'s head joins the optimizer as a "
                                         "group of its own, after the scheduler given in optimizers=(optimizer, "
                                         "scheduler) was built for fewer groups; pass optimizers=(optimizer, None) "
                                         "(Trainer builds the scheduler after the heads join) or put the head's "
                                         "parameters in your optimizer (purifier.param_groups())")
                    optimizer.add_param_group({**group, "weight_decay": 0.0,
                                               **({"lr": self.head_lr} if self.head_lr is not None else {})})
        return optimizer

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """``purify train``'s order and scope (Lightning's ``gradient_clip_val``): the parameter purifiers edit the
        raw accumulated gradients first, then the student's and the purifier heads' gradients are clipped together to
        ``max_grad_norm`` (``Trainer`` clips the model's alone, before its pre-optimizer-step callbacks)."""
        self._purifier_hooks.before_step()
        heads = [p for p in self.distiller.purifiers.parameters() if p.grad is not None]
        if not heads or self.is_deepspeed_enabled or self.is_fsdp_enabled:  # their own clipping: as Trainer does it
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *heads], self.args.max_grad_norm)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """A checkpoint as ``Trainer`` writes it, with the purifiers' state beside the model (:meth:`_save`)."""
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False

    def _tune_save_checkpoint(self, checkpoint_dir: str) -> None:
        """A Ray Tune trial's checkpoint (``Trainer`` writes it through ``save_model``): with the purifiers' state
        too, as :meth:`_save_checkpoint`'s, so a trial resumed from it restores their heads."""
        self._in_checkpoint = True
        try:
            super()._tune_save_checkpoint(checkpoint_dir)
        finally:
            self._in_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The model as ``Trainer`` saves it; in a checkpoint also the purifiers' state (heads, a function anchor's
        stream position) as :data:`PURIFIER_STATE` beside it, so a resume restores them (``save_model`` on its own
        exports the model alone)."""
        super()._save(output_dir, state_dict)
        state = self.distiller.purifiers.state_dict()
        if state and self._in_checkpoint:
            torch.save(state, os.path.join(output_dir or self.args.output_dir, PURIFIER_STATE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The model as ``Trainer`` loads it; the purifiers' saved state is kept until they are set up
        (:meth:`create_optimizer`). A checkpoint without it, for purifiers that have state, is refused."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PURIFIER_STATE)
        saved = torch.load(path, weights_only=True, map_location="cpu") if os.path.isfile(path) else None
        self._resumed = (resume_from_checkpoint, saved)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        """``Trainer``'s count of the accumulated (and, with ``average_tokens_across_devices``, all ranks') target
        positions, of the positions the loss sums (:func:`hf_batch`): a label on a padding position
        (``attention_mask`` 0) counts no more than it is trained on (counted, it shrank every step by real ÷
        labelled positions)."""
        def masked(b: Any) -> Any:  # a 2-D attention mask of the labels' shape (a 4-D one is left to Trainer)
            mask = b.get("attention_mask") if isinstance(b, dict) and "labels" in b else None
            if mask is None or getattr(mask, "shape", None) != getattr(b["labels"], "shape", ()):
                return b
            return {**b, "labels": b["labels"].masked_fill(mask == 0, IGNORE_INDEX)}

        return super()._get_num_items_in_batch([masked(b) for b in batch_samples], device)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        batch = hf_batch(inputs)
        if not model.training:
            return self._evaluation_loss(batch, return_outputs)
        progress = min(1.0, self.state.global_step / max(1, self.state.max_steps))
        steps = max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1))
        if num_items_in_batch is not None:  # all ranks' count: DDP's mean over ranks is undone on this term alone
            # (multiplying the whole loss by the processes, as Trainer's own compute_loss does, weighed each
            # purifier term that many times)
            spread = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            batch["num_items"] = num_items_in_batch / spread
        if self.distiller.on_policy is not None:  # a sampled batch counts its own tokens, this rank's share (DDP
            # averages the ranks' losses), over the accumulation steps
            batch = self.distiller.on_policy_batch(batch, self.state.global_step, count_scale=steps,
                                                   rank=self.args.process_index)
        full = None
        fused = self.distiller.loss_config.fused_linear
        kind = str(getattr(self.accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
        if fused and kind not in ("NO", "DEEPSPEED"):  # DDP or FSDP (compiled or not: the wrapper is inside)
            raise ValueError(f"PurifyTrainer: loss.fused_linear runs the student's decoder itself, outside the {kind} "
                             "wrapper whose forward synchronises the gradients across processes; turn fused_linear "
                             "off, or use purify train (Lightning), which fuses under DDP and DeepSpeed")
        if return_outputs or not fused:
            # through ``model``: under DDP its forward is what makes backward average the gradients over processes
            # (the unwrapped student's trained every rank apart); every position's logits, as a model gives them
            needs = any(getattr(p, "needs_hidden", False) for p in self.distiller.purifiers)
            full = model_forward(model, batch, hidden=needs, shift=False)
        loss, _, _ = self.distiller.compute_loss_and_output(
            batch, progress, extra_scale=1.0 / steps if num_items_in_batch is not None else 1.0,
            student_output=None if full is None else self.distiller.restrict(ModelOutput(
                logits=full.logits[:, :-1], hidden=None if full.hidden is None else full.hidden[:, :-1]),
                self.distiller.student))
        if num_items_in_batch is None:
            loss = loss / steps  # no token count: a mean per micro-batch, averaged over the accumulation steps
        return (loss, {"logits": full.logits}) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """Trainer's, except that an ``evaluate()`` step (or any loss-only one) of a batch without ``labels`` is
        refused like training's: Trainer would skip the loss and ``evaluate()`` return no ``eval_loss``.
        ``predict()`` of unlabelled rows still returns the logits."""
        if ((prediction_loss_only or self._evaluating) and "labels" in self.label_names
                and inputs.get("labels") is None):
            hf_batch({k: v for k, v in inputs.items() if k != "labels"})  # raises, naming what the batch holds
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _evaluation_loss(self, batch: dict[str, Any], return_outputs: bool) -> Any:
        """``evaluate()``/``predict()``'s loss: the distillation objective between the student and the primary
        teacher (:meth:`purify.module.Distiller.evaluation_targets`) on this batch, no purifier run — their terms
        and random streams belong to training, so evaluating changes nothing a later step does and ``eval_loss`` is
        comparable across purifier settings. With ``return_outputs`` also the student's logits at every position."""
        cfg = self.distiller.loss_config
        student = self.distiller.student
        full = model_forward(student, batch, shift=False)
        logits = self.distiller.restrict(ModelOutput(logits=full.logits[:, :-1]), student).logits
        t_logits, weight = self.distiller.evaluation_targets(batch, logits.dtype)
        loss = distillation_loss(logits, t_logits, weight, name=cfg.name, beta=cfg.beta, temperature=cfg.temperature,
                                 labels=batch.get("labels"), hard_label_weight=cfg.hard_label_weight)
        return (loss, {"logits": full.logits}) if return_outputs else loss
