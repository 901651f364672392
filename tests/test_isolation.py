"""One request's parameters never fail its batch neighbours (reliability issue, class 1).

Degenerate but schema-valid sampling values run in one batch beside healthy greedy streams; the healthy
streams must produce exactly the tokens they produce alone, and the degenerate ones must finish too.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import pytest
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
    SamplingParams(max_tokens=8, temperature=2.0, top_p=5e-324),  # docs/server.md: keeps the best token
]
# Unscaled: at temperature 2 the mode is far from certain; only a degenerate value makes it certain.
LOGITS = torch.randn(300, generator=torch.Generator().manual_seed(0))


def penalised(logits: torch.Tensor, params: SamplingParams, counts: Counter[int]) -> torch.Tensor:
    """OpenAI's presence/frequency penalties on the tokens sampled so far (the reference, not the code)."""
    x = logits.clone()
    for token, count in counts.items():
        x[token] -= params.presence_penalty + params.frequency_penalty * count
    return x


@pytest.mark.parametrize("case", range(len(DEGENERATE)))
def test_degenerate_sampling_values_are_safe_and_pick_the_mode(case: int) -> None:
    """Each case leaves one candidate (temperature -> 0, top_k 1, or top_p below the best token's share),
    so every seed must give the mode of the (penalised) logits, step after step."""
    params = DEGENERATE[case]
    for seed in range(20):
        row = RowSampler.create(dataclasses.replace(params, seed=seed))
        for _ in range(params.max_tokens):
            expected = int(penalised(LOGITS, params, row.counts).argmax())
            assert sample_row(LOGITS, row).token_id == expected, (params, seed, dict(row.counts))


def test_the_mode_is_not_what_these_logits_always_give() -> None:
    """The control for the test above: at temperature 2 without top_p/top_k the seeds pick other tokens too,
    so only the degenerate values can have made them pick the mode."""
    rows = [RowSampler.create(SamplingParams(temperature=2.0, seed=seed)) for seed in range(20)]
    picks = {sample_row(LOGITS, row).token_id for row in rows}
    assert picks - {int(LOGITS.argmax())}


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
