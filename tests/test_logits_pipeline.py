"""The logits pipeline (combine -> per-row processors -> sampling) on hand-made logits, no model."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ctxsteer.server.engine.local.logits import LogitsPipeline
from ctxsteer.server.engine.local.processors import LogitsProcessor, Penalties, processors_for
from ctxsteer.server.engine.local.row import Row, cad_twin
from ctxsteer.server.engine.local.sampler import RowSampler, sample_rows
from ctxsteer.server.engine.request import GenerationRequest, SamplingParams
from ctxsteer.steering.cad import CadPlan

GREEDY = SamplingParams(temperature=0.0)
V = 8


class Ban:
    """A token mask: what a logit_bias or grammar processor looks like."""

    def __init__(self, token: int, calls: list[str] | None = None) -> None:
        self.token, self.calls = token, calls

    def apply(self, row: RowSampler, logits: torch.Tensor) -> torch.Tensor:
        if self.calls is not None:
            self.calls.append(f"ban{self.token}")
        return logits.index_fill(0, torch.tensor([self.token]), float("-inf"))

    def accept(self, token: int) -> None:
        pass


class Boom:
    def apply(self, row: RowSampler, logits: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected processor failure")

    def accept(self, token: int) -> None:
        pass


def _sampler(params: SamplingParams = GREEDY, *processors: LogitsProcessor) -> RowSampler:
    return RowSampler(params, None, Counter(), processors)


def _row(name: str, params: SamplingParams = GREEDY, cad: CadPlan | None = None) -> Row:
    req = GenerationRequest(name, [1, 2, 3], params, cad=cad)
    row = Row(req, lambda out: None, sampler=RowSampler.create(params))
    if cad is not None:
        row.twin = cad_twin(req)
    return row


def test_processors_follow_the_params() -> None:
    assert processors_for(GREEDY) == ()
    assert processors_for(SamplingParams(presence_penalty=0.5)) == (Penalties(0.5, 0.0),)
    assert processors_for(SamplingParams(frequency_penalty=-1.0)) == (Penalties(0.0, -1.0),)
    assert RowSampler.create(SamplingParams(presence_penalty=0.5)).processors == (Penalties(0.5, 0.0),)


def test_penalties_subtract_presence_and_frequency_without_touching_the_input() -> None:
    logits = torch.arange(V, dtype=torch.float32)
    row = _sampler()
    assert Penalties(1.0, 0.5).apply(row, logits) is logits  # nothing sampled yet: nothing to penalise
    row.counts.update([3, 3, 5])
    out = Penalties(1.0, 0.5).apply(row, logits)
    want = logits.clone()
    want[3] -= 1.0 + 0.5 * 2
    want[5] -= 1.0 + 0.5 * 1
    assert torch.equal(out, want) and torch.equal(logits, torch.arange(V, dtype=torch.float32))


def test_processors_apply_in_order_and_a_processed_greedy_row_leaves_the_batched_argmax() -> None:
    logits = torch.tensor([[0.0, 1, 2, 9, 8, 3, 0, 0]] * 2)
    calls: list[str] = []
    rows = [_sampler(), _sampler(GREEDY, Ban(3, calls), Ban(4, calls))]
    picks = [s.token_id for s in sample_rows(logits, rows) if s is not None]
    assert picks == [3, 5]  # the plain row takes the argmax; the masked one the best allowed token
    assert calls == ["ban3", "ban4"]
    assert rows[1].counts == Counter({5: 1})


def test_logprobs_report_the_unprocessed_logits() -> None:
    logits = torch.tensor([0.0, 1, 2, 9, 8, 3, 0, 0])
    row = _sampler(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2), Ban(3))
    (s,) = sample_rows(logits[None], [row])
    assert s is not None and s.token_id == 4
    raw = torch.log_softmax(logits, -1)
    assert s.logprob == pytest.approx(float(raw[4]))
    assert [t for t, _ in s.top] == [3, 4]  # the banned token is still the model's favourite


def test_a_failing_processor_fails_its_row_alone() -> None:
    logits = torch.tensor([[0.0, 1, 2, 9, 8, 3, 0, 0]] * 3)
    rows = [_sampler(), _sampler(GREEDY, Boom()), _sampler(GREEDY, Ban(3))]
    got = sample_rows(logits, rows)
    assert got[1] is None and got[0] is not None and got[2] is not None
    assert (got[0].token_id, got[2].token_id) == (3, 4)


def test_cad_contrast_replaces_only_a_cad_rows_first_position() -> None:
    plain, main = _row("p"), _row("c", cad=CadPlan((1,), beta=0.5))
    assert main.twin is not None
    rows = [plain, main.twin, main]  # slot order: the twin just before its request
    logits = torch.randn(3, 2, V, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = LogitsPipeline().contrast(rows, logits)
    assert torch.equal(logits, before)  # the runner's logits are not modified
    assert torch.allclose(out[2, 0], 1.5 * logits[2, 0] - 0.5 * logits[1, 0])
    assert torch.equal(out[2, 1], logits[2, 1]) and torch.equal(out[:2], logits[:2])
    alone = logits[:1]
    assert LogitsPipeline().contrast([plain], alone) is alone  # no twin in the batch: nothing to combine


def test_cad_contrast_of_the_prompt_uses_the_twins_last_prompt_logits() -> None:
    main = _row("c", cad=CadPlan((1,), beta=2.0))
    with_ctx, without = torch.tensor([1.0, 4.0, 0.0]), torch.tensor([0.0, 3.0, 1.0])
    pipeline = LogitsPipeline()
    assert pipeline.contrast_prompt(main, with_ctx) is with_ctx  # the twin's logits are not there yet
    main.twin_logits = without
    assert torch.equal(pipeline.contrast_prompt(main, with_ctx), 3.0 * with_ctx - 2.0 * without)


def test_sample_picks_per_row_and_refuses_a_twin() -> None:
    rows = [_row("a"), _row("b", SamplingParams(temperature=0.0, presence_penalty=100.0))]
    pipeline = LogitsPipeline()
    logits = torch.tensor([[0.0, 1, 2, 9, 8, 3, 0, 0]] * 2)
    assert [s.token_id for s in pipeline.sample(rows, logits) if s] == [3, 3]
    assert [s.token_id for s in pipeline.sample(rows, logits) if s] == [3, 4]  # the penalty moved row b
    twin = _row("c", cad=CadPlan((1,), beta=1.0)).twin
    assert twin is not None
    with pytest.raises(ValueError, match="never sampled"):
        pipeline.sample([twin], logits[:1])
