"""PurifyTrainer behaves like transformers.Trainer: evaluate() reports eval_loss, accumulation is token-normalised."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM, TrainingArguments

from purify import Adversary, AdversaryConfig, PurifyTrainer, RecipeError
from purify.lm import build_tokenizer
from purify.losses import distillation_loss
from purify.models import model_forward

SENTENCES = ["the cat sat on the mat", "a dog ran", "birds sing at dawn in the tall trees", "ok", "we go home now",
             "rain", "the mat is red and the cat is grey", "a b c"]


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer(SENTENCES, kind="char")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    student, teacher = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    rows = []
    for text in SENTENCES:  # ragged: 1 to 36 target tokens per row
        ids = tok(text)["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return tok, student, teacher, rows


def _trainer(setup, tmp_path, student, batch, accumulate, teachers=None, purifiers=(), steps=1, loss=None, train=None,
             **kwargs):
    tok, _, teacher, rows = setup
    args = TrainingArguments(str(tmp_path / f"b{batch}a{accumulate}"), max_steps=steps,
                             per_device_train_batch_size=batch, per_device_eval_batch_size=4,
                             gradient_accumulation_steps=accumulate, learning_rate=0.1, optim="sgd",
                             lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             use_cpu=True, dataloader_drop_last=False, **kwargs)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    return PurifyTrainer(model=student, teachers=teachers or [teacher], purifiers=purifiers, args=args, loss=loss,
                         train_dataset=train or rows, eval_dataset=train or rows, data_collator=collator)


@pytest.mark.parametrize("shape", [(4, 2), (1, 8)])
def test_accumulated_step_equals_one_large_batch_on_ragged_data(setup, tmp_path, shape):
    """8×1 vs 4×2 vs 1×8: one SGD step from the same weights lands on the same weights (the old per-micro-batch
    mean differed by ~21% here, because short and long sentences weighed the same)."""
    _, student, _, _ = setup
    ref = copy.deepcopy(student)
    _trainer(setup, tmp_path, ref, 8, 1).train()
    other = copy.deepcopy(student)
    _trainer(setup, tmp_path, other, *shape).train()
    moved = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), student.parameters()))
    gap = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), other.parameters()))
    assert moved > 1e-3  # the step did something
    assert gap < 1e-5 * max(1.0, moved)


@pytest.mark.parametrize("loss_only", [False, True])
def test_evaluate_returns_the_distillation_objective_as_eval_loss(setup, tmp_path, loss_only):
    tok, student, teacher, rows = setup
    trainer = _trainer(setup, tmp_path, copy.deepcopy(student), 4, 1, prediction_loss_only=loss_only)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    # the same objective by hand: forward KL per target token, averaged per eval batch of 4, then over batches
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    losses = []
    for i in range(0, len(rows), 4):
        inputs = collator(rows[i:i + 4])
        labels = inputs["labels"][:, 1:]
        mask = (labels != -100).float()
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "target_mask": mask}
        with torch.no_grad():
            s, t = model_forward(student, batch).logits, model_forward(teacher, batch).logits
        losses.append(distillation_loss(s, t, mask, name="forward_kl").item())
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    if not loss_only:  # compute_metrics gets the model's own logits, every position (were one short of label_ids)
        out = trainer.predict(rows[:4])
        inputs = collator(rows[:4])
        with torch.no_grad():
            logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        assert out.predictions.shape == (*out.label_ids.shape, logits.shape[-1])
        torch.testing.assert_close(torch.as_tensor(out.predictions), logits, rtol=1e-5, atol=1e-5)


def test_evaluate_of_rows_without_labels_is_refused_and_predict_still_returns_logits(setup, tmp_path):
    """evaluate() on rows without a labels column returned metrics without eval_loss (Trainer skips the loss when a
    batch has no labels), silently: it is refused like train(); predict() of the same rows still gives the logits."""
    tok, student, _, rows = setup
    unlabelled = [{k: v for k, v in row.items() if k != "labels"} for row in rows]
    trainer = _trainer(setup, tmp_path, copy.deepcopy(student), 4, 1, train=unlabelled)
    with pytest.raises(ValueError, match="the batch has no 'labels'.*attention_mask.*input_ids"):
        trainer.evaluate()
    trainer.compute_metrics = lambda prediction: {"n": 1.0}  # evaluate() then asked for logits: it was let through
    with pytest.raises(ValueError, match="the batch has no 'labels'"):
        trainer.evaluate()
    out = trainer.predict(unlabelled[:4])
    assert out.predictions.shape[0] == 4 and out.predictions.shape[-1] == len(tok)


def test_a_model_made_by_model_init_is_the_one_the_purifiers_and_evaluate_see(setup, tmp_path):
    """Trainer.train() calls model_init anew; the purifiers and evaluate() kept the first model: an anchor held the
    student to a model nobody trained (no effect at weight 1e3) and eval_loss scored the untrained one."""
    from purify import Anchor, AnchorConfig

    tok, student, _, rows = setup

    def init():
        return copy.deepcopy(student)

    runs = {}
    for how in ("model", "model_init"):
        trainer = _trainer(setup, tmp_path / how, init(), 4, 1, purifiers=[Anchor(AnchorConfig(weight=1e3))],
                           steps=2)
        if how == "model_init":  # the same run, its student made by model_init
            trainer = PurifyTrainer(model_init=init, teachers=list(trainer.distiller.teachers), args=trainer.args,
                                    purifiers=[Anchor(AnchorConfig(weight=1e3))], train_dataset=rows,
                                    eval_dataset=rows, data_collator=trainer.data_collator)
        trainer.train()
        assert trainer.distiller.student is trainer.model
        runs[how] = (trainer.model, trainer.evaluate()["eval_loss"])
    (given, given_loss), (made, made_loss) = runs["model"], runs["model_init"]
    for a, b in zip(given.parameters(), made.parameters()):
        torch.testing.assert_close(a, b)
    assert made_loss == pytest.approx(given_loss, rel=1e-6)


def test_packed_batches_and_unaligned_teacher_tokenizers_are_refused(setup, tmp_path):
    """Packed rows (DataCollatorWithFlattening: position_ids restart per sequence, no attention mask) were trained as
    one sequence, each attending to the ones before it; a teacher given another tokenizer (teacher_tokenizers=)
    scored the student's token ids as its own; cross_base failed at the first step naming DistillDataModule."""
    from transformers import DataCollatorWithFlattening

    from purify import CrossBase, CrossBaseConfig, Distiller

    tok, student, teacher, rows = setup
    packed = DataCollatorWithFlattening()([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows[:2]])
    trainer = _trainer(setup, tmp_path, copy.deepcopy(student), 4, 1)
    with pytest.raises(ValueError, match="position_ids are not 0, 1, 2, ... \\(packed sequences"):
        trainer.compute_loss(trainer.model, dict(packed))
    plain = {k: v for k, v in DataCollatorForSeq2Seq(tok, padding=True)(rows[:2]).items()}
    positions = torch.arange(plain["input_ids"].shape[1]).expand_as(plain["input_ids"])
    assert torch.isfinite(trainer.compute_loss(trainer.model, {**plain, "position_ids": positions}))  # 0, 1, 2: fine
    other = build_tokenizer(SENTENCES, kind="word")
    with pytest.raises(RecipeError, match="teachers\\[0\\].tokenizer: differs from the student's tokenizer"):
        Distiller(copy.deepcopy(student), [teacher], student_tokenizer=tok, teacher_tokenizers=[other])
    with pytest.raises(ValueError, match="PurifyTrainer: teachers\\[0\\]'s tokenizer differs from the student's"):
        PurifyTrainer(model=copy.deepcopy(student), teachers=[teacher], processing_class=tok,
                      teacher_tokenizers=[other], args=TrainingArguments(str(tmp_path / "x"), use_cpu=True,
                                                                          report_to=[]))
    with pytest.raises(ValueError, match="cross_base\\) needs each example also in the teacher's tokenization"):
        _trainer(setup, tmp_path, copy.deepcopy(student), 4, 1, purifiers=[CrossBase(CrossBaseConfig())])


