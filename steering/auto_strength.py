"""`strength: "auto"`: pick a request's strength from the attention its own prompt pays to the context.

Measured on the unsteered prompt: for each layer l and query head h, the mass C[l][h] that the prompt's
last position puts on the context keys (the steered tokens). Steering multiplies the weight of every other
prompt key by alpha, so with the same scores that head's context share would be
    C / (C + alpha * (1 - C))
(heads and layers outside the request's selection keep C). The predicted ratio is the mean over layers and
heads; the chosen strength is the smallest in [1, max_strength] that brings it to the target (bisection:
the prediction rises monotonically with the strength). It is a per-layer prediction: it ignores that
steering also changes the hidden states of later layers, so the measured ratio usually ends up higher.
"""

from __future__ import annotations

from collections.abc import Sequence

from ctxsteer.steering.rows import SteerRow
from ctxsteer.steering.spec import AutoStrength, strength_to_alpha


def head_gates(row: SteerRow, num_layers: int, num_heads: int) -> list[list[bool]]:
    """Which (layer, head) the row's steering reaches."""
    return [
        [
            row.layer_on(layer) and (row.heads is None or h in row.heads.get(layer, ()))
            for h in range(num_heads)
        ]
        for layer in range(num_layers)
    ]


def predicted_ratio(
    masses: Sequence[Sequence[float]], gates: Sequence[Sequence[bool]], alpha: float
) -> float:
    total, count = 0.0, 0
    for layer_masses, layer_gates in zip(masses, gates, strict=True):
        for c, on in zip(layer_masses, layer_gates, strict=True):
            total += c / (c + alpha * (1.0 - c)) if on and c > 0.0 else c
            count += 1
    return total / count if count else 0.0


def choose_strength(
    masses: Sequence[Sequence[float]],
    gates: Sequence[Sequence[bool]],
    auto: AutoStrength,
    iterations: int = 40,
) -> tuple[float, float, float]:
    """(strength, the unsteered ratio, the predicted ratio at that strength)."""
    unsteered = predicted_ratio(masses, gates, 1.0)
    if unsteered >= auto.target_ratio:
        return 1.0, unsteered, unsteered
    top = predicted_ratio(masses, gates, strength_to_alpha(auto.max_strength))
    if top <= auto.target_ratio:
        return auto.max_strength, unsteered, top
    lo, hi = 1.0, auto.max_strength  # predicted(lo) < target < predicted(hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if predicted_ratio(masses, gates, strength_to_alpha(mid)) >= auto.target_ratio:
            hi = mid
        else:
            lo = mid
    return hi, unsteered, predicted_ratio(masses, gates, strength_to_alpha(hi))
