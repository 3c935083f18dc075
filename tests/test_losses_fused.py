"""The fused linear + distillation loss: the student's logits never built, the same value and gradients as the loss
on ``h Wᵀ + b``; ``loss.fused_linear`` in a Distiller step and a ``purify train`` run, and its refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from purify.config import LossConfig, OptimConfig, RecipeError
from purify.data import TokenDataset
from purify.lm import build_tokenizer
from purify.losses import distillation_loss
from purify.losses_fused import fused_linear_distillation_loss
from purify.models import decoder_hidden, fused_problem, model_forward
from purify.module import Distiller
from purify.purifiers import Adversary, AdversaryConfig, TailTruncation, TailTruncationConfig

LOSSES = [("forward_kl", 0.0), ("reverse_kl", 0.0), ("jsd", 0.0), ("mse", 0.0), ("ce", 0.0), ("forward_kl", 0.3),
          ("jsd", 0.5)]


def _case(seed: int = 0, n: int = 9, h: int = 5, v: int = 13):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden, t_weight = torch.randn(2, n, 4, generator=g, dtype=torch.float64), torch.randn(v, 4, generator=g,
                                                                                           dtype=torch.float64)
    mask = (torch.rand(2, n, generator=g) > 0.3).double()
    labels = torch.randint(0, v, (2, n), generator=g)
    return hidden, weight, bias, t_hidden, t_weight, mask, labels


@pytest.mark.parametrize("name, hard", LOSSES)
@pytest.mark.parametrize("teacher", ["logits", "linear"])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_value_and_gradients_equal_the_loss_on_the_built_logits(name, hard, teacher, chunk):
    hidden, weight, bias, t_hidden, t_weight, mask, labels = _case()
    common = dict(name=name, temperature=1.7, labels=labels, hard_label_weight=hard, num_items=11.0)
    ref = distillation_loss(hidden @ weight.T + bias, t_hidden @ t_weight.T, mask, chunk_size=0, **common)
    expected = torch.autograd.grad(ref, [hidden, weight, bias])
    given = ({"teacher_logits": t_hidden @ t_weight.T} if teacher == "logits"
             else {"teacher_hidden": t_hidden, "teacher_weight": t_weight})
    out = fused_linear_distillation_loss(hidden, weight, bias, row_weight=mask, chunk_size=chunk, **given, **common)
    got = torch.autograd.grad(out, [hidden, weight, bias])
    assert out.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_cross_entropy_counts_only_labelled_positions_by_default():
    """Without ``num_items``, ``name="ce"`` divided by every weighted position, ignored labels included: 8/11 of
    distillation_loss's value and gradients in this case. int16 labels are token ids too."""
    hidden, weight, bias, *_, mask, labels = _case()
    mask = torch.ones_like(mask)
    labels[1, :3] = -100
    ref = distillation_loss(hidden @ weight.T + bias, None, mask, name="ce", labels=labels, chunk_size=0)
    out = fused_linear_distillation_loss(hidden, weight, bias, row_weight=mask, name="ce",
                                         labels=labels.to(torch.int16))
    assert out.item() == pytest.approx(ref.item(), rel=1e-12)
    for e, g in zip(torch.autograd.grad(ref, [hidden, weight]), torch.autograd.grad(out, [hidden, weight])):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_masked_rows_are_never_read_and_the_incoming_gradient_scales():
    """A row of weight 0 holding NaN changes nothing and gets gradient 0; ``(3 · loss).backward()`` is 3× the
    gradient (the stored gradients are scaled by the incoming one)."""
    hidden, weight, bias, t_hidden, t_weight, mask, _ = _case(1)
    mask[0, 2] = 0
    poisoned = hidden.detach().clone()
    poisoned[0, 2] = float("nan")
    poisoned.requires_grad_(True)
    loss = fused_linear_distillation_loss(poisoned, weight, bias, row_weight=mask, teacher_hidden=t_hidden,
                                          teacher_weight=t_weight)
    (3 * loss).backward()
    clean = fused_linear_distillation_loss(hidden, weight, bias, row_weight=mask, teacher_hidden=t_hidden,
                                           teacher_weight=t_weight)
    g_h, g_w = torch.autograd.grad(clean, [hidden, weight])
    assert torch.isfinite(loss) and loss.item() == pytest.approx(clean.item())
    assert torch.equal(poisoned.grad[0, 2], torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(weight.grad, 3 * g_w)
    torch.testing.assert_close(poisoned.grad[1], 3 * g_h[1])


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden": torch.zeros(2, 4)}, r"hidden \(2, 4\) does not match the output layer \(13, 5\)"),
    ({"row_weight": torch.ones(3)}, r"row_weight \(3,\) should be \(2, 9\)"),
    ({"teacher_logits": None}, r"give the teacher as teacher_logits, or as teacher_hidden"),
    ({"teacher_logits": torch.zeros(2, 9, 12)}, r"teacher_logits \(2, 9, 12\) should be \(2, 9, 13\)"),
    ({"name": "ce"}, r"hard-label cross-entropy needs labels of shape \(2, 9\)"),
    ({"name": "kl"}, r"unknown loss name 'kl'; expected one of \['forward_kl'"),  # ran the JSD branch silently
    ({"temperature": 0.0}, r"temperature must be a finite number > 0, got 0.0"),
    # each of these ran: a raw matmul dtype error, an empty torch.cat, the default size, a silently dropped gradient,
    # a silently ignored teacher bias
    ({"hidden": torch.zeros(2, 9, 5)}, r"hidden is torch.float32 and weight torch.float64; give them one dtype, or "
                                       r"call it inside torch.autocast"),
    ({"chunk_size": -3}, r"chunk_size must be >= 1 positions, or None .* got -3; the fused loss always chunks"),
    ({"chunk_size": 0}, r"chunk_size must be >= 1 positions"),
    ({"row_weight": torch.ones(2, 9, dtype=torch.float64, requires_grad=True)},
     r"row_weight requires grad, but the fused loss takes the position weights as constants"),
    ({"teacher_bias": torch.zeros(13, dtype=torch.float64)},
     r"give the teacher as teacher_logits, or as teacher_hidden"),
    # torch's "index 13 is out of bounds" and "gather(): Expected dtype int32/int64" before
    ({"name": "ce", "labels": torch.full((2, 9), 13)}, r"labels hold 13, outside the student's vocabulary \[0, 13\)"),
    ({"hard_label_weight": 0.5, "labels": torch.full((2, 9), -5)}, r"labels hold -5, outside"),
    ({"name": "ce", "labels": torch.zeros(2, 9)}, r"labels must be integer token ids, got torch.float32"),
    ({"bias": torch.zeros(11, dtype=torch.float64)}, r"bias \(11,\) should be \(13,\), one per row"),
    ({"teacher_logits": None, "teacher_hidden": torch.zeros(2, 9, 4, dtype=torch.float64),
      "teacher_weight": torch.zeros(13, 4)}, r"teacher_hidden is torch.float64 and teacher_weight torch.float32"),
])
def test_a_mismatched_input_is_refused_by_name(kwargs, message):
    hidden, weight, bias, t_hidden, t_weight, mask, _ = _case()
    args = {"hidden": hidden, "bias": bias, "row_weight": mask, "teacher_logits": t_hidden @ t_weight.T, **kwargs}
    with pytest.raises(ValueError, match=message):
        fused_linear_distillation_loss(args.pop("hidden"), weight, args.pop("bias"), **args)


