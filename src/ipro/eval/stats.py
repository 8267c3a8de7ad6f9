"""Aggregate values with 95% percentile bootstrap intervals: over videos (`bootstrap_mean`),
or over inputs for any statistic of several runs (`bootstrap_inputs`)."""

from __future__ import annotations

import math

import numpy as np


def bootstrap_mean(values, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """{"mean", "ci_low", "ci_high", "n"} over the finite values; None fields when n is 0.

    The interval resamples videos with replacement (seeded, so reruns agree); with one
    video it collapses to the value itself.
    """
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    means = np.random.default_rng(seed).choice(x, size=(resamples, x.size), replace=True).mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(x.mean()), "ci_low": float(low), "ci_high": float(high), "n": int(x.size)}


def bootstrap_inputs(rows, statistic, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """`statistic` of the (N, K) array `rows` (one row per input, e.g. an input's mean over
    its seeds in K runs) and its 95% percentile interval from resampling whole inputs.

    `statistic` maps (..., N, K) to (...): it gets all resamples at once, e.g.
    `lambda x: x[..., 0].mean(-1)`. Resampling inputs, not videos, keeps one input's seeds
    together: they share a face, so they are not independent evidence. Returns {"value",
    "ci_low", "ci_high", "n"}; None fields when there is no input. Resamples whose
    statistic is not finite (a ratio over inputs that all tie) are dropped.
    """
    x = np.asarray(rows, dtype=np.float64)
    if len(x) == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    x = x.reshape(len(x), -1)
    picks = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    with np.errstate(divide="ignore", invalid="ignore"):
        stats = np.asarray(statistic(x[picks]), dtype=np.float64)
        value = float(statistic(x[None])[0])
    stats = stats[np.isfinite(stats)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail]) if stats.size else (np.nan, np.nan)
    return {"value": value, "ci_low": float(low), "ci_high": float(high), "n": int(len(x))}