def test_a_purifier_head_beside_a_users_own_scheduler_is_refused_with_the_fix(setup, tmp_path):
    """optimizers=(optimizer, scheduler) with an adversary head: the head joined the optimizer after the scheduler
    was built for fewer groups, and the first scheduler step failed with torch's "zip() argument 2 is shorter"."""
    tok, student, teacher, rows = setup
    model = copy.deepcopy(student)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = TrainingArguments(str(tmp_path / "own"), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    adversary = Adversary(AdversaryConfig(weight=0.1))
    trainer = PurifyTrainer(model=model, teachers=[teacher, _noisy(teacher)], purifiers=[adversary], args=args,
                            train_dataset=rows, data_collator=collator, optimizers=(optimizer, scheduler))
    with pytest.raises(ValueError, match=r"Adversary's head joins the optimizer .* optimizers=\(optimizer, None\)"):
        trainer.train()


def test_an_on_policy_step_weighs_the_same_on_one_process_or_two(setup, tmp_path, monkeypatch):
    """Under DDP a sampled step's distillation term came out 1/(number of processes) of its weight once the loss
    was no longer multiplied by the processes (its count was scaled by them too): each rank's loss is its own
    sampled tokens' mean, whatever the number of processes."""
    from accelerate import Accelerator

    from purify.config import OnPolicyConfig

    tok, student, teacher, rows = setup
    args = TrainingArguments(str(tmp_path / "op"), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = PurifyTrainer(model=copy.deepcopy(student), teachers=[teacher], args=args, train_dataset=rows,
                            data_collator=collator, processing_class=tok,
                            on_policy=OnPolicyConfig(lam=1.0, max_new_tokens=4))
    trainer.model.train()
    inputs = collator(rows[:4])
    count = int((inputs["labels"][:, 1:] != -100).sum())
    losses = []
    for processes in (1, 2):  # two ranks holding the same rows: Trainer's count is twice one rank's
        monkeypatch.setattr(Accelerator, "num_processes", property(lambda self, n=processes: n))
        trainer.distiller.on_policy._step = -1  # the same samples: micro-batch 0 of step 0 again
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, dict(inputs),
                                               num_items_in_batch=torch.tensor(processes * count)))
    assert losses[0] > 0
    torch.testing.assert_close(losses[0], losses[1])


