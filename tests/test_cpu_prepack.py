"""oneDNN-prepacked Linear weights (the CPU fp32 default): same logits as stock torch, batching invisible."""

from __future__ import annotations

import pytest
import torch
from test_engine import _requests, solo_then_busy
from tiny import ARCHS, make_model, make_tokenizer
from torch import nn

from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.cpu_prepack import PrepackedLinear, prepack_linears, prepack_supported
from ctxsteer.server.engine.interface import ModelInfo
from ctxsteer.server.engine.local.engine import LocalEngine
from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.bias import build_steer_batch
from ctxsteer.steering.rows import SteerRow

pytestmark = pytest.mark.skipif(
    not prepack_supported(nn.Linear(2, 2)), reason="this torch build has no oneDNN linear"
)


@pytest.mark.parametrize("arch", ARCHS)
def test_prepacked_logits_match_stock_torch(arch: str) -> None:
    register()
    stock = make_model(arch, attn_implementation=ATTN_NAME)
    packed = make_model(arch, attn_implementation=ATTN_NAME)
    linears = sum(type(m) is nn.Linear for m in packed.modules())
    assert prepack_linears(packed) == linears > 0
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert sum(isinstance(m, PrepackedLinear) for m in packed.modules()) == linears
    ids = torch.randint(10, 500, (3, 40), generator=torch.Generator().manual_seed(1))
    cfg = stock.config
    steer = build_steer_batch(
        [SteerRow(alpha=0.3, steered=((5, 20),)), SteerRow(), SteerRow(alpha=0.5, steered=((0, 9),))],
        [40, 40, 40],
        width=40,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
    )
    with torch.inference_mode():
        for kwargs in ({}, {"ctxsteer": steer}):
            a = stock(input_ids=ids, **kwargs).logits
            b = packed(input_ids=ids, **kwargs).logits
            assert (a - b).abs().max().item() < 1e-4  # summation order only
            assert a.abs().max().item() > 0.1  # the comparison is not between zeros


def test_busy_batch_equals_solo_with_prepacked_weights() -> None:
    """oneDNN picks kernels by row count: greedy output must still not depend on batch neighbours."""
    register()
    model = make_model("qwen2", attn_implementation=ATTN_NAME)  # qkv biases go through the packed path
    assert prepack_linears(model, batch_hint=8) > 0
    cfg = model.config
    info = ModelInfo("qwen2", "qwen2", "cpu", "float32", 512, cfg.num_hidden_layers, cfg.num_attention_heads)
    reqs = _requests(8, max_tokens=10, seed=11)

    solo, busy = solo_then_busy(LocalEngine(model, make_tokenizer(), info, max_num_seqs=8), reqs)
    assert all(len(s) == 10 for s in solo)
    assert busy == solo


def test_prepack_skips_what_it_cannot_pack() -> None:
    half = make_model("llama", dtype=torch.float16)
    assert prepack_linears(half) == 0  # fp32 and native bf16 only: other dtypes keep stock torch
    assert any(type(m) is nn.Linear for m in half.modules())


def test_cpu_prepack_flag() -> None:
    assert ServerConfig().cpu_prepack == "auto"
    assert ServerConfig(cpu_prepack="off").cpu_prepack == "off"
    with pytest.raises(ValueError, match="--cpu-prepack"):
        ServerConfig(cpu_prepack="always")


def test_a_build_whose_onednn_fails_keeps_stock_torch(monkeypatch) -> None:
    def broken(self, x):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(PrepackedLinear, "forward", broken)
    model = make_model("llama")
    before = sum(type(m) is nn.Linear for m in model.modules())
    assert prepack_linears(model) == 0
    assert sum(type(m) is nn.Linear for m in model.modules()) == before
