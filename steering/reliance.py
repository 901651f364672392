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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ctxsteer.steering.rows import SteerRow

MEASURE_KWARG = "ctxsteer_measure"  # model(..., ctxsteer_measure=AttentionMass(...)) reaches every layer
WATCH_KWARG = "ctxsteer_watch"  # model(..., ctxsteer_watch=ContextWatch(...)): live, one query per row


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


def context_mask(rows: Sequence[SteerRow], width: int, device: torch.device | str) -> torch.Tensor:
    """[M, width] 1.0 on each row's context keys: the ranges its steering targets (at any strength)."""
    mask = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, row in enumerate(rows):
        for s, e in row.steered:
            mask[i, max(s, 0) : min(e, width)] = 1.0
    return mask.to(device)


@dataclass
class ContextWatch:
    """Live context reliance of one query of some rows (the one predicting their next token).

    Per layer, each watched row's attention mass on its context keys, averaged over query heads: as served
    (with the steering bias) and as if unsteered (the same scores without the bias, i.e. the same hidden
    states: a per-layer counterfactual, not a second forward). One query per row makes the probabilities
    cheap to form explicitly: O(rows x heads x keys) per layer, no L x L map.

    rows:    [M] batch rows watched (indices into the forward's batch).
    context: [M, W] 1.0 on context keys (absolute key positions), 0 elsewhere; keys beyond W are not context.
    """

    rows: torch.Tensor
    context: torch.Tensor
    # which query of each row is measured: the last (a prompt's, or a decode step's one), or in a step that
    # verifies other rows' guessed tokens the first, the watched row's real token (it guesses nothing)
    query: int = -1
    served: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [M, Hq, 1]
    unsteered: dict[int, torch.Tensor] = field(default_factory=dict)
    _all: bool | None = None
    _ctx_cache: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(
        self,
        layer: int,
        query: torch.Tensor,  # [B, Hq, Q, D]: position `self.query` is measured
        key: torch.Tensor,  # [B, Hkv, K, D]
        base_mask: torch.Tensor | None,  # [B, K] 0 / -inf of that query (padding, window); None = all
        bias: torch.Tensor | None,  # [B, 1|Hq, K] steering added in this layer, None = none
        scale: float,
        softcap: float | None = None,
    ) -> None:
        rows = None if self._all_rows(query.shape[0]) else self.rows
        q = query[:, :, self.query] if rows is None else query[rows, :, self.query]  # [M, Hq, D]
        k = key if rows is None else key[rows]  # [M, Hkv, K, D]
        m, hq, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        # One bmm per layer on 3-D views (4-D broadcast matmul would copy the keys); GQA without copying:
        # query head h reads kv head h // (Hq / Hkv), as HF's repeat_kv does.
        q3 = q.float().reshape(m * hkv, hq // hkv, d)
        k3 = k.float().reshape(m * hkv, n, d)
        scores = torch.bmm(q3, k3.transpose(1, 2)).view(m, hq, n)
        if softcap is not None:
            scores = softcap * torch.tanh(scores * (scale / softcap))
            scale = 1.0
        if base_mask is None:
            scores = scores * scale
        else:
            base = (base_mask if rows is None else base_mask[rows]).float()
            scores = torch.add(base[:, None, :], scores, alpha=scale)
        ctx = self._context(n)
        self.unsteered[layer] = torch.bmm(torch.softmax(scores, -1), ctx)  # [M, Hq, 1]
        if bias is None:
            self.served[layer] = self.unsteered[layer]
        else:
            added = (bias if rows is None else bias[rows]).float()
            self.served[layer] = torch.bmm(torch.softmax(scores + added, -1), ctx)

    def _all_rows(self, batch: int) -> bool:
        """Every row of the forward, in order: no gather needed."""
        if self._all is None:
            self._all = self.rows.numel() == batch and bool(
                (self.rows == torch.arange(batch, device=self.rows.device)).all()
            )
        return self._all

    def _context(self, n: int) -> torch.Tensor:
        """The context as a matmul operand [M, n, 1], cut or zero-padded to the forward's n keys."""
        cached = self._ctx_cache.get(n)
        if cached is None:
            ctx = self.context[:, :n].float()
            if ctx.shape[1] < n:
                ctx = torch.nn.functional.pad(ctx, (0, n - ctx.shape[1]))
            cached = self._ctx_cache[n] = ctx[:, :, None]
        return cached

    def unsteered_heads(self, row: int) -> list[list[float]]:
        """One watched row's context mass per layer and query head, without the steering bias."""
        return [self.unsteered[k][row, :, 0].tolist() for k in sorted(self.unsteered)]

    def result(self) -> tuple[list[float], list[float]]:
        """Per watched row: (served, unsteered) ratios, each the mean over layers."""
        if not self.served:
            raise RuntimeError("no layer reported its attention: is the ctxsteer attention in use?")
        layers = sorted(self.served)  # each [M, Hq, 1]: mean over heads, then over layers
        served = torch.stack([self.served[k] for k in layers]).mean(dim=(0, 2, 3))
        plain = torch.stack([self.unsteered[k] for k in layers]).mean(dim=(0, 2, 3))
        return served.tolist(), plain.tolist()
