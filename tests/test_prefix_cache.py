"""Prefix caching in the local engine: exact under steering (fp32: the same greedy tokens and chosen-token
logprobs within 1e-5 with the cache on and off), reused only where the KV is the same, bounded."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from tiny import ARCHS, make_model, make_tokenizer

from ctxsteer.server.engine.interface import ModelInfo
from ctxsteer.server.engine.local.engine import LocalEngine
from ctxsteer.server.engine.local.ngram import NgramConfig
from ctxsteer.server.engine.local.prefix_cache import BLOCK, PrefixCache, block_keys
from ctxsteer.server.engine.request import GenerationOutput, GenerationRequest, SamplingParams
from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.cad import CadPlan
from ctxsteer.steering.rows import SteerRow

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)
TOL = 1e-5


# ---- keys and the block store (no model) ---------------------------------------------------------


def test_keys_follow_tokens_and_every_bias_that_shapes_the_kv() -> None:
    ids = list(range(10, 10 + 4 * BLOCK))
    plain = block_keys(ids, SteerRow(), 4)
    steered = SteerRow(alpha=0.5, steered=((BLOCK + 3, 2 * BLOCK + 5),))
    keys = block_keys(ids, steered, 4)
    assert len(set(plain) | set(keys)) == 8  # steered never shares with unsteered, not even block 0
    assert block_keys(ids, dataclasses.replace(steered), 4) == keys
    for other in (
        dataclasses.replace(steered, alpha=0.25),
        dataclasses.replace(steered, layers=(0,)),
        dataclasses.replace(steered, heads={0: (1,)}),
    ):
        assert not set(block_keys(ids, other, 4)) & set(keys)
    # a span that ends later changes block 2 (and, chained, block 3) only
    later = dataclasses.replace(steered, steered=((BLOCK + 3, 2 * BLOCK + 6),))
    assert block_keys(ids, later, 4)[:2] == keys[:2] and not set(block_keys(ids, later, 4)[2:]) & set(keys)
    changed = ids[:]
    changed[BLOCK + 1] += 1
    assert block_keys(changed, SteerRow(), 4)[:1] == plain[:1]
    assert not set(block_keys(changed, SteerRow(), 4)[1:]) & set(plain)


def _layers(n: int, layers: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)) for _ in range(layers)
    ]


def test_store_and_load_round_trip_keeping_the_last_position_out() -> None:
    cache = PrefixCache(10 * BLOCK)
    ids = list(range(3 * BLOCK))
    kv = _layers(len(ids))
    cache.store(ids, SteerRow(), kv)
    assert cache.tokens == 3 * BLOCK
    n, got = cache.load(ids, SteerRow())  # the whole prompt is cached, but its last position is needed
    assert n == 2 * BLOCK
    for (k, v), (gk, gv) in zip(kv, got, strict=True):
        assert torch.equal(gk, k[:, :, :n]) and torch.equal(gv, v[:, :, :n])
    assert cache.load(ids + [7], SteerRow())[0] == 3 * BLOCK
    assert cache.load(ids[:BLOCK] + [999] * BLOCK, SteerRow())[0] == BLOCK
    assert cache.load(ids, SteerRow(alpha=0.5))[0] == 0


def test_a_hit_compares_the_tokens_too() -> None:
    """Even if two prompts' keys collided, a block is only served for its own token ids."""
    cache = PrefixCache(10 * BLOCK)
    ids = list(range(2 * BLOCK + 1))
    cache.store(ids, SteerRow(), _layers(len(ids)))
    for block in cache._blocks.values():
        block.tokens = (0,) * BLOCK  # as if another prompt's tokens had produced these keys
    assert cache.load(ids, SteerRow()) == (0, [])


