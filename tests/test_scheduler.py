"""The local engine's scheduler driven without a model: hand-made "runner outputs" (a prompt is done,
a row finished) in, step plans out. Admission, KV budget, aborts, slot ownership, no preemption,
fairness."""

from __future__ import annotations

import pytest

from ctxsteer.server.engine.interface import QueueFull
from ctxsteer.server.engine.local.row import Row, RowStatus
from ctxsteer.server.engine.local.scheduler import PrefillBudget, Release, Scheduler
from ctxsteer.server.engine.request import FinishReason, GenerationRequest, SamplingParams


def seq(name: str, prompt: int = 10, max_tokens: int = 5) -> Row:
    req = GenerationRequest(name, list(range(prompt)), SamplingParams(max_tokens=max_tokens))
    return Row(req, emit=lambda out: None)


def sched(max_num_seqs: int = 2, max_queue: int = 3, kv: int = 1000, chunk: int = 512) -> Scheduler:
    budget = PrefillBudget(chunk, share=0.75)
    return Scheduler(max_num_seqs=max_num_seqs, max_queue=max_queue, kv_budget_tokens=kv, budget=budget)


def names(seqs) -> list[str]:  # noqa: ANN001
    return [s.request_id for s in seqs]


def check_slots(s: Scheduler) -> None:
    """One owner of slots: running row i lives in slot i, nobody else has one."""
    for i, q in enumerate(s.running):
        assert q.slot == i and q.status is RowStatus.RUNNING
    for q in [*s.waiting, *s.prefilling]:
        assert q.slot is None


def test_admission_is_fifo_bounded_by_rows_and_the_queue() -> None:
    s = sched(max_num_seqs=2, max_queue=3)
    seqs = [seq(f"r{i}") for i in range(5)]
    for q in seqs:
        s.add(q)
    with pytest.raises(QueueFull):
        s.add(seq("r5"))  # 2 rows + 3 waiting
    plan = s.schedule()
    assert names(plan.admitted) == ["r0", "r1"] and plan.prefill is seqs[0] and plan.decode == []
    assert [q.status for q in seqs] == [RowStatus.PREFILLING] * 2 + [RowStatus.WAITING] * 3
    assert plan.prefill_tokens == 512  # nothing decodes: a full chunk
    assert s.prefilled(seqs[0]) == 0
    plan = s.schedule()
    assert plan.admitted == [] and plan.prefill is seqs[1] and plan.decode == [seqs[0]]
    check_slots(s)


def test_kv_budget_holds_back_without_overtaking_and_a_lone_sequence_always_runs() -> None:
    s = sched(max_num_seqs=4, kv=100)
    big, small, huge = seq("big", 60, 20), seq("small", 5, 5), seq("huge", 500, 100)
    s.add(big)
    s.add(huge)
    s.add(small)
    assert names(s.schedule().admitted) == ["big"]  # huge does not fit beside big; small waits behind it
    assert s.kv_usage() == pytest.approx(0.8)
    s.prefilled(big)
    s.finish(big, FinishReason.LENGTH)
    assert names(s.schedule().admitted) == ["huge"]  # alone, anything runs (the HTTP layer bounds it)
    assert s.kv_usage() == 1.0 and names(s.waiting) == ["small"]


def test_aborts_apply_between_steps_and_running_slots_stay_packed() -> None:
    s = sched(max_num_seqs=3)
    a, b, c, w = seq("a"), seq("b"), seq("c"), seq("w")
    for q in (a, b, c, w):
        s.add(q)
    s.schedule()
    for q in (a, b, c):
        s.prefilled(q)
    plan = s.schedule(aborts={"a", "w", "unknown"})
    assert names(plan.aborted) == ["w", "a"] and all(
        q.finish_reason is FinishReason.ABORT for q in plan.aborted
    )
    assert plan.releases == [Release(slot=0, moved_from=2)]  # c moved into a's slot
    assert plan.decode == [c, b] and (c.slot, b.slot) == (0, 1)
    check_slots(s)
    assert s.finish(b, FinishReason.STOP) == [Release(slot=1, moved_from=None)]  # the last row: no move
    assert s.finish(b, FinishReason.STOP) == []  # finishing twice is a no-op
    check_slots(s)
    assert s.reserved == c.reserve_tokens


