"""The bias fold (`steering.fold`), which vLLM's stock kernels run for steered rows, against the paper's rule
written literally: softmax over the visible keys, multiply the probability of every non-steered prompt
key by alpha in the selected heads, renormalise, average the values.

fp32 folded SDPA vs the literal rule: tolerance 1e-5. In bf16 the (hi, lo) columns must carry the bias to
within 2^-15 relative, where a single bf16 column is off by up to 2^-9."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ctxsteer.server.engine.vllm.fold import folded_head_size
from ctxsteer.steering.bias import fill_row_bias
from ctxsteer.steering.fold import FOLD_COLUMNS, bias_columns
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


def folded(q, k, v, bias, gate, scale: float, window: int | None, width: int) -> torch.Tensor:
    """What the vLLM backend hands its kernel, run through plain SDPA: q', k', v' padded to `width`."""
    q_len, h, d = q.shape
    s, hkv = k.shape[0], k.shape[1]
    g = torch.ones(h) if gate is None else gate
    q2 = F.pad(q, (0, width - d))
    q2[..., d : d + FOLD_COLUMNS] = g[None, :, None].to(q.dtype)
    k2 = F.pad(k, (0, width - d))
    k2[..., d : d + FOLD_COLUMNS] = bias_columns(bias, scale, k.dtype)[:, None, :]
    v2 = F.pad(v, (0, width - d))
    pos = torch.arange(q_len)[:, None] + s - q_len
    cols = torch.arange(s)[None, :]
    visible = cols <= pos
    if window is not None:
        visible &= cols > pos - window
    out = F.scaled_dot_product_attention(
        q2.transpose(0, 1)[None],
        k2.transpose(0, 1)[None],
        v2.transpose(0, 1)[None],
        attn_mask=visible,
        scale=scale,
        enable_gqa=h != hkv,
    )
    return out[0].transpose(0, 1)[..., :d]


def bias_of(row: SteerRow, prompt_len: int, num_keys: int) -> torch.Tensor:
    bias = torch.zeros(num_keys)
    fill_row_bias(bias[:prompt_len], row, prompt_len)
    return bias


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("q_len", [9, 1])  # a (chunked) prefill and a decode step
def test_folded_attention_is_the_paper_rule(window: int | None, gated: bool, q_len: int) -> None:
    torch.manual_seed(0)
    s, h, hkv, d = 23, 6, 2, 8
    q, k, v = torch.randn(q_len, h, d), torch.randn(s, hkv, d), torch.randn(s, hkv, d)
    row = SteerRow(alpha=0.3, steered=((4, 11),))
    prompt_len = 18  # keys 18..22 are generated: never penalised
    gate = torch.tensor([1.0, 0, 1, 0, 0, 1]) if gated else None
    scale = d**-0.5
    want = literal(q, k, v, row, prompt_len, gate, scale, window)
    got = folded(q, k, v, bias_of(row, prompt_len, s), gate, scale, window, width=16)
    assert (got - want).abs().max() <= TOL
    unsteered = folded(q, k, v, torch.zeros(s), gate, scale, window, width=16)
    assert (unsteered - want).abs().max() > 1e-2  # the bias matters: the check can fail


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hi_lo_columns_carry_the_bias_in_half_precision(dtype: torch.dtype) -> None:
    bias = -torch.log(torch.linspace(1.01, 64.0, 997))  # log(1/alpha) for strengths up to 64
    scale = 64**-0.5
    cols = bias_columns(bias, scale, dtype)
    assert cols.dtype == dtype and cols.shape == (997, 2)
    # the kernel: gate 1 on both columns, products accumulated in fp32, times scale
    carried = cols.float().sum(-1) * scale
    rel = ((carried - bias).abs() / bias.abs()).max().item()
    assert rel <= 2**-15, rel
    single = (bias / scale).to(dtype).float() * scale
    assert ((single - bias).abs() / bias.abs()).max().item() > 2**-12  # why two columns


def test_folded_head_sizes() -> None:
    cpu = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]  # CPU_ATTN's list in vLLM 0.32
    assert folded_head_size(64, cpu) == 80
    assert folded_head_size(128, cpu) == 160
    assert folded_head_size(512, cpu) is None  # no room: steering refused for such models
    flash = range(8, 257, 8)
    assert folded_head_size(64, flash) == 72
    assert folded_head_size(256, flash) is None
