"""The aux-logit benchmark suite, its oracle, and delta projection's global mode."""

import copy
import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from purify.assembly import load_recipe
from purify.bench.aux_logits import PROTOCOLS, QUICK, REFS, _dp, _ens, run_suite, task_conditions
from purify.bench.aux_runs import Settings, build_world, run_seed
from purify.bench.digits import read_arrays
from purify.bench.lm_common import Condition
from purify.bench.oracle import TraitGradientOracle
from purify.config import RecipeError
from purify.models import AuxMLP
from purify.module import Distiller
from purify.purifiers import PURIFIERS, PurifierContext
from purify.purifiers.delta_projection import DeltaProjection, DeltaProjectionConfig, teacher_delta
from tests.conftest import mlp_overrides


# ------------------------------------------------------------------ the suite end to end (quick)
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("aux")
    return out, run_suite(quick=True, out=str(out), progress=False)


def test_quick_run_writes_every_file_with_the_schema(quick_run):
    out, summary = quick_run
    assert {p.name for p in out.iterdir()} >= {"summary.json", "summary.md", "summary.csv", "frontier.png",
                                               "env.json"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["seeds"] == summary["seeds"] == [20, 21]  # default: disjoint from the tuning seeds 0-19
    for key in ("suite", "protocol", "data", "seeds", "conditions", "frontier", "verdicts", "p_adjusted", "tuned_on",
                "trait", "bounds"):
        assert key in on_disk
    assert on_disk["suite"] == "aux-logits" and on_disk["protocol"] == "task" and on_disk["data"] == "sklearn digits"
    names = list(on_disk["conditions"])
    assert names[:4] == ["base", "control", "vanilla", "oracle"] and "delta_projection@global-0.3" in names
    for name, cond in on_disk["conditions"].items():
        for metric in ("transfer", "fidelity_kl", "task_error", "agreement", "accuracy"):
            assert set(cond[metric]) >= {"mean", "ci95"} and len(cond[metric]["ci95"]) == 2, (name, metric)
        assert [r["seed"] for r in cond["per_seed"]] == [20, 21]
    assert "oracle" not in PURIFIERS  # the oracle knows the trait: bench only
    points = on_disk["frontier"]["vanilla"]
    assert [p["step"] for p in points] == list(range(0, 200, 25)) + [200]
    assert all({"step", "transfer", "task_error", "fidelity_kl"} <= set(p) for p in points)
    assert set(on_disk["verdicts"]) == {"delta_projection@global-0.3", "ensemble@w-0.5"}  # the oracle is a bound
    assert all(v.startswith("no verdict: 2 seed(s) with finite values, 3 needed") for v in on_disk["verdicts"].values())
    assert set(on_disk["bounds"]) == {"oracle"}
    base, control = on_disk["conditions"]["base"], on_disk["conditions"]["control"]
    assert base["transfer"]["mean"] == 0.0
    for rec, ctl in zip(base["per_seed"], control["per_seed"]):  # transfer − control, per seed
        assert rec["distance_to_control"] == pytest.approx(rec["transfer"] - ctl["transfer"])
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(r["point"] == "final" for r in rows) == 2 * len(names)
    assert sum(r["point"] == "curve" for r in rows) == 2 * len(points)
    env = json.loads((out / "env.json").read_text())
    assert {"machine", "versions", "seeds", "git", "wall_seconds", "command"} <= set(env)
    md = (out / "summary.md").read_text()
    assert "| vanilla |" in md and "quick run" in md and "not applicable" in md
    assert "this run's seeds 20–21 are disjoint from them" in md and "Reported on tuning seeds" not in md
    assert "- Seeds 20–21. Measured wall time" in md and "1 torch thread each" in md
    assert env["workers"] == on_disk["workers"] >= 1 and env["cpu_seconds"] == on_disk["cpu_seconds"] > 0
    assert "--workers 2" in env["command"] and "--protocol task" in env["command"]


def test_worker_processes_give_the_numbers_of_a_sequential_run(quick_run):
    _, summary = quick_run
    settings = replace(PROTOCOLS["task"], **QUICK["task"])
    vanilla = Condition("vanilla", ["trait"], loss=settings.loss, baseline=True, kind="vanilla")
    rec = run_seed(21, settings, [vanilla], None)
    pooled = summary["conditions"]["vanilla"]["per_seed"][1]
    for key in ("transfer", "task_error", "fidelity_kl", "accuracy"):
        assert rec["conditions"]["vanilla"][key] == pooled[key]
    assert [_scores(p) for p in rec["conditions"]["vanilla"]["curve"]] == [_scores(p) for p in pooled["curve"]]


def test_a_fresh_run_is_rederived_unchanged(quick_run, tmp_path):
    import shutil

    from purify.bench.rederive import rereport

    out, summary = quick_run
    shutil.copytree(out, tmp_path / "run")
    again = rereport(tmp_path / "run")
    for key in ("verdicts", "bounds", "p_adjusted", "frontier_gap", "acceptance", "headline", "frontier"):
        assert json.dumps(again[key]) == json.dumps(json.loads((out / "summary.json").read_text())[key]), key
    assert (tmp_path / "run" / "summary.md").read_text() == (out / "summary.md").read_text()
    # all of it: the base's and teacher's seed statistics too (re-derived from their means, their CIs had collapsed)
    assert (tmp_path / "run" / "summary.json").read_text() == (out / "summary.json").read_text()  # byte for byte


def test_a_summary_without_the_declared_fields_is_refused_by_name(quick_run, tmp_path):
    import shutil

    from purify.bench.rederive import rereport
    from purify.bench.report import BenchError

    out, _ = quick_run
    shutil.copytree(out, tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    del stored["tuned_on"]  # as summaries written before runs recorded what was tuned on which seeds
    (tmp_path / "run" / "summary.json").write_text(json.dumps(stored))
    with pytest.raises(BenchError, match="written before summaries recorded tuned_on; re-run the command"):
        rereport(tmp_path / "run")


# ------------------------------------------------------------------ determinism
TINY = Settings(n_aux=4, hidden=(32,), teacher_steps=30, ref_steps=10, student_steps=20, batch=32, n_eval=128,
                curve_every=10)


def _scores(record):
    """A condition's per-seed record without its timing."""
    return {k: v for k, v in record.items() if k not in ("seconds", "curve")}


def test_same_seed_same_numbers_whatever_else_runs():
    conds = [Condition("vanilla", ["trait"], loss=TINY.loss, baseline=True, kind="vanilla"),
             Condition("oracle", ["trait"], loss=TINY.loss, oracle=True),
             Condition("delta_projection@global-0.3", ["trait"], [_dp(mode="global", strength=0.3)], loss=TINY.loss),
             Condition("ensemble@w-0.5", REFS, [_ens(0.5)], loss=TINY.loss)]
    first, second = run_seed(3, TINY, conds, None), run_seed(3, TINY, conds, None)
    for name in first["conditions"]:
        assert _scores(first["conditions"][name]) == _scores(second["conditions"][name])
    assert [_scores(p) for p in first["conditions"]["vanilla"]["curve"]] == \
        [_scores(p) for p in second["conditions"]["vanilla"]["curve"]]
    assert [p["step"] for p in first["conditions"]["vanilla"]["curve"]] == [0, 10, 20]
    alone = run_seed(3, TINY, conds[2:3], None)  # a condition's numbers do not depend on the others run beside it
    assert _scores(alone["conditions"][conds[2].name]) == _scores(first["conditions"][conds[2].name])


def test_default_conditions_cover_each_purifier_and_the_sweeps():
    names = [c.name for c in task_conditions()]
    for prefix in ("ensemble@", "divergence_mask@", "adversary@", "anchor@", "delta_projection@rank-",
                   "cross_init_teacher", "oracle"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert {"delta_projection@global-0.2", "delta_projection@global-0.3", "delta_projection@global-0.5"} <= set(names)
    assert sum(c.role == "combination" for c in task_conditions()) == 1


# ------------------------------------------------------------------ --data validation
def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros(4, int)}, r"missing array 'X'; expected X \(float, N×D\) and y \(int, N\), found \['y'\]"),
    ({"X": np.zeros((4, 2))}, r"missing array 'y'"),
    ({"X": np.zeros((5, 2)), "y": np.array([0, 1, 0, 1])}, r"X has 5 rows but y has 4 labels"),
    ({"X": np.array([[0.0, np.nan], [1, 1], [2, 2], [3, 3]]), "y": np.array([0, 1, 0, 1])},
     r"X contains 1 NaN or infinite values"),
    ({"X": np.zeros((4, 2)), "y": np.zeros(4, int)}, r"y has 1 class; a classification set needs at least 2"),
    ({"X": np.zeros(4), "y": np.array([0, 1, 0, 1])}, r"X must be a non-empty numeric N×D array"),
    ({"X": np.zeros((4, 2)), "y": np.array([0, 1.5, 0, 1])}, r"y must hold integer class labels"),
])
def test_bad_data_files_fail_with_one_line_naming_the_problem(tmp_path, arrays, message):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(ValueError, match=message) as err:
        read_arrays(path)
    assert "\n" not in str(err.value)


