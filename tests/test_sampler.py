"""Batched sampling of a decode step equals sampling each row on its own."""

from __future__ import annotations

import torch

from ctxsteer.server.engine.local.sampler import RowSampler, sample_row, sample_rows
from ctxsteer.server.engine.request import SamplingParams

PARAMS = [
    SamplingParams(temperature=0.0),  # plain greedy: the shared argmax
    SamplingParams(temperature=0.0, presence_penalty=4.0, frequency_penalty=2.0),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=5),
    SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
    SamplingParams(temperature=0.0),
]


def test_sample_rows_equals_sample_row_over_several_steps() -> None:
    g = torch.Generator().manual_seed(0)
    batched = [RowSampler.create(p) for p in PARAMS]
    single = [RowSampler.create(p) for p in PARAMS]
    seen: list[list[int]] = [[] for _ in PARAMS]
    argmax0: list[int] = []
    for _ in range(6):
        step = torch.randn(300, generator=g)
        step[7] = 10.0  # a clear favourite, so penalties visibly change later picks
        logits = step.repeat(len(PARAMS), 1)  # same logits in every row: rows differ only by params
        argmax0.append(int(step.argmax()))
        got = sample_rows(logits, batched)
        want = [sample_row(logits[i], r) for i, r in enumerate(single)]
        assert got == want
        for i, s in enumerate(got):
            seen[i].append(s.token_id)
    assert seen[0].count(7) == 6 and seen[1].count(7) < 6  # the penalised row moved off the favourite
    assert seen[0] == argmax0 == seen[4]  # greedy rows are argmax picks, whatever their neighbours
    assert batched[0].counts == single[0].counts and sum(batched[0].counts.values()) == 6
