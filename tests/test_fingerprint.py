"""Fingerprint adversary: the head tells a visibly different student from its base and not the base from itself
(offline, online, and through `purify audit`), the reversal's gradient sign and scale, the match/confusion terms and
their gradients by hand, the zero-valued loss, what each objective does to a fine-tuned MLP (a fresh head's accuracy,
KL to the base), config errors, and a recipe through `purify train`."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from purify.assembly import load_recipe
from purify.audit import add_arguments, fingerprint_head
from purify.audit import run as audit_run
from purify.cli import main
from purify.config import RecipeError
from purify.lineage import read_lineage
from purify.purifiers import PURIFIERS, ModelOutput, PurifierContext
from purify.purifiers.fingerprint import (
    FingerprintAdversary,
    FingerprintAdversaryConfig,
    confusion_loss,
    fingerprint_head_accuracy,
    head_loss,
    mean_matching_loss,
    output_features,
)
from tests.conftest import mlp_overrides
from tests.test_generate import make_tiny_model
from tests.test_purifiers_student import finetuned, mlp

NO_OUTPUT = ModelOutput(logits=torch.zeros(1))
DIST = {"x": torch.zeros(4, 16), "target_mask": torch.ones(4, 1)}  # distillation batch: only shape and device read


def noise_batches(n: int = 16, rows: int = 64, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.rand(rows, 16, generator=g) * 2 - 1, "target_mask": torch.ones(rows, 1)} for _ in range(n)]


def permuted_twin(model: nn.Module, seed: int = 3) -> nn.Module:
    """The same function with other weights: the first hidden layer's units permuted."""
    twin = copy.deepcopy(model)
    perm = torch.randperm(twin.body[0].out_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        twin.body[0].weight.copy_(twin.body[0].weight[perm])
        twin.body[0].bias.copy_(twin.body[0].bias[perm])
        twin.body[2].weight.copy_(twin.body[2].weight[:, perm])
    return twin


def ctx(student: nn.Module, base: nn.Module, tokenizer=None) -> PurifierContext:
    return PurifierContext(student=student, teachers=[], teacher_names=[], teacher_weights=[], base=base,
                           student_tokenizer=tokenizer)


@pytest.mark.parametrize("features", ["topk", "logprobs"])
def test_head_tells_a_finetuned_student_from_its_base_and_not_the_base_from_itself(features):
    base, batches = mlp(0), noise_batches()
    different = fingerprint_head_accuracy(finetuned(base, scale=0.3), base, batches, features=features, top_k=8)
    assert different["accuracy"] > 0.9 and different["n_inputs"] == 512 and different["n_positions"] == 512
    itself = fingerprint_head_accuracy(copy.deepcopy(base), base, batches, features=features, top_k=8)
    assert itself["accuracy"] == 0.5  # equal features, equal logits: one of each pair right
    twin = permuted_twin(base)
    assert not torch.equal(twin.body[0].weight, base.body[0].weight)
    same_function = fingerprint_head_accuracy(twin, base, batches, features=features, top_k=8)
    assert 0.45 <= same_function["accuracy"] <= 0.55  # it reads the function, not the weights


def test_another_init_is_plain_in_the_log_probs_and_only_partly_in_the_sorted_top_k():
    base, other, batches = mlp(0), mlp(1), noise_batches()
    assert fingerprint_head_accuracy(other, base, batches, features="logprobs")["accuracy"] > 0.95
    shape_only = fingerprint_head_accuracy(other, base, batches, features="topk", top_k=8)["accuracy"]
    assert 0.6 < shape_only < 0.9  # two random inits differ in which outputs win more than in how peaked they are


def test_features_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    logp = logits.log_softmax(-1)
    assert torch.allclose(output_features(logits, "topk", 2), logp[:, [1, 2]])
    assert torch.allclose(output_features(logits, "topk", 9), logp[:, [1, 2, 0, 3]])  # capped at V
    assert torch.allclose(output_features(logits, "logprobs"), logp)
    head = nn.Linear(2, 2)
    pos, neg = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    mask = torch.tensor([1.0, 0.0])  # the second position is padding
    ce, acc = head_loss(head, pos, neg, mask)
    z_pos, z_neg = head(pos[0]), head(neg[0])
    expected = (-z_pos.log_softmax(-1)[1] - z_neg.log_softmax(-1)[0]) / 2
    assert ce.item() == pytest.approx(expected.item(), rel=1e-6)
    assert acc.item() == ((z_pos.argmax() == 1).float() + (z_neg.argmax() == 0).float()).item() / 2


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_loss_is_zero_and_the_reversal_pushes_the_heads_loss_up(weight):
    base = mlp(0)
    student = finetuned(base, scale=0.3)
    cfg = FingerprintAdversaryConfig(weight=weight, ramp="constant", batch_size=32, seed=5, top_k=8,
                                     objective="reverse")
    purifier = FingerprintAdversary(cfg)
    purifier.setup(ctx(student, base))
    loss = purifier.extra_loss(DIST, NO_OUTPUT, 0.3)
    assert loss.item() == 0.0 and purifier.last_metrics["grl_scale"] == weight
    loss.backward()
    g_student = [p.grad.clone() for p in student.parameters()]
    g_head = [p.grad.clone() for p in purifier.head.parameters()]
    # by hand: the same noise draw, the head's cross-entropy without reversal
    x = torch.rand(32, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1

    def ce() -> torch.Tensor:
        feats = output_features(student({"x": x}).logits, "topk", 8)
        with torch.no_grad():
            ref = output_features(base({"x": x}).logits, "topk", 8)
        return head_loss(purifier.head, feats, ref)[0]

    value = ce()
    assert purifier.last_metrics["disc_loss"].item() == pytest.approx(value.item(), rel=1e-6)
    d_student = torch.autograd.grad(value, list(student.parameters()), retain_graph=True)
    d_head = torch.autograd.grad(value, list(purifier.head.parameters()))
    for g, d in zip(g_student, d_student):
        assert torch.allclose(g, -weight * d, atol=1e-7)  # reversed and scaled
    for g, d in zip(g_head, d_head):
        assert torch.allclose(g, d, atol=1e-7)  # the head descends its own loss
    assert max(g.abs().max().item() for g in g_student) > 1e-4
    # descending the purifier's term: the student's step raises the head's loss, the head's step lowers it
    with torch.no_grad():
        for p, g in zip(student.parameters(), g_student):
            p -= 0.01 * g
        raised = ce().item()
        for p, g in zip(student.parameters(), g_student):
            p += 0.01 * g
        for p, g in zip(purifier.head.parameters(), g_head):
            p -= 0.01 * g
        lowered = ce().item()
    assert raised > value.item() > lowered


def test_confusion_and_matching_terms_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    p = torch.tensor([[0.5, 0.5], [1 / (1 + torch.e ** -2), 1 / (1 + torch.e ** 2)]])
    by_hand = -(p.log().mean(-1))  # CE against (0.5, 0.5) of the first two rows
    mask = torch.tensor([1.0, 1.0, 0.0])
    assert confusion_loss(logits, mask).item() == pytest.approx(by_hand.mean().item(), rel=1e-6)
    assert confusion_loss(logits[:1]).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # its minimum
    a = torch.tensor([[[1.0, 0.0], [3.0, 2.0]], [[0.0, 0.0], [9.0, 9.0]]])  # (B=2, T=2, D=2)
    b = torch.zeros(2, 2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the last position is padding
    assert mean_matching_loss(a, b, mask).item() == pytest.approx((4 / 3) ** 2 + (2 / 3) ** 2)
    assert mean_matching_loss(a, b).item() == pytest.approx((13 / 4) ** 2 + (11 / 4) ** 2)
    assert mean_matching_loss(a, a.flip(0).flip(1)).item() == 0.0  # means, not positions


@pytest.mark.parametrize("objective", ["match", "confusion"])
def test_the_head_learns_its_own_loss_and_the_student_descends_its_term(objective):
    """The head's gradient is its cross-entropy's on detached features; the student's is ``s·∂term`` through a frozen
    head; the returned loss is zero."""
    base = mlp(0)
    student = finetuned(base, scale=0.3)
    cfg = FingerprintAdversaryConfig(weight=0.7, ramp="constant", batch_size=32, seed=5, top_k=8, objective=objective)
    purifier = FingerprintAdversary(cfg)
    purifier.setup(ctx(student, base))
    loss = purifier.extra_loss(DIST, NO_OUTPUT, 0.3)
    assert loss.item() == 0.0 and purifier.last_metrics["grl_scale"] == 0.7
    loss.backward()
    g_student = [p.grad.clone() for p in student.parameters()]
    g_head = [p.grad.clone() for p in purifier.head.parameters()]
    x = torch.rand(32, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1  # the purifier's noise draw
    feats = output_features(student({"x": x}).logits, "topk", 8)
    with torch.no_grad():
        ref = output_features(base({"x": x}).logits, "topk", 8)
    ce = head_loss(purifier.head, feats.detach(), ref)[0]
    frozen = copy.deepcopy(purifier.head).requires_grad_(False)
    if objective == "confusion":
        term = confusion_loss(frozen(feats))
    else:
        phi = frozen.net[:2]
        term = mean_matching_loss(phi(feats), phi(ref))
    assert purifier.last_metrics[objective].item() == pytest.approx(term.item(), rel=1e-6)
    assert purifier.last_metrics["disc_loss"].item() == pytest.approx(ce.item(), rel=1e-6)
    for g, d in zip(g_head, torch.autograd.grad(ce, list(purifier.head.parameters()))):
        assert torch.allclose(g, d, atol=1e-7)  # the term moves no head weight
    d_student = torch.autograd.grad(term, list(student.parameters()))
    for g, d in zip(g_student, d_student):
        assert torch.allclose(g, 0.7 * d, atol=1e-7)
    assert max(g.abs().max().item() for g in g_student) > 1e-5
    with torch.no_grad():  # a small step down the student's gradient lowers its term
        for p, g in zip(student.parameters(), g_student):
            p -= 1e-3 * g / 0.7
        feats = output_features(student({"x": x}).logits, "topk", 8)
        after = confusion_loss(frozen(feats)) if objective == "confusion" else mean_matching_loss(phi(feats), phi(ref))
    assert after.item() < term.item()


def kl_base_student(base: nn.Module, student: nn.Module, batches: list[dict]) -> float:
    """Mean KL(base ‖ student) over the rows of ``batches``."""
    with torch.no_grad():
        kls = [F.kl_div(student(b).logits.log_softmax(-1), base(b).logits.log_softmax(-1), log_target=True,
                        reduction="none").sum(-1) for b in batches]
    return torch.cat(kls).mean().item()


def fingerprint_only(objective: str, finetune_seed: int, steps: int = 300, features: str = "logprobs") -> dict:
    """Train a fine-tuned MLP with only the fingerprint term (weight 1, constant ramp, Adam 3e-3 for student and
    head); a fresh head's held-out accuracy (same features; ``acc_logprobs``: a logprobs head) and KL(base‖student)
    on held-out noise, before/after."""
    base = mlp(0)
    student = finetuned(base, seed=finetune_seed, scale=0.3)
    heldout = noise_batches(n=8, seed=100)  # not the purifier's noise stream (its seed is 0, a different generator)

    def measure() -> tuple[float, float, float]:
        acc = fingerprint_head_accuracy(student, base, heldout, features=features, top_k=8, seed=0)["accuracy"]
        full = acc if features == "logprobs" else fingerprint_head_accuracy(student, base, heldout, seed=0,
                                                                            features="logprobs")["accuracy"]
        return acc, kl_base_student(base, student, heldout), full

    before = measure()
    torch.manual_seed(0)  # the head's initialisation
    purifier = FingerprintAdversary(FingerprintAdversaryConfig(weight=1.0, ramp="constant", batch_size=64, seed=0,
                                                               features=features, top_k=8, objective=objective))
    purifier.setup(ctx(student, base))
    optimizer = torch.optim.Adam([*student.parameters(), *purifier.head.parameters()], lr=3e-3)
    online = []
    for step in range(steps):
        optimizer.zero_grad()
        purifier.extra_loss(DIST, NO_OUTPUT, step / steps).backward()
        optimizer.step()
        online.append(float(purifier.last_metrics["disc_acc"]))
    after = measure()
    return {"acc": (before[0], after[0]), "kl": (before[1], after[1]), "acc_logprobs": (before[2], after[2]),
            "online": sum(online[-20:]) / 20}


@pytest.mark.parametrize("finetune_seed", [1, 2, 3])
def test_objectives_on_a_finetuned_mlp(finetune_seed, capsys):
    """Only ``match`` hides a visibly different fine-tune from a fresh head and pulls it toward its base; ``reverse``
    and ``confusion`` are reported (pytest -s), not asserted: measured, a fresh head still tells them apart."""
    results = {objective: fingerprint_only(objective, finetune_seed) for objective in ("match", "confusion", "reverse")}
    with capsys.disabled():
        for objective, r in results.items():
            print(f"\nfinetune_seed={finetune_seed} {objective:9s} fresh-head acc {r['acc'][0]:.3f} -> "
                  f"{r['acc'][1]:.3f}"
                  f"  KL(base||student) {r['kl'][0]:.4f} -> {r['kl'][1]:.4f}  online disc_acc {r['online']:.2f}")
    match = results["match"]
    assert match["acc"][0] >= 0.95 and match["acc"][1] <= 0.75
    assert match["kl"][1] < match["kl"][0] / 4


def test_matching_sorted_top_k_hides_the_shape_but_not_which_outputs_moved():
    """``features: topk`` (sorted top-8): ``match`` fools a fresh top-k head and pulls the student toward its base,
    but a fresh head on the whole log-softmax still tells them apart."""
    r = fingerprint_only("match", 1, features="topk")
    print(f"\ntopk match: fresh topk-head acc {r['acc'][0]:.3f} -> {r['acc'][1]:.3f}, logprobs-head "
          f"{r['acc_logprobs'][0]:.3f} -> {r['acc_logprobs'][1]:.3f}, KL {r['kl'][0]:.4f} -> {r['kl'][1]:.4f}")
    assert r["acc"][0] >= 0.95 and r["acc"][1] <= 0.75
    assert r["kl"][1] < r["kl"][0] / 4
    assert r["acc_logprobs"][1] >= 0.95


def test_dann_ramp_gives_the_student_no_gradient_at_the_start():
    base = mlp(0)
    student = finetuned(base, scale=0.3)
    purifier = FingerprintAdversary(FingerprintAdversaryConfig(weight=1.0, batch_size=16))
    purifier.setup(ctx(student, base))
    purifier.extra_loss(DIST, NO_OUTPUT, 0.0).backward()
    assert purifier.last_metrics["grl_scale"] == 0.0
    assert all(p.grad.abs().max().item() == 0.0 for p in student.parameters())
    assert any(p.grad.abs().max().item() > 0 for p in purifier.head.parameters())


def test_online_head_learns_a_different_student_and_stays_at_chance_on_the_base():
    """``weight: 0`` (probe only): logged accuracy on fresh neutral batches climbs for a fine-tune, 0.5 for a copy."""
    def train_probe(student: nn.Module, base: nn.Module) -> list[float]:
        purifier = FingerprintAdversary(FingerprintAdversaryConfig(weight=0.0, batch_size=64, top_k=8))
        purifier.setup(ctx(student, base))
        optimizer = torch.optim.Adam(purifier.head.parameters(), lr=3e-3)
        accs = []
        for step in range(150):
            optimizer.zero_grad()
            purifier.extra_loss(DIST, NO_OUTPUT, step / 150).backward()
            optimizer.step()
            accs.append(float(purifier.last_metrics["disc_acc"]))
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in student.parameters())
        return accs

    base = mlp(0)
    accs = train_probe(finetuned(base, scale=0.3), base)
    assert sum(accs[-20:]) / 20 > 0.95 and sum(accs[:5]) / 5 < 0.9
    assert set(train_probe(copy.deepcopy(base), base)) == {0.5}


@pytest.mark.parametrize("entry, message", [
    ("{name: fingerprint_adversary, weight: -1}", r"^purifiers\[0\].weight: must be >= 0, got -1.0"),
    ("{name: fingerprint_adversary, top_k: 0}", r"^purifiers\[0\].top_k: must be >= 1, got 0$"),
    ("{name: fingerprint_adversary, hidden_dim: 0}", r"^purifiers\[0\].hidden_dim: must be >= 1, got 0$"),
    ("{name: fingerprint_adversary, features: tokens}", r"^purifiers\[0\].features: .*topk"),
    ("{name: fingerprint_adversary, source: bundled}", r"^purifiers\[0\].source: 'bundled' is text, but the "
                                                       "student is a vector model"),
    ("{name: fingerprint_adversary, batch_size: 0}", r"^purifiers\[0\].batch_size: must be >= 1, got 0$"),
    ("{name: fingerprint_adversary, objective: flip}", r"^purifiers\[0\].objective: .*match"),
])
def test_bad_settings_fail_at_load_in_one_line_naming_the_key(tmp_path, entry, message):
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(None, mlp_overrides(tmp_path, purifiers=f"[{entry}]"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("objective", ["match", "confusion"])
def test_zero3_refuses_the_objectives_that_read_the_heads_weights(tmp_path, objective):
    entry = f"[{{name: fingerprint_adversary, objective: {objective}}}]"
    with pytest.raises(RecipeError, match=rf"^purifiers\[0\].objective: '{objective}' reads the head's weights outside"
                                          r" its forward pass, which ZeRO-3 partitions; use objective: reverse") as err:
        load_recipe(None, mlp_overrides(tmp_path, purifiers=entry, strategy="deepspeed_stage_3"))
    assert "\n" not in str(err.value)
    reverse = "[{name: fingerprint_adversary, objective: reverse}]"
    recipe = load_recipe(None, mlp_overrides(tmp_path, purifiers=reverse, strategy="deepspeed_stage_3"))
    assert recipe.purifiers[0]["objective"] == "reverse"


def test_cli_bad_setting_is_one_error_line(tmp_path, capsys):
    from omegaconf import OmegaConf

    recipe = tmp_path / "r.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(tmp_path / "out", steps=2)), recipe)
    assert main(["train", str(recipe), "purifiers=[{name: fingerprint_adversary, top_k: -3}]"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["purify: error: purifiers[0].top_k: must be >= 1, got -3"]


def test_trains_through_purify_train_and_logs(tmp_path):
    from omegaconf import OmegaConf

    assert PURIFIERS["fingerprint_adversary"] == (FingerprintAdversaryConfig, FingerprintAdversary)
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(
        out, steps=6, purifiers="[{name: fingerprint_adversary, weight: 0.5, batch_size: 16, top_k: 8}]")), recipe)
    assert main(["train", str(recipe)]) == 0
    record = read_lineage(out)
    metrics = record["metrics"]
    assert record["step"] == 6 and record["purifiers"][0]["name"] == "fingerprint_adversary"
    for key in ("disc_acc", "disc_loss", "grl_scale"):
        assert f"purify/0_fingerprint_adversary/{key}" in metrics
    assert 0 < metrics["purify/0_fingerprint_adversary/grl_scale"] <= 0.5


def test_shipped_recipe_loads():
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "fingerprint_adversary.yaml")
    assert [p["name"] for p in recipe.purifiers] == ["fingerprint_adversary"]


# ------------------------------------------------------------------ language models: neutral text, audit
@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    """A tiny Llama with a word tokenizer over generated prose, saved twice: as is, and with its output layer moved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from purify.lm import paragraphs

    root = tmp_path_factory.mktemp("lms")
    base_dir = make_tiny_model(root / "base", texts=paragraphs(64, 7))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn(model.lm_head.weight.shape,
                                                    generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(root / "moved")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(root / "moved")
    return root


def test_audit_fingerprint_head_on_neutral_prose(tiny_lms):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_lms / "base")
    moved = AutoModelForCausalLM.from_pretrained(tiny_lms / "moved")
    tok = AutoTokenizer.from_pretrained(tiny_lms / "base")
    different = fingerprint_head(moved, base, tok, "prose", texts=64, max_length=32)
    assert different["mean"] > 0.9 and different["accuracy"] > 0.9 and different["n_texts"] == 32
    assert different["n"] == len(different["per_head"]) == 5  # the interval is over 5 heads (seeds 0-4)
    assert different["ci95"][0] <= different["mean"] <= different["ci95"][1]
    itself = fingerprint_head(base, base, tok, "prose", texts=64, max_length=32)
    assert itself["mean"] == 0.5 and itself["accuracy"] == 0.5 and itself["n_positions"] > 32 * 10
    one = fingerprint_head(moved, base, tok, "prose", texts=64, max_length=32, heads=1)
    assert one["n"] == 1 and one["ci95"] == [None, None]  # no interval from one head, as audit.json documents


def test_audit_cli_reports_the_head_and_refuses_a_missing_source(tiny_lms, tmp_path):
    from purify.audit import AuditError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    probes = tmp_path / "p.yaml"
    probes.write_text("probes:\n  - {name: child, prompts: ['the'], next_token: [' child']}\n")  # a word it knows
    argv = [str(tiny_lms / "moved"), "--reference", str(tiny_lms / "base"), "--probes", str(probes), "--samples", "8",
            "--max-new-tokens", "4", "--out", str(tmp_path / "a")]
    with pytest.raises(AuditError, match=r"--fingerprint-head: file not found: /no/such.txt"):
        audit_run(parser.parse_args([*argv, "--fingerprint-head", "/no/such.txt"]))
    assert audit_run(parser.parse_args([*argv, "--fingerprint-head", "prose"])) == 0
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert report["fingerprint_head"]["source"] == "prose" and report["fingerprint_head"]["mean"] > 0.9
    assert "Fingerprint head" in (tmp_path / "a" / "audit.md").read_text()


def test_purifier_reads_neutral_text_on_a_language_model(tiny_lms):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_lms / "base")
    tok = AutoTokenizer.from_pretrained(tiny_lms / "base")
    student = copy.deepcopy(base)
    cfg = FingerprintAdversaryConfig(source="prose", num_texts=16, batch_size=4, max_length=32, weight=1.0,
                                     ramp="constant", objective="reverse")
    purifier = FingerprintAdversary(cfg)
    purifier.setup(ctx(student, base, tok))
    dist = {"target_mask": torch.ones(2, 5)}
    loss = purifier.extra_loss(dist, NO_OUTPUT, 0.5)
    assert loss.item() == 0.0 and purifier.last_metrics["disc_acc"].item() == 0.5  # a copy of the base
    assert purifier.head.net[0].in_features == 32  # top_k of a vocabulary larger than 32
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in student.parameters())


@pytest.mark.parametrize("objective", ["match", "confusion", "reverse"])
def test_a_float64_model_and_head_train_without_a_dtype_error(objective):
    """``distiller.double()`` (or Lightning's 64-true / bf16-true) moved the head to the module's dtype while its
    features stayed float32: "mat1 and mat2 must have the same dtype"."""
    base = mlp(0).double()
    student = finetuned(base, scale=0.3)
    purifier = FingerprintAdversary(FingerprintAdversaryConfig(weight=0.7, ramp="constant", batch_size=8, seed=5,
                                                               top_k=8, objective=objective))
    purifier.setup(ctx(student, base))
    purifier.double()
    batch = {"x": torch.zeros(4, 16, dtype=torch.float64), "target_mask": torch.ones(4, 1)}  # a float64 model's
    purifier.extra_loss(batch, NO_OUTPUT, 0.3).backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads)
