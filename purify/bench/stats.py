"""Statistics for benchmarks: means with Student-t 95% intervals, paired tests, the share of transfer removed, and
vanilla's early-stopping curve read at a task error (:func:`interpolate_curve`: the first point in training order
that reaches it). The verdicts built on them are :mod:`purify.bench.verdicts`'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps


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
