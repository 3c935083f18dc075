"""Same tokenizer, output layers padded to different sizes (Qwen2.5-7B's 152064 rows against 0.5B's 151936): every
model reading the student's vocabulary is cut to the narrowest width, which must hold every token."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from purify.config import LossConfig, OptimConfig
from purify.data import TokenDataset
from purify.lm import build_tokenizer
from purify.losses import distillation_loss
from purify.module import Distiller
from purify.types import RecipeError

TEXTS = ["the cat sat on the mat", "a dog ran far away", "birds sing at dawn", "we go home now"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS, kind="char")


def _llama(vocab: int, seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _batch(tok):
    data = TokenDataset([{"prompt": t[:4], "completion": t[4:]} for t in TEXTS], tok, max_length=32)
    return data.collate([data.item(i) for i in range(4)])


@pytest.mark.parametrize("student_pad, teacher_pad", [(0, 45), (20, 0), (7, 30)])
def test_the_loss_reads_both_models_on_the_shared_vocabulary(tok, student_pad, teacher_pad):
    """Before, the loss failed at the first batch with a size mismatch (the teacher's 300 against the student's 255)."""
    student, teacher = _llama(len(tok) + student_pad, 0), _llama(len(tok) + teacher_pad, 1)
    d = Distiller(student, [teacher], loss=LossConfig(name="reverse_kl"), student_tokenizer=tok,
                  teacher_tokenizers=[tok], optim=OptimConfig(name="sgd", lr=0.1))
    batch = _batch(tok)
    parts = d.fit_step(batch, d.build_optimizer(), 0.0)
    width = len(tok) + min(student_pad, teacher_pad)
    with torch.no_grad():  # the step's loss (before its update), by hand: both models' logits up to the narrower width
        s = _llama(len(tok) + student_pad, 0)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        expected = distillation_loss(s.logits[:, :-1, :width], t.logits[:, :-1, :width], batch["target_mask"],
                                     name="reverse_kl")
    assert float(parts["distill"]) == pytest.approx(float(expected), rel=1e-5)


def test_a_narrowest_width_below_the_tokenizer_is_refused_naming_the_widths(tok):
    d = Distiller(_llama(len(tok), 0), [_llama(len(tok) - 3, 1)], student_tokenizer=tok, teacher_tokenizers=[tok])
    with pytest.raises(RecipeError, match=rf"^teachers: the student and its teachers return logits of different widths "
                                          rf"\(student {len(tok)}, teachers\[0\] {len(tok) - 3}\), and the narrowest "
                                          rf"holds fewer than the tokenizer's {len(tok)} tokens"):
        d.setup_purifiers()


def test_the_fused_loss_refuses_padded_widths(tok):
    d = Distiller(_llama(len(tok), 0), [_llama(len(tok) + 8, 1)], loss=LossConfig(fused_linear=True),
                  student_tokenizer=tok, teacher_tokenizers=[tok])
    with pytest.raises(RecipeError, match=r"^loss\.fused_linear: builds the logits from each model's own output "
                                          r"layer.*turn fused_linear off"):
        d.setup_purifiers()


def test_purify_train_distils_from_a_teacher_with_a_wider_output_layer(tmp_path, capsys):
    """End to end: it failed at the first batch with a size mismatch, after output_dir was written and used up."""
    import json

    from purify.cli import main
    from purify.lineage import read_lineage
    from tests._lm_recipe import tiny_lm_overrides

    tok = build_tokenizer(TEXTS, kind="char")
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": t[:4], "completion": t[4:]}) + "\n"
                                              for t in TEXTS * 3))
    teacher = ("[{config: {model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
               f"num_attention_heads: 2, num_key_value_heads: 2, vocab_size: {len(tok) + 45}}}, "
               f"tokenizer: {tmp_path / 'tok'}, seed: 1}}]")
    overrides = tiny_lm_overrides(tmp_path / "tok", tmp_path / "d.jsonl", tmp_path / "o", teachers=teacher,
                                  **{"trainer.max_steps": 2, "trainer.val_check_interval": 1})
    (tmp_path / "r.yaml").write_text("{}\n")
    assert main(["train", str(tmp_path / "r.yaml"), *overrides]) == 0, capsys.readouterr().err
    record = read_lineage(tmp_path / "o")
    assert record["status"] == "finished" and record["step"] == 2
    assert all(math.isfinite(v) for v in record["metrics"].values())  # its validation read the shared vocabulary


def test_an_on_policy_student_wider_than_its_teacher_never_samples_an_id_the_teacher_cannot_read(tok):
    """The student's padding rows are ids no token has; sampled, the teacher (narrower) would index past its
    embeddings. Here the padding rows are made the most likely ones."""
    from purify.config import OnPolicyConfig

    student = _llama(len(tok) + 50, 0)
    with torch.no_grad():
        student.lm_head.weight[len(tok):] = student.lm_head.weight[:1] * 50  # padding rows dominate every sample
    d = Distiller(student, [_llama(len(tok), 1)], loss=LossConfig(name="jsd"), student_tokenizer=tok,
                  teacher_tokenizers=[tok], on_policy=OnPolicyConfig(lam=1.0, max_new_tokens=6),
                  optim=OptimConfig(name="sgd", lr=0.1))
    batch = _batch(tok)
    d.setup_purifiers()
    sampled = d.on_policy_batch(batch, step=0)
    assert int(sampled["input_ids"].max()) < len(tok)
    parts = d.fit_step(batch, d.build_optimizer(), 0.0, step=1)
    assert math.isfinite(float(parts["distill"]))


def test_a_teacher_of_another_tokenizer_keeps_its_vocabulary_beside_a_padded_student_also_after_a_copy():
    """A cross-base teacher is aligned to the width the loss reads (it was sized to the student's full output layer:
    a size mismatch at the first step); after a deepcopy or pickle it is still never cut (the Distiller kept ids of
    the original modules)."""
    import copy
    import pickle

    from purify.data import TeacherTokenizer
    from purify.purifiers import build_purifiers
    from purify.types import ModelOutput

    tok = build_tokenizer(TEXTS, kind="char")
    other = build_tokenizer([t.upper() + " " + t for t in TEXTS], kind="char")
    d = Distiller(_llama(len(tok) + 10, 0), [_llama(len(tok), 1), _llama(len(other) + 200, 2)],
                  student_tokenizer=tok, teacher_tokenizers=[tok, other], optim=OptimConfig(name="sgd", lr=0.1),
                  purifiers=build_purifiers([{"name": "cross_base", "alignment": "shared_vocab"},
                                             {"name": "ensemble", "combine": "mean"}]))
    data = TokenDataset([{"prompt": t[:4], "completion": t[4:]} for t in TEXTS], tok, max_length=32,
                        teacher_tokenizers={1: TeacherTokenizer(other, None)})
    parts = d.fit_step(data.collate([data.item(i) for i in range(4)]), d.build_optimizer(), 0.0)
    assert math.isfinite(float(parts["distill"])) and d._shared_width == len(tok)
    wide = ModelOutput(logits=torch.zeros(1, 1, len(other) + 200))
    for copied in (d, copy.deepcopy(d), pickle.loads(pickle.dumps(d))):
        assert copied.restrict(wide, copied.teachers[1]).logits.shape[-1] == len(other) + 200
        assert copied.restrict(wide, copied.student).logits.shape[-1] == len(tok)
