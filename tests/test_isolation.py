"""One request's parameters never fail its batch neighbours (reliability issue, class 1).

Degenerate but schema-valid sampling values run in one batch beside healthy greedy streams; the healthy
streams must produce exactly the tokens they produce alone, and the degenerate ones must finish too.
"""

from __future__ import annotations

import asyncio
import dataclasses

import torch
from test_engine import _collect, _engine, _requests

from ctxsteer.server.engine.local import sampler as sampler_mod
from ctxsteer.server.engine.local.sampler import RowSampler, sample_row
from ctxsteer.server.engine.request import FinishReason, GenerationRequest, SamplingParams

# Each accepted by the HTTP schema (temperature in [0, 2], top_p in (0, 1], top_k >= -1).
DEGENERATE = [
    SamplingParams(max_tokens=8, temperature=1e-300),
    SamplingParams(max_tokens=8, temperature=5e-324, top_p=1e-300),
    SamplingParams(max_tokens=8, temperature=2.0, top_p=5e-324, top_k=1),
    SamplingParams(
        max_tokens=8, temperature=1e-30, top_k=10**9, presence_penalty=2.0, frequency_penalty=-2.0
    ),
]


def test_degenerate_sampling_values_are_safe_and_pick_the_mode() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 20
    for params in DEGENERATE[:2]:
        s = sample_row(logits, RowSampler.create(dataclasses.replace(params, presence_penalty=0.0)))
        assert s.token_id == int(logits.argmax())  # temperature -> 0 is greedy


def _degenerate_requests(prompt: list[int]) -> list[GenerationRequest]:
    return [GenerationRequest(f"bad{i}", prompt, p) for i, p in enumerate(DEGENERATE)]


def test_degenerate_requests_beside_healthy_streams_leave_them_unchanged() -> None:
    healthy = _requests(4, max_tokens=10)
    bad = _degenerate_requests(healthy[0].prompt_ids)

    async def main():
        engine = _engine("llama", max_num_seqs=8, prefill_chunk=16)
        await engine.start()
        solo = [await _collect(engine, r) for r in healthy]
        mixed = await asyncio.gather(*(_collect(engine, r) for r in [*healthy, *bad]))
        await engine.shutdown()
        return solo, mixed

    solo, mixed = asyncio.run(main())
    assert [m for m in mixed[: len(healthy)]] == solo
    for ids, reason in mixed[len(healthy) :]:
        assert reason in (FinishReason.STOP, FinishReason.LENGTH) and ids


def test_a_row_whose_sampling_raises_fails_alone(monkeypatch) -> None:
    """Isolation does not rely on the sampler being perfect: an injected per-row failure fails that row."""
    real = sampler_mod.sample_row

    def flaky(logits: torch.Tensor, row: RowSampler):
        if row.params.top_k == 77:
            raise RuntimeError("injected sampling failure")
        return real(logits, row)

    monkeypatch.setattr(sampler_mod, "sample_row", flaky)
    healthy = _requests(3, max_tokens=10)
    culprit = GenerationRequest(
        "culprit", healthy[0].prompt_ids, SamplingParams(max_tokens=10, temperature=0.7, top_k=77)
    )

    async def main():
        engine = _engine("llama", max_num_seqs=8)
        await engine.start()
        solo = [await _collect(engine, r) for r in healthy]
        mixed = await asyncio.gather(*(_collect(engine, r) for r in [*healthy, culprit]))
        after = await _collect(engine, healthy[1])
        await engine.shutdown()
        return solo, mixed, after

    solo, mixed, after = asyncio.run(main())
    assert mixed[:3] == solo
    assert mixed[3][1] == FinishReason.ERROR
    assert after == solo[1]


def test_a_cancelled_request_frees_its_place_at_once_and_is_forgotten() -> None:
    """One slot, no queue: cancel a running stream and retry at once. Before, the abort was applied at the
    next step only, so the retry got QueueFull; and finished requests stayed in the engine forever."""

    async def main():
        engine = _engine("llama", max_num_seqs=1, max_queue=0)
        await engine.start()
        req = _requests(1, max_tokens=200)[0]
        stream = engine.generate(req)
        await anext(stream)
        await stream.aclose()  # what a client disconnect does
        retry = dataclasses.replace(
            req, request_id="retry", sampling=SamplingParams(max_tokens=3, temperature=0)
        )
        ids, reason = await _collect(engine, retry)  # raised QueueFull before the fix
        live_after = dict(engine._live)
        await engine.shutdown()
        return ids, reason, live_after

    ids, reason, live_after = asyncio.run(main())
    assert reason == FinishReason.LENGTH and len(ids) == 3
    assert live_after == {}
