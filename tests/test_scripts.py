"""The analysis scripts quoted in the README compute what they say on hand-made summaries."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(seeds: list[int], arm: list[float], control: list[float], vanilla: list[float]) -> dict:
    rec = lambda values: [{"seed": s, "transfer": v} for s, v in zip(seeds, values)]  # noqa: E731
    return {"conditions": {"control": {"per_seed": rec(control)}, "vanilla": {"per_seed": rec(vanilla)}},
            "probe_free": {"arms": {"a": {"per_seed": rec(arm)}}}}


def test_pool_probe_free_pools_per_seed_gaps_against_the_pooled_margin() -> None:
    pool = _script("pool_probe_free")
    one = _run([1, 2], [0.1, 0.3], [0.0, 0.1], [1.0, 1.1])
    two = _run([3, 4], [0.2, 0.2], [0.1, 0.1], [0.9, 0.9])
    got = pool.pooled("a", [one, two])
    assert got["n"] == 4 and got["mean"] == pytest.approx((0.1 + 0.2 + 0.1 + 0.1) / 4)
    assert got["margin"] == pytest.approx(0.1 * (1.0 + 1.0 + 0.8 + 0.8) / 4)
    assert got["inside"] is False  # gaps of 0.1-0.2 are not within ±0.09
    close = pool.pooled("a", [_run([1, 2, 3], [0.01, 0.0, -0.01], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])])
    assert close["inside"] is True
    with pytest.raises(SystemExit, match="seed 1 appears in two runs"):
        pool.pooled("a", [one, one])


def test_pool_probe_free_pairs_an_on_policy_arm_with_the_on_policy_references() -> None:
    pool = _script("pool_probe_free")
    run = _run([1, 2, 3], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    rec = lambda values: [{"seed": s, "transfer": v} for s, v in zip([1, 2, 3], values)]  # noqa: E731
    run["conditions"] |= {"control:on-policy": {"per_seed": rec([0.5, 0.5, 0.5])},
                          "vanilla:on-policy": {"per_seed": rec([1.5, 1.5, 1.5])},
                          "a@0.1": {"per_seed": rec([0.5, 0.5, 0.5])}}
    on = {"lam": 1.0}
    run["settings"] = {"conditions": [
        {"name": "control", "kind": "control", "loss": "forward_kl", "student": None},
        {"name": "vanilla", "kind": "vanilla", "loss": "forward_kl", "student": None},
        {"name": "control:on-policy", "kind": "control", "loss": "forward_kl", "on_policy": on, "student": None},
        {"name": "vanilla:on-policy", "kind": "vanilla", "loss": "forward_kl", "on_policy": on, "student": None},
        {"name": "a@0.1", "kind": None, "loss": "forward_kl", "on_policy": on, "student": None, "baseline": False}]}
    run["probe_free"]["arms"]["a"]["values"] = [0.1]
    got = pool.pooled("a", [run])  # against the off-policy control this would be +0.5, outside the margin
    assert got["mean"] == pytest.approx(0.0) and got["margin"] == pytest.approx(0.1) and got["inside"] is True


def test_pool_probe_free_counts_the_seeds_and_runs_below_each_guards_band() -> None:
    pool = _script("pool_probe_free")

    def run(seeds: list[int], arm: list[float], control: list[float], vanilla: list[float]) -> dict:
        r = _run(seeds, [0.0] * len(seeds), [0.0] * len(seeds), [1.0] * len(seeds))
        for name, mass in (("control", control), ("vanilla", vanilla)):
            for rec, m in zip(r["conditions"][name]["per_seed"], mass):
                rec["animal_mass"] = m
        for rec, m in zip(r["probe_free"]["arms"]["a"]["per_seed"], arm):
            rec["animal_mass"] = m
        r["conditions"]["base"] = {"per_seed": [{"seed": s, "animal_mass": 1.0} for s in seeds]}  # band: ≥ 0.5
        r["guards"] = [{"metric": "animal_mass", "label": "P(any animal)", "min_ratio_of_base": 0.5}]
        return r

    one = run([1, 2, 3], arm=[0.9, 0.1, 0.8], control=[0.9, 0.9, 0.9], vanilla=[0.5, 0.9, 0.49])
    two = run([4, 5, 6], arm=[0.9, 0.9, 0.9], control=[0.0, 0.9, 0.95], vanilla=[0.9, 0.9, 0.9])
    got = pool.guard_tally("a", [one, two])["P(any animal)"]
    assert got["a"] == {"seeds": 6, "below": 1, "runs": 2, "ci_below": 1}  # run one: mean 0.6, wide CI
    assert got["control"] == {"seeds": 6, "below": 1, "runs": 2, "ci_below": 1}  # run two: 0.0 on seed 4
    assert got["vanilla"] == {"seeds": 6, "below": 1, "runs": 2, "ci_below": 1}  # 0.49 < 0.5; 0.5 is inside


@pytest.mark.parametrize("args, message", [
    # a smoke test through the script replaced a committed result (purify bench refused the same --out)
    (["--quick", "--seeds", "1", "--out", "{run}"], "--out {run} holds a finished benchmark run"),
    (["--quick", "--seeds", "0", "--out", "{new}"], "--seeds 0: must be at least 1"),
    (["--quick", "--first-seed", "-5", "--out", "{new}"], "--first-seed -5: seeds are non-negative integers"),
    (["--quick", "--out", "{new}", "--option", "conditions=[nope"], "--option: cannot read 'conditions=[nope'"),
    (["--quick", "--out", "/proc/purify-script"], "cannot create anything in /proc"),
])
def test_lm_parallel_seeds_checks_its_flags_as_purify_bench_does(tmp_path, capsys, monkeypatch, args, message):
    from purify.bench import lm_suites

    script = _script("lm_parallel_seeds")
    monkeypatch.setattr(lm_suites, "run_suite", lambda *a, **k: pytest.fail("the suite ran"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"suite": "style-tic"}')
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert script.main(["style-tic", *[a.format(run=run, new=tmp_path / "new") for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lm_parallel_seeds: error: ") and \
        message.format(run=run) in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "new").exists()


def test_curve_roughness_is_the_mean_and_largest_step_between_neighbouring_points() -> None:
    rough = _script("curve_roughness")
    curve = [{"step": s, "transfer": t} for s, t in ((0, 0.0), (10, 0.5), (20, 0.1), (30, 0.2))]
    summary = {"conditions": {"vanilla": {"per_seed": [{"curve": curve}]}, "control": {"per_seed": [{}]}}}
    got = rough.roughness(summary, from_step=10)["vanilla"]
    assert got["pairs"] == 2
    assert got["mean_abs_step"] == pytest.approx(0.25) and got["max_abs_step"] == pytest.approx(0.4)
    assert "control" not in rough.roughness(summary, 0)


def test_gpu_check_counts_model_flops_by_hand_and_reads_the_peak_by_the_longest_name() -> None:
    gpu = _script("gpu_check")
    # N = 10 linear weights, 2 blocks of width 4, 3 sequences of 5 tokens:
    # student (6·10 + 12·2·4·5) + teacher (2·10 + 4·2·4·5) per token = 540 + 180 = 720, times 15 tokens
    assert gpu.step_flops(10, 2, 4, 3, 5) == 720 * 15
    model = gpu.LlamaForCausalLM(gpu.LlamaConfig(**gpu.TINY))
    d, f, v, kv = 64, 128, 512, 64 * 2 // 4  # width, MLP, vocabulary, K/V width (2 of 4 heads)
    assert gpu.linear_weights(model) == 2 * (d * d * 2 + d * kv * 2 + 3 * d * f) + v * d
    assert gpu.peak("NVIDIA H100 80GB HBM3") == 989.4e12 and gpu.peak("NVIDIA H100 PCIe") == 756.5e12
    assert gpu.peak("cpu") is None


def test_gpu_check_runs_on_cpu_and_names_the_device_and_why_the_covert_run_did_not_run(tmp_path: Path) -> None:
    gpu = _script("gpu_check")
    assert gpu.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--batch", "2", "--length", "16",
                     "--steps", "2", "--warmup", "1", "--covert-budget", "1"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mfu"]["device"] == "cpu" and result["mfu"]["mfu"] is None
    assert result["mfu"]["median_step_s"] > 0 and result["mfu"]["step_flops"] > 0
    assert result["covert"] == {"ran": False, "why": "stopped by the budget after 1 s",
                                "command": result["covert"]["command"]}
    assert result["environment"]["command"].startswith("python scripts/gpu_check.py --device cpu")
    assert result["environment"]["versions"]["torch"] and "git" in result["environment"]
    assert "on **cpu**" in (tmp_path / "gpu_check.md").read_text()
