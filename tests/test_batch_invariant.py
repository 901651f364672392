"""`--batch-invariant`: in bf16, a request's answer does not depend on who shares its decode steps (each
request decodes in a forward of its own); the same greedy tokens and bit-identical logprobs batched and
alone, CAD pairs and speculation included."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tiny import make_model, make_tokenizer

from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.interface import ModelInfo
from ctxsteer.server.engine.local.engine import LocalEngine
from ctxsteer.server.engine.local.ngram import NgramConfig
from ctxsteer.server.engine.request import GenerationOutput, GenerationRequest, SamplingParams
from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.cad import CadPlan
from ctxsteer.steering.rows import SteerRow

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True)
STRENGTHS = (1.0, 1.5, 2.0, 3.0, 1.25, 4.0, 2.5, 6.0)


def _requests() -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(7)
    out = []
    for i, strength in enumerate(STRENGTHS):
        phrase = torch.randint(
            10, 700, (int(torch.randint(10, 30, (1,), generator=g)),), generator=g
        ).tolist()
        ids = phrase * 2 + phrase[:4]  # repeats: n-gram guesses exist
        steer = SteerRow(alpha=1 / strength, steered=((3, len(phrase)),))
        cad = CadPlan(free_ids=tuple(ids[:3] + ids[len(phrase) :]), beta=0.5) if i == 5 else None
        out.append(GenerationRequest(f"r{i}", ids, GREEDY, SteerRow() if cad else steer, cad=cad))
    return out


def _serve(
    model, reqs: list[GenerationRequest], together: bool, invariant: bool
) -> list[list[GenerationOutput]]:
    cfg = model.config
    info = ModelInfo("m", "m", "cpu", "bfloat16", 512, cfg.num_hidden_layers, cfg.num_attention_heads)
    engine = LocalEngine(
        model, make_tokenizer(), info, max_num_seqs=10, speculative=NgramConfig(),
        enable_prefix_caching=False, batch_invariant=invariant,
    )  # fmt: skip

    async def collect(req: GenerationRequest) -> list[GenerationOutput]:
        return [o async for o in engine.generate(req)]

    async def main() -> list[list[GenerationOutput]]:
        await engine.start()
        if together:
            out = list(await asyncio.gather(*(collect(r) for r in reqs)))
        else:
            out = [await collect(r) for r in reqs]
        await engine.shutdown()
        return out

    return asyncio.run(main())


def _answer(outs: list[GenerationOutput]) -> tuple[list[int], list[float]]:
    return [t for o in outs for t in o.token_ids], [lp.logprob for o in outs for lp in o.logprobs]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_equals_alone_in_bf16(arch: str) -> None:
    register()
    model = make_model(arch, attn_implementation=ATTN_NAME).to(torch.bfloat16)
    reqs = _requests()
    alone = _serve(model, reqs, together=False, invariant=True)
    batched = _serve(model, reqs, together=True, invariant=True)
    for a, b in zip(alone, batched, strict=True):
        assert _answer(a) == _answer(b)  # tokens and logprobs, bit for bit


def test_the_flag_is_local_and_turns_prefix_caching_off_by_default() -> None:
    assert ServerConfig(batch_invariant=True).batch_invariant
    with pytest.raises(ValueError, match="--batch-invariant: is a local engine setting"):
        ServerConfig(batch_invariant=True, engine="vllm")
