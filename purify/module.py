"""The Distiller: a LightningModule that trains a student on frozen teachers' outputs, with purifiers.

``training_step``: teacher forward → target-side purifiers → loss → student-side purifiers; parameter-side
purifiers act around the optimizer step. Teachers (and the frozen base copy) are kept out of the optimizer and out
of checkpoints: they are rebuilt from the recipe, so a checkpoint holds only what training changes.

Teachers given as a builder are built in ``configure_model``; under DeepSpeed ZeRO-3 they are then partitioned
across ranks there, so each rank keeps only its shard of every frozen teacher parameter (see
:meth:`Distiller.configure_model`). Teacher targets are upcast to float32 before target purifiers and the loss.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from purify.align import differing_tokenizers, same_tokenizer
from purify.cache import CachedTeacher, holds_whole_vocabulary
from purify.config import (
    LossConfig,
    OnPolicyConfig,
    OptimConfig,
    SchedulerConfig,
    cache_problems,
    logit_slice_problem,
    loss_problems,
    optim_problems,
    type_problems,
)
from purify.lora import is_lora
from purify.losses import distillation_loss, target_count
from purify.losses_fused import fused_linear_distillation_loss
from purify.metrics import FidelityMetrics
from purify.models import (
    decoder_hidden,
    freeze,
    fused_problem,
    is_hf_model,
    logit_width,
    model_forward,
    output_layer,
)
from purify.on_policy import sampler_for
from purify.purifiers.base import (
    ParameterPurifier,
    Purifier,
    PurifierConfig,
    PurifierContext,
    StudentPurifier,
    TargetPurifier,
)
from purify.purifiers.checks import config_problems, entry_problems, frozen_by_lora, stand_in, unaligned_teachers
from purify.types import Batch, DivergedError, ModelOutput, RecipeError, Targets, is_int, is_real, position_limit

_NOT_SAVED = ("teachers.", "base.")


def shared_width(widths: dict[str, int | None], tokens: int | None, fused: bool = False) -> int | None:
    """The width the student and its same-tokenizer teachers (``widths``: recipe key → logits per position) are all
    cut to where their output layers are padded to different sizes (Qwen2.5-7B's 152064 rows against 0.5B's
    151936): the narrowest, which must still hold every one of the tokenizer's ``tokens`` (the rows past it are ids
    no token has). ``None`` where the widths agree or one is unknown before a forward.

    Raises:
        RecipeError: the widths differ and the narrowest holds fewer than ``tokens`` (or there is no tokenizer: a
            vector model's outputs are not a vocabulary), or ``fused`` (the fused loss builds each model's logits
            from its own output layer).
    """
    if None in widths.values() or len(set(widths.values())) < 2:
        return None
    width = min(w for w in widths.values() if w is not None)
    shown = ", ".join(f"{k} {v}" for k, v in widths.items())
    if tokens is None or tokens > width:
        raise RecipeError(f"teachers: the student and its teachers return logits of different widths ({shown})"
                          + (f", and the narrowest holds fewer than the tokenizer's {tokens} tokens; give models "
                             "that score the same vocabulary" if tokens is not None else "; give models that score "
                             "the same outputs, or the student's tokenizer (student_tokenizer=...; PurifyTrainer: "
                             "processing_class=...) where they share one"))
    if fused:
        raise RecipeError(f"loss.fused_linear: builds the logits from each model's own output layer, and the "
                          f"student's and a teacher's are padded to different sizes ({shown}); turn fused_linear off")
    return width


def mean_over_ranks(metrics: dict[str, Any]) -> dict[str, Any]:
    """Each metric averaged over the processes that report it (one ``all_gather_object`` per call; ``metrics`` as is
    outside a process group). A purifier's metrics may differ in their keys from one rank to another (a rank whose
    batch had nothing to align logs no ULD term), which Lightning's per-key ``sync_dist`` would wait on forever."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    local = {k: float(v) for k, v in metrics.items()}
    gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    ranks = [g for g in gathered if g is not None]
    keys = dict.fromkeys(k for g in ranks for k in g)
    return {k: sum(g[k] for g in ranks if k in g) / sum(k in g for g in ranks) for k in keys}


def stack_problems(student: nn.Module, teachers: Sequence[nn.Module], purifiers: Sequence[Purifier], loss: LossConfig,
                   teacher_names: list[str], teacher_weights: Sequence[float] | None,
                   student_tokenizer: Any | None, teacher_tokenizers: Sequence[Any] | None = None) -> list[str]:
    """What a recipe's validation says of a purifier stack (:func:`purify.purifiers.checks.config_problems`: each
    config against the run, and the contracts of the list: an order that undoes a purifier, a loss that cannot take
    a purifier's zero-mass targets, ...) for a :class:`Distiller` built in Python, whose purifiers all carry a
    :class:`PurifierConfig` (a user's own class included; a stack holding a purifier without one is checked entry by
    entry only); also a text-reading purifier on a language model given no tokenizer, a teacher whose tokenizer
    (``teacher_tokenizers``) differs from the student's without a ``cross_base`` purifier aligning it, and a teacher
    that shares parameters with the student (freezing it would freeze them)."""
    configs = [getattr(p, "config", None) for p in purifiers]
    out = []
    if student_tokenizer is not None and teacher_tokenizers:
        out += unaligned_teachers([c if isinstance(c, PurifierConfig) else None for c in configs], teacher_names,
                                  differing_tokenizers(student_tokenizer, teacher_tokenizers))
    if configs and all(isinstance(c, PurifierConfig) for c in configs):
        run = stand_in(teacher_names, loss, vector_student=not is_hf_model(student), teacher_weights=teacher_weights,
                       lora=is_lora(student), data="<Python data>")
        out += config_problems(configs, run)  # type: ignore[arg-type]
    else:  # a purifier without a config among them: each config on its own
        out += [p for i, c in enumerate(configs) if isinstance(c, PurifierConfig)
                for p in entry_problems(i, c) + (frozen_by_lora(i, c) if is_lora(student) else [])]
    if is_hf_model(student) and student_tokenizer is None:
        out += [f"purifiers[{i}].source: {c.source!r} reads text with the student's tokenizer, and none was given; "
                "pass student_tokenizer= (PurifyTrainer: processing_class=)" for i, c in enumerate(configs)
                if getattr(c, "source", "noise") != "noise"]
    own = {id(p): name for name, p in student.named_parameters()}
    for i, teacher in enumerate(teachers):
        shared = [own[id(p)] for p in teacher.parameters() if id(p) in own]
        if shared:
            out.append(f"teachers[{i}]: shares {len(shared)} parameter(s) with the student (e.g. {shared[0]}); a "
                       "teacher is frozen, which would freeze them in the student too: give the teacher its own copy "
                       "(copy.deepcopy)")
    return out


