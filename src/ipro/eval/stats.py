"""Aggregate per-video values: mean and a 95% percentile bootstrap interval."""

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