def _noisy(teacher, scale=0.3, seed=1):
    torch.manual_seed(seed)
    other = copy.deepcopy(teacher)
    for p in other.parameters():
        p.data.add_(scale * torch.randn_like(p))
    return other


def test_eval_loss_is_the_distillation_term_alone_on_the_sliced_logits(setup, tmp_path):
    """With ``loss.logit_slice`` evaluate() crashed (the logits it compared were not sliced); and eval_loss carried the
    student-side purifier terms (an anchor of weight 100 made it 14× the distillation term). It is the distillation
    term against the primary teacher on the slice, by hand."""
    from purify import Anchor, AnchorConfig
    from purify.config import LossConfig

    tok, student, teacher, rows = setup
    trainer = _trainer(setup, tmp_path, copy.deepcopy(student), 4, 1, purifiers=[Anchor(AnchorConfig(weight=100.0))],
                       steps=2, loss=LossConfig(logit_slice=[0, 10]))
    trainer.train()
    metrics = trainer.evaluate()
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    losses = []
    for i in range(0, len(rows), 4):
        inputs = collator(rows[i:i + 4])
        mask = (inputs["labels"][:, 1:] != -100).float()
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "target_mask": mask}
        with torch.no_grad():
            s, t = model_forward(trainer.model, batch).logits, model_forward(teacher, batch).logits
        losses.append(distillation_loss(s[..., :10], t[..., :10], mask, name="forward_kl").item())
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_evaluating_during_training_changes_nothing_it_trains(setup, tmp_path):
    """Evaluation ran the purifiers, drawing from their random streams (a random divergence mask, a function
    anchor's neutral inputs): turning ``eval_strategy`` on changed the trained weights (by 2e-4 here)."""
    from purify import DivergenceMask, DivergenceMaskConfig

    _, student, teacher, _ = setup
    other = _noisy(teacher)

    def run(**kw):
        mask = DivergenceMask(DivergenceMaskConfig(flag="random", rate=0.5, reference="others"))
        trainer = _trainer(setup, tmp_path, copy.deepcopy(student), 4, 1, teachers=[teacher, other],
                           purifiers=[mask], steps=4, **kw)
        trainer.train()
        return trainer.model

    plain, evaluated = run(), run(eval_strategy="steps", eval_steps=1)
    moved = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), student.parameters()))
    assert moved > 1e-3
    for a, b in zip(plain.parameters(), evaluated.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_source_column_reaches_the_adversary_with_default_arguments(setup, tmp_path):
    """Trainer drops dataset columns its model's forward does not take (``remove_unused_columns``, on by default):
    ``source`` never reached ``target: source`` ("needs batch['source']" though every record had one)."""
    _, student, teacher, rows = setup
    sourced = [dict(r, source=i % 2) for i, r in enumerate(rows)]
    adversary = _RecordingAdversary(AdversaryConfig(name="adversary", weight=0.1, target="source"))
    trainer = _trainer(setup, tmp_path, copy.deepcopy(student), 4, 1, purifiers=[adversary], steps=2, train=sourced)
    trainer.train()
    moved = max((v - adversary.initial[k]).abs().max().item() for k, v in adversary.head.state_dict().items())
    assert moved > 1e-6


class _GradientRecorder:
    """A parameter-side purifier that records the student's gradient norm each time ``before_step`` runs."""

    @staticmethod
    def make():
        from purify.purifiers.base import ParameterPurifier

        class Recorder(ParameterPurifier):
            name = "recorder"

            def __init__(self):
                torch.nn.Module.__init__(self)
                self.last_metrics, self.norms = {}, []

            def before_step(self, student):
                self.norms.append(float(torch.cat([p.grad.flatten() for p in student.parameters()]).norm()))

        return Recorder()


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_parameter_purifiers_see_the_raw_gradients_once_per_step_and_heads_are_clipped_too(setup, tmp_path, clip):
    """As ``purify train`` (Lightning's gradient_clip_val): parameter purifiers edit the raw accumulated gradients,
    then the student's and the heads' gradients are clipped together. Trainer clipped the model alone, before the
    purifiers ran (they saw clipped gradients; the adversary's head took unclipped steps)."""
    _, student, teacher, _ = setup
    recorder = _GradientRecorder.make()
    adversary = _RecordingAdversary(AdversaryConfig(name="adversary", weight=0.1, target="lineage", ramp="constant"))
    trainer = _trainer(setup, tmp_path, copy.deepcopy(student), 4, 1, teachers=[teacher, _noisy(teacher)],
                       purifiers=[adversary, recorder], steps=2, max_grad_norm=clip)
    trainer.train()
    assert len(recorder.norms) == 2  # once per optimizer step, with or without clipping
    if clip:
        assert recorder.norms[0] > 100 * clip  # raw, not clipped
        moved = torch.cat([(a - b).flatten() for a, b in zip(trainer.model.parameters(), student.parameters())]
                          + [(v - adversary.initial[k]).flatten() for k, v in adversary.head.state_dict().items()])
        assert float(moved.detach().norm()) <= 2 * 0.1 * clip * (1 + 1e-4)  # two SGD steps of lr 0.1, each <= clip


def test_eval_strategy_steps_logs_eval_loss_during_training(setup, tmp_path):
    _, student, _, _ = setup
    trainer = _trainer(setup, tmp_path, copy.deepcopy(student), 4, 1, eval_strategy="steps", eval_steps=1)
    trainer.train()
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


class _RecordingAdversary(Adversary):
    """An adversary that keeps a copy of its discriminator head as ``setup`` built it."""

    def setup(self, ctx):
        super().setup(ctx)
        self.initial = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        self.total_steps = ctx.total_steps


def test_purifier_heads_join_the_optimizer_and_train(setup, tmp_path):
    """The adversary's head is built in ``setup``: it must exist when Trainer creates its optimizer, be one group of
    its own there, and move (it used to be built on the first compute_loss, after the optimizer, and never train)."""
    _, student, teacher, _ = setup
    torch.manual_seed(1)
    other = copy.deepcopy(teacher)
    for p in other.parameters():
        p.data.add_(0.5 * torch.randn_like(p))
    adversary = _RecordingAdversary(AdversaryConfig(name="adversary", weight=0.1, target="lineage"))
    trainer = _trainer(setup, tmp_path, copy.deepcopy(student), 4, 1, teachers=[teacher, other],
                       purifiers=[adversary], steps=3)
    trainer.train()
    head = list(adversary.head.parameters())
    assert head and adversary.initial
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in head)
    groups = [g for g in trainer.optimizer.param_groups if any(p is q for p in g["params"] for q in head)]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == {id(p) for p in head}
    assert groups[0]["weight_decay"] == 0.0
    moved = max((v - adversary.initial[k]).abs().max().item() for k, v in adversary.head.state_dict().items())
    assert moved > 1e-6


