"""Statistics for benchmarks: means with Student-t 95% intervals, paired tests, and the early-stopping frontier.

A purifier *wins* only where, at matched fidelity, its transfer lies below vanilla distillation's early-stopping
curve (DESIGN §4): per seed, interpolate vanilla's curve (transfer against task error) at the purifier's final
task error and take the difference; the verdict is ``below frontier`` when the 95% CI of the mean difference over
seeds lies entirely below zero, ``above frontier`` when entirely above, else ``on frontier``. "Interpolate at the
task error" means true early stopping (:func:`interpolate_curve`): the first point in training order that reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

BELOW, ON, ABOVE = "below frontier", "on frontier", "above frontier"
NO_GAIN = "no verdict: task error not below the undistilled base's (not distilling dominates it)"
UNRESOLVED = "no verdict: vanilla's frontier unresolved here"


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean and two-sided Student-t confidence interval.

    Returns:
        ``{"mean", "ci95": [lo, hi], "n"}``; with one value the interval is ``[mean, mean]``. NaNs are dropped.
    """
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    m = float(x.mean())
    if len(x) < 2:
        return {"mean": m, "ci95": [m, m], "n": 1}
    half = float(sps.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return {"mean": m, "ci95": [m - half, m + half], "n": int(len(x))}


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired-by-seed difference ``a - b``: mean, 95% CI and two-sided t-test p-value."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    out = mean_ci(d.tolist())
    out["p_value"] = float(sps.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and d.std() > 0 else float("nan")
    return out


def interpolate_curve(curve: Sequence[dict[str, float]], x: float, xkey: str = "task_error",
                      ykey: str = "transfer", order_key: str = "step") -> float:
    """Early-stopping value of ``ykey`` at ``xkey = x``: where training would have stopped to reach ``x``.

    Walk the curve in training order (``order_key``, else the given order) and stop at the *first* point whose
    ``xkey`` is ``<= x``; interpolate linearly in ``xkey`` between it and the point before. If the first point is
    already at or below ``x``, its value is returned; if no point reaches ``x``, the last point's (training to the
    end did not get there). This is true early stopping: where ``xkey`` plateaus while ``ykey`` keeps rising, a
    sorted interpolation would compare with a late, high-``ykey`` point that a user stopping at ``x`` never reaches.

    Args:
        curve: points with ``xkey``, ``ykey`` (and ``order_key``, when present in every point).
        x: the target value of ``xkey`` (e.g. a purifier's final task error).
    """
    if not curve:
        raise ValueError("interpolate_curve: empty curve")
    pts = sorted(curve, key=lambda p: p[order_key]) if all(order_key in p for p in curve) else list(curve)
    xs, ys = [float(p[xkey]) for p in pts], [float(p[ykey]) for p in pts]
    for i, xi in enumerate(xs):
        if xi <= x:
            if i == 0 or xs[i - 1] == xi:
                return ys[i]
            w = (xs[i - 1] - x) / (xs[i - 1] - xi)
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[-1]


def _segment_jump(curve: Sequence[dict[str, float]], x: float, xkey: str, ykey: str) -> float:
    """How much ``ykey`` changes across the curve segment :func:`interpolate_curve` reads at ``x`` (0 at a point)."""
    pts = sorted(curve, key=lambda p: p["step"]) if all("step" in p for p in curve) else list(curve)
    for i, p in enumerate(pts):
        if p[xkey] <= x:
            return 0.0 if i == 0 or p[xkey] == x else abs(p[ykey] - pts[i - 1][ykey])
    return 0.0


def frontier_gap(vanilla_curves: Sequence[Sequence[dict[str, float]]], finals: Sequence[dict[str, float]],
                 xkey: str = "task_error", ykey: str = "transfer", resolution: float = 0.25) -> dict[str, Any]:
    """Per-seed transfer minus vanilla's curve at the same task error; mean, CI, p-value and verdict.

    Two cases give no below/on/above verdict, because the comparison would be meaningless: a condition whose task
    error is, on average over seeds, not below the undistilled base's (the curve's ``step == 0`` point) is
    dominated by not distilling at all (:data:`NO_GAIN`); and where vanilla's measured curve jumps by more than
    ``resolution`` in ``ykey`` between the two points the interpolation reads, its early-stopping frontier there is
    not measured, only guessed (:data:`UNRESOLVED`: evaluate vanilla more densely).

    Args:
        vanilla_curves: one early-stopping curve per seed (points with ``xkey`` and ``ykey``).
        finals: the condition's final point per seed, same seed order.
        resolution: largest ``ykey`` change across an interpolated curve segment that still counts as measured.
    """
    diffs = [f[ykey] - interpolate_curve(c, f[xkey], xkey, ykey) for c, f in zip(vanilla_curves, finals)]
    out = paired_test(diffs, [0.0] * len(diffs))
    lo, hi = out["ci95"]
    out["verdict"] = BELOW if hi < 0 else ABOVE if lo > 0 else ON
    starts = [next((p for p in c if p.get("step") == 0), None) for c in vanilla_curves]
    jump = max(_segment_jump(c, f[xkey], xkey, ykey) for c, f in zip(vanilla_curves, finals))
    if all(starts) and np.mean([f[xkey] - s[xkey] for f, s in zip(finals, starts)]) >= 0:  # type: ignore[index]
        out["verdict"] = NO_GAIN
    elif jump > resolution:
        out["verdict"] = f"{UNRESOLVED} (vanilla's curve jumps by {jump:.2f} between the two points read here)"
    out["per_seed"] = diffs
    out["segment_jump"] = jump
    return out


def mean_curve(curves: Sequence[Sequence[dict[str, float]]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Average same-length curves point by point (matching ``step``), with 95% CIs for each key."""
    n = min(len(c) for c in curves)
    out = []
    for i in range(n):
        point: dict[str, Any] = {"step": curves[0][i].get("step", i)}
        for key in keys:
            ci = mean_ci([c[i][key] for c in curves])
            point[key], point[f"{key}_ci95"] = ci["mean"], ci["ci95"]
        out.append(point)
    return out


def fraction_removed(values: Sequence[float], vanilla: Sequence[float], control: Sequence[float],
                     n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Share of vanilla's excess over control that a condition removes, ``(v̄ − x̄) / (v̄ − c̄)`` (means over seeds).

    1 = down to control, 0 = vanilla's level, > 1 = overshoot below control, < 0 = worse than vanilla. The 95%
    interval is a paired percentile bootstrap over seeds (``n_boot`` resamples, fixed ``seed``); resamples whose
    denominator is not positive are dropped. With ``v̄ ≤ c̄`` there is nothing to remove: the mean is NaN.

    Returns:
        ``{"mean", "ci95": [lo, hi], "n"}``.
    """
    x, v, c = (np.asarray(a, dtype=float) for a in (values, vanilla, control))
    n = len(x)
    den = v.mean() - c.mean() if n else float("nan")
    if not n or not den > 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": n}
    mean = float((v.mean() - x.mean()) / den)
    if n < 2:
        return {"mean": mean, "ci95": [mean, mean], "n": n}
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    dens = v[idx].mean(1) - c[idx].mean(1)
    ok = dens > 0
    boots = (v[idx].mean(1) - x[idx].mean(1))[ok] / dens[ok]
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if len(boots) else (float("nan"), float("nan")))
    return {"mean": mean, "ci95": [float(lo), float(hi)], "n": n}


def frontier_problems(conditions: dict[str, Any]) -> list[str]:
    """Why a suite's frontier verdicts would be meaningless, from its per-seed ``transfer`` and ``task_error``.

    Two conditions must hold, each as a paired 95% CI entirely above zero: vanilla's transfer exceeds the
    control's (otherwise there is no transfer to remove, and any "win" is a placebo), and vanilla's task error is
    below the undistilled base's (otherwise the fidelity axis does not measure what distillation teaches).

    Args:
        conditions: ``{name: {"per_seed": [{"transfer", "task_error", ...}, ...]}}`` with ``base``, ``control``
            and ``vanilla`` in the same seed order.

    Returns:
        Human-readable problems; empty when verdicts are meaningful.
    """
    def values(name: str, key: str) -> list[float]:
        return [r[key] for r in conditions[name]["per_seed"]]

    problems = []
    if "control" in conditions:
        lo = paired_test(values("vanilla", "transfer"), values("control", "transfer"))["ci95"][0]
        if not lo > 0:
            problems.append("vanilla transfer is not significantly above control")
    if "base" in conditions:
        lo = paired_test(values("base", "task_error"), values("vanilla", "task_error"))["ci95"][0]
        if not lo > 0:
            problems.append("vanilla's task error is not significantly below the base's")
    return problems