def test_no_preemption_admitted_rows_always_finish() -> None:
    """A stream of arrivals never evicts an admitted row; it decodes every step until it finishes."""
    s = sched(max_num_seqs=2, max_queue=50, kv=10_000)
    first = seq("first", 10, 30)
    s.add(first)
    s.schedule()
    s.prefilled(first)
    for i in range(30):  # one newcomer per step, each done after one step
        s.add(seq(f"n{i}"))
        plan = s.schedule()
        assert first in plan.decode and first.status is RowStatus.RUNNING
        for q in plan.admitted:
            s.prefilled(q)
            s.finish(q, FinishReason.STOP)
    check_slots(s)


def test_prompts_are_prefilled_oldest_first_and_chunks_shrink_beside_decoding() -> None:
    s = sched(max_num_seqs=4, chunk=512)
    s.budget.observe_prefill(512, 0.512)  # 1 ms per prompt token
    s.budget.observe_decode(0.080)
    a, b, c = seq("a", 600), seq("b", 20), seq("c", 20)
    for q in (a, b, c):
        s.add(q)
    plan = s.schedule()
    assert plan.prefill is a and plan.prefill_tokens == 512  # b and c wait for the older prompt
    s.prefilled(a)
    plan = s.schedule()
    assert plan.prefill is b and plan.decode == [a]
    assert plan.prefill_tokens == 120  # 0.75 x 80 ms x 2 prompts waiting, at 1 ms per token


def test_reset_drops_admitted_rows_and_keeps_the_queue() -> None:
    s = sched(max_num_seqs=1)
    a, w = seq("a"), seq("w")
    s.add(a)
    s.add(w)
    s.schedule()
    s.prefilled(a)
    assert s.reset() == [a] and a.slot is None
    assert names(s.waiting) == ["w"] and s.reserved == 0 and s.active == 0


def cad_seq(name: str, prompt: int = 10, twin_prompt: int = 6, max_tokens: int = 5) -> Row:
    main = seq(name, prompt, max_tokens)
    main.twin = Row(
        GenerationRequest(f"{name}~cad", list(range(twin_prompt)), SamplingParams(max_tokens=max_tokens)),
        emit=lambda out: None,
        is_twin=True,
    )
    return main


def test_a_cad_request_takes_two_seats_its_twin_the_slot_before_it_and_leaves_with_it() -> None:
    s = sched(max_num_seqs=3, kv=1000)
    a, c, b = seq("a"), cad_seq("c", 10, 6, 5), seq("b")
    for q in (a, c, b):
        s.add(q)
    assert names(s.schedule().admitted) == ["a", "c"]  # 1 + 2 seats: b waits
    assert s.reserved == 15 + (15 + 11) and s.active == 3
    assert s.prefilled(a) == 0 and s.prefilled(c) == 2 and c.twin is not None and c.twin.slot == 1
    check_slots(s)
    assert names(s.schedule().decode) == ["a", "c~cad", "c"]  # the twin decodes beside its request
    assert names(s.all()) == ["b", "a", "c"]  # twins are part of their request, not listed
    # a leaves: the last row (c) moves into slot 0, then c leaves with its twin
    assert s.finish(a, FinishReason.STOP) == [Release(0, 2)]
    assert [q.request_id for q in s.running] == ["c", "c~cad"]
    assert s.finish(c, FinishReason.ABORT) == [Release(0, 1), Release(0, None)]
    assert s.running == [] and s.reserved == 0 and c.twin.finished
    assert names(s.schedule().admitted) == ["b"]