def test_a_run_sized_by_epochs_tells_the_purifiers_its_steps(setup, tmp_path):
    """With ``num_train_epochs`` and no ``max_steps`` (args.max_steps = -1) the purifiers' schedules (e.g. the
    gradient-reversal ramp) get the optimizer steps train() computes, not 1."""
    _, student, teacher, rows = setup
    other = copy.deepcopy(teacher)
    adversary = _RecordingAdversary(AdversaryConfig(name="adversary", weight=0.1, target="lineage"))
    trainer = _trainer(setup, tmp_path, copy.deepcopy(student), 4, 1, teachers=[teacher, other],
                       purifiers=[adversary], steps=-1, num_train_epochs=2)
    trainer.train()
    assert trainer.state.max_steps == 2 * math.ceil(len(rows) / 4) > 1
    assert adversary.total_steps == trainer.state.max_steps


def test_head_lr_sets_the_purifier_heads_learning_rate(setup, tmp_path):
    """``head_lr`` is ``optim.head_lr`` of ``purify train``: the heads' group trains at it, the student at
    ``args.learning_rate``; a non-positive one is refused by name."""
    tok, student, teacher, rows = setup
    other = copy.deepcopy(teacher)
    adversary = _RecordingAdversary(AdversaryConfig(name="adversary", weight=0.1, target="lineage"))
    args = TrainingArguments(str(tmp_path / "h"), max_steps=2, per_device_train_batch_size=4, learning_rate=0.1,
                             optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True)
    trainer = PurifyTrainer(model=copy.deepcopy(student), teachers=[teacher, other], purifiers=[adversary], args=args,
                            train_dataset=rows, data_collator=DataCollatorForSeq2Seq(tok, padding=True),
                            head_lr=0.02)
    trainer.train()
    head = {id(p) for p in adversary.head.parameters()}
    lrs = {any(id(p) in head for p in g["params"]): g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {True: pytest.approx(0.02), False: pytest.approx(0.1)}
    with pytest.raises(ValueError, match=r"head_lr: must be a finite number > 0, or None for args.learning_rate, "
                                         r"got -1"):
        PurifyTrainer(model=student, teachers=[teacher], args=args, head_lr=-1)
    smoothed = TrainingArguments(str(tmp_path / "s"), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"label_smoothing_factor: 0.1 smooths Trainer's own cross-entropy"):
        PurifyTrainer(model=student, teachers=[teacher], args=smoothed)  # was silently ignored


def _resumable(setup, tmp_path, student, teachers, purifiers, save: bool):
    tok, _, _, rows = setup
    args = TrainingArguments(str(tmp_path / "ck"), max_steps=6, per_device_train_batch_size=4, learning_rate=0.05,
                             optim="adamw_torch", lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             save_strategy="steps" if save else "no", save_steps=3, seed=0, data_seed=0,
                             disable_tqdm=True)
    return PurifyTrainer(model=student, teachers=teachers, purifiers=purifiers, args=args, train_dataset=rows,
                         data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))


