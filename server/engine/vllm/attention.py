"""Steering inside vLLM's attention backends: each backend's impl, subclassed with `SteeringMixin`.

Every row first goes through vLLM's own kernel (so unsteered rows are exactly plain vLLM); the rows of
steered requests in steered layers are then recomputed with the paper's rule from the paged KV cache
(`steering.ragged`) and overwrite their output: prefill / chunked-prefill rows one by one (queries in
chunks), all decode rows of a step in one SDPA call over their padded keys. Generated keys carry no bias.

A backend supplies `_block_size` and `_blocks`: whole blocks gathered with one copy, seen as transposed
keys and values (the CPU kernel already stores keys transposed; FlashAttention's are viewed so). What a
forward steers (rows, block ids, masks) is planned once and shared by every layer with the same selection.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ctxsteer.server.engine.vllm.worker_state import STATE
from ctxsteer.steering.ragged import (
    paged_decode_attention,
    paged_decode_mask,
    sequence_masks,
    steered_sequence_attention,
)

_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int:
    m = _LAYER_RE.search("." + name + ".")
    if m is None:
        raise RuntimeError(f"ctxsteer: cannot tell the layer index of attention layer {name!r}")
    return int(m.group(1))


class SteeringMixin:
    """Mixed into a vLLM AttentionImpl (first base): steers the rows `worker_state.STATE` names."""

    _layer: int | None = None
    _first_head: int = 0
    num_heads: int
    scale: float

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):  # noqa: ANN001, ANN201
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)  # type: ignore[misc]
        if attn_metadata is None or not STATE.rows or not getattr(attn_metadata, "causal", True):
            return out
        if self._layer is None:
            from vllm.distributed import get_tensor_model_parallel_rank

            self._layer = layer_index(layer.layer_name)
            self._first_head = get_tensor_model_parallel_rank() * self.num_heads  # heads shard contiguously
        self._check_supported()
        self._steer(layer, query, kv_cache, attn_metadata, out)
        return out

    # ---- backend specifics -------------------------------------------------------------------
    def _block_size(self, kv_cache: torch.Tensor) -> int:
        raise NotImplementedError

    def _blocks(
        self, layer: Any, kv_cache: torch.Tensor, ids: torch.Tensor, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ids [rows * w] -> (keys transposed [rows, w, Hkv, D, bs], values [rows, w, Hkv, bs, D]):
        one copy (index_select of whole blocks), then views."""
        raise NotImplementedError

    def _check_supported(self) -> None:
        unsupported = (
            getattr(self, "alibi_slopes", None) is not None
            or getattr(self, "sinks", None) is not None
            or bool(getattr(self, "logits_soft_cap", 0) or 0)
            or str(getattr(self, "kv_cache_dtype", "auto")).startswith("fp8")
        )
        if unsupported:
            raise RuntimeError(
                "ctxsteer: steering is not supported with an fp8 KV cache, ALiBi, attention sinks or logit "
                "softcapping"
            )

    # ---- shared ------------------------------------------------------------------------------
    def _steer(
        self, layer: Any, query: torch.Tensor, kv_cache: torch.Tensor, md: Any, out: torch.Tensor
    ) -> None:
        assert self._layer is not None
        plan = self._plan(md, self._block_size(kv_cache), query)
        for q0, q1, ids, num_keys, masks in plan.prefill:
            kt, v = self._blocks(layer, kv_cache, ids, 1)
            w, hkv, d, bs = kt.shape[1:]
            keys = kt[0].permute(0, 3, 1, 2).reshape(w * bs, hkv, d)[:num_keys]
            values = v[0].permute(0, 2, 1, 3).reshape(w * bs, hkv, -1)[:num_keys]
            out[q0:q1] = steered_sequence_attention(
                query[q0:q1], keys, values, None, None, self.scale, masks=masks
            )
        if plan.decode_starts is not None:
            kt, v = self._blocks(layer, kv_cache, plan.decode_ids, len(plan.decode_starts))
            starts = plan.decode_starts
            out[starts] = paged_decode_attention(query[starts], kt, v, plan.decode_mask, self.scale)

    def _plan(self, md: Any, block_size: int, query: torch.Tensor) -> _Plan:
        """What this forward steers in this layer; built once per forward for all layers that select the
        same rows and heads (every layer, unless requests pick layers or heads)."""
        layer = self._layer
        assert layer is not None
        signature = tuple(
            (r.index, r.row.layer_on(layer), None if r.row.heads is None else r.row.heads.get(layer))
            for r in STATE.rows
        )
        key = (id(md), self._first_head, signature)
        plan = STATE.cache.get(key)
        if plan is None:
            plan = self._build_plan(md, block_size, query, layer)
            STATE.cache[key] = plan
        return plan

    def _build_plan(self, md: Any, block_size: int, query: torch.Tensor, layer: int) -> _Plan:
        qsl = md.query_start_loc.tolist()
        seq_lens = md.seq_lens.tolist()
        sliding = getattr(self, "sliding_window", None)
        window = sliding if isinstance(sliding, int) and sliding > 0 else None
        device, dtype = query.device, query.dtype
        plan = _Plan()
        decode: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []  # (row, keys, bias, gate)
        for r in STATE.rows:
            if r.index + 1 >= len(qsl):
                continue
            num_keys = int(seq_lens[r.index])
            bias = r.key_bias(num_keys, layer)
            gate = r.head_gate(layer, self.num_heads, self._first_head)
            if bias is None or (gate is not None and not bool(gate.any())):
                continue
            q0, q1 = qsl[r.index], qsl[r.index + 1]
            if q1 - q0 == 1:
                decode.append((r.index, num_keys, bias, gate))
                continue
            ids = md.block_table[r.index, : -(-num_keys // block_size)].to(torch.long)
            masks = sequence_masks(
                q1 - q0, bias.to(device), None if gate is None else gate.to(device), window, dtype
            )
            plan.prefill.append((q0, q1, ids, num_keys, masks))
        if decode:
            lengths = torch.tensor([n for _, n, _, _ in decode])
            width = -(-int(lengths.max()) // block_size)
            index = torch.tensor([i for i, _, _, _ in decode], device=md.block_table.device)
            ids = md.block_table[index, :width].to(torch.long).clamp_(0, None)  # padding blocks are masked
            bias = torch.zeros(len(decode), width * block_size, dtype=torch.float32)
            for j, (_, n, row_bias, _) in enumerate(decode):
                bias[j, :n] = row_bias
            gate = None
            if any(g is not None for *_, g in decode):
                gate = torch.stack([torch.ones(self.num_heads) if g is None else g for *_, g in decode])
            hkv = getattr(self, "num_kv_heads", self.num_heads)
            plan.decode_ids = ids.reshape(-1)
            plan.decode_mask = paged_decode_mask(bias, lengths, gate, hkv, block_size, window, dtype).to(
                device
            )
            plan.decode_starts = torch.tensor([qsl[i] for i, _, _, _ in decode], device=device)
        return plan


class _Plan:
    """One forward's steered work for the layers that share a selection (see `SteeringMixin._plan`)."""

    def __init__(self) -> None:
        self.prefill: list[tuple[int, int, torch.Tensor, int, list[torch.Tensor]]] = []
        self.decode_ids: torch.Tensor | None = None
        self.decode_mask: torch.Tensor | None = None
        self.decode_starts: torch.Tensor | None = None
