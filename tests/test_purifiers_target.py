"""Target-side purifiers: ensemble combination, divergence mask, tail truncation — values checked by hand."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from purify.assembly import load_recipe
from purify.config import LossConfig, RecipeError
from purify.lineage import read_lineage
from purify.losses import distillation_loss, forward_kl, generalized_jsd
from purify.models import AuxMLP
from purify.module import Distiller
from purify.purifiers import PURIFIERS, ModelOutput, PurifierContext, Targets
from purify.purifiers.divergence_mask import DivergenceMask, DivergenceMaskConfig, divergence, mask_weights
from purify.purifiers.ensemble import Ensemble, EnsembleConfig, combine
from purify.purifiers.tail_truncation import TailTruncation, TailTruncationConfig, keep_mask, truncate
from purify.train import train
from tests.conftest import mlp_overrides

MLP = "{arch: aux_mlp, seed: %d, name: %s, weight: %g, kwargs: {in_dim: 16, hidden: [32, 32], n_aux: 3}}"
TWO = f"[{MLP % (7, 'a', 1)}, {MLP % (8, 'b', 1)}]"
MODES = ["mean", "logmean", "min", "logits"]


def outs(*probs: list[list[float]]) -> list[ModelOutput]:
    """Teacher outputs ``(1, T, V)`` whose logits are the log of the given probabilities."""
    return [ModelOutput(logits=torch.tensor([p]).log()) for p in probs]


def ctx(n: int, weights: list[float] | None = None, names: list[str] | None = None) -> PurifierContext:
    return PurifierContext(student=nn.Identity(), teachers=[nn.Identity()] * n,
                           teacher_names=names or [f"t{i}" for i in range(n)], teacher_weights=weights or [1.0] * n)


def apply(purifier, outputs: list[ModelOutput], mask: list[float] | None = None) -> Targets:
    t = outputs[0].logits.shape[1]
    target_mask = torch.tensor([mask or [1.0] * t])
    return purifier.transform_targets({"target_mask": target_mask}, outputs, Targets(outputs[0].logits, target_mask))


def recipe_error(tmp_path, purifiers: str, **extra) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(None, mlp_overrides(tmp_path, purifiers=purifiers, **extra))
    assert str(err.value).startswith("purifiers[0].") and "\n" not in str(err.value)
    return str(err.value)


def test_registered():
    assert PURIFIERS["ensemble"] == (EnsembleConfig, Ensemble)
    assert PURIFIERS["divergence_mask"] == (DivergenceMaskConfig, DivergenceMask)
    assert PURIFIERS["tail_truncation"] == (TailTruncationConfig, TailTruncation)


# ------------------------------------------------------------------ ensemble
@pytest.mark.parametrize("how", MODES)
def test_identical_teachers_give_the_single_teachers_targets(how):
    single = torch.randn(2, 3, 5) * 3
    out = combine(torch.stack([single] * 3), torch.tensor([1.0, 2.0, 3.0]), how)
    torch.testing.assert_close(F.log_softmax(out, -1), F.log_softmax(single, -1))


P = [[0.8, 0.1, 0.1], [0.5, 0.3, 0.2]]
Q = [[0.2, 0.4, 0.4], [0.1, 0.1, 0.8]]


GEO = [0.05**0.5, 0.03**0.5, 0.16**0.5]  # sqrt(p q) at position 1


@pytest.mark.parametrize("how, weights, expected, changed", [
    ("mean", [3.0, 1.0], [[0.65, 0.175, 0.175], [0.4, 0.25, 0.35]], 0.0),  # 0.75 p + 0.25 q
    ("logmean", [1.0, 1.0], [[0.5, 0.25, 0.25], [g / sum(GEO) for g in GEO]], 0.5),  # sqrt(p q) renormalised
    ("min", [3.0, 1.0], [[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]], 0.5),  # min(p, q) renormalised
])
def test_two_teacher_combination_by_hand(how, weights, expected, changed):
    purifier = Ensemble(EnsembleConfig(combine=how))
    purifier.setup(ctx(2, weights))
    got = apply(purifier, outs(P, Q))
    torch.testing.assert_close(got.logits.exp(), torch.tensor([expected]))
    assert purifier.last_metrics["top1_changed"].item() == changed  # position 1's argmax moves from 0 to 2


def test_weights_in_the_config_override_teacher_weights_and_logits_mode_is_a_weighted_logit_mean():
    purifier = Ensemble(EnsembleConfig(combine="logits", weights=[1.0, 3.0]))
    purifier.setup(ctx(2, [3.0, 1.0]))
    p, q = (o.logits for o in outs(P, Q))
    torch.testing.assert_close(apply(purifier, outs(P, Q)).logits, 0.25 * p + 0.75 * q)
    # a zero weight drops a teacher entirely
    torch.testing.assert_close(combine(torch.stack([p, q]), torch.tensor([0.0, 1.0]), "logmean"), q.log_softmax(-1))


@pytest.mark.parametrize("purifiers, extra, message", [
    ("[{name: ensemble, combine: mean}]", {}, "purifiers[0].teachers: ensemble needs at least 2 teachers (got 1)"),
    ("[{name: ensemble, combine: logmean}]", {"teachers": TWO, "loss.name": "mse"}, "purifiers[0].combine: 'logmean'"),
    ("[{name: ensemble, weights: [0, 0]}]", {"teachers": TWO}, "purifiers[0].weights: [0.0, 0.0] must be >= 0"),
    ("[{name: ensemble, weights: [1]}]", {"teachers": TWO}, "purifiers[0].weights: got 1 weights for 2 teachers"),
    ("[{name: ensemble, combine: avg}]", {"teachers": TWO}, "purifiers[0].combine: Invalid value 'avg'"),
])
def test_ensemble_config_errors(tmp_path, purifiers, extra, message):
    assert message in recipe_error(tmp_path, purifiers, **extra)


def test_ensemble_logits_mode_works_with_mse(tmp_path):
    r = load_recipe(None, mlp_overrides(tmp_path, teachers=TWO, purifiers="[{name: ensemble, combine: logits}]",
                                        **{"loss.name": "mse"}))
    assert r.purifiers[0]["combine"] == "logits"


# ------------------------------------------------------------------ divergence mask
SAME, FAR, NEAR = [0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]


def jsd(p: list[float], q: list[float]) -> float:
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return sum(0.5 * a * math.log(a / c) + 0.5 * b * math.log(b / c) for a, b, c in zip(p, q, m))


def test_drop_masks_exactly_the_divergent_positions():
    primary, ref = [SAME, FAR, SAME, NEAR], [SAME, SAME, SAME, SAME]
    purifier = DivergenceMask(DivergenceMaskConfig(reference="b", threshold=0.01))
    purifier.setup(ctx(2, names=["a", "b"]))
    got = apply(purifier, outs(primary, ref), mask=[1.0, 1.0, 1.0, 0.0])
    assert got.weight.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    torch.testing.assert_close(got.logits, outs(primary)[0].logits)  # the targets themselves are untouched
    assert purifier.last_metrics["masked_fraction"].item() == pytest.approx(1 / 3)  # over the 3 real positions
    assert purifier.last_metrics["mean_divergence"].item() == pytest.approx(jsd(FAR, SAME) / 3, abs=1e-6)


def test_soft_mode_weights_by_hand():
    primary, ref = [SAME, FAR, NEAR, SAME], [SAME, SAME, SAME, SAME]
    d_far, d_near = jsd(FAR, SAME), jsd(NEAR, SAME)
    purifier = DivergenceMask(DivergenceMaskConfig(reference="others", threshold=0.01, mode="soft"))
    purifier.setup(ctx(2))
    got = apply(purifier, outs(primary, ref))
    torch.testing.assert_close(got.weight, torch.tensor([[1.0, 0.0, 1 - d_near / d_far, 1.0]]))
    div = torch.tensor([0.0, 0.5, 0.2, 0.9])  # d_max is taken over real positions only; below threshold keeps 1
    torch.testing.assert_close(mask_weights(div, torch.tensor([True, True, True, False]), 0.3, "soft"),
                               torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_reference_others_is_the_weighted_mixture_and_top1_counts_argmax_changes():
    p, q1, q2 = [[0.6, 0.3, 0.1]], [[0.2, 0.7, 0.1]], [[0.8, 0.1, 0.1]]
    mix = [0.25 * a + 0.75 * b for a, b in zip(q1[0], q2[0])]  # teacher weights 1 and 3
    purifier = DivergenceMask(DivergenceMaskConfig(reference="others", threshold=0.0))
    purifier.setup(ctx(3, [5.0, 1.0, 3.0]))
    apply(purifier, outs(p, q1, q2))
    assert purifier.last_metrics["mean_divergence"].item() == pytest.approx(jsd(p[0], mix), abs=1e-6)
    top1 = divergence(torch.tensor(P).log(), torch.tensor(Q).log(), "top1")
    assert top1.tolist() == [1.0, 1.0]


def test_reference_base_is_the_students_frozen_initial_copy():
    torch.manual_seed(0)
    student = AuxMLP(in_dim=16, hidden=[32, 32], n_aux=3)
    twin, other = copy.deepcopy(student), AuxMLP(in_dim=16, hidden=[32, 32], n_aux=3)
    batch = {"x": torch.rand(8, 16), "target_mask": torch.ones(8, 1)}

    def masked(teachers: list[nn.Module]) -> tuple[float, Distiller]:
        purifier = DivergenceMask(DivergenceMaskConfig(reference="base", threshold=1e-6))
        distiller = Distiller(student, teachers, loss=LossConfig(logit_slice=[10, 13]), purifiers=[purifier])
        loss, _ = distiller.compute_loss(batch, progress=0.0)
        assert torch.isfinite(loss)
        return purifier.last_metrics["masked_fraction"].item(), distiller

    frac, distiller = masked([twin])  # the teacher equals the student's initial weights: nothing diverges
    assert frac == 0.0 and distiller.base is not student
    assert not any(p.requires_grad for p in distiller.base.parameters())
    saved = [k for k in distiller.state_dict() if k.startswith("purifiers.")]
    assert saved == ["purifiers.0._extra_state"]  # the base is not saved twice: only the purifier's own RNG state
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)  # the student moves; its frozen base does not
    distiller.compute_loss(batch, progress=0.0)
    assert distiller.purifiers[0].last_metrics["masked_fraction"].item() == 0.0
    assert masked([other])[0] == 1.0


@pytest.mark.parametrize("purifiers, extra, message", [
    ("[{name: divergence_mask, reference: c}]", {"teachers": TWO}, "purifiers[0].reference: unknown reference 'c'; "
     "allowed: others, base, b"),
    ("[{name: divergence_mask, reference: a}]", {"teachers": TWO}, "'a' (that is teachers[0], the primary teacher)"),
    ("[{name: divergence_mask}]", {}, "purifiers[0].reference: 'others' needs at least 2 teachers"),
    ("[{name: divergence_mask, threshold: -1}]", {"teachers": TWO}, "purifiers[0].threshold: must be >= 0"),
])
def test_divergence_mask_config_errors(tmp_path, purifiers, extra, message):
    assert message in recipe_error(tmp_path, purifiers, **extra)


def test_missing_reference_name_at_setup():
    with pytest.raises(ValueError, match="no teacher named 'c'"):
        DivergenceMask(DivergenceMaskConfig(reference="c")).setup(ctx(2))


# ------------------------------------------------------------------ divergence mask: the chunked, fused path
def dense_divergence_mask(cfg: DivergenceMaskConfig, weights: list[float], names: list[str], teachers: list[Tensor],
                          base: Tensor, mask: Tensor, targets: Targets) -> tuple[Targets, Tensor]:
    """The straightforward definition (the module docstring) on whole ``(B, T, V)`` tensors: returns the targets and
    the flagged positions."""
    real, primary = mask > 0, teachers[0]
    if cfg.reference == "base":
        ref = base
    elif cfg.reference == "others":
        ref = combine(torch.stack(teachers[1:]), torch.tensor(weights[1:]), "mean")
    else:
        ref = teachers[names.index(cfg.reference)]
    div = generalized_jsd(ref, primary, beta=0.5) if cfg.metric == "jsd" else \
        (primary.argmax(-1) != ref.argmax(-1)).float()
    if cfg.flag == "divergence":
        flagged = (div > cfg.threshold) & real
    else:
        if cfg.flag == "logratio":
            t, b = primary.log_softmax(-1), base.log_softmax(-1)
            top = t.argmax(-1, keepdim=True)
            score = (t.gather(-1, top) - b.gather(-1, top)).squeeze(-1)
        else:
            score = torch.rand(real.shape, generator=torch.Generator().manual_seed(cfg.seed))
        k = round(cfg.rate * int(real.sum()))
        flagged = torch.zeros(real.numel(), dtype=torch.bool)
        flagged[torch.where(real.flatten(), score.flatten(), -math.inf).topk(k).indices] = True
        flagged = flagged.view_as(real)
    if cfg.mode == "replace":
        return Targets(torch.where(flagged[..., None], ref.float().log_softmax(-1), targets.logits),
                       targets.weight), flagged
    if cfg.mode == "soft":
        d_max = torch.where(real, div, 0.0).max()
        factor = torch.where(div > cfg.threshold, (1 - div / d_max).clamp(0, 1), 1.0)
    else:
        factor = (~flagged).float()
    return Targets(targets.logits, targets.weight * factor), flagged


@pytest.mark.parametrize("entry, n_teachers", [
    ({"reference": "others"}, 2),  # the benchmark's case: the mixture of one other teacher
    ({"reference": "others"}, 3),
    ({"reference": "t2", "mode": "soft"}, 3),
    ({"reference": "base", "mode": "replace"}, 2),
    ({"reference": "others", "metric": "top1", "mode": "replace", "threshold": 0.5}, 3),
    ({"reference": "base", "mode": "replace", "flag": "logratio", "rate": 0.3}, 2),
    ({"reference": "others", "mode": "replace", "flag": "random", "rate": 0.4}, 3),
    ({"reference": "others", "flag": "logratio", "rate": 0.2}, 2),
])
def test_divergence_mask_gives_the_dense_definitions_targets(monkeypatch, entry, n_teachers):
    """The purifier computes the reference and the divergence a few positions at a time and only where targets are
    read: the same targets as the dense definition, at padded, prompt and down-weighted positions too."""
    monkeypatch.setattr("purify.losses_chunked.CHUNK_BYTES", 4 * 40 * 7)  # 7 positions per chunk: 6 chunks, one short
    g = torch.Generator().manual_seed(3)
    batch, length, vocab = 3, 20, 40
    primary = 2 * torch.randn(batch, length, vocab, generator=g)
    spread = torch.rand(batch, length, 1, generator=g)  # how far each position's other teachers are from the primary
    teachers = [primary] + [primary + 3 * spread * torch.randn(batch, length, vocab, generator=g)
                            for _ in range(n_teachers - 1)]
    base = primary + 2 * spread * torch.randn(batch, length, vocab, generator=g)
    mask = torch.ones(batch, length)
    mask[:, :3], mask[1, 12:], mask[2, 17:] = 0, 0, 0  # prompt and padding
    weight = mask.clone()
    weight[0, 0], weight[1, 5] = 0.5, 0.25  # a weighted non-target position; a down-weighted target
    weights, names = [1.0, 1.0, 3.0][:n_teachers], [f"t{i}" for i in range(n_teachers)]
    cfg = DivergenceMaskConfig(**entry)
    if cfg.flag == "divergence" and cfg.metric == "jsd":  # halfway between two middle dense divergences
        ref = {"base": base, "others": combine(torch.stack(teachers[1:]), torch.tensor(weights[1:]), "mean")}.get(
            cfg.reference, teachers[-1])
        values = generalized_jsd(ref, primary, beta=0.5)[mask > 0].sort().values
        cfg.threshold = float(values[len(values) // 2 - 1:len(values) // 2 + 1].mean())
    context = PurifierContext(student=nn.Identity(), teachers=[nn.Identity()] * n_teachers, teacher_names=names,
                              teacher_weights=weights, base=nn.Identity(),
                              forward=lambda model, b: ModelOutput(logits=base))
    purifier = DivergenceMask(cfg)
    purifier.setup(context)
    got = purifier.transform_targets({"target_mask": mask}, [ModelOutput(logits=t) for t in teachers],
                                     Targets(primary, weight))
    expected, flagged = dense_divergence_mask(cfg, weights, names, teachers, base, mask, Targets(primary, weight))
    assert 0 < int(flagged.sum()) < int((mask > 0).sum())  # the comparison sees both kinds of position
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.weight, expected.weight, rtol=0, atol=1e-6)
    assert purifier.last_metrics["flagged_fraction"].item() == pytest.approx(flagged.sum().item() / mask.sum().item())
    if cfg.mode != "replace":
        assert torch.equal(got.logits, primary)  # untouched
    else:
        assert torch.equal(got.weight, weight) and torch.equal(got.logits[~flagged], primary[~flagged])


def test_divergence_is_the_generalized_jsd_at_one_half():
    g = torch.Generator().manual_seed(0)
    p, q = 3 * torch.randn(6, 1000, generator=g), 3 * torch.randn(6, 1000, generator=g)
    p[0, :10], q[1, :500], q[2], p[2] = -math.inf, -math.inf, p[2], p[2]  # zero-probability tokens; identical rows
    got, expected = divergence(p, q), generalized_jsd(q, p, beta=0.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got[2].item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(got).all()


# ------------------------------------------------------------------ label replacement (divergence_mask mode: replace)
def test_replace_puts_the_references_distribution_exactly_at_flagged_positions():
    primary, ref = [SAME, FAR, SAME, NEAR], [NEAR, SAME, SAME, SAME]  # JSD: pos 0 ~0.03, pos 1 ~0.22, pos 2 0
    purifier = DivergenceMask(DivergenceMaskConfig(reference="b", threshold=0.1, mode="replace"))
    purifier.setup(ctx(2, names=["a", "b"]))
    raw = torch.tensor([[[2.0, 1.0, 0.0], [5.0, -1.0, 3.0], [0.0, 0.0, 1.0], [1.0, 2.0, 3.0]]])  # unnormalised
    batch = {"target_mask": torch.tensor([[1.0, 1.0, 1.0, 0.0]])}  # position 3 diverges but is not a target
    got = purifier.transform_targets(batch, outs(primary, ref), Targets(raw, batch["target_mask"]))
    torch.testing.assert_close(got.logits[0, 1], torch.tensor(SAME).log())  # the reference's log-probabilities
    for i in (0, 2, 3):
        assert torch.equal(got.logits[0, i], raw[0, i])  # untouched, bit for bit
    assert torch.equal(got.weight, batch["target_mask"])  # replaced, not dropped
    assert purifier.last_metrics["flagged_fraction"].item() == pytest.approx(1 / 3)
    assert "masked_fraction" not in purifier.last_metrics


def test_replace_with_the_others_mixture_and_random_flags_at_the_requested_rate():
    torch.manual_seed(0)
    teachers = [ModelOutput(logits=torch.randn(4, 50, 6)) for _ in range(3)]
    mask = torch.ones(4, 50)
    mask[:, 40:] = 0  # 160 real positions
    purifier = DivergenceMask(DivergenceMaskConfig(reference="others", mode="replace", flag="random", rate=0.25))
    purifier.setup(ctx(3, [1.0, 1.0, 3.0]))
    mix = combine(torch.stack([teachers[1].logits, teachers[2].logits]), torch.tensor([1.0, 3.0]), "mean")
    seen = []
    for _ in range(2):
        got = purifier.transform_targets({"target_mask": mask}, teachers, Targets(teachers[0].logits, mask))
        flagged = (got.logits != teachers[0].logits).any(-1)
        assert int(flagged.sum()) == 40 and not flagged[mask == 0].any()  # round(0.25 × 160), real positions only
        torch.testing.assert_close(got.logits[flagged], mix[flagged].log_softmax(-1))
        assert purifier.last_metrics["flagged_fraction"].item() == pytest.approx(0.25)
        seen.append(flagged)
    assert not torch.equal(*seen)  # fresh draws each batch
    drop = DivergenceMask(DivergenceMaskConfig(reference="others", flag="random", rate=0.5))
    drop.setup(ctx(3))
    weight = drop.transform_targets({"target_mask": mask}, teachers, Targets(teachers[0].logits, mask)).weight
    assert weight.sum().item() == 80.0 and drop.last_metrics["masked_fraction"].item() == pytest.approx(0.5)


def test_logratio_flags_the_positions_where_the_teacher_most_outbelieves_the_base():
    teacher = [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]]
    base = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.05, 0.5, 0.45]]
    # log p_T(top) − log p_base(top): 0, log 6, log(4/3), log 10 → the top half is positions 3 and 1
    base_out = outs(base)[0]
    context = PurifierContext(student=nn.Identity(), teachers=[nn.Identity()], teacher_names=["t"],
                              teacher_weights=[1.0], base=nn.Identity(), forward=lambda model, batch: base_out)
    purifier = DivergenceMask(DivergenceMaskConfig(reference="base", mode="replace", flag="logratio", rate=0.5))
    assert purifier.needs_base
    purifier.setup(context)
    got = apply(purifier, outs(teacher))
    torch.testing.assert_close(got.logits.exp(), torch.tensor([[teacher[0], base[1], teacher[2], base[3]]]))
    assert DivergenceMask(DivergenceMaskConfig(reference="others", flag="logratio")).needs_base  # the flag reads it


@pytest.mark.parametrize("purifiers, extra, message", [
    ("[{name: divergence_mask, flag: random, rate: 0}]", {"teachers": TWO}, "purifiers[0].rate: 0.0 is not in (0, 1]"),
    ("[{name: divergence_mask, flag: logratio, mode: soft}]", {"teachers": TWO},
     "purifiers[0].mode: soft scales weights by the divergence"),
    ("[{name: divergence_mask, mode: replace}]", {"teachers": TWO, "loss.name": "mse"},
     "purifiers[0].mode: replace puts the reference's log-probabilities in the target, but loss.name: mse"),
    ("[{name: divergence_mask, flag: sometimes}]", {"teachers": TWO}, "purifiers[0].flag: Invalid value 'sometimes'"),
])
def test_label_replacement_config_errors(tmp_path, purifiers, extra, message):
    assert message in recipe_error(tmp_path, purifiers, **extra)


def test_label_replacement_trains_from_a_recipe_with_purify_train(tmp_path):
    from purify.cli import main

    recipe = tmp_path / "r.yaml"
    entry = "[{name: divergence_mask, reference: base, mode: replace, flag: random, rate: 0.25}]"
    OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(tmp_path / "out", steps=4, purifiers=entry, export=False,
                                                        **{"trainer.log_every_n_steps": 1})), recipe)
    assert main(["train", str(recipe)]) == 0
    metrics = read_lineage(tmp_path / "out")["metrics"]
    assert metrics["purify/0_divergence_mask/flagged_fraction"] == pytest.approx(0.25)  # 16 positions, 4 flagged


# ------------------------------------------------------------------ tail truncation
HEAD = [[0.6, 0.25, 0.1, 0.05], [0.85, 0.1, 0.03, 0.02]]


@pytest.mark.parametrize("knobs, expected", [
    ({"top_k": 2}, [[0.6 / 0.85, 0.25 / 0.85, 0, 0], [0.85 / 0.95, 0.1 / 0.95, 0, 0]]),
    ({"top_p": 0.8}, [[0.6 / 0.85, 0.25 / 0.85, 0, 0], [1, 0, 0, 0]]),  # mass before the 2nd token of row 2 is .85
    ({"top_p": 0.9}, [[0.6 / 0.95, 0.25 / 0.95, 0.1 / 0.95, 0], [0.85 / 0.95, 0.1 / 0.95, 0, 0]]),
    ({"min_prob": 0.2}, [[0.6 / 0.85, 0.25 / 0.85, 0, 0], [1, 0, 0, 0]]),
    ({"min_prob": 0.99, "top_k": 3}, [[1, 0, 0, 0], [1, 0, 0, 0]]),  # the top-1 is always kept
])
def test_truncation_by_hand(knobs, expected):
    got, expected = truncate(torch.tensor(HEAD).log(), **knobs), torch.tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(got.exp(), expected)
    assert torch.equal(torch.isinf(got), expected == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_keeps_k_tokens_when_maxima_tie(dtype):
    """Tied maxima (common in bf16 logits): topk's k plus argmax's first maximum, when topk had picked other ones,
    kept k + 1 tokens."""
    logits = torch.zeros(2, 10, dtype=dtype)
    logits[1, 4:] = 1.0  # six tied maxima, none at index 0
    assert keep_mask(logits.float().log_softmax(-1), top_k=3).sum(-1).tolist() == [3, 3]
    assert torch.isfinite(truncate(logits, top_k=3)).sum(-1).tolist() == [3, 3]


def test_kept_mass_and_tokens_are_logged():
    purifier = TailTruncation(TailTruncationConfig(top_p=0.8))
    got = apply(purifier, outs(HEAD))
    assert purifier.last_metrics["kept_mass"].item() == pytest.approx(0.85)  # .6 + .25 and .85
    assert purifier.last_metrics["kept_tokens"].item() == 1.5
    assert torch.isfinite(got.logits).sum().item() == 3
    assert keep_mask(torch.tensor(HEAD).log(), top_k=3, top_p=0.9).sum().item() == 5  # criteria intersect


def dense_truncation(logits: Tensor, **knobs) -> tuple[Tensor, Tensor, Tensor]:
    """The full-vocabulary definition: log-softmax, :func:`keep_mask`, renormalise; kept mass and tokens."""
    logp = logits.float().log_softmax(-1)
    kept = logp.masked_fill(~keep_mask(logp, **knobs), -math.inf)
    out = kept - kept.logsumexp(-1, keepdim=True)
    finite = torch.isfinite(out)
    return out, (logits.float().softmax(-1) * finite).sum(-1), finite.sum(-1).float()


@pytest.mark.parametrize("knobs", [{"top_k": 20}, {"top_k": 1}, {"top_p": 0.9}, {"top_p": 0.5, "top_k": 5},
                                   {"min_prob": 0.01}, {"min_prob": 0.0}, {"top_p": 1.0},
                                   {"top_p": 0.3, "min_prob": 0.02, "top_k": 50}])
@pytest.mark.parametrize("kind", ["float32", "bfloat16 ties", "flat"])
def test_tail_truncation_gives_the_dense_definitions_targets(monkeypatch, knobs, kind):
    """The kept set is read off a few top-k candidates per position, a chunk of positions at a time; ties across the
    kept prefix's end and NaN positions take the dense path: the same targets and metrics as the dense definition."""
    monkeypatch.setattr("purify.losses_chunked.CHUNK_BYTES", 4 * 3000 * 7)  # 7 positions per chunk
    g = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(3, 16, 3000, generator=g)
    if kind == "bfloat16 ties":  # a bf16 teacher's logits: many exact ties, at the top and at the cut
        logits = logits.bfloat16().float()
    elif kind == "flat":  # a wide nucleus: the number of candidates has to grow
        logits = 0.1 * logits
    logits[0, 1, :] = (logits[0, 1, :] * 2).round() / 2  # coarse ties
    logits[0, 2, 5:] = -math.inf  # an already truncated target: 5 finite tokens
    logits[0, 3, 1] = logits[0, 3].max()  # two tokens tied at the top
    logits[2, 15, 7] = math.nan  # a padded position holding garbage
    mask = torch.ones(3, 16)
    mask[2, 12:] = 0
    purifier = TailTruncation(TailTruncationConfig(**knobs))
    got = purifier.transform_targets({"target_mask": mask}, [ModelOutput(logits=logits)], Targets(logits, mask))
    out, mass, count = dense_truncation(logits, **knobs)
    assert torch.equal(torch.isnan(got.logits), torch.isnan(out)) and torch.isnan(out[2, 15]).all()
    assert torch.equal(got.logits == -math.inf, out == -math.inf)  # the same kept tokens everywhere
    finite = torch.isfinite(out)
    torch.testing.assert_close(got.logits[finite], out[finite], rtol=1e-6, atol=1e-6)
    assert torch.equal(got.weight, mask)
    real = mask > 0
    torch.testing.assert_close(purifier.last_metrics["kept_mass"], (mass * real)[real].sum() / real.sum(), rtol=1e-6,
                               atol=1e-6)
    assert purifier.last_metrics["kept_tokens"].item() == ((count * real)[real].sum() / real.sum()).item()
    torch.testing.assert_close(truncate(logits, **knobs), got.logits, equal_nan=True)


