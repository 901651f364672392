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


def percent_cell(values: Sequence[float] | None, intervals: bool = True) -> str:
    """A table cell: the mean of 0/1 (or fractional) scores in percent, with its 95 % bootstrap interval
    when asked; "–" for no values."""
    if not values:
        return "–"
    mean = 100 * sum(values) / len(values)
    if not intervals:
        return f"{mean:.1f}"
    lo, hi = bootstrap_ci(values)
    return f"{mean:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"