def purifier_name(purifier: Any) -> str:
    """How a purifier's metrics are keyed: its config's ``name``, else its own ``name`` attribute, else its class."""
    configured = getattr(getattr(purifier, "config", None), "name", None)
    return configured or getattr(purifier, "name", type(purifier).__name__)


class Distiller(L.LightningModule):
    """Distil ``student`` from ``teachers`` (``teachers[0]`` is the primary target) under ``purifiers``.

    Args:
        student: the model to train (a transformers causal LM or a registered architecture).
        teachers: frozen teachers; they are put in ``eval()`` mode with gradients off. Or a zero-argument callable
            that builds them, called in ``configure_model`` (or by :meth:`setup_purifiers` outside Lightning); it
            needs ``teacher_names``, one per teacher it builds.
        loss: the objective (see :mod:`purify.losses`).
        purifiers: purifiers in the order they apply; the empty list is vanilla distillation.
        optim: optimizer settings (one optimizer; purifier heads are their own parameter group).
        scheduler: learning-rate schedule with warmup.
        teacher_names: labels for logs and purifiers (default ``teacher0``, ``teacher1``, …).
        teacher_weights: ensemble weights (default all 1).
        total_steps: planned optimizer steps (for schedules); defaults to ``trainer.max_steps``.
        student_tokenizer: the student's tokenizer, for purifiers that align vocabularies (cross-base).
        teacher_tokenizers: one tokenizer (or ``None``) per teacher, for the same purifiers.
        teacher_dtype: cast the frozen teachers to this dtype once purifiers have seen them at full precision
            (:meth:`setup_purifiers`: Lightning's set-up, or a plain loop's first step), e.g. ``torch.bfloat16`` for
            DeepSpeed bf16 runs; ``None`` leaves them as built.
        on_policy: on-policy distillation (:mod:`purify.on_policy`): with probability ``lam`` per optimizer step
            the student's own samples replace the batch's completions; ``None`` = off-policy.
        seed: keys the on-policy step decisions and samples.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module] | Callable[[], Sequence[nn.Module]], *,
                 loss: LossConfig | None = None, purifiers: Sequence[Purifier] = (), optim: OptimConfig | None = None,
                 scheduler: SchedulerConfig | None = None, teacher_names: Sequence[str] | None = None,
                 teacher_weights: Sequence[float] | None = None, total_steps: int | None = None,
                 student_tokenizer: Any | None = None, teacher_tokenizers: Sequence[Any] | None = None,
                 teacher_dtype: torch.dtype | None = None, on_policy: OnPolicyConfig | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if isinstance(teachers, nn.Module):
            raise ValueError("Distiller: teachers must be a list of models (or a builder returning one), got one "
                             f"{type(teachers).__name__}; give [teacher]")
        deferred = callable(teachers)
        if deferred and not teacher_names:
            raise ValueError("Distiller: a teacher builder needs teacher_names (one per teacher it builds)")
        count = len(teacher_names) if deferred else len(teachers)  # type: ignore[arg-type]
        if not count:
            raise ValueError("Distiller needs at least one teacher")
        if (isinstance(purifiers, nn.Module) and not isinstance(purifiers, nn.ModuleList)) or not all(
                isinstance(p, Purifier) for p in purifiers):
            given = [type(p).__name__ for p in ([purifiers] if isinstance(purifiers, nn.Module) else purifiers)]
            raise ValueError(f"Distiller: purifiers must be a list of purifiers (e.g. [Anchor(AnchorConfig())]), got "
                             f"{given if not isinstance(purifiers, nn.Module) else given[0]}; build each from its "
                             "config (purify.purifiers.build_purifier(config)) and give a list")
        models = [("student", student)] + ([] if deferred else [(f"teachers[{i}]", t) for i, t in enumerate(teachers)])
        for key, model in models:  # a hub name given for a model was an AttributeError deep in the checks
            if not isinstance(model, nn.Module):
                raise ValueError(f"Distiller: {key} must be a torch module (e.g. AutoModelForCausalLM."
                                 f"from_pretrained(...)), got {type(model).__name__}")
        for key, value, kind in (("loss", loss, LossConfig), ("optim", optim, OptimConfig),
                                 ("scheduler", scheduler, SchedulerConfig), ("on_policy", on_policy, OnPolicyConfig)):
            if value is not None and not isinstance(value, kind):
                article = "an" if kind.__name__[0] in "AEIOU" else "a"
                raise ValueError(f"Distiller: {key} must be {article} {kind.__name__}, got {type(value).__name__}; "
                                 f"give {kind.__name__}(...)")
        typed = [p for key, value in (("loss", loss), ("optim", optim), ("scheduler", scheduler),
                                      ("on_policy", on_policy)) if value is not None
                 for p in type_problems(value, f"{key}.", choices=False)]
        if typed:  # before the range checks, which compare them with numbers
            raise RecipeError(typed)
        problems = loss_problems(loss or LossConfig()) + optim_problems(optim or OptimConfig(),
                                                                       scheduler or SchedulerConfig())
        problems += [f"{key}: {len(given)} given for {count} teachers; give one per teacher"
                     for key, given in (("teacher_names", teacher_names), ("teacher_weights", teacher_weights))
                     if given is not None and len(given) != count]
        if total_steps is not None and not is_int(total_steps, 0):
            problems.append(f"total_steps: must be an int >= 0 (the optimizer steps the run plans) or None, got "
                            f"{total_steps!r}")
        if teacher_weights is not None and not (all(w >= 0 and math.isfinite(w) for w in teacher_weights)
                                                and sum(teacher_weights) > 0):
            problems.append(f"teacher_weights: {list(teacher_weights)}; give finite weights >= 0, not all 0")
        cached = None if deferred else next((i for i, t in enumerate(teachers) if isinstance(t, CachedTeacher)), None)
        whole = cached is not None and holds_whole_vocabulary(teachers[cached].manifest, teachers[cached].teacher)
        problems += cache_problems(loss or LossConfig(), f"teachers[{cached}]", on_policy is not None, whole) \
            if cached is not None else []
        fused = fused_problem(student, "student") if (loss or LossConfig()).fused_linear else None
        if fused:
            problems.append(f"loss.fused_linear: {fused}; turn fused_linear off")
        if not problems:
            names = list(teacher_names or [f"teacher{i}" for i in range(count)])
            problems += stack_problems(student, [] if deferred else teachers, purifiers,  # type: ignore[arg-type]
                                       loss or LossConfig(), names, teacher_weights, student_tokenizer,
                                       teacher_tokenizers)
        if problems:  # what a recipe's validation says, for a Distiller built in Python (build_run builds one too)
            raise RecipeError(problems)
        cfg = loss or LossConfig()
        if cfg.name in ("mse", "ce") and cfg.temperature != 1:
            rank_zero_warn(f"loss.temperature ({cfg.temperature}) does nothing with loss.name {cfg.name} (raw logits "
                           "or hard labels have no temperature): it trains as at 1.0", category=UserWarning)
        self.student = student
        builder = teachers if deferred else None
        self._teacher_builder: Callable[[], Sequence[nn.Module]] | None = builder  # type: ignore[assignment]
        self.teachers = nn.ModuleList([] if deferred else [freeze(t) for t in teachers])  # type: ignore[union-attr]
        self.purifiers = nn.ModuleList(purifiers)
        self.loss_config = loss or LossConfig()
        self.optim_config = optim or OptimConfig()
        self.scheduler_config = scheduler or SchedulerConfig()
        self.teacher_names = list(teacher_names or [f"teacher{i}" for i in range(count)])
        self.teacher_weights = list(teacher_weights or [1.0] * count)
        self.total_steps = total_steps
        self.tokenizers = {"student_tokenizer": student_tokenizer,
                           "teacher_tokenizers": list(teacher_tokenizers or [None] * count)}
        self.teacher_dtype = teacher_dtype
        self.on_policy = sampler_for(on_policy, seed, student_tokenizer, student,
                                     self.tokenizers["teacher_tokenizers"])
        self.base: nn.Module | None = None
        self.val_fidelity = FidelityMetrics()
        self._ready = False
        self._shared_width: int | None = None  # set up by shared_vocabulary
        self._own_vocabulary: set[int] = set()  # indices of teachers with another tokenizer: never cut
        self._owner_token = object()  # marks the purifiers this Distiller set up (a deepcopy keeps the pairing)
        self._configured = False
        self._metric_sums: dict[str, Tensor] = {}  # purifier metrics summed over fit_step calls
        self._metric_steps = 0
        self._rng_base: int | None = None  # the run's seed, read at the first Lightning training step
        self._rng_step, self._micro = -1, 0  # the optimizer step and micro-batch last seeded (_seed_step)
        self._fusable_teacher: bool | None = None  # loss.fused_linear: may the teacher be fused too (_teacher_fusable)

    # ---------------------------------------------------------------- set-up
    def _planned_steps(self) -> int:
        """The optimizer steps schedules and purifier ramps plan over: ``total_steps``, else Lightning's
        ``max_steps``, else (a run sized by ``max_epochs``) Lightning's estimate from the epochs, batches and
        accumulation; 1 outside a trainer. (A run sized by epochs was planned as 1 step: a decaying learning rate
        reached 0 after the first.)"""
        if self.total_steps is not None:
            return max(1, self.total_steps)  # 0 (a zero-step run) plans as 1: a ramp's step / planned steps
        trainer = self._trainer
        if trainer is None:
            return 1
        if trainer.max_steps > 0:
            return max(1, trainer.max_steps)
        estimate = trainer.estimated_stepping_batches
        if not math.isfinite(estimate) or estimate < 1:  # an endless stream (DistillDataModule's): Lightning
            # estimates inf or -1, and the run was planned as 1 step
            raise RecipeError("trainer: a run sized by max_epochs over data without an end (DistillDataModule's "
                              "stream) has no planned length for its schedule and purifier ramps; give "
                              "Trainer(max_steps=...) or Distiller(total_steps=...)")
        return max(1, int(estimate))

    def _build_teachers(self) -> None:
        """Run the teacher builder (once) and freeze what it returns."""
        if self._teacher_builder is None:
            return
        built = list(self._teacher_builder())
        if len(built) != len(self.teacher_names):
            raise ValueError(f"Distiller: the teacher builder made {len(built)} teachers for "
                             f"{len(self.teacher_names)} teacher_names")
        self.teachers.extend(freeze(t) for t in built)
        self._teacher_builder = None

    def snapshot_base(self) -> None:
        """Take the frozen copy of the student's weights as they are now, where a purifier needs it (``needs_base``),
        once: the base the anchor, delta projection, function anchor … measure from. :meth:`setup_purifiers` takes it
        if nothing did before; a trainer that loads a checkpoint into the student before setting up its purifiers
        (Hugging Face's ``resume_from_checkpoint``) takes it first, so the base stays the starting weights."""
        if self.base is None and any(p.needs_base for p in self.purifiers):
            self.base = freeze(copy.deepcopy(self.student))

    def setup_purifiers(self) -> None:
        """Build deferred teachers, create the frozen base copy (if asked for), call each purifier's ``setup`` and
        cast the teachers to ``teacher_dtype``, once."""
        if self._ready:
            self._check_purifiers_owned()
            return
        self._build_teachers()
        self.snapshot_base()
        self._shared_width = self.shared_vocabulary()
        ctx = PurifierContext(student=self.student, teachers=list(self.teachers), teacher_names=self.teacher_names,
                              teacher_weights=self.teacher_weights, base=self.base, forward=self.run_model,
                              total_steps=self._planned_steps(), logit_slice=self.loss_config.logit_slice,
                              student_tokenizer=self.tokenizers["student_tokenizer"],
                              teacher_tokenizers=self.tokenizers["teacher_tokenizers"],
                              vocab_width=self._shared_width)
        for p in self.purifiers:
            p.setup(ctx)
            p._set_up_by = self._owner_token  # its per-run state (base, head, schedule) is now this Distiller's
        if self.on_policy is not None:  # cross-base teachers' position limits, for re-tokenised samples
            self.on_policy.limit_teachers(list(self.teachers))
            # no sample of an id a teacher has no logit for (a logit_slice leaves the loss's width alone, not this:
            # the narrowest of the models' widths, unchecked, as the slice decides what the loss reads)
            widths = self._widths()
            self.on_policy.vocab_limit = self._shared_width if self.loss_config.logit_slice is None else \
                min(widths.values()) if None not in widths.values() and len(set(widths.values())) > 1 else None
            same = [self.student, *(t for i, t in enumerate(self.teachers) if i not in self._own_vocabulary)]
            self.on_policy.position_limit = min((n for n in map(position_limit, same) if n is not None), default=None)
        if self.teacher_dtype is not None:  # after the purifiers saw them at full precision (a plain loop too)
            self.teachers.to(self.teacher_dtype)
        self._ready = True

    def shared_vocabulary(self) -> int | None:
        """:func:`shared_width` of the student and its teachers with the student's tokenizer (teachers with another
        tokenizer keep their own vocabulary: ``cross_base`` aligns them); records which teachers those are.
        :meth:`setup_purifiers` calls it; :func:`purify.assembly.build_run` too, so a recipe is refused before
        anything is written (teachers not built yet, under ZeRO-3, are checked at set-up)."""
        widths = self._widths()
        if self.loss_config.logit_slice is not None:
            return None
        tokenizer = self.tokenizers["student_tokenizer"]
        return shared_width(widths, None if tokenizer is None else len(tokenizer), self.loss_config.fused_linear)

    def _widths(self) -> dict[str, int | None]:
        """The logits per position of the student and its teachers with the student's tokenizer, by recipe key;
        records the others (:attr:`_own_vocabulary`)."""
        tokenizer = self.tokenizers["student_tokenizer"]
        same = [i for i, tok in enumerate(self.tokenizers["teacher_tokenizers"][:len(self.teachers)])
                if tok is None or tokenizer is None or same_tokenizer(tokenizer, tok)]
        self._own_vocabulary = set(range(len(self.teachers))) - set(same)
        return {"student": logit_width(self.student), **{f"teachers[{i}]": logit_width(self.teachers[i]) for i in same}}

    def _check_purifiers_owned(self) -> None:
        """Refuse to go on with a purifier that another Distiller has set up since this one did: its per-run state
        (base copy, head, schedule length) is that run's now, and it would silently serve both."""
        taken = [f"purifiers[{i}]: this {purifier_name(p)} instance was set up by another Distiller after this one; a "
                 "purifier holds per-run state (its base copy, head, schedule), so two Distillers cannot share one "
                 "instance: give each its own (copy.deepcopy(purifier) before either runs)"
                 for i, p in enumerate(self.purifiers) if getattr(p, "_set_up_by", None) is not self._owner_token]
        if taken:
            raise RecipeError(taken)

    def train(self, mode: bool = True) -> Distiller:
        """Training mode for the student and purifier heads; the frozen teachers and base copy stay in ``eval()``
        (their dropout would make the targets noisy: a plain loop's ``distiller.train()`` switched them too)."""
        super().train(mode)
        self.teachers.eval()
        if self.base is not None:
            self.base.eval()
        return self

    def setup(self, stage: str) -> None:
        if self._teacher_builder is None:  # deferred teachers: configure_model, which Lightning calls next
            self.setup_purifiers()

    def configure_model(self) -> None:
        """Build deferred teachers, set up purifiers, cast teachers to ``teacher_dtype``, shard them under ZeRO-3.

        Lightning calls this hook (once per process, after ``setup``) inside ``deepspeed.zero.Init`` for ZeRO-3. That
        context is paused while teachers and purifier heads are built, so every model source loads as usual (into
        host memory) and purifiers (``delta_projection``, the base copy) see full, full-precision weights. Then the
        teachers are cast to ``teacher_dtype`` and, under ZeRO-3, partitioned parameter by parameter across the
        data-parallel ranks (``deepspeed.zero.Init(module=...)``): each rank keeps only its shard (``ds_tensor``),
        gathered for a forward and released after it. Teachers stay frozen, in ``eval()``, out of the optimizer
        (it takes trainable parameters only) and out of checkpoints.
        """
        if self._configured:
            return
        with _zero_init_paused():
            self.setup_purifiers()  # casts the teachers to teacher_dtype
        strategy = self._trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "zero_stage_3", False):
            import deepspeed

            deepspeed.zero.Init(module=self.teachers, config_dict_or_path=strategy.config,  # type: ignore[union-attr]
                                remote_device=getattr(strategy, "remote_device", None))
        self._configured = True

    # ---------------------------------------------------------------- forward
    def run_model(self, model: nn.Module, batch: Batch, hidden: bool = False) -> ModelOutput:
        """Run any model on a batch, restricted to ``loss.logit_slice`` when set."""
        return self.restrict(model_forward(model, batch, hidden=hidden), model)

    def restrict(self, out: ModelOutput, model: nn.Module) -> ModelOutput:
        """``model``'s output ``out`` restricted to ``loss.logit_slice`` when set (the logits the loss distils), or
        cut to the student's and its same-tokenizer teachers' shared vocabulary where their output layers are
        padded to different sizes (:meth:`shared_vocabulary`)."""
        sl = self.loss_config.logit_slice
        if sl is None:
            width = self._shared_width
            if width is None or out.logits.shape[-1] <= width or any(model is self.teachers[i]
                                                                       for i in self._own_vocabulary):
                return out
            return ModelOutput(logits=out.logits[..., :width], hidden=out.hidden)
        problem = logit_slice_problem(sl, out.logits.shape[-1], type(model).__name__)
        if problem:  # a model that does not say its width (logit_width) is checked here, at its first forward
            raise RecipeError(problem)
        return ModelOutput(logits=out.logits[..., sl[0]:sl[1]], hidden=out.hidden)

    def _of_kind(self, kind: type) -> list[Any]:
        return [p for p in self.purifiers if isinstance(p, kind)]

    @staticmethod
    def teacher_batch(i: int, batch: Batch) -> Batch:
        """Teacher ``i``'s inputs: its own tokenization of the text (``batch["teacher_batches"][i]``, built for a
        teacher whose tokenizer differs from the student's) or the student's batch."""
        return batch.get("teacher_batches", {}).get(i, batch)

    def teacher_targets(self, batch: Batch, dtype: torch.dtype) -> Targets:
        """Run every teacher on its inputs and apply the target-side purifiers in order.

        Teacher logits (bf16 from a bf16 teacher) are upcast to at least float32, and the weights are at least
        float32, so target purifiers and the loss compute in float32 whatever the teachers' dtype.
        """
        dtype = torch.promote_types(dtype, torch.float32)
        with torch.no_grad():
            t_outs = [_upcast(self.run_model(t, self.teacher_batch(i, batch))) for i, t in enumerate(self.teachers)]
        targets = Targets(logits=t_outs[0].logits, weight=batch["target_mask"].to(dtype))
        for p in self._of_kind(TargetPurifier):
            targets = p.transform_targets(batch, t_outs, targets)
        return targets

    def on_policy_batch(self, batch: Batch, step: int, count_scale: float = 1.0, rank: int | None = None) -> Batch:
        """The micro-batch to train on at optimizer step ``step``: ``batch``, or on an on-policy step the batch
        rebuilt on the student's own samples (:class:`purify.on_policy.OnPolicySampler`; ``count_scale`` is what the
        loss divides ``num_items`` by). Off-policy (``on_policy=None``): ``batch`` itself."""
        if self.on_policy is None:
            return batch
        self.setup_purifiers()  # built teachers: their position limits cut re-tokenised cross-base samples
        return self.on_policy(self.student, batch, step, self.global_rank if rank is None else rank, count_scale)

    def compute_loss(self, batch: Batch, progress: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The training objective on one micro-batch; returns the loss and its logged parts."""
        loss, parts, _ = self.compute_loss_and_output(batch, progress)
        return loss, parts

    def compute_loss_and_output(self, batch: Batch, progress: float, extra_scale: float = 1.0,
                                student_output: ModelOutput | None = None
                                ) -> tuple[Tensor, dict[str, Tensor], ModelOutput]:
        """The objective on one micro-batch, its logged parts and the student's output.

        Args:
            batch: the micro-batch; ``batch["num_items"]`` (the global target count), when present, normalises the
                distillation term over the whole accumulated (and data-parallel) batch; else the batch's own count
                of target positions, taken before the target purifiers (a dropped position lowers the loss).
            progress: training progress in ``[0, 1]`` (purifier schedules).
            extra_scale: factor on the student-side purifier terms (``1 / accumulation steps`` where the caller
                does not divide the whole loss by the accumulation steps itself, as Hugging Face's Trainer with
                ``num_items_in_batch``).
            student_output: the student's output on ``batch`` (as :meth:`run_model` gives it, with hidden states
                where a student purifier needs them) when the caller ran the student itself; ``None`` runs it here.
        """
        self.setup_purifiers()
        if not (is_real(progress) and 0 <= progress <= 1):  # a step index skipped a head's ramp
            raise ValueError(f"Distiller: progress must be a number in [0, 1] (optimizer step / planned steps), got "
                             f"{progress!r}")
        if "target_mask" not in batch:
            raise ValueError(f"Distiller: the batch has no 'target_mask' (it has {sorted(batch)}): the weight of each "
                             "position to distil, (B, T) for token batches (purify.data's collate builds it), (B, 1) "
                             "ones for vector batches")
        student_purifiers = self._of_kind(StudentPurifier)
        num_items = batch.get("num_items")
        if num_items is not None:  # global normalisation; undo Lightning's /accumulate and DDP's mean over ranks
            trainer = self._trainer
            scale = trainer.accumulate_grad_batches * trainer.world_size if trainer is not None else 1
            num_items = num_items / scale
        else:  # this batch's targets counted before the target purifiers, as purify train's and Trainer's counts
            # are: a position a divergence mask drops lowers the loss, it does not scale the others up
            mask = batch["target_mask"]
            num_items = target_count(self.loss_config.name, mask, batch.get("labels"), mask.shape)
        cfg = self.loss_config
        if student_output is None and cfg.fused_linear and self.student.training and torch.is_grad_enabled():
            loss, s_out = self._fused_loss(batch, num_items)
        else:
            s_out = student_output or self.run_model(self.student, batch,
                                                     hidden=any(p.needs_hidden for p in student_purifiers))
            targets = self.teacher_targets(batch, s_out.logits.dtype)
            loss = distillation_loss(s_out.logits, targets.logits, targets.weight, name=cfg.name, beta=cfg.beta,
                                     temperature=cfg.temperature, labels=batch.get("labels"),
                                     hard_label_weight=cfg.hard_label_weight, num_items=num_items)
        parts = {"distill": loss.detach()}
        for i, p in enumerate(self.purifiers):  # keyed as their metrics are: two of one class do not collide
            if not isinstance(p, StudentPurifier):
                continue
            extra = p.extra_loss(batch, s_out, progress)
            parts[f"{i}_{purifier_name(p)}"] = extra.detach()
            loss = loss + extra_scale * extra
        return loss, parts, s_out

    def _fused_loss(self, batch: Batch, num_items: Tensor | float | None) -> tuple[Tensor, ModelOutput]:
        """``loss.fused_linear``: the distillation term from the student's last hidden states and output layer
        (:func:`purify.losses_fused.fused_linear_distillation_loss`), its ``(B, T, V)`` logits never built. The
        teacher is given the same way where nothing needs its logits (no target-side purifier, the primary teacher a
        Hugging Face model in the student's tokenization with the same vocabulary width); else as the targets of
        :meth:`teacher_targets`. Returns the loss and the student's output (hidden states; logits empty)."""
        cfg = self.loss_config
        hidden = decoder_hidden(self.student, batch)
        weight, bias = output_layer(self.student)
        teacher: dict[str, Any]
        if self._teacher_fusable(batch, weight.shape[0]):
            with torch.no_grad():
                t_hidden = decoder_hidden(self.teachers[0], batch)
            t_weight, t_bias = output_layer(self.teachers[0])
            teacher = {"teacher_hidden": t_hidden, "teacher_weight": t_weight, "teacher_bias": t_bias,
                       "row_weight": batch["target_mask"].to(torch.promote_types(hidden.dtype, torch.float32))}
        else:
            targets = self.teacher_targets(batch, hidden.dtype)
            teacher = {"teacher_logits": targets.logits, "row_weight": targets.weight}
        loss = fused_linear_distillation_loss(hidden, weight, bias, name=cfg.name, beta=cfg.beta,
                                              temperature=cfg.temperature, labels=batch.get("labels"),
                                              hard_label_weight=cfg.hard_label_weight, num_items=num_items, **teacher)
        return loss, ModelOutput(logits=hidden.new_empty(0), hidden=hidden)

    def _teacher_fusable(self, batch: Batch, vocab: int) -> bool:
        """Whether the fused loss may read the primary teacher as hidden states and output layer (checked once per
        run with :func:`purify.models.fused_problem`; a cached or plain-torch teacher, a target-side purifier, or a
        teacher in its own tokenization: no)."""
        if self._fusable_teacher is None:
            teacher = self.teachers[0]
            self._fusable_teacher = (fused_problem(teacher, "teachers[0]") is None
                                     and output_layer(teacher)[0].shape[0] == vocab)
        return self._fusable_teacher and not self._of_kind(TargetPurifier) and 0 not in batch.get("teacher_batches", {})

    # ---------------------------------------------------------------- lightning hooks
    def _seed_step(self) -> None:
        """Re-seed the global random streams (dropout draws from them) from the run's seed, the optimizer step and
        the micro-batch within it. A resumed run then draws what the uninterrupted one drew at each step: the
        stream itself is in no checkpoint, and whatever else draws from it between steps (a DataLoader's base
        seed, a validation pass) shifted it (a LoRA student with dropout 0.1 resumed 0.0097 off)."""
        step = self.global_step
        self._micro = self._micro + 1 if self._rng_step == step else 0
        self._rng_step = step
        if self._rng_base is None:
            self._rng_base = torch.initial_seed()  # build_run's seed_everything(recipe.seed), on every launch
        torch.manual_seed((self._rng_base * 1_000_003 + step * 1_009 + self._micro) % 2**63)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        self._seed_step()
        if self.on_policy is not None:
            trainer = self._trainer
            scale = trainer.accumulate_grad_batches * trainer.world_size if trainer is not None else 1
            batch = self.on_policy_batch(batch, self.global_step, count_scale=scale)
            for key in ("on_policy_fraction", "sampled_tokens_per_s"):
                if key in self.on_policy.last_metrics:
                    self.log(f"train/{key}", self.on_policy.last_metrics[key], batch_size=len(batch["target_mask"]))
        loss, parts = self.compute_loss(batch, progress=min(1.0, self.global_step / self._planned_steps()))
        if not torch.isfinite(loss):
            precision = str(getattr(self._trainer, "precision", "")) if self._trainer is not None else ""
            fix = (f"Under trainer.precision {precision}, float16 overflows easily: use bf16-mixed or 32-true, or "
                   "lower optim.lr." if precision.startswith("16") else "Lower optim.lr or check the data.")
            raise DivergedError(f"non-finite loss ({loss.item()}) at step {self.global_step}; nothing was saved "
                                f"for this step. {fix}")
        bs = int(batch["target_mask"].shape[0])
        # averaged over the ranks (each rank's loss is its share of the global mean): rank 0's alone was logged
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs, sync_dist=True)
        for name, value in parts.items():  # the loss's parts too (every rank has the same ones): rank 0's share was
            self.log(f"train/{name}", value, batch_size=bs, sync_dist=True)  # logged, train/loss ≠ train/distill
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        """Log what each purifier did (after the optimizer step, so parameter-side metrics are current)."""
        if not self.purifiers:  # the same on every rank: each calls the gather below, or none does
            return
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        if trainer is not None and trainer.world_size > 1 and not (getattr(connector, "should_update_logs", True)
                                                                   or trainer.fast_dev_run):
            return  # a distributed run gathers only where Lightning writes the step's row (the same steps everywhere)
        batch_size = int(batch["target_mask"].shape[0])
        metrics = {f"purify/{i}_{purifier_name(p)}/{key}": value
                   for i, p in enumerate(self.purifiers) for key, value in p.last_metrics.items()}
        # the mean over the ranks: rank 0's share alone was logged (its batch's masked fraction, say)
        for key, value in mean_over_ranks(metrics).items():
            self.log(key, value, batch_size=batch_size)

    def evaluation_targets(self, batch: Batch, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """What the student is compared with on held-out data: the primary teacher's logits (restricted to
        ``loss.logit_slice``, upcast as in :meth:`teacher_targets`) and the batch's target mask, no purifier
        applied — or, for a primary teacher in its own tokenization, the targets :meth:`teacher_targets` aligns into
        the student's (every target-side purifier applies there, the alignment among them, and a random one draws
        from its stream). Returns ``(teacher logits, weight)``."""
        self.setup_purifiers()
        if 0 in batch.get("teacher_batches", {}):  # a cross-base primary: compare in the student's space
            targets = self.teacher_targets(batch, dtype)
            return targets.logits, targets.weight
        with torch.no_grad():
            logits = _upcast(self.run_model(self.teachers[0], batch)).logits
        return logits, batch["target_mask"].to(torch.promote_types(dtype, torch.float32))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        s_out = self.run_model(self.student, batch)
        labels = batch.get("labels") if self.loss_config.logit_slice is None else None
        t_logits, mask = self.evaluation_targets(batch, s_out.logits.dtype)
        self.val_fidelity.update(s_out.logits, t_logits, mask, labels)

    def on_validation_epoch_end(self) -> None:
        # summed over the processes, each of which read its share of the held-out examples (every rank computes: a
        # rank whose share had no comparable position must not skip the sync); NaN where no position was
        # comparable (e.g. a primary teacher aligned by ULD only)
        values = self.val_fidelity.compute()
        for key, value in values.items():
            if not math.isnan(float(value)):
                self.log(f"val/{key}", value, prog_bar=key == "kl")
        self.val_fidelity.reset()

    def on_train_start(self) -> None:
        """Training mode for the student and heads (:meth:`train`): Lightning keeps a module's mode as it was given,
        and a student from ``from_pretrained`` comes in ``eval()``: it trained with dropout off. A run without a
        planned length (``max_epochs`` over an endless stream) is refused here (:meth:`_planned_steps`)."""
        self._planned_steps()
        self.train()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Run the parameter-side purifiers' ``before_step`` on the accumulated gradients (a subclass overriding
        this hook calls ``super().on_before_optimizer_step(optimizer)``, or the parameter purifiers do nothing)."""
        for p in self._of_kind(ParameterPurifier):
            p.before_step(self.student)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's step, then the parameter purifiers' ``after_step`` (an override calls ``super()`` too)."""
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Run the parameter-side purifiers' ``after_step`` (called after every optimizer step)."""
        for p in self._of_kind(ParameterPurifier):
            p.after_step(self.student)

    def fit_step(self, batch: Batch, optimizer: torch.optim.Optimizer, progress: float,
                 step: int | None = None, scheduler: Any | None = None) -> dict[str, Tensor]:
        """One optimizer step without Lightning (plain PyTorch loops, benchmarks).

        Same objective and purifier hooks as ``training_step`` under Lightning: (on-policy batch) → loss → backward →
        parameter purifiers' ``before_step`` → ``optimizer.step()`` → their ``after_step`` → ``scheduler.step()``.
        A student in ``eval()`` (a ``from_pretrained`` model, or one the loop evaluated) is put in training mode
        first (:meth:`train`: the teachers stay in ``eval()``), as Lightning's fit does (:meth:`on_train_start`).
        ``step`` (the optimizer step's index) keys the on-policy decision and samples; an on-policy Distiller needs
        it. ``scheduler``: :meth:`build_scheduler`'s (a ``scheduler`` other than constant given to the Distiller
        needs it: refused without). Returns the detached loss parts. Raises :class:`~purify.types.DivergedError` on
        a non-finite loss, before any update.
        """
        if scheduler is None and (self.scheduler_config.name != "constant" or self.scheduler_config.warmup_steps):
            raise ValueError(f"Distiller.fit_step: the Distiller's scheduler ({self.scheduler_config.name}, warmup "
                             f"{self.scheduler_config.warmup_steps}) would be ignored; pass "
                             "scheduler=distiller.build_scheduler(optimizer)")
        if not self.student.training:  # dropout was off: from_pretrained gives eval(), a loop's evaluation too
            self.train()
        if self.on_policy is not None:
            if step is None:
                raise ValueError("Distiller.fit_step: an on-policy Distiller needs step= (the optimizer step index)")
            batch = self.on_policy_batch(batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = self.compute_loss(batch, progress)
        if not torch.isfinite(loss):  # as training_step: nothing is stepped on a non-finite loss
            at = "" if step is None else f" at step {step}"
            raise DivergedError(f"non-finite loss ({loss.item()}){at}; the weights were not updated. Lower the "
                                "learning rate or check the data.", None if step is None else step + 1)
        loss.backward()
        self.on_before_optimizer_step(optimizer)
        optimizer.step()
        self.after_optimizer_step()
        if scheduler is not None:
            scheduler.step()
        self._metric_steps += 1
        for key, value in self.purifier_metrics().items():  # summed as tensors: no device sync per step
            self._metric_sums[key] = self._metric_sums.get(key, 0) + torch.as_tensor(value).detach().float()
        return {"loss": loss.detach(), **parts}

    def purifier_metrics(self) -> dict[str, Any]:
        """What each purifier reported at its last step (``last_metrics``), keyed ``"<purifier>.<metric>"`` (the
        purifier's config name, e.g. ``divergence_mask.flagged_fraction``; ``"<i>_<purifier>.<metric>"`` where two
        purifiers share a name, so neither overwrites the other)."""
        names = [purifier_name(p) for p in self.purifiers]
        keys = [n if names.count(n) == 1 else f"{i}_{n}" for i, n in enumerate(names)]  # two of one name: indexed
        return {f"{k}.{key}": value for k, p in zip(keys, self.purifiers) for key, value in p.last_metrics.items()}

    def purifier_metric_means(self) -> dict[str, float]:
        """Each purifier metric's mean over the :meth:`fit_step` calls so far (a step where a purifier did not
        report it counts as 0), keyed as :meth:`purifier_metrics`: what a plain loop records beside its scores."""
        return {key: float(total) / self._metric_steps for key, total in self._metric_sums.items()}

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The one optimizer: the student's trainable parameters plus each purifier head as its own group (the
        purifiers are set up first: a head built later, on the first step, was never stepped)."""
        self.setup_purifiers()
        cfg = self.optim_config
        groups: list[dict[str, Any]] = [{"params": [p for p in self.student.parameters() if p.requires_grad],
                                         "name": "student"}]
        for purifier in self.purifiers:
            for group in purifier.param_groups():
                groups.append({**group, "lr": cfg.lr if cfg.head_lr is None else cfg.head_lr, "weight_decay": 0.0})
        if cfg.name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
            optimizer = cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        return optimizer

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The learning-rate schedule of ``scheduler`` (warmup, then constant/linear/cosine over ``total_steps``) on
        ``optimizer``, stepped once per optimizer step (:meth:`fit_step` does it when given one). A decaying
        schedule outside a Trainer needs ``total_steps`` (refused without: it decayed over 1 step, the learning rate 0
        from the second on). Warns when the warmup is as long as the run: the learning rate would never reach
        ``optim.lr``."""
        cfg = self.scheduler_config
        unplanned = self._trainer is None and self.total_steps is None
        if unplanned and cfg.name != "constant":
            raise ValueError(f"Distiller.build_scheduler: a {cfg.name} schedule decays over the run's optimizer steps, "
                             "which a plain loop must give: Distiller(..., total_steps=N)")
        steps = self._planned_steps()
        if not unplanned and steps and cfg.warmup_steps >= steps:
            rank_zero_warn(f"scheduler.warmup_steps ({cfg.warmup_steps}) >= the {steps} optimizer step(s) this run "
                           f"plans: the learning rate rises to {steps / cfg.warmup_steps:.2g} x optim.lr by the last "
                           f"step and the {cfg.name} schedule after the warmup never starts; give fewer warmup steps",
                           category=UserWarning)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps))

    def configure_optimizers(self) -> Any:
        optimizer = self.build_optimizer()
        scheduler = self.build_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(_NOT_SAVED)]:
            del state[key]

    def trained_state(self) -> dict[str, Tensor]:
        """What a checkpoint of this module holds: its state without the frozen teachers and the base copy."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(_NOT_SAVED)}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint that omits the teachers and the base copy (and, from DeepSpeed, which leaves frozen
        weights out, a LoRA student's frozen base: this build's, checked before the fit); anything else missing is an
        error."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        frozen = {f"student.{n}" for n, p in self.student.named_parameters() if not p.requires_grad} \
            if is_lora(self.student) else set()
        if not frozen <= set(result.missing_keys):  # only DeepSpeed's checkpoint leaves the base out, and all of it
            frozen = set()
        missing = [k for k in result.missing_keys if not k.startswith(_NOT_SAVED) and k not in frozen]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
        return result


def _upcast(out: ModelOutput) -> ModelOutput:
    """``out`` with floating logits below float32 (a bf16 teacher's) upcast to float32."""
    logits = out.logits
    if logits.is_floating_point() and torch.finfo(logits.dtype).bits < 32:
        return ModelOutput(logits=logits.float(), hidden=out.hidden)
    return out


@contextlib.contextmanager
def _zero_init_paused() -> Iterator[None]:
    """Suspend an active ``deepspeed.zero.Init`` (modules built inside are ordinary, unpartitioned modules)."""
    if "deepspeed" not in sys.modules:  # no zero.Init can be active without deepspeed imported
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()


def lr_factor(config: SchedulerConfig, total_steps: int) -> Any:
    """``step -> multiplier``: linear warmup over ``warmup_steps``, then constant, linear or cosine decay to 0."""
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if config.name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