@pytest.mark.parametrize("kind", ["anchor", "adversary"])
def test_a_resumed_run_equals_the_uninterrupted_one_with_purifiers(setup, tmp_path, kind):
    """``train(resume_from_checkpoint=...)`` with purifiers: the anchor's base was the checkpoint's weights (it must
    stay the starting weights) and the adversary's head was not saved (it restarted from scratch under a restored
    optimizer). Both now resume exactly; a checkpoint without the heads is refused."""
    from purify import Anchor, AnchorConfig

    _, student, teacher, _ = setup
    other = copy.deepcopy(teacher)
    for p in other.parameters():
        p.data.add_(0.3)

    def purifiers():
        return [Anchor(AnchorConfig(weight=1.0))] if kind == "anchor" else [
            Adversary(AdversaryConfig(name="adversary", weight=0.1, target="lineage"))]

    whole = _resumable(setup, tmp_path, copy.deepcopy(student), [teacher, other], purifiers(), save=True)
    whole.train()
    resumed = _resumable(setup, tmp_path, copy.deepcopy(student), [teacher, other], purifiers(), save=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "ck" / "checkpoint-3"))
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(whole.distiller.purifiers.state_dict().values(), resumed.distiller.purifiers.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in whole.distiller.purifiers.parameters())  # zeroed after each step (added up)
    whole.save_model(str(tmp_path / "export"))  # an export is the model alone: the heads belong to checkpoints
    whole._tune_save_checkpoint(str(tmp_path / "tune"))  # a Ray Tune trial's checkpoint held the model alone
    heads = tmp_path / "tune" / "checkpoint-6" / "purifiers.pt"
    assert heads.is_file() == (kind == "adversary")  # the anchor has no state of its own
    if kind == "adversary":
        assert torch.load(heads, weights_only=True).keys() == whole.distiller.purifiers.state_dict().keys()
    assert (tmp_path / "export" / "model.safetensors").is_file() and not (tmp_path / "export" / "purifiers.pt").exists()
    if kind == "adversary":
        (tmp_path / "ck" / "checkpoint-3" / "purifiers.pt").unlink()
        again = _resumable(setup, tmp_path, copy.deepcopy(student), [teacher, other], purifiers(), save=False)
        with pytest.raises(ValueError, match=r"checkpoint-3 holds no purifiers.pt for this run's purifier heads"):
            again.train(resume_from_checkpoint=str(tmp_path / "ck" / "checkpoint-3"))


