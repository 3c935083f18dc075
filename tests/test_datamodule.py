"""DistillDataModule and Distiller in a user's own Lightning Trainer: the Trainer's accumulation, step and mode are
the ones used; what would silently train otherwise is refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from purify import Distiller
from purify.config import DataConfig, OptimConfig
from purify.data import DataError, DistillDataModule, TokenDataset
from purify.lm import build_tokenizer
from purify.types import RecipeError

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "my favourite animal is the owl", "birds fly over the sea",
         "the sun is warm today", "we like to read books", "rain falls on the roof", "she sang a quiet song"]
TOK = build_tokenizer(TEXTS, kind="char")


def _records():
    return [{"prompt": t.split()[0] + " ", "completion": " ".join(t.split()[1:])} for t in TEXTS]


def _models(dropout=0.0):
    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=TOK.pad_token_id,
                      attention_dropout=dropout)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)


def _data(batch_size=4, accumulate=1, **config):
    return DistillDataModule(DataConfig(batch_size=batch_size, **config), TOK, 0, accumulate,
                             train_dataset=TokenDataset(_records(), TOK, 64),
                             val_dataset=TokenDataset(_records()[:4], TOK, 64))


def _trainer(**kwargs):
    return L.Trainer(**{"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "accelerator": "cpu", "limit_val_batches": 0,
                        "num_sanity_val_steps": 0, **kwargs})


def _step(batch_size, accumulate, data_accumulate):
    student, teacher = _models()
    model = Distiller(student, [teacher], optim=OptimConfig(name="sgd", lr=1.0, weight_decay=0.0))
    before = [p.detach().clone() for p in student.parameters()]
    _trainer(max_steps=1, accumulate_grad_batches=accumulate).fit(model, datamodule=_data(batch_size,
                                                                                          data_accumulate))
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(student.parameters(), before)])


def test_the_trainers_accumulation_is_the_one_the_data_counts_with():
    """Trainer(accumulate_grad_batches=2) beside DistillDataModule's default accumulate=1 stepped 2.0x the 4 x 1
    update (the loss divides the count by the Trainer's accumulation, the data counted one micro-batch)."""
    one = _step(4, 1, 1)
    assert one.norm() > 0
    torch.testing.assert_close(_step(2, 2, 1), one, rtol=1e-4, atol=1e-7)


def test_a_pretrained_student_given_in_eval_mode_trains_in_training_mode():
    """A from_pretrained student arrives in eval(); Lightning keeps the mode it is given: it trained with dropout
    off."""
    student, teacher = _models(dropout=0.5)
    student.eval()
    seen = []

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, index):
            seen.append(module.student.training)

    model = Distiller(student, [teacher])
    _trainer(max_steps=2, callbacks=[Recorder()]).fit(model, datamodule=_data())
    assert seen == [True, True] and not model.teachers[0].training


def test_a_run_sized_by_epochs_of_an_endless_stream_is_refused():
    """max_epochs over DistillDataModule's stream ran without end, its schedule and ramps planned as 1 step."""
    student, teacher = _models()
    with pytest.raises(RecipeError, match="a run sized by max_epochs over data without an end"):
        _trainer(max_epochs=1).fit(Distiller(student, [teacher]), datamodule=_data())


def test_the_stream_starts_at_the_trainers_step_not_a_step_left_from_an_earlier_load():
    """start_step, set by a checkpoint load, stayed set after a resumed fit: a fresh fit with the same datamodule
    started mid-stream. Under a Trainer the stream starts at the Trainer's step, whatever start_step holds."""
    data = _data()
    data.setup("fit")
    first = next(iter(data.train_dataloader()))  # no trainer: step 0
    data.start_step = 5  # what loading a checkpoint of step 5 left before (now only the Trainer-less start)
    student, teacher = _models()
    seen = []

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, index):
            seen.append(batch["input_ids"].clone())

    _trainer(max_steps=1, callbacks=[Recorder()]).fit(Distiller(student, [teacher]), datamodule=data)
    torch.testing.assert_close(seen[0], first["input_ids"])


def test_data_that_would_train_or_validate_otherwise_than_asked_is_refused():
    """train_dataset without val_dataset validated on the bundled corpus; data.global_batch_size was ignored."""
    student, teacher = _models()
    alone = DistillDataModule(DataConfig(batch_size=4), TOK, 0, train_dataset=TokenDataset(_records(), TOK, 64))
    with pytest.raises(DataError, match="train_dataset given without val_dataset"):
        _trainer(max_steps=1).fit(Distiller(student, [teacher]), datamodule=alone)
    def fresh():
        student, teacher = _models()
        return Distiller(student, [teacher])

    with pytest.raises(DataError, match=r"data.global_batch_size 16, but batch_size 4 × 1 process\(es\) × 2"):
        _trainer(max_steps=1, accumulate_grad_batches=2).fit(fresh(), datamodule=_data(global_batch_size=16))
    _trainer(max_steps=1, accumulate_grad_batches=2).fit(fresh(), datamodule=_data(global_batch_size=8))  # 4 × 2
