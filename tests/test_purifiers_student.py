"""Student- and parameter-side purifiers: gradient reversal, adversary, anchor (L2-SP), delta projection."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import purify.assembly
from purify.assembly import load_recipe
from purify.config import OptimConfig, RecipeError
from purify.lineage import read_lineage
from purify.models import AuxMLP, build_model
from purify.module import Distiller
from purify.purifiers import ModelOutput, ParameterPurifier, PurifierContext, Targets
from purify.purifiers.adversary import Adversary, AdversaryConfig, DiscriminatorHead, example_lineage
from purify.purifiers.anchor import Anchor, AnchorConfig, anchor_penalty
from purify.purifiers.delta_projection import DeltaProjection, DeltaProjectionConfig, delta_subspaces
from purify.purifiers.function_anchor import FunctionAnchor, FunctionAnchorConfig, kl_to_base
from purify.purifiers.grl import GradientReversal, dann_lambda
from purify.train import train
from tests.conftest import mlp_overrides

MLP = {"in_dim": 16, "hidden": [32, 32], "n_aux": 3}
SPEC = "{arch: aux_mlp, seed: %d, kwargs: {in_dim: 16, hidden: [32, 32], n_aux: 3}%s}"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster and immune to oversubscription on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed: int = 0) -> AuxMLP:
    torch.manual_seed(seed)
    return AuxMLP(**MLP)


def finetuned(student: nn.Module, seed: int = 1, scale: float = 0.2) -> nn.Module:
    """A "teacher fine-tuned from the student's base": a rank-2 change to every matrix, a shift of every bias."""
    teacher = copy.deepcopy(student)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.parameters():
            if p.ndim == 2:
                p += scale * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g) / 4
            else:
                p += scale * torch.randn(p.shape, generator=g)
    return teacher


def batch(seed: int, n: int = 16, source: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"x": torch.rand(n, 16, generator=g) * 2 - 1, "target_mask": torch.ones(n, 1)}
    if source:
        out["source"] = torch.arange(n) % 2
    return out


def run_steps(distiller: Distiller, steps: int) -> None:
    """The Distiller's optimizer step without a Trainer: loss, backward, hooks around ``optimizer.step()``."""
    distiller.setup_purifiers()
    optimizer = distiller.configure_optimizers()["optimizer"]
    for step in range(steps):
        optimizer.zero_grad()
        loss, _ = distiller.compute_loss(batch(step), progress=step / steps)
        loss.backward()
        distiller.on_before_optimizer_step(optimizer)
        optimizer.step()
        for p in distiller.purifiers:
            if isinstance(p, ParameterPurifier):
                p.after_step(distiller.student)


# ------------------------------------------------------------------ gradient reversal
def test_gradient_reversal_is_identity_forward_and_flips_the_gradient():
    x = torch.randn(4, 5, requires_grad=True)
    incoming = torch.randn(4, 5)
    y = GradientReversal(scale=0.37)(x)
    assert torch.equal(y, x)
    y.backward(incoming)
    assert torch.equal(x.grad, -0.37 * incoming)
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(0.999909, abs=1e-6)
    for bad in (-1.0, float("nan"), float("inf")):  # a negative scale helped the adversary instead (accepted silently)
        with pytest.raises(ValueError, match=r"reverse_gradient: scale must be a finite number >= 0"):
            GradientReversal(scale=bad)(x)


