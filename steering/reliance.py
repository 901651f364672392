"""Context reliance: the share of attention a model's tokens pay to the user's context, measured inside the
fast attention path (no L x L attention maps).

Definition (the "user attention ratio" of Wang, Bai, Peng & Hsieh, arXiv 2411.02688, as this project
computes it): for each selected query position (the response tokens of an example), the attention mass
on the selected keys (the tokens of the user messages' contents), i.e. sum over those keys of the softmax
probabilities; averaged over all heads of a layer, over the selected queries, then over all layers.
Steering, when given, is part of the attention being measured (steered probabilities).

How: one extra value column holding 1 on selected keys and 0 elsewhere makes SDPA return exactly that
mass per query and head next to the real output (the same trick as the bias fold, on the value side).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

MEASURE_KWARG = "ctxsteer_measure"  # model(..., ctxsteer_measure=AttentionMass(...)) reaches every layer


@dataclass
class AttentionMass:
    """Collects, per layer, each row's mean attention mass on `key_mask` keys over its `query_mask` queries.

    key_mask:   [B, K] 1.0 on the keys whose mass is measured (e.g. user-content tokens), 0 elsewhere.
    query_mask: [B, Q] 1.0 on the queries averaged (e.g. response tokens); Q == K for one full forward.
    """

    key_mask: torch.Tensor
    query_mask: torch.Tensor
    per_layer: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B]

    def record(self, layer: int, mass: torch.Tensor) -> None:
        """mass: [B, H, Q] attention mass of each query and head on the selected keys."""
        q = self.query_mask.to(mass.dtype)
        per_query = mass.mean(dim=1)  # over heads
        self.per_layer[layer] = (per_query * q).sum(-1) / q.sum(-1).clamp(min=1)

    def ratio(self) -> torch.Tensor:
        """[B]: the mean over layers."""
        if not self.per_layer:
            raise RuntimeError("no layer reported its attention mass: is the ctxsteer attention in use?")
        return torch.stack([self.per_layer[k] for k in sorted(self.per_layer)]).mean(0)


def value_with_mass_column(value: torch.Tensor, key_mask: torch.Tensor, extra: int) -> torch.Tensor:
    """[B, Hkv, K, D] -> [B, Hkv, K, D + extra] with key_mask ([B, K]) in column D and zeros after it."""
    b, hkv, k, _ = value.shape
    pad = value.new_zeros(b, hkv, k, extra)
    pad[..., 0] = key_mask[:, None, -k:].to(value.dtype)
    return torch.cat([value, pad], dim=-1)


@torch.no_grad()
def attention_ratio(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    key_mask: torch.Tensor,
    query_mask: torch.Tensor,
    **forward_kwargs: Any,
) -> torch.Tensor:
    """One forward of left-padded rows (the model must use the "ctxsteer" attention); returns [B] ratios.
    `forward_kwargs` may carry steering (`ctxsteer=`) to measure the steered attention."""
    measure = AttentionMass(key_mask.float(), query_mask.float())
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False,
          **{MEASURE_KWARG: measure}, **forward_kwargs)  # fmt: skip
    return measure.ratio()
