"""Steered attention of one sequence over its whole key range, for engines that keep their own KV cache
(e.g. vLLM's paged cache): the caller gathers the sequence's keys and values, this applies the paper's
rule exactly as `attention.py` does for transformers models.

Queries are the last Q positions of the S keys (prefill chunk or decode step). The additive mask holds
causality, an optional sliding window and the key bias (gated per query head); queries are processed in
chunks so the mask stays small for long prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_CHUNK = 256


def sequence_mask(
    num_queries: int,
    key_bias: torch.Tensor,
    head_gate: torch.Tensor | None,
    sliding_window: int | None,
    dtype: torch.dtype,
    first_query: int = 0,
) -> torch.Tensor:
    """[1|H, Q, S] additive mask for `num_queries` queries at absolute positions first_query, ...; S keys."""
    s = key_bias.shape[0]
    pos = torch.arange(num_queries, device=key_bias.device)[:, None] + first_query
    cols = torch.arange(s, device=key_bias.device)[None, :]
    visible = cols <= pos
    if sliding_window is not None and sliding_window > 0:
        visible &= cols > pos - sliding_window
    bias = key_bias[None, None, :]
    if head_gate is not None:
        bias = head_gate[:, None, None] * bias
    mask = bias.expand(-1, num_queries, -1).masked_fill(~visible[None], float("-inf"))
    return mask.to(dtype)


def steered_sequence_attention(
    query: torch.Tensor,  # [Q, H, D]
    key: torch.Tensor,  # [S, Hkv, D]
    value: torch.Tensor,  # [S, Hkv, Dv]
    key_bias: torch.Tensor,  # [S] fp32: log(alpha) on non-steered prompt keys, else 0
    head_gate: torch.Tensor | None,  # [H] 0/1, None = every head steered
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [Q, H, Dv]
) -> torch.Tensor:
    q_len, h, _ = query.shape
    s, hkv = key.shape[0], key.shape[1]
    if out is None:
        out = query.new_empty(q_len, h, value.shape[-1])
    k = key.transpose(0, 1)[None]  # [1, Hkv, S, D]
    v = value.transpose(0, 1)[None]
    offset = s - q_len  # absolute position of the first query
    for start in range(0, q_len, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, q_len)
        keys = offset + stop  # later keys are masked for every query of this chunk anyway
        mask = sequence_mask(
            stop - start, key_bias[:keys], head_gate, sliding_window, query.dtype, first_query=offset + start
        )
        q = query[start:stop].transpose(0, 1)[None]  # [1, H, Qc, D]
        o = F.scaled_dot_product_attention(
            q, k[:, :, :keys], v[:, :, :keys], attn_mask=mask[None], scale=scale, enable_gqa=h != hkv
        )
        out[start:stop] = o[0].transpose(0, 1)
    return out


def steered_decode_attention(
    query: torch.Tensor,  # [B, H, D]: one query per row, at position lengths[b] - 1
    key: torch.Tensor,  # [B, Hkv, S, D], row b valid on [0, lengths[b])
    value: torch.Tensor,  # [B, Hkv, S, Dv]
    key_bias: torch.Tensor,  # [B, S] fp32
    lengths: torch.Tensor,  # [B] int64
    head_gate: torch.Tensor | None,  # [B, H] 0/1, None = every head of every row steered
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One decode step of B steered rows in one SDPA call (padding keys masked): [B, H, Dv]."""
    b, h, _ = query.shape
    s = key.shape[2]
    cols = torch.arange(s, device=key.device)[None, :]
    visible = cols < lengths[:, None]
    if sliding_window is not None and sliding_window > 0:
        visible &= cols > lengths[:, None] - 1 - sliding_window
    bias = key_bias[:, None, :] if head_gate is None else head_gate[:, :, None] * key_bias[:, None, :]
    mask = bias.masked_fill(~visible[:, None, :], float("-inf")).to(query.dtype)[:, :, None, :]
    out = F.scaled_dot_product_attention(
        query[:, :, None, :], key, value, attn_mask=mask, scale=scale, enable_gqa=h != key.shape[1]
    )
    return out[:, :, 0, :]
