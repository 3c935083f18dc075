"""Statistics for benchmarks: means with Student-t 95% intervals, paired tests, the share of transfer removed. The
verdicts built on them (and vanilla's early-stopping curve read at a task error, :func:`purify.bench.verdicts.segment`)
are :mod:`purify.bench.verdicts`'.
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
        ``{"mean", "ci95": [lo, hi], "n"}``; with one value the interval is ``[mean, mean]``. Values that are not
        finite (NaN, ±inf: a mean of inf had an interval of NaN) are dropped, and ``n`` counts the rest.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    m = float(x.mean())
    if len(x) < 2:
        return {"mean": m, "ci95": [m, m], "n": 1}
    half = float(sps.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return {"mean": m, "ci95": [m - half, m + half], "n": int(len(x))}


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired-by-seed difference ``a - b``: mean, 95% CI and two-sided t-test p-value, both over the pairs whose
    difference is finite (a NaN made the p-value NaN while the interval left it out)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    out = mean_ci(d.tolist())
    out["p_value"] = float(sps.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and d.std() > 0 else float("nan")
    return out


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN where ``b`` is 0 (a vanilla task error of 0 crashed a whole summary)."""
    return a / b if b else float("nan")


def clearly_above_zero(test: dict[str, Any]) -> bool:
    """Whether a :func:`paired_test`'s 95% CI lies above 0 with its p-value below 0.05 — never from one seed or
    zero variance, whose "interval" is ``[mean, mean]`` (it said vanilla was significantly above control there,
    while every verdict, reading the test's NaN p, said it was not)."""
    return bool(test["n"] > 1 and test["ci95"][0] > 0 and test["p_value"] < 0.05)


def fmt_test(test: dict[str, Any], digits: int = 3) -> str:
    """A :func:`paired_test` in one phrase: ``+mean [lo, hi], p = p`` (``digits`` significant)."""
    lo, hi = test["ci95"]
    return f"{test['mean']:+.{digits}g} [{lo:+.{digits}g}, {hi:+.{digits}g}], p = {test['p_value']:.3g}"


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
