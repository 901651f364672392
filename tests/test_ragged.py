"""`steering.ragged` (the attention the vLLM backend runs for steered rows) against the paper's rule
written literally: softmax over the visible keys, multiply the probability of every non-steered prompt
key by alpha in the selected heads, renormalise, average the values. fp32, tolerance 1e-5."""

from __future__ import annotations

import math

import pytest
import torch

from ctxsteer.steering.bias import fill_row_bias
from ctxsteer.steering.ragged import QUERY_CHUNK, steered_decode_attention, steered_sequence_attention
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


def test_decode_batch_equals_each_row_alone() -> None:
    torch.manual_seed(2)
    h, hkv, d, width = 4, 2, 8, 40
    rows = [
        SteerRow(alpha=0.25, steered=((2, 9),)),
        SteerRow(alpha=0.7),
        SteerRow(alpha=0.5, steered=((0, 3),)),
    ]
    lengths, prompt_lens = [17, 40, 25], [12, 30, 25]
    gates = [None, torch.tensor([0.0, 1, 1, 0]), None]
    q = torch.randn(3, h, d)
    k, v = torch.randn(3, hkv, width, d), torch.randn(3, hkv, width, d)
    bias = torch.stack([bias_of(r, p, width) for r, p in zip(rows, prompt_lens, strict=True)])
    gate = torch.stack([torch.ones(h) if g is None else g for g in gates])
    got = steered_decode_attention(q, k, v, bias, torch.tensor(lengths), gate, d**-0.5, None)
    for b, (row, n, p, g) in enumerate(zip(rows, lengths, prompt_lens, gates, strict=True)):
        kk, vv = k[b, :, :n].transpose(0, 1), v[b, :, :n].transpose(0, 1)
        want = literal(q[b : b + 1], kk, vv, row, p, g, d**-0.5, None)[0]
        assert (got[b] - want).abs().max().item() < TOL