# ------------------------------------------------------------------ adversary
def _lineage_game(weight: float) -> tuple[float, float, float, float]:
    """Lineage shifts input 0 by ±4; the task (MSE to a function of inputs 1-3) does not need it. Returns the head's
    accuracy over the last 20 steps, the first and last MSE, and a fresh probe's held-out accuracy."""
    def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(512) % 2
        x = torch.randn(512, 8, generator=g)
        x[:, 0] += 4.0 * (2 * y - 1)
        return x, y

    (x, y), (x_test, y_test) = data(0), data(9)
    target = x[:, 1:4] @ torch.randn(3, 3, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    features, readout, head, grl = nn.Linear(8, 5), nn.Linear(5, 3), DiscriminatorHead(5, 32, 2), GradientReversal()
    optimizer = torch.optim.Adam([*features.parameters(), *readout.parameters(), *head.parameters()], lr=1e-2)
    accs, mses = [], []
    for step in range(400):
        grl.scale = weight * dann_lambda(step / 400)
        optimizer.zero_grad()
        f = features(x)
        mse, logits = F.mse_loss(readout(f), target), head(grl(f))
        (mse + F.cross_entropy(logits, y)).backward()
        optimizer.step()
        accs.append((logits.argmax(-1) == y).float().mean().item())
        mses.append(mse.item())
    with torch.no_grad():
        f_train, f_test = features(x), features(x_test)
    probe = DiscriminatorHead(5, 32, 2)
    probe_opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(300):
        probe_opt.zero_grad()
        F.cross_entropy(probe(f_train), y).backward()
        probe_opt.step()
    held_out = (probe(f_test).argmax(-1) == y_test).float().mean().item()
    return sum(accs[-20:]) / 20, mses[0], mses[-1], held_out


def test_reversal_hides_the_lineage_while_the_task_is_still_learned():
    head_acc, _, _, probe_acc = _lineage_game(weight=0.0)
    assert head_acc > 0.9 and probe_acc > 0.9  # without reversal the lineage is readable
    _, first_mse, last_mse, probe_acc = _lineage_game(weight=1.0)
    assert probe_acc <= 0.65  # with reversal a fresh probe is near chance on held-out data
    assert last_mse < 0.01 * first_mse  # and the distillation objective still falls


def test_adversary_with_zero_weight_leaves_the_student_objective_vanilla():
    def distiller(purifiers):
        torch.manual_seed(0)
        return Distiller(mlp(0), [mlp(7)], purifiers=purifiers)

    vanilla = distiller([])
    probe = distiller([Adversary(AdversaryConfig(weight=0.0, target="source"))])
    b = batch(0, source=True)
    grads = []
    for d in (vanilla, probe):
        d.setup_purifiers()
        loss, _ = d.compute_loss(b, progress=0.5)
        loss.backward()
        grads.append([p.grad.clone() for p in d.student.parameters()])
    assert torch.equal(vanilla.compute_loss(b, 0.5)[0], probe.compute_loss(b, 0.5)[0])
    assert all(torch.equal(a, c) for a, c in zip(*grads))
    assert all(p.grad.abs().sum() > 0 for p in probe.purifiers[0].parameters())  # the head still learns
    metrics = probe.purifiers[0].last_metrics
    assert set(metrics) == {"disc_loss", "disc_acc", "grl_scale"} and metrics["grl_scale"] == 0.0


def test_adversary_head_is_its_own_param_group_and_reversal_reaches_the_student():
    d = Distiller(mlp(0), [mlp(7), mlp(8)], purifiers=[Adversary(AdversaryConfig(weight=1.0, ramp="constant"))],
                  optim=OptimConfig(lr=1e-3, head_lr=1e-2))
    d.setup_purifiers()
    groups = d.configure_optimizers()["optimizer"].param_groups
    head = list(d.purifiers[0].parameters())
    assert [g["name"] for g in groups] == ["student", "purifier.Adversary"]
    assert groups[1]["lr"] == 1e-2 and [id(p) for p in groups[1]["params"]] == [id(p) for p in head]
    assert not {id(p) for p in head} & {id(p) for p in groups[0]["params"]}
    # the gradient reaching the student's hidden states is -weight × the head's
    b = batch(0)
    hidden = d.student.body(b["x"])[:, None].detach().requires_grad_(True)  # (B, 1, H)
    term = d.purifiers[0].extra_loss(b, ModelOutput(logits=torch.zeros(16, 1, 13), hidden=hidden), progress=0.3)
    assert term.item() == 0.0
    term.backward()
    plain = hidden.detach().requires_grad_(True)
    ce = F.cross_entropy(d.purifiers[0].head(plain[:, 0]), example_lineage(b, 2))
    torch.testing.assert_close(hidden.grad, -1.0 * torch.autograd.grad(ce, plain)[0], rtol=1e-5, atol=1e-8)
    assert d.purifiers[0].last_metrics["disc_loss"].item() == pytest.approx(ce.item(), rel=1e-6)


def test_build_optimizer_before_any_set_up_still_trains_the_head():
    """A plain loop that built its optimizer before setup_purifiers() left the head out of it: built lazily on the
    first step, never stepped, its gradients adding up (zero_grad does not cover it)."""
    d = Distiller(mlp(0), [mlp(7), mlp(8)], purifiers=[Adversary(AdversaryConfig(weight=0.1, ramp="constant"))])
    optimizer = d.build_optimizer()  # no d.setup_purifiers() first
    d.fit_step(batch(0), optimizer, progress=0.0)
    head = list(d.purifiers[0].parameters())
    assert head and {id(p) for p in head} <= {id(p) for g in optimizer.param_groups for p in g["params"]}
    before = [p.detach().clone() for p in head]
    d.fit_step(batch(1), optimizer, progress=0.5)
    assert all(not torch.equal(a, p) for a, p in zip(before, head))


def test_token_pooling_scores_each_target_position_and_skips_unknown_sources():
    adversary = Adversary(AdversaryConfig(target="source", pool="token", num_sources=3))
    adversary.setup(PurifierContext(student=mlp(0), teachers=[mlp(7)], teacher_names=["t"], teacher_weights=[1.0]))
    hidden = torch.randn(4, 3, 32)
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    source = torch.tensor([0, 2, -1, 1])  # -1: unknown lineage
    out = ModelOutput(logits=torch.zeros(4, 3, 13), hidden=hidden)
    adversary.extra_loss({"target_mask": mask, "source": source}, out, progress=0.5)
    logits = adversary.head(hidden)
    expected = torch.stack([F.cross_entropy(logits[b, t], source[b]) for b, t in [(0, 0), (0, 1), (1, 0)]]).mean()
    assert adversary.last_metrics["disc_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"label 3 but num_sources is 3; raise num_sources"):
        adversary.extra_loss({"target_mask": mask, "source": source + 1}, out, progress=0.5)
    with pytest.raises(ValueError, match=r"target 'source' needs batch\['source'\]"):
        adversary.extra_loss({"target_mask": mask}, out, progress=0.5)


def test_a_bf16_students_hidden_states_reach_the_float32_head():
    """A student loaded in bfloat16 (no autocast) crashed the adversary: "mat1 and mat2 must have the same dtype"."""
    adversary = Adversary(AdversaryConfig(target="source", num_sources=2, ramp="constant"))
    adversary.setup(PurifierContext(student=mlp(0), teachers=[mlp(7)], teacher_names=["t"], teacher_weights=[1.0]))
    hidden = torch.randn(4, 3, 32).bfloat16().requires_grad_(True)
    batch_ = {"target_mask": torch.ones(4, 3), "source": torch.tensor([0, 1, 1, 0])}
    adversary.extra_loss(batch_, ModelOutput(logits=torch.zeros(4, 3, 13), hidden=hidden), progress=0.5).backward()
    assert hidden.grad.dtype == torch.bfloat16 and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0
    plain = hidden.detach().float()
    expected = F.cross_entropy(adversary.head(plain.mean(1)), batch_["source"])
    assert adversary.last_metrics["disc_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_lineage_targets_follow_a_stable_per_example_assignment():
    adversary = Adversary(AdversaryConfig(weight=0.1))
    teachers = [mlp(7), mlp(8), mlp(9)]
    adversary.setup(PurifierContext(student=mlp(0), teachers=teachers, teacher_names=["a", "b", "c"],
                                    teacher_weights=[1.0] * 3))
    b = batch(0, n=60)
    outs = [t(b) for t in teachers]
    labels = example_lineage(b, 3)
    assert sorted(set(labels.tolist())) == [0, 1, 2] and min(torch.bincount(labels).tolist()) >= 10
    new = adversary.transform_targets(b, outs, Targets(logits=outs[0].logits, weight=b["target_mask"]))
    for i, k in enumerate(labels.tolist()):
        assert torch.equal(new.logits[i], outs[k].logits[i])
    order = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    shuffled = {"x": b["x"][order], "target_mask": b["target_mask"][order]}
    assert torch.equal(example_lineage(shuffled, 3), labels[order])  # same teacher in any batch and order
    assert torch.equal(adversary.labels(b), labels)


def test_a_token_examples_lineage_is_the_same_under_left_and_right_padding_of_any_width():
    """Left padding shifted the tokens to other byte positions: an example changed teacher with the batch's longest
    row (widths 4/6/9 gave [0, 4, 5], [3, 0, 1], [6, 0, 3] for one set of rows)."""
    rows = [[5, 9, 2, 7], [3, 4], [8, 8, 1]]

    def padded(width, left):
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            at = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, at], mask[i, at] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}

    labels = example_lineage(padded(4, left=False), 7)
    assert len(set(labels.tolist())) > 1
    for width in (4, 6, 9):
        for left in (False, True):
            assert torch.equal(example_lineage(padded(width, left), 7), labels)


# ------------------------------------------------------------------ anchor
def test_anchor_gradient_is_weight_times_displacement():
    base = mlp(0)
    student = finetuned(base)
    anchor_penalty(student, base, weight=0.3).backward()
    origin = dict(base.named_parameters())
    for name, p in student.named_parameters():
        assert torch.equal(p.grad, 0.3 * (p - origin[name]))
    anchor = Anchor(AnchorConfig(weight=0.3))
    anchor.setup(PurifierContext(student=student, teachers=[], teacher_names=[], teacher_weights=[], base=base))
    loss = anchor.extra_loss(batch(0), ModelOutput(logits=torch.zeros(1)), 0.0)
    distance = torch.sqrt(sum(((p - origin[n]) ** 2).sum() for n, p in student.named_parameters()))
    assert loss.item() == pytest.approx(0.15 * distance.item() ** 2, rel=1e-6)
    assert anchor.last_metrics["anchor_distance"].item() == pytest.approx(distance.item(), rel=1e-6)
    assert list(anchor.parameters()) == []  # the student and base are not registered inside the purifier


# ------------------------------------------------------------------ function anchor (off-task KL to the base)
def anchor_ctx(student: nn.Module, base: nn.Module, tokenizer=None) -> PurifierContext:
    return PurifierContext(student=student, teachers=[], teacher_names=[], teacher_weights=[], base=base,
                           student_tokenizer=tokenizer)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_function_anchor_is_zero_with_zero_gradient_at_the_base_and_pulls_toward_it_otherwise(direction):
    base = mlp(0)
    student = copy.deepcopy(base)
    cfg = FunctionAnchorConfig(weight=2.0, direction=direction, batch_size=32, seed=5)
    purifier = FunctionAnchor(cfg)
    purifier.setup(anchor_ctx(student, base))
    assert purifier.source == "noise"  # auto, for a vector model
    loss = purifier.extra_loss(batch(0), ModelOutput(logits=torch.zeros(1)), 0.0)
    loss.backward()
    assert loss.item() == 0.0
    # zero up to float rounding (~1e-9; the same student one perturbation away has gradients ~0.2)
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-7
    student = finetuned(base, scale=0.3)
    purifier = FunctionAnchor(cfg)
    purifier.setup(anchor_ctx(student, base))
    loss = purifier.extra_loss(batch(0), ModelOutput(logits=torch.zeros(1)), 0.0)
    # by hand: the same uniform draw in [-1, 1], KL over the 13 outputs, mean over the 32 rows, times the weight
    x = torch.rand(32, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        lp_b, lp_s = base({"x": x}).logits.log_softmax(-1), student({"x": x}).logits.log_softmax(-1)
    p, q = (lp_b, lp_s) if direction == "forward" else (lp_s, lp_b)
    expected = 2.0 * (p.exp() * (p - q)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0
    assert purifier.last_metrics["kl_to_base"].item() == pytest.approx(expected.item() / 2, rel=1e-5)
    # descending the anchor alone pulls the student's function toward the base's on fresh neutral inputs
    fresh = {"x": torch.rand(256, 16, generator=torch.Generator().manual_seed(99)) * 2 - 1}

    def drift() -> float:
        with torch.no_grad():
            return kl_to_base(student(fresh).logits, base(fresh).logits).item()

    before = drift()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        purifier.extra_loss(batch(0), ModelOutput(logits=torch.zeros(1)), 0.0).backward()
        optimizer.step()
    assert drift() < 0.7 * before


def test_function_anchor_reads_neutral_text_with_the_students_tokenizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from purify.lm import build_tokenizer
    from purify.lm.corpus import paragraphs

    texts = paragraphs(8, 31)
    tok = build_tokenizer(texts, "word")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    student = copy.deepcopy(base)
    purifier = FunctionAnchor(FunctionAnchorConfig(source="prose", num_texts=8, corpus_seed=31, batch_size=3))
    purifier.setup(anchor_ctx(student, base, tok))
    dist = {"target_mask": torch.ones(2, 5)}
    neutral = purifier.neutral_batch(dist)
    assert neutral["input_ids"].shape[0] == 3
    encoded = {tuple([tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:64]
               for t in texts}
    assert {tuple(r[m.bool()].tolist()) for r, m in zip(neutral["input_ids"], neutral["attention_mask"])} <= encoded
    assert purifier.extra_loss(dist, ModelOutput(logits=torch.zeros(1)), 0.0).item() == 0.0  # student = base
    with torch.no_grad():
        student.lm_head.weight.add_(0.5 * torch.randn_like(student.lm_head.weight))
    assert purifier.extra_loss(dist, ModelOutput(logits=torch.zeros(1)), 0.0).item() > 0
    seen = [purifier.neutral_batch(dist)["input_ids"] for _ in range(3)]  # the stream cycles through all 8 texts
    assert len({tuple(r[r != tok.pad_token_id].tolist()) for b in seen for r in b}) >= 6


@pytest.mark.parametrize("purifier, message", [
    ("{name: function_anchor, weight: -1}", r"purifiers\[0\].weight: must be >= 0"),
    ("{name: function_anchor, source: bundled}", r"purifiers\[0\].source: 'bundled' is text, but the student is a "
                                                 "vector model"),
    ("{name: function_anchor, source: /no/such.txt}", r"purifiers\[0\].source: file not found: /no/such.txt"),
    ("{name: function_anchor, noise_low: 1, noise_high: 0}", r"purifiers\[0\].noise_low: 1.0 must be below"),
])
def test_function_anchor_bad_settings_fail_at_load(tmp_path, purifier, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, mlp_overrides(tmp_path, purifiers=f"[{purifier}]"))


def test_function_anchor_undistilled_outputs_compare_only_the_logits_outside_the_slice(tmp_path):
    base = mlp(0)
    student = finetuned(base, scale=0.3)
    ctx = PurifierContext(student=student, teachers=[], teacher_names=[], teacher_weights=[], base=base,
                          logit_slice=[10, 13])
    purifier = FunctionAnchor(FunctionAnchorConfig(weight=1.0, batch_size=32, seed=5, outputs="undistilled"))
    purifier.setup(ctx)
    loss = purifier.extra_loss(batch(0), ModelOutput(logits=torch.zeros(1)), 0.0)
    x = torch.rand(32, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():  # by hand: KL(base || student) over the 10 class logits + nothing after the slice
        lp_b, lp_s = (m({"x": x}).logits[..., :10].log_softmax(-1) for m in (base, student))
    assert student({"x": x}).logits.shape[-1] == 13
    assert loss.item() == pytest.approx(float((lp_b.exp() * (lp_b - lp_s)).sum(-1).mean()), rel=1e-5)
    with pytest.raises(RecipeError, match=r"purifiers\[0\].outputs: undistilled compares the logits outside "
                                          r"loss.logit_slice"):
        load_recipe(None, mlp_overrides(tmp_path, **{"loss.logit_slice": "null"},
                                        purifiers="[{name: function_anchor, outputs: undistilled}]"))


def test_function_anchor_refuses_the_distillation_data_as_neutral_inputs():
    from types import SimpleNamespace

    lm = SimpleNamespace(student=SimpleNamespace(arch=None), data=SimpleNamespace(train="bundled"))
    assert "is the distillation data" in FunctionAnchorConfig().recipe_problems(lm)[0]  # auto → bundled
    assert FunctionAnchorConfig(source="prose").recipe_problems(lm) == []
    assert "needs a vector model" in FunctionAnchorConfig(source="noise").recipe_problems(lm)[0]


# ------------------------------------------------------------------ delta projection
def test_displacement_stays_out_of_the_teachers_update_subspace():
    student = mlp(0)
    base, teacher = copy.deepcopy(student), finetuned(student)
    d = Distiller(student, [teacher], purifiers=[DeltaProjection(DeltaProjectionConfig(rank=2))])
    run_steps(d, 4)
    subspaces = delta_subspaces(base, teacher, rank=2)
    origin = dict(base.named_parameters())
    for name, p in d.student.named_parameters():
        u, v = subspaces[name]
        disp = (p - origin[name]).detach().reshape(p.shape[0], -1)
        assert u.shape[1] == (2 if p.ndim == 2 else 1) and disp.norm() > 1e-4  # the student did move
        assert (u.T @ disp).norm() < 1e-6
        if p.ndim == 2:
            assert (u.T @ disp @ v).norm() < 1e-6 and (disp @ v).norm() < 1e-6
    metrics = d.purifiers[0].last_metrics
    assert metrics["projected_norm"] > 0 and metrics["displacement_norm"] > 0


def test_update_mode_projects_gradients_and_with_sgd_the_displacement():
    student = mlp(0)
    base, teacher = copy.deepcopy(student), finetuned(student)
    d = Distiller(student, [teacher], purifiers=[DeltaProjection(DeltaProjectionConfig(rank=2, mode="update"))],
                  optim=OptimConfig(name="sgd", lr=0.1))
    run_steps(d, 3)
    subspaces, origin = delta_subspaces(base, teacher, rank=2), dict(base.named_parameters())
    for name, p in d.student.named_parameters():
        u, _ = subspaces[name]
        assert (u.T @ p.grad.reshape(p.shape[0], -1)).norm() < 1e-6
        assert (u.T @ (p - origin[name]).detach().reshape(p.shape[0], -1)).norm() < 1e-6


def test_rank_zero_equals_vanilla():
    teacher = finetuned(mlp(0))
    vanilla = Distiller(mlp(0), [teacher])
    rank0 = Distiller(mlp(0), [teacher], purifiers=[DeltaProjection(DeltaProjectionConfig(rank=0))])
    for d in (vanilla, rank0):
        run_steps(d, 5)
    for a, b in zip(vanilla.student.parameters(), rank0.student.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("teacher, message", [
    (lambda: mlp(7), r"shared-init check\): ‖θ_T − θ₀‖/‖θ₀‖ = 1\.\d+ > max_relative_delta = 1\.0"),
    (lambda: AuxMLP(in_dim=16, hidden=[32, 16], n_aux=3), r"body.2.weight has shape \(16, 32\) in the teacher"),
    (lambda: AuxMLP(in_dim=16, hidden=[32], n_aux=3), r"parameter names differ \(only in the student: \['body.2"),
])
def test_teacher_of_another_base_is_refused(teacher, message):
    d = Distiller(mlp(0), [teacher()], purifiers=[DeltaProjection(DeltaProjectionConfig(rank=2))])
    with pytest.raises(ValueError, match=r"not a fine-tune of the student's base") as err:
        d.setup_purifiers()
    assert err.match(message)


# ------------------------------------------------------------------ recipes and end-to-end runs
@pytest.mark.parametrize("purifier, message", [
    ("{name: adversary}", r"purifiers\[0\].target: 'lineage' needs at least 2 teachers, got 1"),
    ("{name: adversary, target: source, weight: -1}", r"purifiers\[0\].weight: must be >= 0"),
    ("{name: adversary, target: source, hidden_dim: 0}", r"purifiers\[0\].hidden_dim: must be >= 1"),
    ("{name: adversary, pool: max}", r"purifiers\[0\].pool: .*mean"),
    ("{name: anchor, weight: -0.1}", r"purifiers\[0\].weight: must be >= 0"),
    ("{name: delta_projection, rank: -1}", r"purifiers\[0\].rank: must be >= 0"),
    ("{name: delta_projection, teacher_index: 1}", r"purifiers\[0\].teacher_index: 1 is out of range"),
    ("{name: delta_projection, mode: grads}", r"purifiers\[0\].mode: .*displacement"),
])
def test_bad_purifier_settings_fail_at_load(tmp_path, purifier, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, mlp_overrides(tmp_path, purifiers=f"[{purifier}]"))


def _perturb_finetuned_teachers(monkeypatch):
    """Teachers named ``finetuned`` become a fine-tune of their init (no such arch exists for vector models)."""
    def build(spec, seed):
        loaded = build_model(spec, seed)
        if spec.name == "finetuned":
            loaded.module = finetuned(loaded.module)
        return loaded

    monkeypatch.setattr(purify.assembly, "build_model", build)


@pytest.mark.parametrize("name, extra, keys", [
    ("anchor", {"purifiers": "[{name: anchor, weight: 0.01}]"}, ["anchor_distance"]),
    ("adversary", {"purifiers": "[{name: adversary, weight: 0.5}]",
                   "teachers": f"[{SPEC % (7, '')}, {SPEC % (8, '')}]"}, ["disc_acc", "disc_loss", "grl_scale"]),
    ("delta_projection", {"purifiers": "[{name: delta_projection, rank: 2}]",
                          "teachers": f"[{SPEC % (0, ', name: finetuned')}]"}, ["projected_norm", "displacement_norm"]),
    ("function_anchor", {"purifiers": "[{name: function_anchor, weight: 1.0}]"}, ["kl_to_base"]),
])
def test_each_purifier_trains_end_to_end_and_logs(tmp_path, monkeypatch, name, extra, keys):
    _perturb_finetuned_teachers(monkeypatch)
    out = train(load_recipe(None, mlp_overrides(tmp_path / name, steps=5, **extra)))
    record = read_lineage(out)
    metrics = record["metrics"]
    assert record["step"] == 5 and record["purifiers"][0]["name"] == name
    for key in keys:
        assert f"purify/0_{name}/{key}" in metrics
    assert metrics.get(f"purify/0_{name}/projected_norm", 1.0) > 0


def test_lineage_adversary_must_come_first_and_not_beside_an_ensemble(tmp_path):
    from purify.assembly import load_recipe
    from purify.config import RecipeError
    from tests.conftest import mlp_overrides

    two = ("[{arch: aux_mlp, seed: 7, kwargs: {in_dim: 16, hidden: [32, 32], n_aux: 3}}, "
           "{arch: aux_mlp, seed: 8, kwargs: {in_dim: 16, hidden: [32, 32], n_aux: 3}}]")
    ok = load_recipe(None, mlp_overrides(tmp_path, teachers=two,
                                         purifiers="[{name: adversary, target: lineage}, {name: anchor}]"))
    assert [p["name"] for p in ok.purifiers] == ["adversary", "anchor"]
    with pytest.raises(RecipeError, match=r"purifiers\[1\]\.name: adversary must be the first purifier"):
        load_recipe(None, mlp_overrides(tmp_path, teachers=two,
                                        purifiers="[{name: anchor}, {name: adversary, target: lineage}]"))
    # either order was refused by the other's rule, each message sending the user to the other order
    for stack in ("[{name: adversary, target: lineage}, {name: ensemble}]",
                  "[{name: ensemble}, {name: adversary, target: lineage}]"):
        with pytest.raises(RecipeError) as err:
            load_recipe(None, mlp_overrides(tmp_path, teachers=two, purifiers=stack))
        (problem,) = err.value.problems
        assert problem.startswith("purifiers[1].name: adversary (purifiers[") and "do not combine in either order" \
            in problem


def test_fit_step_keeps_each_purifier_metric_mean_over_its_steps():
    torch.manual_seed(0)
    student, teacher = AuxMLP(in_dim=8, n_aux=3), AuxMLP(in_dim=8, n_aux=3)
    distiller = Distiller(student, [teacher], purifiers=[Anchor(AnchorConfig(weight=1e-3))])
    distiller.setup_purifiers()
    optimizer = distiller.build_optimizer()
    seen = []
    for step in range(4):
        distiller.fit_step({"x": torch.rand(16, 8), "target_mask": torch.ones(16, 1)}, optimizer, step / 4)
        seen.append(float(distiller.purifier_metrics()["anchor.anchor_distance"]))
    assert seen[0] != seen[-1]  # the student moves away from its anchor: the steps differ
    assert distiller.purifier_metric_means() == {"anchor.anchor_distance": pytest.approx(sum(seen) / 4, rel=1e-6)}


def test_each_student_purifier_loss_term_is_its_own_logged_part():
    """Loss parts are keyed as the metrics are (``<index>_<name>``): two purifiers of one class were one part keyed
    by the class name, the second overwriting the first."""
    torch.manual_seed(0)
    student, teacher = AuxMLP(in_dim=8, n_aux=3), AuxMLP(in_dim=8, n_aux=3)
    distiller = Distiller(student, [teacher], purifiers=[Anchor(AnchorConfig(weight=1.0)),
                                                         Anchor(AnchorConfig(weight=3.0))])
    distiller.setup_purifiers()
    optimizer = distiller.build_optimizer()
    batch = {"x": torch.rand(16, 8), "target_mask": torch.ones(16, 1)}
    distiller.fit_step(batch, optimizer, 0.0)  # moves the student off its anchor: the terms are non-zero
    parts = distiller.fit_step(batch, optimizer, 0.5)
    assert set(parts) == {"loss", "distill", "0_anchor", "1_anchor"}
    assert float(parts["0_anchor"]) > 0
    assert float(parts["1_anchor"]) == pytest.approx(3.0 * float(parts["0_anchor"]), rel=1e-5)


# ------------------------------------------------------------------ the Distiller in a user's own Lightning or loop
def test_a_run_sized_by_epochs_plans_its_schedule_over_its_steps():
    """With max_epochs and no max_steps (Lightning's max_steps = -1) the schedules and ramps planned over 1 step: a
    linear learning rate was 0 from the second step on."""
    import lightning as L

    from purify.config import SchedulerConfig

    planned, lrs = [], []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            planned.append(module._planned_steps())
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    d = Distiller(mlp(0), [mlp(7)], optim=OptimConfig(name="sgd", lr=0.01), scheduler=SchedulerConfig(name="linear"))
    batches = [batch(i) for i in range(3)]
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Record()]).fit(
        d, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert planned == [6] * 6
    assert lrs == pytest.approx([0.01 * (1 - k / 6) for k in range(6)])


def test_train_mode_leaves_the_teachers_and_base_in_eval():
    """A plain loop's ``distiller.train()`` switched the frozen teachers (and base copy) to train mode: a teacher
    with dropout gave other targets at every call."""
    teacher = nn.Sequential(nn.Dropout(0.5))
    d = Distiller(mlp(0), [mlp(7), teacher], purifiers=[Anchor(AnchorConfig(weight=1.0))])
    d.setup_purifiers()
    d.train()
    assert d.student.training and not any(m.training for m in [*d.teachers.modules(), *d.base.modules()])


@pytest.mark.parametrize("kwargs, message", [
    ({"optim": OptimConfig(name="sgdd")}, r"optim.name: 'sgdd' is not one of adamw, adam, sgd"),  # built Adam
    ({"optim": OptimConfig(head_lr=-1.0)}, r"optim.head_lr: must be a finite number > 0"),  # ascended the head
    ({"optim": OptimConfig(betas=[0.9])}, r"optim.betas: expected two numbers"),  # an IndexError
    ({"teacher_weights": [1.0, -2.0]}, r"teacher_weights: \[1.0, -2.0\]; give finite weights >= 0, not all 0"),
])
def test_optimizer_schedule_and_weights_given_in_python_are_checked_as_a_recipes(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        Distiller(mlp(0), [mlp(7), mlp(8)], **kwargs)
    with pytest.raises(ValueError, match=r"teachers must be a list of models .* got one AuxMLP; give \[teacher\]"):
        Distiller(mlp(0), mlp(7))


def test_a_cosine_typo_in_the_schedule_is_refused():
    from purify.config import SchedulerConfig

    with pytest.raises(RecipeError, match=r"scheduler.name: 'cosin' is not one of constant, linear, cosine"):
        Distiller(mlp(0), [mlp(7)], scheduler=SchedulerConfig(name="cosin"))


def test_fit_step_stops_on_a_non_finite_loss_before_updating():
    """fit_step stepped on a NaN loss and left NaN weights; training_step raised."""
    from purify.types import DivergedError

    d = Distiller(mlp(0), [mlp(7)])
    before = copy.deepcopy(d.student.state_dict())
    bad = {"x": torch.full((4, 16), float("nan")), "target_mask": torch.ones(4, 1)}
    with pytest.raises(DivergedError, match=r"non-finite loss \(nan\) at step 4; the weights were not updated") as err:
        d.fit_step(bad, d.build_optimizer(), 0.0, step=4)
    assert err.value.step == 5
    assert all(torch.equal(v, before[k]) for k, v in d.student.state_dict().items())


def test_purifier_metrics_of_two_purifiers_of_one_name_are_both_kept():
    from purify.purifiers.divergence_mask import DivergenceMask, DivergenceMaskConfig

    masks = [DivergenceMask(DivergenceMaskConfig(flag="random", rate=r, reference="others")) for r in (0.25, 0.75)]
    d = Distiller(mlp(0), [mlp(7), mlp(8)], purifiers=masks)
    d.fit_step(batch(0), d.build_optimizer(), 0.0)
    got = d.purifier_metrics()
    assert {"0_divergence_mask.flagged_fraction", "1_divergence_mask.flagged_fraction"} <= set(got)


def test_anchor_penalty_and_delta_subspaces_refuse_what_they_cannot_pair_or_read():
    """anchor_penalty broadcast a (1, 3) base weight over a (4, 3) student's (a finite, wrong penalty), raised a bare
    KeyError for another naming and torch's empty-stack error without trainable parameters; delta_subspaces read
    rank -1 as a Python slice (a rank-4 basis of 5)."""
    import copy

    from purify import anchor_penalty, delta_subspaces

    student = nn.Linear(3, 4)
    for base, message in ((nn.Linear(3, 1), r"the base has one of shape \(1, 3\) for the student's weight \(4, 3\)"),
                          (nn.Sequential(nn.Linear(3, 4)), r"the base has none of that name for the student's weight")):
        with pytest.raises(ValueError, match="^anchor: " + message):
            anchor_penalty(student, base)
    with pytest.raises(ValueError, match=r"^anchor_penalty: weight must be >= 0, got -1\.0"):
        anchor_penalty(student, copy.deepcopy(student), -1.0)
    frozen = copy.deepcopy(student).requires_grad_(False)
    assert anchor_penalty(frozen, nn.Linear(3, 4)).item() == 0.0
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.weight.add_(0.05 * torch.randn_like(teacher.weight))
    for rank in (-1, 2.0, True):
        with pytest.raises(ValueError, match=rf"^delta_subspaces: rank must be an int >= 0, got {rank!r}"):
            delta_subspaces(student, teacher, rank)
    assert delta_subspaces(student, teacher, 1)["weight"][0].shape == (4, 1)
