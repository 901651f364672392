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


def sequence_masks(
    num_queries: int,
    key_bias: torch.Tensor,  # [S] fp32
    head_gate: torch.Tensor | None,
    sliding_window: int | None,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """The per-chunk masks of `steered_sequence_attention` for the last `num_queries` of S positions
    (layer-independent: an engine builds them once per forward)."""
    offset = key_bias.shape[0] - num_queries
    masks = []
    for start in range(0, num_queries, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, num_queries)
        keys = offset + stop  # later keys are masked for every query of this chunk anyway
        chunk = sequence_mask(stop - start, key_bias[:keys], head_gate, sliding_window, dtype, offset + start)
        masks.append(chunk[None])
    return masks


def steered_sequence_attention(
    query: torch.Tensor,  # [Q, H, D]
    key: torch.Tensor,  # [S, Hkv, D]
    value: torch.Tensor,  # [S, Hkv, Dv]
    key_bias: torch.Tensor | None,  # [S] fp32: log(alpha) on non-steered prompt keys, else 0
    head_gate: torch.Tensor | None,  # [H] 0/1, None = every head steered
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [Q, H, Dv]
    masks: list[torch.Tensor] | None = None,  # from `sequence_masks` (then key_bias/head_gate are unused)
) -> torch.Tensor:
    q_len, h, _ = query.shape
    s, hkv = key.shape[0], key.shape[1]
    if masks is None:
        assert key_bias is not None
        masks = sequence_masks(q_len, key_bias, head_gate, sliding_window, query.dtype)
    if out is None:
        out = query.new_empty(q_len, h, value.shape[-1])
    k = key.transpose(0, 1)[None]  # [1, Hkv, S, D]
    v = value.transpose(0, 1)[None]
    offset = s - q_len  # absolute position of the first query
    for i, start in enumerate(range(0, q_len, QUERY_CHUNK)):
        stop = min(start + QUERY_CHUNK, q_len)
        keys = offset + stop
        q = query[start:stop].transpose(0, 1)[None]  # [1, H, Qc, D]
        o = F.scaled_dot_product_attention(
            q, k[:, :, :keys], v[:, :, :keys], attn_mask=masks[i], scale=scale, enable_gqa=h != hkv
        )
        out[start:stop] = o[0].transpose(0, 1)
    return out


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D]
    key_t: torch.Tensor,  # [B, w, Hkv, D, bs]: each row's key blocks, transposed (a view of the gather)
    value: torch.Tensor,  # [B, w, Hkv, bs, Dv]
    mask: torch.Tensor,  # [B, w, 1|Hkv, 1|G, bs] additive: bias (gated per head) and -inf on invalid keys
    scale: float,
) -> torch.Tensor:
    """One decode step over paged blocks without making the keys contiguous: batched matmuls over
    (row, block, kv head), one softmax across the row's blocks. [B, H, Dv]."""
    b, h, d = query.shape
    w, hkv, bs = key_t.shape[1], key_t.shape[2], key_t.shape[-1]
    g = h // hkv
    scores = torch.matmul(query.view(b, 1, hkv, g, d), key_t).mul_(scale).add_(mask)  # [B, w, Hkv, G, bs]
    probs = torch.softmax(scores.permute(0, 2, 3, 1, 4).reshape(b, hkv, g, w * bs), dim=-1)
    probs = probs.view(b, hkv, g, w, bs).permute(0, 3, 1, 2, 4)  # [B, w, Hkv, G, bs]
    return torch.matmul(probs, value).sum(1).reshape(b, h, value.shape[-1])


def paged_decode_mask(
    key_bias: torch.Tensor,  # [B, w*bs] fp32
    lengths: torch.Tensor,  # [B]
    head_gate: torch.Tensor | None,  # [B, H] or None
    num_kv_heads: int,
    block_size: int,
    sliding_window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive mask `paged_decode_attention` takes: [B, w, 1|Hkv, 1|G, bs]."""
    b, width = key_bias.shape
    cols = torch.arange(width, device=key_bias.device)[None, :]
    visible = cols < lengths[:, None]
    if sliding_window is not None and sliding_window > 0:
        visible &= cols > lengths[:, None] - 1 - sliding_window
    w = width // block_size
    if head_gate is None:
        add = key_bias.masked_fill(~visible, float("-inf")).view(b, w, 1, 1, block_size)
    else:
        gate = head_gate.view(b, 1, num_kv_heads, -1, 1)
        add = (gate * key_bias.view(b, w, 1, 1, block_size)).masked_fill(
            ~visible.view(b, w, 1, 1, block_size), float("-inf")
        )
    return add.to(dtype)
