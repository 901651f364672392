"""Context-aware decoding (CAD; Shi, Han, Lewis, Tsvetkov, Zettlemoyer & Yih 2023, arXiv 2305.14739):
sample from softmax[(1 + beta) * logits(y | context, x) - beta * logits(y | x)]. The context-free logits
come from a hidden twin of the request that decodes the same tokens in lockstep.

AdaCAD (Wang, Prasad, Stengel-Eskin & Bansal, NAACL 2025, arXiv 2409.07394) uses the same contrast with a
weight per token instead of a fixed beta: alpha_t = JSD(p(y_t | c, x, y_<t) || p(y_t | x, y_<t)), so a
token where the two distributions agree (no conflict between context and memory) is left as it is.

What the twin's prompt is, exactly: the request's rendered prompt with every *steered* token removed,
the same tokens that attention steering emphasises (by default the content of the user messages; with
`steering.spans`, only the spans; per-message `steer` flags count too). Template tokens (role headers,
end-of-turn markers), the system prompt and everything not steered stay, in order. To keep the question
in the twin, steer only the context: `"spans": [context]` or a separate user message for the question
with `"steer": false`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Range = tuple[int, int]


@dataclass(frozen=True, slots=True)
class CadPlan:
    """A request's contrast: the twin's prompt ids, the rule (`CONTRASTS`: a `CONTRAST_RULES` value of
    steering.spec) and its fixed weight (CAD's beta; None for AdaCAD, whose weight is per token)."""

    free_ids: tuple[int, ...]
    beta: float | None
    rule: str = "cad"

    def __post_init__(self) -> None:
        if self.rule not in CONTRASTS or (self.beta is None) != (self.rule == "adacad"):
            raise ValueError(f"no contrast rule {self.rule!r} with weight {self.beta!r}")

    def combine(self, with_context: torch.Tensor, without_context: torch.Tensor) -> torch.Tensor:
        """The request's next-token logits from its own row's and its twin's (same shape, vocab last)."""
        return CONTRASTS[self.rule](with_context, without_context, self.beta)


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


def jsd_bits(with_context: torch.Tensor, without_context: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of the softmax distributions of two logit tensors along the last dim, in
    bits (base-2 logs: in [0, 1], 1 for disjoint supports), computed in float32; shape [..., 1]. Tensor
    methods only: this module stays importable without torch (the HTTP side builds `CadPlan`s)."""
    lp = with_context.float().log_softmax(dim=-1)
    lq = without_context.float().log_softmax(dim=-1)
    lm = lp.logaddexp(lq) - math.log(2.0)  # log of the mixture (p + q) / 2

    def kl_to_mixture(lx: torch.Tensor) -> torch.Tensor:
        x = lx.exp()
        return (x * (lx - lm)).where(x > 0, 0.0).sum(dim=-1, keepdim=True)  # 0 log 0 = 0

    jsd = 0.5 * (kl_to_mixture(lp) + kl_to_mixture(lq)) / math.log(2.0)
    return jsd.clamp(0.0, 1.0)  # rounding can leave it a hair outside


def adacad_logits(with_context: torch.Tensor, without_context: torch.Tensor) -> torch.Tensor:
    """AdaCAD: (1 + a) * with - a * without, a = `jsd_bits` of the two rows' distributions, per position
    (the paper's formula with its bounded weight; in the input's dtype)."""
    alpha = jsd_bits(with_context, without_context)
    out = (1.0 + alpha) * with_context.float() - alpha * without_context.float()
    return out.to(with_context.dtype)


def _fixed_weight(
    with_context: torch.Tensor, without_context: torch.Tensor, beta: float | None
) -> torch.Tensor:
    assert beta is not None  # CadPlan checks it
    return cad_logits(with_context, without_context, beta)


# Each contrast rule (the values of steering.spec.CONTRAST_RULES): (with, without, the plan's beta) -> logits.
Contrast = Callable[["torch.Tensor", "torch.Tensor", "float | None"], "torch.Tensor"]
CONTRASTS: dict[str, Contrast] = {
    "cad": _fixed_weight,
    "adacad": lambda with_context, without_context, _beta: adacad_logits(with_context, without_context),
}