def test_forward_kl_on_the_truncated_target_is_finite_with_the_right_gradient():
    target = truncate(torch.tensor([HEAD]).log(), top_k=2)  # (1, 2, 4)
    student = torch.randn(1, 2, 4, requires_grad=True)
    loss = distillation_loss(student, target, torch.ones(1, 2), name="forward_kl")
    p_trunc, q = target.exp(), student.detach().softmax(-1)
    by_hand = sum((p_trunc[0, t, v] * (p_trunc[0, t, v] / q[0, t, v]).log()).item()
                  for t in range(2) for v in range(2)) / 2
    assert torch.isfinite(loss) and loss.item() == pytest.approx(by_hand, rel=1e-5)
    loss.backward()
    torch.testing.assert_close(student.grad, (q - p_trunc) / 2)  # dKL/dz = q - p'
    assert (student.grad[..., 2:] > 0).all()  # the dropped tail is pushed down
    assert torch.isfinite(forward_kl(student, target)).all()


@pytest.mark.parametrize("purifiers, extra, message", [
    ("[{name: tail_truncation}]", {}, "purifiers[0].top_k: set at least one of top_k, top_p, min_prob"),
    ("[{name: tail_truncation, top_k: 0}]", {}, "purifiers[0].top_k: must be >= 1, got 0"),
    ("[{name: tail_truncation, top_p: 1.5}]", {}, "purifiers[0].top_p: 1.5 is not in (0, 1]"),
    ("[{name: tail_truncation, top_p: 0}]", {}, "purifiers[0].top_p: 0.0 is not in (0, 1]"),
    ("[{name: tail_truncation, top_k: 2}]", {"loss.name": "mse"}, "purifiers[0].name: tail_truncation gives some "
     "tokens zero target mass, which loss.name: mse cannot use"),
    ("[{name: tail_truncation, top_k: 2}]", {"loss.name": "reverse_kl"}, "loss.name: reverse_kl cannot use"),
])
def test_tail_truncation_config_errors(tmp_path, purifiers, extra, message):
    assert message in recipe_error(tmp_path, purifiers, **extra)


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("purifiers, keys", [
    ("[{name: ensemble, combine: logmean}]", ["purify/0_ensemble/top1_changed", "purify/0_ensemble/kl_primary"]),
    ("[{name: divergence_mask, reference: b, threshold: 0.01}]", ["purify/0_divergence_mask/masked_fraction"]),
    ("[{name: ensemble}, {name: tail_truncation, top_k: 2}]", ["purify/1_tail_truncation/kept_mass"]),
])
def test_training_logs_the_purifier_metrics(tmp_path, purifiers, keys):
    recipe = load_recipe(None, mlp_overrides(tmp_path, steps=5, teachers=TWO, purifiers=purifiers,
                                             export=False, **{"trainer.log_every_n_steps": 1}))
    metrics = read_lineage(train(recipe))["metrics"]
    for key in keys:
        assert key in metrics and math.isfinite(metrics[key])


