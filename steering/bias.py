"""The per-row key bias: log(alpha) on non-steered prompt keys, 0 on steered and generated keys.

Memory is O(batch x keys) (+ O(layers x batch x heads) gates when heads/layers are selected); the
attention function broadcasts it, so no per-head L x L mask is ever materialised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ctxsteer.steering.rows import SteerRow


@dataclass(slots=True)
class SteerBatch:
    """Steering for one forward pass of B rows; passed to the model as the `ctxsteer=` kwarg.

    key_bias:      [B, W] fp32. Column j is absolute key position j of the row (a full, untrimmed
                   KV cache is assumed); keys beyond W get no bias.
    layer_gate:    [L, B] fp32 0/1, or None when every row is steered in every layer.
    head_gate:     [L, B, H] fp32 0/1 over query heads, or None when all heads are steered.
    active_layers: layers where some row is steered (the others take the stock SDPA path).
    key_lengths:   [B] int64, for callers with their own row-aligned KV cache (the server's engine): in
                   a decode step the last query of row b sees keys [0, key_lengths[b]) and the attention
                   function builds the padding / sliding-window mask itself; None = use the model's mask.
    queries:       new tokens per row in such a step (more than 1 when drafted tokens are verified):
                   query j of Q sees keys [0, key_lengths[b] - (Q - 1 - j)).
    """

    key_bias: torch.Tensor
    layer_gate: torch.Tensor | None
    head_gate: torch.Tensor | None
    active_layers: frozenset[int]
    key_lengths: torch.Tensor | None = None
    queries: int = 1
    _base_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _step_masks: dict[tuple[int | None, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def decode_mask(
        self, layer: int, num_keys: int, sliding_window: int | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """[B, 1|H, Q, K] additive mask of one decode step from `key_lengths` (+ bias on steered layers)."""
        base = self.step_base(num_keys, sliding_window)  # [B, Q, K]
        if layer not in self.active_layers:
            return base[:, None].to(dtype)
        uniform = self.layer_gate is None and self.head_gate is None  # same mask in every steered layer
        key = (sliding_window, dtype)  # steered decode mask, shared by all steered layers
        if uniform and (hit := self._step_masks.get(key)) is not None and hit.shape[-1] == num_keys:
            return hit
        add = self.added_bias(layer, num_keys)
        assert add is not None
        mask = (base[:, None] + add[:, :, None, :]).to(dtype)
        if uniform:
            self._step_masks[key] = mask
        return mask

    def step_base(self, num_keys: int, sliding_window: int | None) -> torch.Tensor:
        """[B, Q, K] fp32 0 / -inf: the keys each query of the step sees (from `key_lengths`)."""
        base = self._base_masks.get(sliding_window)
        if base is None or base.shape[-1] != num_keys:
            assert self.key_lengths is not None
            back = torch.arange(self.queries - 1, -1, -1, device=self.key_lengths.device)
            lengths = self.key_lengths[:, None] - back[None, :]  # [B, Q]: keys seen by each query
            base = visible_keys(lengths.reshape(-1), num_keys, sliding_window)
            base = base.view(len(self.key_lengths), self.queries, num_keys)
            self._base_masks[sliding_window] = base
        return base

    def added_bias(self, layer: int, num_keys: int) -> torch.Tensor | None:
        """[B, 1|H, K] fp32: what steering adds to this layer's scores; None where no row is steered."""
        if layer not in self.active_layers:
            return None
        bias = self.bias_for(layer, num_keys)
        heads = self.heads_for(layer)
        return bias[:, None, :] if heads is None else heads[:, :, None] * bias[:, None, :]

    def bias_for(self, layer: int, num_keys: int) -> torch.Tensor:
        """[B, num_keys] fp32 bias of this layer (row gating applied)."""
        bias = self.key_bias
        width = bias.shape[1]
        if width >= num_keys:
            bias = bias[:, :num_keys]
        else:
            bias = torch.nn.functional.pad(bias, (0, num_keys - width))
        if self.layer_gate is not None:
            bias = bias * self.layer_gate[layer][:, None]
        return bias

    def heads_for(self, layer: int) -> torch.Tensor | None:
        return None if self.head_gate is None else self.head_gate[layer]


def visible_keys(key_lengths: torch.Tensor, num_keys: int, sliding_window: int | None) -> torch.Tensor:
    """[B, K] fp32 additive mask (0 / -inf) of the last query of rows holding `key_lengths` keys."""
    cols = torch.arange(num_keys, device=key_lengths.device)[None, :]
    n = key_lengths[:, None]
    valid = cols < n
    if sliding_window is not None:  # HF semantics: key j visible from query i iff j > i - window
        valid &= cols > n - 1 - sliding_window
    return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(
        ~valid, float("-inf")
    )


def fill_row_bias(dst: torch.Tensor, row: SteerRow, prompt_len: int, offset: int = 0) -> None:
    """Write one row's bias into a 1-D tensor view in place (the engine's bias table)."""
    dst.zero_()
    if not row.active:
        return
    dst[offset : offset + prompt_len] = math.log(row.alpha)
    for s, e in row.steered:
        s, e = max(s, 0), min(e, prompt_len)
        if e > s:
            dst[offset + s : offset + e] = 0.0


def build_steer_batch(
    rows: Sequence[SteerRow],
    prompt_lens: Sequence[int],
    *,
    width: int,
    num_layers: int,
    num_heads: int,
    device: torch.device | str = "cpu",
    offsets: Sequence[int] | None = None,
) -> SteerBatch | None:
    """Steering for a batch; None when no row is steered (the model then runs stock SDPA, bit-exact)."""
    if not any(r.active for r in rows):
        return None
    offsets = offsets or [0] * len(rows)
    key_bias = torch.zeros(len(rows), width, dtype=torch.float32)
    for b, (row, n, off) in enumerate(zip(rows, prompt_lens, offsets, strict=True)):
        fill_row_bias(key_bias[b], row, n, off)
    return make_gates(rows, key_bias.to(device), num_layers=num_layers, num_heads=num_heads)


def make_gates(
    rows: Sequence[SteerRow], key_bias: torch.Tensor, *, num_layers: int, num_heads: int
) -> SteerBatch:
    """Wrap a [B, W] bias with the layer/head gates that the rows' selections need."""
    active = [r.active for r in rows]
    active_layers = frozenset(
        layer
        for layer in range(num_layers)
        if any(a and r.layer_on(layer) for a, r in zip(active, rows, strict=True))
    )
    layer_gate = head_gate = None
    if any(r.layers is not None or r.heads is not None for r in rows):
        layer_gate = torch.tensor(
            [[1.0 if r.layer_on(layer) else 0.0 for r in rows] for layer in range(num_layers)],
            dtype=torch.float32,
        )
        layer_gate = layer_gate.to(key_bias.device)
    if any(r.heads is not None for r in rows):
        gate = torch.ones(num_layers, len(rows), num_heads, dtype=torch.float32)
        for b, r in enumerate(rows):
            if r.heads is None:
                continue
            gate[:, b, :] = 0.0
            for layer, heads in r.heads.items():
                gate[layer, b, list(heads)] = 1.0
        head_gate = gate.to(key_bias.device)
    return SteerBatch(key_bias, layer_gate, head_gate, active_layers)
