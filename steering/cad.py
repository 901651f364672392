"""Context-aware decoding (CAD; Shi, Han, Lewis, Tsvetkov, Zettlemoyer & Yih 2023, arXiv 2305.14739):
sample from softmax[(1 + beta) * logits(y | context, x) - beta * logits(y | x)]. The context-free logits
come from a hidden twin of the request that decodes the same tokens in lockstep.

What the twin's prompt is, exactly: the request's rendered prompt with every *steered* token removed,
the same tokens that attention steering emphasises (by default the content of the user messages; with
`steering.spans`, only the spans; per-message `steer` flags count too). Template tokens (role headers,
end-of-turn markers), the system prompt and everything not steered stay, in order. To keep the question
in the twin, steer only the context: `"spans": [context]` or a separate user message for the question
with `"steer": false`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Range = tuple[int, int]


@dataclass(frozen=True, slots=True)
class CadPlan:
    """A request's CAD: the twin's prompt ids and the weight."""

    free_ids: tuple[int, ...]
    beta: float


def context_free_ids(ids: Sequence[int], steered: Sequence[Range]) -> list[int]:
    """`ids` without the tokens of the steered half-open ranges."""
    drop = [False] * len(ids)
    for s, e in steered:
        for i in range(max(s, 0), min(e, len(ids))):
            drop[i] = True
    return [t for t, d in zip(ids, drop, strict=True) if not d]


def cad_logits(with_context: torch.Tensor, without_context: torch.Tensor, beta: float) -> torch.Tensor:
    """(1 + beta) * with - beta * without, on tensors of the same shape (log-probabilities give the same
    distribution: the per-row normalisers only shift every logit by one constant)."""
    return (1.0 + beta) * with_context - beta * without_context