def test_eviction_is_lru_tail_first_and_bounded() -> None:
    cache = PrefixCache(4 * BLOCK)
    a, b = list(range(3 * BLOCK)), list(range(1000, 1000 + 2 * BLOCK))
    cache.store(a, SteerRow(), _layers(len(a)))
    cache.store(b, SteerRow(), _layers(len(b)))  # 5 blocks > 4: a's tail goes first
    assert cache.tokens == 4 * BLOCK
    assert cache.load(a + [1], SteerRow())[0] == 2 * BLOCK
    assert cache.load(b + [1], SteerRow())[0] == 2 * BLOCK
    cache.fit(BLOCK)  # admitted requests need the room
    assert cache.tokens == BLOCK and cache.limit_tokens == BLOCK
    cache.fit(100 * BLOCK)
    assert cache.limit_tokens == 4 * BLOCK  # never above its capacity


# ---- the engine: cache on == cache off -------------------------------------------------------------


def _engine(model, *, cache: bool, spec: NgramConfig | None = None, **kw) -> LocalEngine:
    cfg = model.config
    info = ModelInfo("m", "m", "cpu", "float32", 512, cfg.num_hidden_layers, cfg.num_attention_heads)
    return LocalEngine(model, make_tokenizer(), info, enable_prefix_caching=cache, speculative=spec, **kw)


def _serve(engine: LocalEngine, batches: list[list[GenerationRequest]]) -> list[list[GenerationOutput]]:
    """Each batch's requests together, batches one after another."""

    async def collect(req: GenerationRequest) -> list[GenerationOutput]:
        return [o async for o in engine.generate(req)]

    async def main() -> list[list[GenerationOutput]]:
        await engine.start()
        out = []
        for batch in batches:
            out += await asyncio.gather(*(collect(r) for r in batch))
        await engine.shutdown()
        return out

    return asyncio.run(main())


def _same(on: list[GenerationOutput], off: list[GenerationOutput]) -> None:
    assert [t for o in on for t in o.token_ids] == [t for o in off for t in o.token_ids]
    lp_on = [lp.logprob for o in on for lp in o.logprobs]
    lp_off = [lp.logprob for o in off for lp in o.logprobs]
    assert len(lp_on) == len(lp_off) > 0
    assert max(abs(a - b) for a, b in zip(lp_on, lp_off, strict=True)) < TOL
    ctx_on = [v for o in on for pair in o.context_attention for v in pair]
    ctx_off = [v for o in off for pair in o.context_attention for v in pair]
    assert len(ctx_on) == len(ctx_off)
    assert all(abs(a - b) < TOL for a, b in zip(ctx_on, ctx_off, strict=True))


def _cached(outs: list[GenerationOutput]) -> int:
    return outs[-1].cached_tokens or 0


def _compare(model, batches, **kw) -> list[list[GenerationOutput]]:
    on = _serve(_engine(model, cache=True, **kw), batches)
    off = _serve(_engine(model, cache=False, **kw), batches)
    for a, b in zip(on, off, strict=True):
        _same(a, b)
        assert b[-1].cached_tokens is None  # caching off reports nothing
    return on


def _turns(seed: int = 0) -> tuple[list[int], list[int], SteerRow, SteerRow]:
    """A two-turn chat at strength 2: [system, document(steered), question] then the same + an answer
    and a follow-up question (steered: the document and the follow-up)."""
    g = torch.Generator().manual_seed(seed)
    system, doc, q1 = (torch.randint(10, 700, (n,), generator=g).tolist() for n in (9, 150, 12))
    answer, q2 = (torch.randint(10, 700, (n,), generator=g).tolist() for n in (12, 14))
    first = system + doc + q1
    second = first + answer + q2
    s1 = SteerRow(alpha=0.5, steered=((9, 159),))
    s2 = SteerRow(alpha=0.5, steered=((9, 159), (len(first) + len(answer), len(second))))
    return first, second, s1, s2


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_turn_reuses_the_previous_prompt_exactly(arch: str) -> None:
    register()
    model = make_model(arch, attn_implementation=ATTN_NAME)
    first, second, s1, s2 = _turns()
    reqs = [
        [GenerationRequest("t1", first, GREEDY, s1)],
        [GenerationRequest("t1-again", first, GREEDY, s1, watch_context=True)],
        [GenerationRequest("t2", second, GREEDY, s2, watch_context=True)],
    ]
    on = _compare(model, reqs)
    assert on[2][-1].context_attention  # measured rows report the same values with and without a hit
    assert _cached(on[0]) == 0
    assert _cached(on[1]) == (len(first) - 1) // BLOCK * BLOCK
    assert _cached(on[2]) == len(first) // BLOCK * BLOCK  # the first turn's prompt, not its answer


