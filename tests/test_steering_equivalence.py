"""The fast path (fold at prefill, biased mask at decode) must equal the paper's eager rule.

Tolerance: max |delta logit| <= 1e-4 in fp32 over prefill + 10 greedy decode steps (observed ~1e-6).
"""

from __future__ import annotations

import pytest
import torch
from steer_reference import RefSteer, register_reference
from tiny import ARCHS, make_model

from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.bias import build_steer_batch
from ctxsteer.steering.generate import greedy_generate, left_pad, steer_kwargs
from ctxsteer.steering.rows import SteerRow

TOL = 1e-4
STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    register()
    register_reference()


def _prompts(vocab: int, lens: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lens]


def _run(model, attn: str, ids, mask, **kw):
    model.set_attn_implementation(attn)
    return greedy_generate(model, ids, mask, STEPS, **kw)


def _compare(model, rows: list[SteerRow], lens: list[int]) -> float:
    ids, mask = left_pad(_prompts(model.config.vocab_size, lens), pad_id=0)
    fast = _run(model, ATTN_NAME, ids, mask, **steer_kwargs(model, rows, mask))
    pad = [ids.shape[1] - n for n in lens]
    ref = _run(model, "ctxsteer_ref", ids, mask, ctxsteer_ref=RefSteer(rows, lens, pad))
    assert torch.equal(fast.tokens, ref.tokens)
    return max((a - b).abs().max().item() for a, b in zip(fast.logits, ref.logits, strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_strengths_batch_matches_eager_reference(arch: str) -> None:
    model = make_model(arch)
    # Prompts longer than the tiny sliding window (16), different lengths -> left padding.
    lens = [40, 27, 33, 21]
    rows = [
        SteerRow(alpha=0.5, steered=((5, 20),)),
        SteerRow(alpha=1.0),
        SteerRow(alpha=1 / 3, steered=((0, 4), (10, 25))),
        SteerRow(alpha=0.05, steered=((2, 9),)),
    ]
    assert _compare(model, rows, lens) <= TOL


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_layer_and_head_selection_matches_reference(arch: str) -> None:
    model = make_model(arch)
    heads = model.config.num_attention_heads
    rows = [
        SteerRow(alpha=0.2, steered=((3, 12),), layers=(1,)),
        SteerRow(alpha=0.3, steered=((0, 8),), heads={0: (0, heads - 1), 1: (1,)}),
        SteerRow(alpha=0.5, steered=((4, 6),)),
    ]
    assert _compare(model, rows, [30, 22, 26]) <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_strength_one_is_bit_identical_to_unsteered(arch: str) -> None:
    model = make_model(arch)
    ids, mask = left_pad(_prompts(model.config.vocab_size, [30, 19]), pad_id=0)
    rows = [SteerRow(alpha=1.0, steered=((2, 9),)), SteerRow(alpha=1.0)]
    kw = steer_kwargs(model, rows, mask)
    assert kw == {}  # nothing steered: the stock SDPA path, untouched
    plain = _run(model, "sdpa", ids, mask)
    steered_off = _run(model, ATTN_NAME, ids, mask, **kw)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, steered_off.logits, strict=True))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_steering_moves_logits_and_rows_stay_independent(arch: str) -> None:
    model = make_model(arch)
    ids, mask = left_pad(_prompts(model.config.vocab_size, [30, 24]), pad_id=0)
    base = _run(model, "sdpa", ids, mask)
    one = _run(
        model, ATTN_NAME, ids, mask, **steer_kwargs(model, [SteerRow(0.1, ((0, 10),)), SteerRow()], mask)
    )
    # Row 0 moves a lot; row 1 (unsteered, same batch) must not move at all beyond float noise.
    assert (one.logits[0][0] - base.logits[0][0]).abs().max().item() > 1e-2
    assert max((a[1] - b[1]).abs().max().item() for a, b in zip(one.logits, base.logits, strict=True)) <= 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_right_padding_prefill_matches_reference(arch: str) -> None:
    model = make_model(arch)
    lens = [28, 18]
    prompts = _prompts(model.config.vocab_size, lens)
    width = max(lens)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
        mask[b, : len(p)] = 1
    rows = [SteerRow(0.25, ((3, 10),)), SteerRow(0.5, ((0, 5),))]
    cfg = model.config
    steer = build_steer_batch(
        rows, lens, width=width, num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads
    )
    with torch.no_grad():
        model.set_attn_implementation(ATTN_NAME)
        fast = model(input_ids=ids, attention_mask=mask, ctxsteer=steer).logits
        model.set_attn_implementation("ctxsteer_ref")
        ref = model(input_ids=ids, attention_mask=mask, ctxsteer_ref=RefSteer(rows, lens, [0, 0])).logits
    for b, n in enumerate(lens):
        assert (fast[b, :n] - ref[b, :n]).abs().max().item() <= TOL
