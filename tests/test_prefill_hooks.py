"""After-prefill hooks: unit tests with a fake runner (no model), then the served path on a tiny model,
where the request object the HTTP side built must come out of the engine unchanged."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Sequence

import pytest
from test_engine import _engine, _requests

from ctxsteer.server.engine.interface import EngineObserver
from ctxsteer.server.engine.local.detok import Detokenizer
from ctxsteer.server.engine.local.hooks import AutoStrengthHook, IndicatorHook, PrefillHooks, Replan
from ctxsteer.server.engine.local.row import Row
from ctxsteer.server.engine.local.runner import PrefillState
from ctxsteer.server.engine.request import GenerationOutput, GenerationRequest, SamplingParams
from ctxsteer.steering.indicator import IndicatorPlan
from ctxsteer.steering.rows import SteerRow
from ctxsteer.steering.spec import AutoStrength

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]
CONTEXT = SteerRow(alpha=1.0, steered=((2, 5),))
MARKED = IndicatorPlan(
    insert_at=6,
    marked_ids=(*PROMPT[:6], 99, *PROMPT[6:]),
    marked_steer=SteerRow(0.5, ((2, 5),)),
    threshold=0.4,
)
MASSES = [[0.1, 0.3], [0.2, 0.4]]  # per layer and head: the last prompt position's attention on the context


class FakeRunner:
    def __init__(self) -> None:
        self.restarts: list[tuple[list[int], SteerRow, int]] = []

    def restart_prefill(self, st: PrefillState, ids: Sequence[int], steer: SteerRow, keep: int) -> None:
        self.restarts.append((list(ids), steer, keep))
        st.ids, st.steer, st.done, st.context, st.context_heads = list(ids), steer, keep, None, None


class FakeTokenizer:
    def decode(self, ids: list[int], **kw: bool) -> str:
        return " ".join(map(str, ids))


def _row(**req: object) -> Row:
    request = GenerationRequest("r", list(PROMPT), SamplingParams(), CONTEXT, **req)
    return Row(request, lambda out: None, detok=Detokenizer(FakeTokenizer(), request.prompt_ids, ()))


def _prefilled(ratio: float = 0.5) -> PrefillState:
    return PrefillState(
        list(PROMPT), CONTEXT, watch=True, done=len(PROMPT), context=(ratio, ratio), context_heads=MASSES
    )


def test_indicator_above_the_threshold_replans_the_row_not_the_request() -> None:
    runner, row, state = FakeRunner(), _row(indicator=MARKED), _prefilled(0.5)
    before, detok = copy.deepcopy(row.request), row.detok
    assert PrefillHooks(runner, FakeTokenizer()).after_prefill(row, state)
    assert runner.restarts == [(list(MARKED.marked_ids), MARKED.marked_steer, 6)]
    assert row.indicator == (True, 0.5) and not state.watch  # the request does not watch its tokens
    assert (row.prompt_ids, row.steer) == (list(MARKED.marked_ids), MARKED.marked_steer)
    assert (row.served.prompt_ids, row.served.steer) == (list(MARKED.marked_ids), MARKED.marked_steer)
    assert row.detok is not detok and row.detok is not None and row.detok.ids[-3:] == [99, 17, 18]
    assert row.request == before and row.request.prompt_ids == PROMPT
    assert not PrefillHooks(runner, FakeTokenizer()).after_prefill(row, state)  # decided once
    assert len(runner.restarts) == 1


def test_indicator_below_the_threshold_only_records_the_decision() -> None:
    runner, row = FakeRunner(), _row(indicator=MARKED)
    assert not PrefillHooks(runner, FakeTokenizer()).after_prefill(row, _prefilled(0.3))
    assert row.indicator == (False, 0.3) and runner.restarts == [] and row.prompt_ids == PROMPT


def test_auto_strength_replans_the_steering_of_the_same_prompt() -> None:
    runner, row, state = FakeRunner(), _row(auto_strength=AutoStrength(0.9, 4.0)), _prefilled()
    before = copy.deepcopy(row.request)
    assert PrefillHooks(runner, FakeTokenizer()).after_prefill(row, state)
    assert row.auto_strength is not None and row.auto_strength[0] == 4.0  # out of reach: the bound
    assert runner.restarts == [(PROMPT, dataclasses.replace(CONTEXT, alpha=0.25), 0)]
    assert row.steer.alpha == 0.25 and row.request == before and row.request.steer is CONTEXT
    assert not PrefillHooks(runner, FakeTokenizer()).after_prefill(row, state)


def test_auto_strength_one_keeps_the_prefill() -> None:
    runner, row = FakeRunner(), _row(auto_strength=AutoStrength(0.1, 4.0))
    assert not PrefillHooks(runner, FakeTokenizer()).after_prefill(row, _prefilled())
    assert row.auto_strength is not None and row.auto_strength[0] == 1.0 and runner.restarts == []
    assert AutoStrengthHook().after_prefill(_row(), _prefilled()) is None  # not asked for
    assert IndicatorHook().after_prefill(_row(), _prefilled()) is None


def test_the_first_replan_wins() -> None:
    seen: list[str] = []

    class Hook:
        def __init__(self, name: str, plan: Replan | None) -> None:
            self.name, self.plan = name, plan

        def after_prefill(self, row: object, state: PrefillState) -> Replan | None:
            seen.append(self.name)
            return self.plan

    hooks = [Hook("a", None), Hook("b", Replan(PROMPT, CONTEXT, 3)), Hook("c", None)]
    runner = FakeRunner()
    assert PrefillHooks(runner, FakeTokenizer(), hooks).after_prefill(_row(), _prefilled())
    assert seen == ["a", "b"] and runner.restarts == [(PROMPT, CONTEXT, 3)]


# ---- served, tiny model ------------------------------------------------------------------------------


class Finishes(EngineObserver):
    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    def on_finish(self, request: GenerationRequest, out: GenerationOutput, e2e_s: float) -> None:
        self.requests.append(request)


def _served(reqs: list[GenerationRequest]) -> tuple[list[list[GenerationOutput]], Finishes]:
    seen = Finishes()

    async def main() -> list[list[GenerationOutput]]:
        engine = _engine("llama", observer=seen)
        await engine.start()
        outs = [[o async for o in engine.generate(r)] for r in reqs]
        await engine.shutdown()
        return outs

    return asyncio.run(main()), seen


def _ids(outs: list[GenerationOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.mark.parametrize("decision", ["indicator", "auto_strength"])
def test_the_engine_leaves_the_request_unchanged(decision: str) -> None:
    """A re-planned request generates what the re-planned prompt and steering generate when asked for
    directly; the request object is what the HTTP side built, and the observer sees the request as served."""
    base = _requests(1, max_tokens=8)[0]
    n = len(base.prompt_ids)
    if decision == "indicator":
        marked = (*base.prompt_ids[: n - 2], 7, *base.prompt_ids[n - 2 :])
        steer = dataclasses.replace(base.steer, alpha=0.5)  # the marked prompt is steered too
        plan = IndicatorPlan(n - 2, marked, steer, threshold=-1.0)  # always applied
        req = dataclasses.replace(base, indicator=plan)
        fixed = dataclasses.replace(base, request_id="fixed", prompt_ids=list(marked), steer=steer)
    else:
        req = dataclasses.replace(base, steer=dataclasses.replace(base.steer, alpha=1.0))
        req = dataclasses.replace(req, auto_strength=AutoStrength(target_ratio=0.999, max_strength=3.0))
        fixed = dataclasses.replace(
            base, request_id="fixed", steer=dataclasses.replace(base.steer, alpha=1 / 3)
        )
    before, prompt_list = copy.deepcopy(req), req.prompt_ids
    (outs, want), seen = _served([req, fixed])
    assert req == before and req.prompt_ids is prompt_list and req.prompt_ids == before.prompt_ids
    assert _ids(outs) == _ids(want) and len(_ids(outs)) == 8
    final = outs[-1]
    if decision == "indicator":
        assert final.indicator is not None and final.indicator[0] and final.prompt_tokens == n + 1
    else:
        assert final.auto_strength is not None and final.auto_strength[0] == 3.0
    served = next(r for r in seen.requests if r.request_id == req.request_id)
    assert (served.prompt_ids, served.steer) == (fixed.prompt_ids, fixed.steer)
