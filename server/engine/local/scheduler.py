"""Admission, batching and KV-slot policy of the local engine (no torch).

Each engine step asks `schedule()` for a `StepPlan` (who leaves, who is admitted, which prompt chunk to
prefill and how many tokens of it, which rows decode), the runner executes it, and the engine reports
back (`prefilled`, `finish`). A bounded waiting queue; at most `max_num_seqs` sequences admitted; a KV
token budget reserved per sequence as prompt + max_tokens, so an admitted sequence can always finish
(no preemption). Admission is FIFO (no overtaking) and prompts are prefilled oldest first. The scheduler
is the one owner of KV slots: running row i lives in slot i, and a row that leaves is replaced by the
last row (`Release` says which move the runner must make). A CAD request's hidden twin (`Row.twin`)
is never queued on its own: it is admitted with its request (two seats), takes the slot just before it
when the prompt is done, and leaves with it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ctxsteer.server.engine.interface import QueueFull
from ctxsteer.server.engine.local.row import Row, RowStatus
from ctxsteer.server.engine.request import FinishReason


@dataclass(frozen=True, slots=True)
class Release:
    """A running row left `slot`; the last row (at `moved_from`, if any) now lives there."""

    slot: int
    moved_from: int | None


@dataclass
class StepPlan:
    aborted: list[Row] = field(default_factory=list)  # already out of the scheduler
    releases: list[Release] = field(default_factory=list)  # KV moves the aborted running rows need
    admitted: list[Row] = field(default_factory=list)  # start prefilling (runner state to create)
    prefill: Row | None = None  # whose next prompt chunk runs
    prefill_tokens: int = 0  # at most this many of its prompt tokens
    decode: list[Row] = field(default_factory=list)  # running rows, in slot order

    @property
    def empty(self) -> bool:
        return self.prefill is None and not self.decode and not self.aborted


class PrefillBudget:
    """How many prompt tokens a prefill step may take (timings in, a token count out).

    The local engine runs a step's prefill chunk and its decode step as two forwards, so every prompt
    token prefilled in a step delays the running streams' next token. Alone (nothing decoding) a
    newcomer takes `max_chunk` tokens per step. Beside decoding rows, with `share` > 0, the chunk may
    take about `share` of a decode step's time per prompt still waiting to be prefilled: one newcomer
    then adds at most `share` to the running streams' inter-token latency, instead of stalling them for a
    whole 512-token chunk, while a burst of k newcomers (k streams whose first token matters as much)
    gets k times the room. Both costs are running averages of the engine's own measurements.

    It is off by default (`share` 0: whole chunks) because on a CPU it costs throughput: a decode step
    reads every weight whatever the batch, so spreading prefill over more steps adds decode forwards.
    Measured (SmolLM2, 2-core EPYC, 8 simultaneous 319-token prompts, 64 tokens each): 52 -> 30 tok/s.
    """

    def __init__(
        self, max_chunk: int, *, min_chunk: int = 16, share: float = 0.0, decay: float = 0.8
    ) -> None:
        self.max_chunk, self.min_chunk, self.share, self.decay = max_chunk, min_chunk, share, decay
        self.prefill_s_per_token: float | None = None
        self.decode_step_s: float | None = None

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self.prefill_s_per_token = self._average(self.prefill_s_per_token, seconds / tokens)

    def observe_decode(self, seconds: float) -> None:
        self.decode_step_s = self._average(self.decode_step_s, seconds)

    def chunk(self, decoding: int, prefilling: int = 1) -> int:
        """Tokens for the next prefill chunk: `decoding` rows running, `prefilling` prompts admitted."""
        if not decoding or self.share <= 0:
            return self.max_chunk
        if self.prefill_s_per_token is None or self.decode_step_s is None:
            return max(self.min_chunk, self.max_chunk // 4)
        room = self.share * max(1, prefilling) * self.decode_step_s
        return max(self.min_chunk, min(self.max_chunk, int(room / self.prefill_s_per_token)))


class Scheduler:
    def __init__(
        self, *, max_num_seqs: int, max_queue: int, kv_budget_tokens: int, budget: PrefillBudget
    ) -> None:
        self.max_num_seqs, self.max_queue, self.kv_budget = max_num_seqs, max_queue, kv_budget_tokens
        self.budget = budget
        self.waiting: deque[Row] = deque()
        self.prefilling: deque[Row] = deque()  # admitted, prompt not fully processed yet
        self.running: list[Row] = []  # decoding; index == KV slot
        self.reserved = 0

    # ---- requests come and go (any thread, under the engine's lock) ---------------------------
    def add(self, row: Row, leaving: int = 0) -> None:
        """Queue a sequence; refuses when the running slots are taken and `max_queue` already wait.
        `leaving`: admitted sequences already aborted, which free their places before the next admission."""
        if len(self.waiting) + self.active - leaving >= self.capacity:
            raise QueueFull(retry_after_s=1)
        self.waiting.append(row)

    def remove_waiting(self, request_id: str) -> Row | None:
        for row in self.waiting:
            if row.request_id == request_id:
                self.waiting.remove(row)
                return row
        return None

    @property
    def capacity(self) -> int:
        """Sequences held at most (admitted + waiting)."""
        return self.max_num_seqs + self.max_queue

    @property
    def active(self) -> int:
        """Seats taken: admitted sequences, CAD twins included."""
        return sum(s.seats for s in self.prefilling) + len(self.running)

    # ---- one engine step ------------------------------------------------------------------------
    def schedule(self, aborts: Iterable[str] = ()) -> StepPlan:
        """Apply aborts, admit what fits, pick the prefill chunk and the decode rows."""
        plan = StepPlan()
        abort_ids = set(aborts)
        for row in [s for s in self.all() if s.request_id in abort_ids]:
            plan.releases += self.finish(row, FinishReason.ABORT)
            plan.aborted.append(row)
        plan.admitted = self._admit()
        if self.prefilling:
            plan.prefill = self.prefilling[0]
            plan.prefill_tokens = self.budget.chunk(len(self.running), len(self.prefilling))
        plan.decode = list(self.running)
        return plan

    def _admit(self) -> list[Row]:
        admitted = []
        while self.waiting and self.active + self.waiting[0].seats <= self.max_num_seqs:
            row = self.waiting[0]
            if self.reserved + row.reserve_tokens > self.kv_budget and self.active:
                break  # wait for room; a lone sequence is always admitted (the HTTP layer bounds its size)
            self.waiting.popleft()
            self.reserved += row.reserve_tokens
            row.status = RowStatus.PREFILLING
            self.prefilling.append(row)
            admitted.append(row)
        return admitted

    def prefilled(self, row: Row) -> int:
        """Its prompt is done: it decodes from now on, in the returned slot (the next free one; a CAD
        twin takes the one before it)."""
        self.prefilling.remove(row)
        for r in (row.twin, row) if row.twin is not None else (row,):
            r.status = RowStatus.RUNNING
            r.slot = len(self.running)
            self.running.append(r)
        assert row.slot is not None
        return row.slot

    def finish(self, row: Row, reason: FinishReason) -> list[Release]:
        """Forget an admitted or waiting sequence (and its CAD twin); a running row's slot is refilled by
        the last row. The runner must apply the releases in order."""
        if row.finished:
            return []
        previous, row.status, row.finish_reason = row.status, RowStatus.FINISHED, reason
        releases = []
        if previous is RowStatus.WAITING:
            self.waiting.remove(row)
        else:
            self.reserved -= row.reserve_tokens  # its twin's included
            if previous is RowStatus.PREFILLING:
                self.prefilling.remove(row)
            else:
                releases.append(self._vacate(row))
        twin = row.twin
        if twin is not None and not twin.finished:
            twin_was_running = twin.status is RowStatus.RUNNING
            twin.status, twin.finish_reason = RowStatus.FINISHED, reason
            if twin_was_running:
                releases.append(self._vacate(twin))
        return releases

    def _vacate(self, row: Row) -> Release:
        slot = row.slot
        assert slot is not None and self.running[slot] is row
        row.slot = None
        last = self.running.pop()
        if last is row:
            return Release(slot, None)
        self.running[slot] = last
        last.slot = slot
        return Release(slot, len(self.running))

    def reset(self) -> list[Row]:
        """After a failed step: drop every admitted sequence (returned); waiting ones stay queued."""
        dropped = [*self.prefilling, *self.running]
        self.prefilling.clear()
        self.running.clear()
        self.reserved = 0
        for row in dropped:
            row.slot = None
        return dropped

    def all(self) -> Iterator[Row]:
        """Every request held (CAD twins are part of theirs, not listed)."""
        yield from self.waiting
        yield from self.prefilling
        yield from (s for s in self.running if not s.is_twin)

    def kv_room(self) -> int:
        """KV tokens of the budget that no admitted sequence reserved (the prefix cache may hold them)."""
        return max(0, self.kv_budget - self.reserved)

    def kv_usage(self, cached: int = 0) -> float:
        """Reserved (and `cached`: prefix-cache) tokens over the budget."""
        return min(1.0, (self.reserved + cached) / self.kv_budget) if self.kv_budget else 0.0