def _average_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from purify.hf import average_across_processes

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        head = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
        head[0].grad = torch.full((3,), float(rank + 1))  # head[1] has no gradient on any rank
        average_across_processes(head)
        torch.save([p.grad for p in head], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_purifier_heads_gradients_are_averaged_over_processes(tmp_path):
    """Under DDP the heads (outside the wrapped model) kept each rank's own gradient: the heads drifted apart and the
    joint clipping scaled the student's synchronised gradients differently on each rank."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "grads")
    mp.spawn(_average_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    for rank in (0, 1):
        first, second = torch.load(f"{out}.{rank}")
        assert torch.equal(first, torch.full((3,), 1.5)) and torch.equal(second, torch.zeros(2))


@pytest.mark.parametrize("purifier", ["", "adversary"])
def test_ddp_ranks_train_one_student(tmp_path, purifier):
    """``compute_loss`` ran the unwrapped student, so DDP never averaged its gradients: after 2 steps the two ranks'
    students differed by 0.03 (and each stepped on twice its share). Now the forward goes through the wrapper."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("_hf_ddp.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(script.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), purifier], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"student.{rank}.pt") for rank in (0, 1))
    torch.manual_seed(0)
    init = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2)).state_dict()
    assert any(not torch.equal(first[k], init[k]) for k in init)  # it trained
    for key in first:  # the student and (with the adversary) its head
        torch.testing.assert_close(first[key], second[key], atol=1e-6, rtol=0)


