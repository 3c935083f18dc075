"""Statistics for benchmarks: means with Student-t 95% intervals, paired tests, and the early-stopping frontier.

A purifier *wins* only where, at matched fidelity, its transfer lies below vanilla distillation's early-stopping
curve (DESIGN §4): per seed, interpolate vanilla's curve (transfer against task error) at the purifier's final
task error and take the difference; the verdict is ``below frontier`` when the 95% CI of the mean difference over
seeds lies entirely below zero, ``above frontier`` when entirely above, else ``on frontier``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

BELOW, ON, ABOVE = "below frontier", "on frontier", "above frontier"


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
                      ykey: str = "transfer") -> float:
    """Vanilla's transfer at task error ``x``: linear interpolation of the curve sorted by ``xkey``.

    Outside the curve's range the nearest end is used (a purifier with better fidelity than vanilla ever reached
    is compared with vanilla's best point; one with worse fidelity than vanilla's first point, with that point).
    """
    pts = sorted((p[xkey], p[ykey]) for p in curve)
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    return float(np.interp(x, xs, ys))


def frontier_gap(vanilla_curves: Sequence[Sequence[dict[str, float]]], finals: Sequence[dict[str, float]],
                 xkey: str = "task_error", ykey: str = "transfer") -> dict[str, Any]:
    """Per-seed transfer minus vanilla's curve at the same task error; mean, CI, p-value and verdict.

    Args:
        vanilla_curves: one early-stopping curve per seed (points with ``xkey`` and ``ykey``).
        finals: the condition's final point per seed, same seed order.
    """
    diffs = [f[ykey] - interpolate_curve(c, f[xkey], xkey, ykey) for c, f in zip(vanilla_curves, finals)]
    out = paired_test(diffs, [0.0] * len(diffs))
    lo, hi = out["ci95"]
    out["verdict"] = BELOW if hi < 0 else ABOVE if lo > 0 else ON
    out["per_seed"] = diffs
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