# ------------------------------------------------------------------ in a Distiller step
TEXTS = ["the cat sat on the mat", "a dog ran far away", "birds sing at dawn", "we go home now"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS, kind="char")


def _llama(tok, seed: int, tie: bool = False) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _step(student, teachers, tok, fused: bool, purifiers=(), name: str = "forward_kl") -> tuple[Distiller, dict]:
    data = TokenDataset([{"prompt": t[:4], "completion": t[4:]} for t in TEXTS], tok, max_length=32)
    d = Distiller(copy.deepcopy(student), copy.deepcopy(teachers), purifiers=[copy.deepcopy(p) for p in purifiers],
                  loss=LossConfig(name=name, temperature=2.0, hard_label_weight=0.2, fused_linear=fused),
                  optim=OptimConfig(name="sgd", lr=0.5), total_steps=2)
    opt = d.build_optimizer()
    parts = d.fit_step(data.collate([data.item(i) for i in range(4)]), opt, 0.0)
    return d, parts


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("purifiers", [(), "adversary", "tail"], ids=["vanilla", "adversary", "tail_truncation"])
def test_a_fused_distiller_step_equals_the_unfused_one(tok, tie, purifiers):
    """Same loss and the same student after an SGD step, with tied or untied output embeddings; with a student
    purifier reading hidden states (the adversary: its targets read the teachers' logits, so the teacher is given as
    logits) and with a target purifier (tail truncation)."""
    chosen = {(): (), "adversary": (Adversary(AdversaryConfig(name="adversary", weight=0.1, target="lineage")),),
              "tail": (TailTruncation(TailTruncationConfig(top_k=5)),)}[purifiers]
    student, teachers = _llama(tok, 0, tie), [_llama(tok, 1, tie), _llama(tok, 2, tie)]
    plain, p_parts = _step(student, teachers, tok, False, chosen)
    fused, f_parts = _step(student, teachers, tok, True, chosen)
    assert f_parts["loss"].item() == pytest.approx(p_parts["loss"].item(), rel=1e-5)
    for (name, a), b in zip(plain.student.named_parameters(), fused.student.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert fused._fusable_teacher is True


def test_a_lora_student_steps_the_same_fused(tok):
    """A peft LoRA student: its adapter trains the same fused as unfused (its decoder carries the adapter)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    student = get_peft_model(_llama(tok, 0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    plain, _ = _step(student, [_llama(tok, 1)], tok, False)
    fused, _ = _step(student, [_llama(tok, 1)], tok, True)
    moved = 0.0
    for (name, a), b, c in zip(plain.student.named_parameters(), fused.student.parameters(), student.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (a - c).abs().max().item())
    assert moved > 1e-4


def test_the_fused_path_builds_no_student_logits(tok, monkeypatch):
    """The student's full forward (its logits) is never run in a fused training step; the decoder is."""
    student, teacher = _llama(tok, 0), _llama(tok, 1)
    calls = []
    original = LlamaForCausalLM.forward

    def spy(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", spy)
    d, _ = _step(student, [teacher], tok, True)
    assert d.student not in calls[1:]  # after the two-token probe of fused_problem
    assert sum(c is d.teachers[0] for c in calls) <= 1  # the teacher: its probe only


def test_decoder_hidden_is_the_hidden_state_the_logits_are_made_from(tok):
    model = _llama(tok, 3).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = model_forward(model, batch, hidden=True)
    torch.testing.assert_close(decoder_hidden(model, batch), out.hidden)
    torch.testing.assert_close(model.lm_head(decoder_hidden(model, batch)), out.logits)


def test_a_model_whose_logits_are_not_its_head_on_its_hidden_state_is_refused(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    capped = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, final_logit_softcapping=0.5))
    assert "soft-capped or scaled logits" in fused_problem(capped, "student")
    assert fused_problem(_llama(tok, 0), "student") is None
    with pytest.raises(RecipeError, match=r"loss.fused_linear: student's logits are not its output layer"):
        Distiller(capped, [capped], loss=LossConfig(fused_linear=True)).setup_purifiers()


# ------------------------------------------------------------------ in a recipe
def test_purify_train_runs_fused_and_refuses_what_it_cannot_fuse(tmp_path, tok):
    from purify.assembly import load_recipe
    from purify.train import train
    from tests._lm_recipe import tiny_lm_overrides
    from tests.conftest import mlp_overrides

    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": t[:4], "completion": t[4:]}) + "\n"
                                              for t in TEXTS))
    args = tiny_lm_overrides(tmp_path / "tok", tmp_path / "d.jsonl", tmp_path / "run", **{
        "loss.fused_linear": True, "trainer.max_steps": 3, "trainer.val_check_interval": 3})
    out = train(load_recipe(None, args))
    assert json.loads((out / "lineage.json").read_text())["status"] == "finished"
    for overrides, message in [
        (mlp_overrides(tmp_path / "m", **{"loss.fused_linear": True}),
         r"loss.fused_linear: cannot take loss.logit_slice.*\n.*loss.fused_linear: needs a Hugging Face causal-LM "
         r"student"),
        ([*args, "strategy=deepspeed_stage_3"], r"loss.fused_linear: reads the student's output layer outside its "
                                                 r"forward, which ZeRO-3 keeps partitioned"),
    ]:
        with pytest.raises(RecipeError, match=message.replace("cannot take", "distils every logit of the output "
                                                                             "layer; it cannot take")):
            load_recipe(None, overrides)