def test_run_suite_refuses_bad_data_before_running(tmp_path):
    with pytest.raises(ValueError, match="y has 1 class"):
        run_suite(data=_npz(tmp_path, X=np.zeros((4, 2)), y=np.zeros(4, int)), out=str(tmp_path / "o"), quick=True,
                  progress=False)
    with pytest.raises(FileNotFoundError, match="file not found"):
        read_arrays(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="unknown protocol 'mnist'"):
        run_suite(protocol="mnist", out=str(tmp_path / "o"))


def test_any_classification_set_runs(tmp_path):
    g = np.random.default_rng(0)
    y = np.repeat([3, 7, 9], 40)  # arbitrary labels are remapped to 0..C-1
    x = g.normal(size=(120, 8)) + y[:, None]
    settings = replace(TINY, teacher_steps=200, teacher_lr=3e-3)
    path = _npz(tmp_path, X=x, y=y)
    world = build_world(0, settings, path)
    assert world.data.n_classes == 3 and world.data.dim == 8 and world.acc["trait"] > 0.9
    res = run_seed(0, settings, [Condition("vanilla", ["trait"], loss=settings.loss)], path)
    assert np.isfinite(res["conditions"]["vanilla"]["transfer"]) and res["world"]["chance"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------ the oracle
def test_oracle_projects_only_when_the_gradients_align():
    student = nn.Linear(2, 1, bias=False)
    trait_direction = torch.tensor([[1.0, 0.0]])
    oracle = TraitGradientOracle(lambda s: (s.weight * trait_direction).sum())  # trait gradient = (1, 0)
    student.weight.grad = torch.tensor([[2.0, 1.0]])  # aligned: <g, t> = 2 > 0 → remove the t component
    oracle.before_step(student)
    assert torch.equal(student.weight.grad, torch.tensor([[0.0, 1.0]])) and oracle.last_metrics["projected"] == 1.0
    student.weight.grad = torch.tensor([[-2.0, 1.0]])  # opposed: the step already raises the trait loss → unchanged
    oracle.before_step(student)
    assert torch.equal(student.weight.grad, torch.tensor([[-2.0, 1.0]])) and oracle.last_metrics["projected"] == 0.0


# ------------------------------------------------------------------ delta projection, mode: global
def _mlp(seed=0):
    torch.manual_seed(seed)
    return AuxMLP(in_dim=16, hidden=[32, 32], n_aux=3)


def _finetuned(student, seed=1):
    teacher = copy.deepcopy(student)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.parameters():
            p += 0.05 * torch.randn(p.shape, generator=g)
    return teacher


def _ctx(student, teacher, logit_slice=None):
    return PurifierContext(student=student, teachers=[teacher], teacher_names=["t"], teacher_weights=[1.0],
                           base=copy.deepcopy(student), logit_slice=logit_slice)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_global_mode_removes_exactly_alpha_of_the_component_along_the_teacher_delta(alpha):
    student = _mlp()
    teacher = _finetuned(student)
    purifier = DeltaProjection(DeltaProjectionConfig(mode="global", strength=alpha))
    purifier.setup(_ctx(student, teacher))
    delta = teacher_delta(student, teacher)
    norm = torch.sqrt(sum(d.pow(2).sum() for d in delta.values()))
    u = {n: d / norm for n, d in delta.items()}
    g = torch.Generator().manual_seed(5)
    for p in student.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    before = {n: p.grad.clone() for n, p in student.named_parameters()}
    along = sum((before[n] * u[n]).sum() for n in u)
    purifier.before_step(student)
    after = {n: p.grad for n, p in student.named_parameters()}
    assert float(sum((after[n] * u[n]).sum() for n in u)) == pytest.approx((1 - alpha) * float(along), abs=1e-5)
    for n in u:  # only the component along u changed
        torch.testing.assert_close(after[n] - before[n], -alpha * along * u[n], atol=1e-6, rtol=0)
    assert float(purifier.last_metrics["projected_norm"]) == pytest.approx(alpha * abs(float(along)), abs=1e-5)


def test_global_strength_zero_is_vanilla():
    teacher = _finetuned(_mlp())
    batches = [{"x": torch.rand(8, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1,
                "target_mask": torch.ones(8, 1)} for i in range(5)]
    students = []
    for purifiers in ([], [DeltaProjection(DeltaProjectionConfig(mode="global", strength=0.0))]):
        d = Distiller(_mlp(), [teacher], purifiers=purifiers)
        opt = d.build_optimizer()
        for b in batches:
            d.fit_step(b, opt, 0.0)
        students.append(d.student)
    for a, b in zip(students[0].parameters(), students[1].parameters()):
        assert torch.equal(a, b)


def test_undistilled_output_rows_are_left_out_of_the_teacher_delta():
    student = _mlp()
    teacher = _finetuned(student)
    full, sliced = (DeltaProjection(DeltaProjectionConfig(mode="global")) for _ in range(2))
    full.setup(_ctx(student, teacher))
    sliced.setup(_ctx(student, teacher, logit_slice=[10, 13]))
    names = sliced._names
    head_w, head_b = sliced._basis(names.index("head.weight"))[0], sliced._basis(names.index("head.bias"))[0]
    assert head_w[:10].abs().sum() == 0 and head_b[:10].abs().sum() == 0 and head_w[10:].abs().sum() > 0
    assert full._basis(names.index("head.weight"))[0][:10].abs().sum() > 0
    assert float(sum(sliced._basis(i)[0].pow(2).sum() for i in range(len(names)))) == pytest.approx(1.0, abs=1e-5)
    explicit = DeltaProjection(DeltaProjectionConfig(rank=2, output_layer="head"))
    explicit.setup(_ctx(student, teacher, logit_slice=[10, 13]))
    assert explicit.live_rows == {"head.weight": (10, 13), "head.bias": (10, 13)}
    u, _ = explicit._basis(explicit._names.index("head.weight"))
    assert u[:10].abs().sum() < 1e-6  # the SVD modes get the same mask
    with pytest.raises(ValueError, match="output_layer 'lm_head' is not a module of the student"):
        DeltaProjection(DeltaProjectionConfig(output_layer="lm_head")).setup(_ctx(student, teacher, [10, 13]))


def test_strength_outside_zero_one_fails_at_load(tmp_path):
    with pytest.raises(RecipeError, match=r"purifiers\[0\].strength: 1.5 is not in \[0, 1\]"):
        load_recipe(None, mlp_overrides(tmp_path, purifiers="[{name: delta_projection, mode: global, strength: 1.5}]"))
