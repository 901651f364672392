"""Steering inside vLLM's attention backends: each backend's impl, subclassed with `SteeringMixin`.

Every row first goes through vLLM's own kernel (so unsteered rows are exactly plain vLLM); the rows of
steered requests in steered layers are then recomputed with the paper's rule from the paged KV cache
(`steering.ragged`) and overwrite their output: prefill / chunked-prefill rows one by one (queries in
chunks), all decode rows of a step in one SDPA call over their padded keys. Generated keys carry no bias.

A backend supplies `_paged_kv(kv_cache)`, the cache as per-block keys and values, and `_block_keys`,
which turns gathered key blocks into [B, Hkv, w*bs, D]: the CPU kernel stores key blocks transposed.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ctxsteer.server.engine.vllm.worker_state import STATE, SteeredRow
from ctxsteer.steering.ragged import steered_decode_attention, steered_sequence_attention

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
    def _paged_kv(self, layer: Any, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(key blocks, value blocks [num_blocks, ...], block_size)."""
        raise NotImplementedError

    def _gather(
        self, keys: torch.Tensor, values: torch.Tensor, blocks: torch.Tensor, block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks [B, w] -> keys, values [B, Hkv, w*block_size, D]."""
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
        keys, values, block_size = self._paged_kv(layer, kv_cache)
        qsl = md.query_start_loc.tolist()
        seq_lens = md.seq_lens.tolist()
        sliding = getattr(self, "sliding_window", None)
        window = sliding if isinstance(sliding, int) and sliding > 0 else None
        layer_idx = self._layer
        assert layer_idx is not None
        decode: list[tuple[SteeredRow, int, torch.Tensor, torch.Tensor | None]] = []
        for r in STATE.rows:
            if r.index + 1 >= len(qsl):
                continue
            num_keys = int(seq_lens[r.index])
            bias = r.key_bias(num_keys, layer_idx)
            gate = r.head_gate(layer_idx, self.num_heads, self._first_head)
            if bias is None or (gate is not None and not bool(gate.any())):
                continue
            q0, q1 = qsl[r.index], qsl[r.index + 1]
            if q1 - q0 == 1:
                decode.append((r, num_keys, bias, gate))
                continue
            blocks = md.block_table[r.index : r.index + 1, : -(-num_keys // block_size)].to(torch.long)
            k, v = self._gather(keys, values, blocks, block_size)
            out[q0:q1] = steered_sequence_attention(
                query[q0:q1],
                k[0, :, :num_keys].transpose(0, 1),
                v[0, :, :num_keys].transpose(0, 1),
                bias.to(query.device),
                None if gate is None else gate.to(query.device),
                self.scale,
                window,
            )
        if decode:
            self._steer_decode(decode, query, keys, values, block_size, md.block_table, qsl, window, out)

    def _steer_decode(self, rows, query, keys, values, block_size, block_table, qsl, window, out) -> None:  # noqa: ANN001
        """All steered decode rows of the step in one SDPA call over their padded keys."""
        device = query.device
        index = torch.tensor([r.index for r, _, _, _ in rows], device=block_table.device)
        lengths = torch.tensor([n for _, n, _, _ in rows])
        width = -(-int(lengths.max()) // block_size)
        blocks = block_table[index, :width].to(torch.long).clamp_(0, keys.shape[0] - 1)  # padding is masked
        k, v = self._gather(keys, values, blocks, block_size)
        bias = torch.zeros(len(rows), width * block_size, dtype=torch.float32)
        for j, (_, n, row_bias, _) in enumerate(rows):
            bias[j, :n] = row_bias
        gate = None
        if any(g is not None for *_, g in rows):
            gate = torch.stack([torch.ones(self.num_heads) if g is None else g for *_, g in rows]).to(device)
        starts = torch.tensor([qsl[r.index] for r, _, _, _ in rows], device=device)
        out[starts] = steered_decode_attention(
            query[starts], k, v, bias.to(device), lengths.to(device), gate, self.scale, window
        )