def test_a_dropped_position_lowers_the_loss_in_a_plain_loop_as_under_purify_train():
    """Without ``num_items`` (fit_step, a user's loop, the benchmark) the count was taken after the divergence mask:
    dropping half the positions doubled the others' weight (loss 2.0x the one purify train and PurifyTrainer,
    which count the targets first, computed). Both count the targets before the target purifiers now."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)
    torch.manual_seed(0)
    student, t0, t1 = (LlamaForCausalLM(cfg) for _ in range(3))
    ids = torch.randint(0, 20, (4, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": torch.ones(4, 8),
             "labels": ids[:, 1:]}
    losses = []
    for extra in ({}, {"num_items": torch.tensor(32.0)}):
        mask = DivergenceMask(DivergenceMaskConfig(reference="others", flag="random", rate=0.5, mode="drop"))
        d = Distiller(student, [t0, t1], purifiers=[mask])
        losses.append(d.compute_loss({**batch, **extra}, 0.0)[0])
        kept = mask.last_metrics.get("masked_fraction")
    assert kept is not None and 0.2 < float(kept) < 0.8  # the mask dropped a real share of the positions
    torch.testing.assert_close(losses[0], losses[1])


def test_truncation_criteria_outside_their_range_are_named():
    """``keep_mask(top_k=0)`` kept nothing (not even the top-1 its docstring promises), ``truncate(top_k=0)`` was an
    IndexError (NaN targets on the grad path), ``top_k=-1`` torch's "selected index k out of range"."""
    from purify import keep_mask, truncate

    logits = torch.randn(2, 3, 7)
    for kwargs, message in (({"top_k": 0}, r"top_k must be an int >= 1 \(or None\), got 0"),
                            ({"top_k": -1}, r"top_k must be an int >= 1"), ({"top_k": 2.5}, r"top_k must be an int"),
                            ({"top_p": 0.0}, r"top_p must be in \(0, 1\] \(or None\), got 0\.0"),
                            ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
                            ({"min_prob": -0.1}, r"min_prob must be in \[0, 1\] \(or None\), got -0\.1")):
        for call in (lambda: keep_mask(torch.log_softmax(logits, -1), **kwargs), lambda: truncate(logits, **kwargs),
                     lambda: truncate(logits.clone().requires_grad_(), **kwargs)):
            with pytest.raises(ValueError, match="^tail truncation: " + message):
                call()
    assert keep_mask(torch.log_softmax(logits, -1), top_k=1).sum(-1).eq(1).all()