def test_other_steering_on_the_same_prompt_reuses_nothing() -> None:
    register()
    model = make_model("llama", attn_implementation=ATTN_NAME)
    first, _, s1, _ = _turns(1)
    steers = [
        s1,
        SteerRow(),
        SteerRow(alpha=0.25, steered=s1.steered),
        dataclasses.replace(s1, layers=(0,)),
        dataclasses.replace(s1, heads={0: (0,), 1: (1, 2)}),
    ]
    batches = [[GenerationRequest(f"s{i}", first, GREEDY, s)] for i, s in enumerate(steers)]
    on = _compare(model, batches + [[GenerationRequest("again", first, GREEDY, steers[-1])]])
    assert [_cached(o) for o in on[:-1]] == [0] * len(steers)
    assert _cached(on[-1]) > 0


def test_cad_speculation_and_a_hit_beside_decoding_rows() -> None:
    register()
    model = make_model("qwen2", attn_implementation=ATTN_NAME)
    first, second, s1, s2 = _turns(2)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=True)
    cad = CadPlan(free_ids=tuple(first[:9] + first[159:]), beta=0.5)
    batches = [
        [GenerationRequest("warm", first, GREEDY, s1)],
        [  # a long unrelated row decodes while the cached prompts join
            GenerationRequest("busy", list(range(300, 340)), long, SteerRow()),
            GenerationRequest("hit", second, GREEDY, s2),
            GenerationRequest("cad", first, GREEDY, SteerRow(), cad=cad),
        ],
        [GenerationRequest("cad-again", first, GREEDY, SteerRow(), cad=cad)],
    ]
    on = _compare(model, batches, spec=NgramConfig())
    assert _cached(on[2]) > 0
    assert _cached(on[4]) > 0  # the CAD request's own prompt; its twin's is cached as well


@pytest.mark.slow
def test_smollm2_multi_turn_is_exact() -> None:
    from ctxsteer.server.engine.loader import load_model

    register()
    model, _, _ = load_model(None, dtype="float32", attn_implementation=ATTN_NAME)
    first, second, s1, s2 = _turns(3)
    on = _compare(
        model, [[GenerationRequest("a", first, GREEDY, s1)], [GenerationRequest("b", second, GREEDY, s2)]]
    )
    assert _cached(on[1]) == len(first) // BLOCK * BLOCK


def test_small_budget_evicts_old_blocks_and_keeps_outputs() -> None:
    register()
    model = make_model("llama", attn_implementation=ATTN_NAME)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(10, 700, (200,), generator=g).tolist() for _ in range(4)]
    batches = [[GenerationRequest(f"p{i}", p, GREEDY, SteerRow())] for i, p in enumerate(prompts)]
    batches.append([GenerationRequest("p0-again", prompts[0], GREEDY, SteerRow())])
    engine = _engine(model, cache=True, kv_budget_tokens=1600)  # the cache keeps 400 positions
    on = _serve(engine, batches)
    off = _serve(_engine(model, cache=False, kv_budget_tokens=1600), batches)
    for a, b in zip(on, off, strict=True):
        _same(a, b)
    assert engine.runner.prefix is not None and engine.runner.prefix.tokens <= 400
    assert _cached(on[-1]) == 0  # p0's blocks were evicted by the later prompts
