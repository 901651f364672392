"""`steering.ragged` (the attention the vLLM backend runs for steered rows) against the paper's rule
written literally: softmax over the visible keys, multiply the probability of every non-steered prompt
key by alpha in the selected heads, renormalise, average the values. fp32, tolerance 1e-5."""

from __future__ import annotations

import math

import pytest
import torch

from ctxsteer.steering.bias import fill_row_bias
from ctxsteer.steering.ragged import (
    QUERY_CHUNK,
    paged_decode_attention,
    paged_decode_mask,
    steered_sequence_attention,
)
from ctxsteer.steering.rows import SteerRow

TOL = 1e-5


def literal(q, k, v, row: SteerRow, prompt_len: int, gate, scale: float, window: int | None) -> torch.Tensor:
    """q [Q, H, D] at the last Q of S positions; k, v [S, Hkv, D]. Returns [Q, H, D]."""
    q_len, h, _ = q.shape
    s, hkv = k.shape[0], k.shape[1]
    steered = {j for a, b in row.steered for j in range(a, b)}
    out = torch.empty_like(q)
    for t in range(q_len):
        pos = s - q_len + t
        for head in range(h):
            kv = head // (h // hkv)
            visible = [j for j in range(pos + 1) if window is None or j > pos - window]
            scores = torch.stack([q[t, head] @ k[j, kv] * scale for j in visible])
            p = torch.softmax(scores, 0)
            if gate is None or gate[head]:
                factor = torch.tensor(
                    [row.alpha if (j < prompt_len and j not in steered) else 1.0 for j in visible]
                )
                p = p * factor / (p * factor).sum()
            out[t, head] = sum(p[i] * v[j, kv] for i, j in enumerate(visible))
    return out


def bias_of(row: SteerRow, prompt_len: int, num_keys: int) -> torch.Tensor:
    bias = torch.zeros(num_keys)
    fill_row_bias(bias[:prompt_len], row, prompt_len)
    return bias


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("gated", [False, True])
def test_sequence_attention_is_the_paper_rule(window: int | None, gated: bool) -> None:
    torch.manual_seed(0)
    s, q_len, h, hkv, d = 23, 9, 6, 2, 8
    q, k, v = torch.randn(q_len, h, d), torch.randn(s, hkv, d), torch.randn(s, hkv, d)
    row = SteerRow(alpha=0.3, steered=((4, 11),))
    prompt_len = 18  # keys 18..22 are generated: never penalised
    gate = torch.tensor([1.0, 0, 1, 0, 0, 1]) if gated else None
    got = steered_sequence_attention(q, k, v, bias_of(row, prompt_len, s), gate, d**-0.5, window)
    want = literal(q, k, v, row, prompt_len, gate, d**-0.5, window)
    assert (got - want).abs().max().item() < TOL


def test_sequence_attention_query_chunks() -> None:
    """More queries than one chunk: the chunked masks must line up with absolute positions."""
    torch.manual_seed(1)
    s = QUERY_CHUNK + 40
    q, k, v = torch.randn(s, 2, 4), torch.randn(s, 1, 4), torch.randn(s, 1, 4)
    row = SteerRow(alpha=0.5, steered=((10, 100),))
    got = steered_sequence_attention(q, k, v, bias_of(row, s, s), None, 0.5)
    scores = torch.einsum("qhd,khd->hqk", q, k.expand(s, 2, 4)) * 0.5 + bias_of(row, s, s)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf)
    want = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v.expand(s, 2, 4))
    assert (got - want).abs().max().item() < TOL


def test_paged_decode_equals_each_row_alone() -> None:
    """Rows of different lengths, blocks of 4 keys stored transposed (as vLLM's CPU kernel does), GQA,
    head gates on one row: each row equals the literal rule on its own keys."""
    torch.manual_seed(2)
    h, hkv, d, bs, w = 4, 2, 8, 4, 10
    rows = [
        SteerRow(alpha=0.25, steered=((2, 9),)),
        SteerRow(alpha=0.7),
        SteerRow(alpha=0.5, steered=((0, 3),)),
    ]
    lengths, prompt_lens = [17, 40, 25], [12, 30, 25]
    gates = [None, torch.tensor([0.0, 1, 1, 0]), None]
    q = torch.randn(3, h, d)
    k, v = torch.randn(3, w * bs, hkv, d), torch.randn(3, w * bs, hkv, d)
    key_t = k.view(3, w, bs, hkv, d).permute(0, 1, 3, 4, 2)  # [B, w, Hkv, D, bs]
    value = v.view(3, w, bs, hkv, d).permute(0, 1, 3, 2, 4)  # [B, w, Hkv, bs, D]
    bias = torch.stack([bias_of(r, p, w * bs) for r, p in zip(rows, prompt_lens, strict=True)])
    gate = torch.stack([torch.ones(h) if g is None else g for g in gates])
    mask = paged_decode_mask(bias, torch.tensor(lengths), gate, hkv, bs, None, torch.float32)
    got = paged_decode_attention(q, key_t, value, mask, d**-0.5)
    for b, (row, n, p, g) in enumerate(zip(rows, lengths, prompt_lens, gates, strict=True)):
        want = literal(q[b : b + 1], k[b, :n], v[b, :n], row, p, g, d**-0.5, None)[0]
        assert (got[b] - want).abs().max().item() < TOL


def test_paged_decode_sliding_window() -> None:
    torch.manual_seed(3)
    h, hkv, d, bs, w, n = 2, 1, 4, 4, 3, 11
    q, k, v = torch.randn(1, h, d), torch.randn(1, w * bs, hkv, d), torch.randn(1, w * bs, hkv, d)
    row = SteerRow(alpha=0.2, steered=((6, 8),))
    mask = paged_decode_mask(
        bias_of(row, 9, w * bs)[None], torch.tensor([n]), None, hkv, bs, 4, torch.float32
    )
    key_t = k.view(1, w, bs, hkv, d).permute(0, 1, 3, 4, 2)
    got = paged_decode_attention(q, key_t, v.view(1, w, bs, hkv, d).permute(0, 1, 3, 2, 4), mask, 0.5)
    want = literal(q, k[0, :n], v[0, :n], row, 9, None, 0.5, 4)[0]
    assert (got[0] - want).abs().max().item() < TOL