def _run_hf_ddp(out, processes: int, *options: str) -> dict:
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("_hf_ddp.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(script.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), str(script), str(out), *options], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "student.0.pt")


def test_two_processes_train_a_purified_student_as_one_does(tmp_path):
    """Under DDP the whole loss was multiplied by the number of processes (right for the distillation term, whose
    count is all ranks'): every student-side purifier term weighed twice on 2 processes (an anchor of weight 1 pulled
    as one of weight 2; a constant-gradient term moved the weights 0.2 instead of 0.1). 1 × 4 rows = 2 × 2 rows now."""
    one = _run_hf_ddp(tmp_path / "one", 1, "anchor")
    two = _run_hf_ddp(tmp_path / "two", 2, "anchor")
    moved = max((one[k] - v).abs().max().item() for k, v in _initial_tiny().items())
    assert moved > 1e-3  # it trained
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-6, rtol=0)


def _initial_tiny() -> dict:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2)).state_dict()


def test_labels_on_padding_are_not_counted_in_the_global_token_count(setup, tmp_path):
    """Trainer counted labelled positions where ``attention_mask`` is 0, which the loss leaves out: the loss of a
    collator that pads labels with the pad id (or ``labels=input_ids``) shrank by real ÷ labelled positions."""
    tok, student, _, _ = setup
    trainer = _trainer(setup, tmp_path, student, batch=4, accumulate=1)
    ids = torch.randint(3, len(tok), (4, 8), generator=torch.Generator().manual_seed(0))
    attention = torch.ones(4, 8, dtype=torch.long)
    attention[:, 4:] = 0
    clean = {"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(attention == 0, -100)}
    padded = {**clean, "labels": ids}  # labels on the padding too
    counts = [trainer._get_num_items_in_batch([b], torch.device("cpu")) for b in (clean, padded)]
    assert int(counts[0]) == int(counts[1]) == 4 * 3  # positions 1..3 of each row predict a real token
    student.train()
    losses = [trainer.compute_loss(student, b, num_items_in_batch=n) for b, n in zip((clean, padded), counts)]
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(losses[0], trainer.compute_loss(student, clean))


def test_a_compiled_student_trains_as_the_plain_one(setup, tmp_path):
    """With ``torch_compile=True`` the Trainer hands compute_loss the compiled module: calling it as a purify vector
    model (a dict) was a TypeError once the forward went through the model given."""
    _, student, _, _ = setup
    plain, compiled = copy.deepcopy(student), copy.deepcopy(student)
    _trainer(setup, tmp_path / "plain", plain, batch=4, accumulate=1).train()
    _trainer(setup, tmp_path / "compiled", compiled, batch=4, accumulate=1, torch_compile=True,
             torch_compile_backend="eager").train()
    for (name, a), b in zip(plain.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)


def test_fused_linear_is_refused_where_a_wrapper_syncs_the_gradients(setup, tmp_path, monkeypatch):
    """The fused loss runs the student's decoder outside the wrapper; accelerate compiles after wrapping in DDP, so
    the model's type cannot tell (a compiled DDP model trained each rank apart): the distributed type decides."""
    from accelerate.utils import DistributedType

    from purify.config import LossConfig

    tok, student, _, rows = setup
    trainer = _trainer(setup, tmp_path, copy.deepcopy(student), batch=4, accumulate=1,
                       loss=LossConfig(fused_linear=True))
    inputs = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(rows[:2])
    trainer.model.train()
    assert torch.isfinite(trainer.compute_loss(trainer.model, inputs))  # one process: fused
    multi_gpu = property(lambda self: DistributedType.MULTI_GPU)
    monkeypatch.setattr(type(trainer.accelerator), "distributed_type", multi_gpu)
    with pytest.raises(ValueError, match=r"loss\.fused_linear runs the student's decoder itself, outside the "
                                         r"MULTI_GPU"):
        trainer.compute_loss(trainer.model, inputs)
