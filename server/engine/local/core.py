"""The step frame of the local engine: execute a `scheduler.StepPlan`, then book what it produced.

A step plans one prefill chunk of the oldest admitted prompt plus one decode step over every running row.
A prefill chunk is `prefill_chunk` tokens; with `prefill_stall_share` > 0 the chunk beside decoding rows
is sized to a share of a decode step instead (`scheduler.PrefillBudget`), so newcomers do not stall the
running streams. A finished prompt passes the after-prefill hooks (`hooks.py`, which may restart it),
samples its first token and joins the decode batch; finished rows leave at once. The plug-ins: the logits
pipeline (`logits.py`), the draft proposer (`drafts.py`), the after-prefill hooks and the output book
(`output.py`). Every row fails alone: its prefill, its sampling and its bookkeeping are guarded one by
one; a failed decode forward fails the rows in it, and anything else fails the step (the engine recovers).

With speculation (`drafts.DraftProposer`) a decode step may feed each row its last token plus a few
guessed ones and read the row's logits after each. The row samples position by position exactly as plain
decoding would (same pipeline, generator and penalties) and keeps going only while its sample equals the
next guess, because only then were the following logits computed on the row's real text; the refused
guesses' keys are dropped. The output is therefore the same distribution (greedy: the same tokens, up to
float summation order), only sooner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ctxsteer.server.engine.interface import EngineObserver
from ctxsteer.server.engine.local.drafts import DraftProposer
from ctxsteer.server.engine.local.hooks import PrefillHooks
from ctxsteer.server.engine.local.logits import LogitsPipeline
from ctxsteer.server.engine.local.output import OutputBook
from ctxsteer.server.engine.local.row import Row
from ctxsteer.server.engine.local.runner import DecodeResult, ModelRunner
from ctxsteer.server.engine.local.scheduler import Scheduler, StepPlan
from ctxsteer.server.engine.request import FinishReason, TokenLogprob

log = logging.getLogger("ctxsteer.engine")

# Sends a row's final output, once: (row, reason, text, logprob, error)
Finalize = Callable[[Row, FinishReason, str, TokenLogprob | None, str | None], None]


@dataclass(frozen=True, slots=True)
class PlugIns:
    """What the step frame calls out to: each one object with its own contract and tests."""

    book: OutputBook  # sampled tokens -> outputs, finish checks, final outputs
    hooks: PrefillHooks  # decisions on a finished prefill (may restart it)
    logits: LogitsPipeline = field(default_factory=LogitsPipeline)  # logits -> sampled tokens
    drafts: DraftProposer | None = None  # speculation's guesses (None: plain decoding)


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        sched: Scheduler,
        lock: threading.RLock,
        observer: EngineObserver,
        plugins: PlugIns,
        finalize: Finalize,
        max_model_len: int,
        batch_invariant: bool = False,
    ) -> None:
        self.runner, self.sched, self.budget, self.lock = runner, sched, sched.budget, lock
        self.observer, self.finalize, self.max_model_len = observer, finalize, max_model_len
        self.book, self.hooks = plugins.book, plugins.hooks
        self.logits, self.drafts = plugins.logits, plugins.drafts
        self.batch_invariant = batch_invariant  # each request decodes in a forward of its own

    def run(self, plan: StepPlan) -> None:
        """Execute the plan and book its outputs."""
        for release in plan.releases:
            self.runner.release(release.slot, release.moved_from)
        for row in plan.aborted:
            row.prefill = None
            self.finalize(row, FinishReason.ABORT, "", None, None)
        self._start(plan.admitted)
        if (prefix := self.runner.prefix) is not None:  # after their lookups: the newcomers need the room
            prefix.fit(self.sched.kv_room())
        prefill_tokens, joined = 0, list[Row]()
        if plan.prefill is not None:
            prefill_tokens, joined = self._prefill(plan.prefill, plan.prefill_tokens)
        rows = [*plan.decode, *joined]  # slot order
        if rows:
            self._decode(rows, prefill_tokens)
        elif plan.prefill is not None:
            self.observer.on_step(0, prefill_tokens)
        if self.runner.live_rows != len(self.sched.running):  # e.g. a KV release failed mid-step
            raise RuntimeError("the runner's KV slots and the scheduler's running rows disagree")

    def _start(self, admitted: list[Row]) -> None:
        now = time.monotonic()
        for row in admitted:
            row.admitted_at = now
            req = row.request
            watch = req.watch_context or req.indicator is not None or req.auto_strength is not None
            row.prefill = self.runner.start_prefill(row.prompt_ids, row.steer, watch)
            if (twin := row.twin) is not None:
                twin.prefill = self.runner.start_prefill(twin.prompt_ids, twin.steer)

    def _prefill(self, row: Row, max_tokens: int) -> tuple[int, list[Row]]:
        """One chunk of the row's prompt (its CAD twin's first); returns the prompt tokens processed and,
        when the prompt is done and its first token did not finish it, the rows that joined the decode
        batch (in slot order)."""
        assert row.prefill is not None
        twin = row.twin
        state = twin.prefill if twin is not None and row.twin_logits is None else row.prefill
        assert state is not None
        before = state.done
        t0 = time.perf_counter()
        try:
            logits = self.runner.prefill_step(state, max_tokens)
            tokens = state.done - before
            if state is not row.prefill:
                row.twin_logits = logits
                logits = None
            elif logits is not None and self.hooks.after_prefill(row, row.prefill):
                return tokens, []
        except Exception:  # noqa: BLE001 - this request fails alone
            log.exception("prefill failed for %s", row.request_id)
            self.finish(row, FinishReason.ERROR, "generation failed")
            return 0, []
        self.budget.observe_prefill(tokens, time.perf_counter() - t0)
        if logits is None:
            return tokens, []
        return tokens, self._join(row, logits)

    def _join(self, row: Row, logits: torch.Tensor) -> list[Row]:
        """The prompt is done: the row (after its twin) joins the decode batch and samples its first token
        from the last prompt position's logits [V]."""
        state, row.prefill = row.prefill, None
        assert state is not None
        if state.context is not None and row.request.watch_context:
            row.context.append(state.context)
        if self.runner.prefix is not None:
            row.cached_tokens = state.cached
        with self.lock:
            slot = self.sched.prefilled(row)
        joined = [row]
        if (twin := row.twin) is not None:
            assert twin.slot is not None and twin.prefill is not None
            self.runner.admit(twin.prefill, twin.slot)
            twin.prefill = None
            logits = self.logits.contrast_prompt(row, logits)
            row.twin_logits = None
            joined = [twin, row]
        self.runner.admit(state, slot)
        self._sample_and_accept([row], logits.unsqueeze(0), first=True)
        return [] if row.finished else joined

    def _decode(self, rows: list[Row], prefill_tokens: int) -> None:
        t0 = time.perf_counter()
        try:
            steps = [self._forward(group, first) for first, group in self._groups(rows)]
            self.budget.observe_decode(time.perf_counter() - t0)
        except Exception:  # noqa: BLE001
            log.exception("decode step failed; failing %d rows", len(rows))
            for row in rows:
                self.finish(row, FinishReason.ERROR, "generation failed")
            return
        # Reported before any row's output is emitted: rows in the forward, and the warm-up's last step
        # is seen while the engine is still not ready.
        self.observer.on_step(len(rows), prefill_tokens)
        for group, drafts, result in steps:
            self._book(group, drafts, result)

    def _groups(self, rows: list[Row]) -> list[tuple[int | None, list[Row]]]:
        """The forwards of a decode step as (first slot, rows): one over the whole batch (None), or,
        batch-invariant, one per row (CAD twins too: a pair's slots need not stay adjacent)."""
        if not self.batch_invariant:
            return [(None, rows)]
        return [(slot, [row]) for slot, row in enumerate(rows)]

    def _forward(
        self, rows: list[Row], first_slot: int | None
    ) -> tuple[list[Row], list[list[int]] | None, DecodeResult]:
        drafts = self.drafts.propose(rows) if self.drafts is not None else None
        width = 1 + max(map(len, drafts)) if drafts else 1
        # rows with fewer guesses are padded with their last token; those positions are never read
        tokens = [
            [r.last_token, *d, *[r.last_token] * (width - 1 - len(d))]
            for r, d in zip(rows, drafts or [[]] * len(rows), strict=True)
        ]
        watch = [i for i, r in enumerate(rows) if r.request.watch_context]
        steers = [r.steer for r in rows]
        result = self.runner.decode(
            tokens, steers, watch, max_position=self.max_model_len - 1, first_slot=first_slot
        )
        return rows, drafts, result

    def _book(self, rows: list[Row], drafts: list[list[int]] | None, result: DecodeResult) -> None:
        """Sample and book one forward's rows (speculation: verify each row's guesses)."""
        for i, value in result.context.items():
            rows[i].context.append(value)
        logits = self.logits.contrast(rows, result.logits)  # a CAD row's first position; twins not sampled
        if drafts is None:
            mains = [i for i, r in enumerate(rows) if not r.is_twin]
            self._sample_and_accept([rows[i] for i in mains], logits[mains, 0])
            return
        for row, draft, row_logits in zip(rows, drafts, logits, strict=True):
            if not row.is_twin:
                self._verify(row, draft, row_logits)
        for twin in (r for r in rows if r.is_twin):  # fed [token, padding...]: only the token's key stays
            if not twin.finished and twin.slot is not None:
                self.runner.reject(twin.slot, logits.shape[1] - 1)

    def _verify(self, row: Row, draft: list[int], logits: torch.Tensor) -> None:
        """Sample the row position by position from its logits after each fed token ([Q, V]); continue
        while the sample is the next guess. Keys of fed tokens past the last kept one are dropped."""
        fed = logits.shape[0]
        kept = 0  # fed tokens whose keys stay: the row's real text
        accepted = 0  # guesses equal to the row's own sample (the last one too, when it ends the row)
        for j in range(len(draft) + 1):
            booked = len(row.generated)
            self._sample_and_accept([row], logits[j : j + 1], same_step=j > 0)
            kept = j + 1
            hit = j < len(draft) and len(row.generated) > booked and row.last_token == draft[j]
            accepted += hit
            if row.finished or not hit:  # stopped, failed alone (nothing booked then), or a wrong guess
                break
        if draft:
            assert self.drafts is not None
            self.drafts.observe(row, draft, accepted)
            self.observer.on_draft(len(draft), accepted)
        if not row.finished and row.slot is not None:
            self.runner.reject(row.slot, fed - kept)

    def _sample_and_accept(
        self, rows: list[Row], logits: torch.Tensor, first: bool = False, same_step: bool = False
    ) -> None:
        """Sample and book every row; a row whose own sampling or bookkeeping raises fails alone, so one
        request's parameters can never fail its batch neighbours."""
        sampled = self.logits.sample(rows, logits)
        for row, s in zip(rows, sampled, strict=True):
            if s is None:
                self.finish(row, FinishReason.ERROR, "sampling failed for this request")
                continue
            try:
                ending = self.book.accept(row, s, first=first, same_step=same_step)
                if ending is not None:
                    self.finish(row, ending.reason, tail=ending.text, lp=ending.logprob)
                elif row.twin is not None:  # the twin decodes what its request generated
                    row.twin.generated.append(row.last_token)
            except Exception:  # noqa: BLE001
                log.exception("output bookkeeping failed for %s", row.request_id)
                self.finish(row, FinishReason.ERROR, "generation failed")

    def finish(
        self,
        row: Row,
        reason: FinishReason,
        error: str | None = None,
        tail: str = "",
        lp: TokenLogprob | None = None,
    ) -> None:
        """Take the request out of the batch and send its last output (even when freeing its KV slot
        fails: the step then ends in the engine's recovery, see `run`)."""
        if row.finished:
            return
        with self.lock:
            releases = self.sched.finish(row, reason)
        row.prefill = None
        if row.twin is not None:
            row.twin.prefill, row.twin_logits = None, None
        try:
            for release in releases:
                self.runner.release(release.slot, release.moved_from)
        finally:
            tail += self.book.held_text(row, reason)
            self.finalize(row, reason, tail, lp, error)
