"""Confidence intervals for the evaluation tables: percentile bootstrap over questions (seeded)."""

from __future__ import annotations

import random
from collections.abc import Sequence


def bootstrap_ci(
    values: Sequence[float], *, reps: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """The `level` percentile-bootstrap interval of the mean of `values` (resampled with replacement)."""
    if not values:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(reps))
    lo = means[int((1 - level) / 2 * reps)]
    hi = means[min(reps - 1, int((1 + level) / 2 * reps))]
    return lo, hi
