"""The CUDA path (skipped without a GPU; `scripts/gpu_check.sh` runs it on a lent machine).

fp32 on CUDA is held to the eager reference like the CPU path, with a looser bound (TF32 is off, but
SDPA's CUDA kernels sum in another order): max |delta logit| <= 1e-3. bf16 is held to the bf16 eager
reference at 5 % of the logit range, the rounding of a bf16 forward.
"""

from __future__ import annotations

import pytest
import torch
from steer_reference import fast_and_reference
from test_engine import _requests, solo_then_busy
from tiny import ARCHS, make_model, make_tokenizer

from ctxsteer.server.engine.interface import ModelInfo
from ctxsteer.server.engine.local.engine import LocalEngine
from ctxsteer.steering.attention import ATTN_NAME, register

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_fp32_matches_eager_reference(arch: str) -> None:
    fast, ref = fast_and_reference(make_model(arch).cuda(), steps=8)
    assert fast[0].is_cuda
    assert max((a - b).abs().max().item() for a, b in zip(fast, ref, strict=True)) <= 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_bf16_close_to_eager_reference(arch: str) -> None:
    fast, ref = fast_and_reference(make_model(arch, dtype=torch.bfloat16).cuda(), steps=8)
    first, first_ref = fast[0], ref[0]  # later steps may follow different tokens after a bf16 tie
    span = (first_ref.max() - first_ref.min()).item()
    assert (first - first_ref).abs().max().item() <= 0.05 * span


def test_cuda_busy_batch_equals_solo() -> None:
    register()
    model = make_model("qwen2", attn_implementation=ATTN_NAME).cuda()
    cfg = model.config
    info = ModelInfo("qwen2", "qwen2", "cuda", "float32", 512, cfg.num_hidden_layers, cfg.num_attention_heads)
    reqs = _requests(8, max_tokens=10, seed=5)

    solo, busy = solo_then_busy(
        LocalEngine(model, make_tokenizer(), info, max_num_seqs=8, prefill_chunk=16), reqs
    )
    assert all(len(s) == 10 for s in solo)
    assert busy == solo
