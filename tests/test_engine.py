"""The engine on tiny models: batching is invisible in greedy output, steering equals the core loop."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tiny import make_model, make_tokenizer

from ctxsteer.server.engine.interface import ModelInfo, QueueFull
from ctxsteer.server.engine.local.engine import LocalEngine
from ctxsteer.server.engine.request import FinishReason, GenerationRequest, SamplingParams
from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.generate import greedy_generate, left_pad, steer_kwargs
from ctxsteer.steering.rows import SteerRow

STRENGTHS = [1.0, 1.5, 3.0, 1.0, 2.0, 5.0, 1.2, 10.0]


def _engine(arch: str, **kw) -> LocalEngine:
    register()
    model = make_model(arch, attn_implementation=ATTN_NAME)
    cfg = model.config
    info = ModelInfo(arch, arch, "cpu", "float32", 512, cfg.num_hidden_layers, cfg.num_attention_heads)
    return LocalEngine(model, make_tokenizer(), info, **kw)


def _requests(n: int, max_tokens: int = 12, seed: int = 3) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(12, 60, (1,), generator=g))
        ids = torch.randint(10, 500, (length,), generator=g).tolist()
        steer = SteerRow(alpha=1 / STRENGTHS[i % len(STRENGTHS)], steered=((2, length // 2),))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        out.append(GenerationRequest(f"r{i}", ids, params, steer))
    return out


async def _collect(engine: LocalEngine, req: GenerationRequest) -> tuple[list[int], FinishReason | None]:
    ids: list[int] = []
    reason = None
    async for out in engine.generate(req):
        ids.extend(out.token_ids)
        reason = out.finish_reason
    return ids, reason


def _run(coro):
    return asyncio.run(coro)


def solo_then_busy(engine: LocalEngine, reqs: list[GenerationRequest]) -> tuple[list[list[int]], ...]:
    """Greedy token ids of each request run alone, then of all of them at once (same engine)."""

    async def main() -> tuple[list[list[int]], list[list[int]]]:
        await engine.start()
        solo = [(await _collect(engine, r))[0] for r in reqs]
        busy = await asyncio.gather(*(_collect(engine, r) for r in reqs))
        await engine.shutdown()
        return solo, [ids for ids, _ in busy]

    return _run(main())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_busy_batch_equals_solo_and_core_loop(arch: str) -> None:
    reqs = _requests(8)
    engine = _engine(arch, max_num_seqs=8, prefill_chunk=16)  # small chunks: chunked prefill too
    solo, busy = solo_then_busy(engine, reqs)
    assert busy == solo
    # The engine's steered decoding equals the plain core loop (per row, its own strength).
    model = make_model(arch, attn_implementation=ATTN_NAME)
    for req, got in zip(reqs[:4], solo[:4], strict=True):
        ids, mask = left_pad([req.prompt_ids], pad_id=0)
        ref = greedy_generate(model, ids, mask, 12, **steer_kwargs(model, [req.steer], mask))
        assert ref.tokens[0].tolist() == got


def test_steering_changes_distribution_but_strength_one_does_not() -> None:
    req = _requests(1, max_tokens=6)[0]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=5)

    async def main():
        engine = _engine("llama")
        await engine.start()
        off = GenerationRequest("a", req.prompt_ids, params, SteerRow(1.0, req.steer.steered))
        plain = GenerationRequest("b", req.prompt_ids, params)
        strong = GenerationRequest("c", req.prompt_ids, params, SteerRow(0.02, req.steer.steered))
        res = [[lp for o in await _outs(engine, r) for lp in o.logprobs] for r in (off, plain, strong)]
        await engine.shutdown()
        return res

    off, plain, strong = _run(main())
    assert off == plain  # exactly: strength 1 takes the unsteered path
    assert max(abs(a.logprob - b.logprob) for a, b in zip(strong, plain, strict=True)) > 1e-3


async def _outs(engine: LocalEngine, req: GenerationRequest) -> list:
    return [o async for o in engine.generate(req)]


def test_limits_stop_abort_and_queue() -> None:
    async def main():
        engine = _engine("llama", max_num_seqs=2, max_queue=2)
        await engine.start()
        base = _requests(1)[0]
        # max_tokens -> length
        ids, reason = await _collect(engine, base)
        assert len(ids) == 12 and reason == FinishReason.LENGTH
        # abort mid-stream frees the slot
        long = GenerationRequest(
            "long", base.prompt_ids, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        )
        stream = engine.generate(long)
        await stream.__anext__()
        await stream.aclose()
        await _until(lambda: engine.stats().running == 0)
        # queue bound: 2 running + 2 waiting, the 5th is refused at once
        many = [
            GenerationRequest(
                f"q{i}", base.prompt_ids, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
            )
            for i in range(4)
        ]
        streams = [engine.generate(r) for r in many[:2]]
        await _until(lambda: engine.stats().running == 2)
        streams += [engine.generate(r) for r in many[2:]]
        with pytest.raises(QueueFull):
            for i in range(3):
                engine.generate(GenerationRequest(f"x{i}", base.prompt_ids, SamplingParams(max_tokens=2)))
        results = await asyncio.gather(*(_drain(s) for s in streams))
        assert all(len(r) == 30 for r in results)  # everything accepted completes
        await engine.shutdown()

    _run(main())


def test_a_stale_abort_frees_no_place() -> None:
    """An abort that arrives for a request that already finished (its id still pending until the next
    step) must not let the queue take one request more than its bound."""

    async def main():
        engine = _engine("llama", max_num_seqs=1, max_queue=1)
        await engine.start()
        base = _requests(1)[0]
        long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
        running = engine.generate(GenerationRequest("a", base.prompt_ids, long))
        await running.__anext__()  # admitted and decoding: the one seat is taken
        waiting = engine.generate(GenerationRequest("b", base.prompt_ids, long))  # the one queue place
        with engine._lock:  # no step may take the pending aborts in between
            engine._aborts.add("gone")  # its request finished in the step the abort arrived
            with pytest.raises(QueueFull):
                engine.generate(GenerationRequest("c", base.prompt_ids, SamplingParams(max_tokens=2)))
        assert len(await _drain(running)) == 59 and len(await _drain(waiting)) == 60
        await engine.shutdown()

    _run(main())


async def _until(cond, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def _drain(stream) -> list[int]:
    ids: list[int] = []
    async for out in stream:
        ids.extend(out.token_ids)
    return ids


def test_seeded_sampling_is_reproducible_in_any_batch() -> None:
    base = _requests(3)

    def sampled(r: GenerationRequest, seed: int) -> GenerationRequest:
        p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True)
        return GenerationRequest(r.request_id, r.prompt_ids, p, r.steer)

    async def main():
        engine = _engine("qwen2")
        await engine.start()
        alone = (await _collect(engine, sampled(base[0], 7)))[0]
        together = await asyncio.gather(*(_collect(engine, sampled(r, 7 + i)) for i, r in enumerate(base)))
        other_seed = (await _collect(engine, sampled(base[0], 8)))[0]
        await engine.shutdown()
        return alone, together[0][0], other_seed

    alone, together, other = _run(main())
    assert alone == together
    assert alone != other


def test_stop_string_and_logprobs() -> None:
    tok = make_tokenizer()

    async def main():
        engine = _engine("llama")
        await engine.start()
        req = _requests(1, max_tokens=8)[0]
        free = GenerationRequest(
            "f", req.prompt_ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        )
        outs = [o async for o in engine.generate(free)]
        text = "".join(o.text for o in outs)
        ids = [t for o in outs for t in o.token_ids]
        assert text == tok.decode(ids, skip_special_tokens=True)
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        p = SamplingParams(
            max_tokens=8, temperature=0, ignore_eos=True, stop=(stop,), logprobs=True, top_logprobs=3
        )
        outs = [o async for o in engine.generate(GenerationRequest("s", req.prompt_ids, p))]
        await engine.shutdown()
        return text, stop, outs

    text, stop, outs = _run(main())
    stopped = "".join(o.text for o in outs)
    assert outs[-1].finish_reason == FinishReason.STOP
    assert stopped == text[: text.index(stop)]
    lps = [lp for o in outs for lp in o.logprobs]
    assert lps and all(len(lp.top) == 3 and lp.top[0][2] >= lp.logprob - 1e-6 for lp in lps)


def test_a_failing_step_fails_in_flight_requests_and_the_engine_keeps_serving(monkeypatch) -> None:
    async def main():
        engine = _engine("llama", max_num_seqs=2)
        await engine.start()
        real = engine.runner.release
        calls = {"n": 0}

        def broken(slot: int, moved_from: int | None):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected")
            return real(slot, moved_from)

        monkeypatch.setattr(engine.runner, "release", broken)
        reqs = _requests(3, max_tokens=5)
        first = await asyncio.gather(*(_outs(engine, r) for r in reqs))
        after = await _collect(engine, _requests(1, max_tokens=5, seed=9)[0])
        await engine.shutdown()
        return first, after

    first, (ids, reason) = _run(main())
    reasons = [outs[-1].finish_reason for outs in first]
    assert FinishReason.ERROR in reasons  # nothing hangs: every accepted request got a final output
    assert reason == FinishReason.LENGTH and len(ids) == 5
