"""The analysis scripts quoted in the README compute what they say on hand-made summaries."""

import importlib.util
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


def test_curve_roughness_is_the_mean_and_largest_step_between_neighbouring_points() -> None:
    rough = _script("curve_roughness")
    curve = [{"step": s, "transfer": t} for s, t in ((0, 0.0), (10, 0.5), (20, 0.1), (30, 0.2))]
    summary = {"conditions": {"vanilla": {"per_seed": [{"curve": curve}]}, "control": {"per_seed": [{}]}}}
    got = rough.roughness(summary, from_step=10)["vanilla"]
    assert got["pairs"] == 2
    assert got["mean_abs_step"] == pytest.approx(0.25) and got["max_abs_step"] == pytest.approx(0.4)
    assert "control" not in rough.roughness(summary, 0)
