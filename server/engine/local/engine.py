"""The engine: one thread owns the model and runs the step loop; asyncio callers get per-request queues.

Each step is schedule -> execute -> update: the scheduler (no tensors) applies aborts, admits waiting
requests and plans one prefill chunk of the oldest admitted prompt plus one decode step over every running
row; the runner executes the plan; the engine samples and books the outputs into each request's one
record (`sequence.Sequence`). Newcomers join between steps and finished rows leave at once. A prefill
chunk is `prefill_chunk` tokens; with `prefill_stall_share` > 0 the chunk beside decoding rows is sized
to a share of a decode step instead (`scheduler.PrefillBudget`), so newcomers do not stall the running
streams. A CAD request (`request.cad`) brings a hidden twin row with the context-free prompt: it is
prefilled before its request's prompt, decodes beside it in the same batch, and each step the request
samples from the contrast of the two rows' logits; the twin is fed the sampled token.

With n-gram speculation (`speculative`, vLLM's "ngram" method) a decode step may feed each row its last
token plus a few guessed ones (`ngram.propose`) and read the row's logits after each. The row samples
position by position exactly as plain decoding would (same sampler, generator and penalties) and keeps
going only while its sample equals the next guess, because only then were the following logits computed
on the row's real text; the refused guesses' keys are dropped. The output is therefore the same
distribution (greedy: the same tokens, up to float summation order), only sooner.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from ctxsteer.server.engine.interface import (
    AsyncEngine,
    EngineDead,
    EngineObserver,
    EngineStats,
    ModelInfo,
    warm_up,
)
from ctxsteer.server.engine.local.detok import Detokenizer
from ctxsteer.server.engine.local.ngram import NgramConfig, propose
from ctxsteer.server.engine.local.runner import ModelRunner
from ctxsteer.server.engine.local.sampler import RowSampler, Sampled, sample_rows
from ctxsteer.server.engine.local.scheduler import PrefillBudget, Scheduler, StepPlan
from ctxsteer.server.engine.local.sequence import SeqStatus, Sequence
from ctxsteer.server.engine.request import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
from ctxsteer.steering.auto_strength import choose_strength, head_gates
from ctxsteer.steering.cad import cad_logits
from ctxsteer.steering.rows import SteerRow

log = logging.getLogger("ctxsteer.engine")

# A row whose guesses are mostly refused stops drafting (a refused guess costs a step part of a token's
# time, see NgramConfig.max_step_tokens) and tries again some steps later.
_DRAFT_MIN_SCORE = 0.3
_DRAFT_RECOVERY = 0.02


class LocalEngine(AsyncEngine):
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        info: ModelInfo,
        *,
        max_num_seqs: int = 8,
        max_queue: int = 64,
        kv_budget_tokens: int | None = None,
        prefill_chunk: int = 512,
        prefill_stall_share: float = 0.0,
        speculative: NgramConfig | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        # CAD needs two rows of the batch per request
        info = dataclasses.replace(info, context_attention=True, cad=max_num_seqs >= 2)
        self.info, self.tokenizer = info, tokenizer
        self.runner = ModelRunner(model, max_rows=max_num_seqs)
        budget = kv_budget_tokens or max_num_seqs * info.max_model_len
        self.budget = PrefillBudget(prefill_chunk, share=prefill_stall_share)
        self.sched = Scheduler(
            max_num_seqs=max_num_seqs, max_queue=max_queue, kv_budget_tokens=budget, budget=self.budget
        )
        self.observer = observer or EngineObserver()
        self.eos_ids = _eos_ids(model, tokenizer)
        self.speculative = speculative
        self._lock = threading.RLock()  # _emit_final may run while the step holds it
        self._wake = threading.Event()
        self._aborts: set[str] = set()
        self._live: dict[str, Sequence] = {}  # every accepted, unfinished request: none can be lost
        self._stop = False
        self._accepting = True
        self._ready = False
        self._thread: threading.Thread | None = None

    # ---- asyncio side ----------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if not self._alive() or not self._accepting:
            raise EngineDead("the engine is not running")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        seq = Sequence(
            request,
            lambda out: loop.call_soon_threadsafe(queue.put_nowait, out),
            sampler=RowSampler.create(request.sampling),
            detok=Detokenizer(self.tokenizer, request.prompt_ids, request.sampling.stop),
        )
        if request.cad is not None:
            seq.twin = _twin(request)
        with self._lock:
            # Rows whose abort is pending leave at the next step: their places are already free, so a
            # client that cancels and retries at once is not told to retry later. (An id whose request
            # finished in the meantime frees nothing.)
            leaving = sum(self._live[r].seats for r in self._aborts if r in self._live)
            self.sched.add(seq, leaving=leaving)  # raises QueueFull
            self._live[request.request_id] = seq
        self._wake.set()
        return self._stream(seq, queue)

    async def _stream(
        self, seq: Sequence, queue: asyncio.Queue[GenerationOutput]
    ) -> AsyncIterator[GenerationOutput]:
        finished = False
        try:
            while True:
                out = await queue.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            if not finished:  # consumer went away (disconnect, cancel): free the slot
                self.abort(seq.request_id)

    def abort(self, request_id: str) -> None:
        """A waiting request leaves now; an admitted one at the start of the next step."""
        with self._lock:
            waiting = self.sched.remove_waiting(request_id)
            if waiting is None and request_id in self._live:
                self._aborts.add(request_id)
        if waiting is not None:
            self._emit_final(waiting, FinishReason.ABORT, "", None)  # never admitted: nothing to release
        self._wake.set()

    @property
    def max_requests(self) -> int:
        return self.sched.capacity

    @property
    def ready(self) -> bool:
        return self._ready and self._alive()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=self.sched.active, waiting=len(self.sched.waiting), kv_usage=self.sched.kv_usage()
            )

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ctxsteer-engine", daemon=True)
        self._thread.start()
        await warm_up(self)
        self._ready = True

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self._alive():
            with self._lock:
                if not any(True for _ in self.sched.all()):
                    break
            await asyncio.sleep(0.05)
        with self._lock:
            self._aborts.update(s.request_id for s in self.sched.all())
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
        self._ready = False

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    # ---- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():  # tensors made here are updated in place across steps
            while not self._stop:
                try:
                    worked = self._step()
                except Exception:  # noqa: BLE001 - fail what is in flight, keep serving
                    log.exception("engine step failed; failing in-flight requests and resetting the batch")
                    self._recover()
                    continue
                if not worked:
                    self._wake.wait(0.5)
                    self._wake.clear()
        self._fail_all("the server is shutting down", FinishReason.ABORT)

    def _recover(self) -> None:
        """After a failed step: fail the admitted rows, reset the batch; waiting requests stay queued.

        The snapshot is taken under the lock, so a request that arrives meanwhile is never dropped.
        """
        with self._lock:
            orphans = self.sched.reset()
        self.runner.reset()
        for seq in orphans:
            seq.prefill = None
            self._emit_final(seq, FinishReason.ERROR, "", None, "generation failed")

    # ---- one step: schedule -> execute -> update --------------------------------------------
    def _step(self) -> bool:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            plan = self.sched.schedule(aborts)
        for release in plan.releases:
            self.runner.release(release.slot, release.moved_from)
        for seq in plan.aborted:
            seq.prefill = None
            self._emit_final(seq, FinishReason.ABORT, "", None)
        now = time.monotonic()
        for seq in plan.admitted:
            seq.admitted_at = now
            req = seq.request
            watch = req.watch_context or req.indicator is not None or req.auto_strength is not None
            seq.prefill = self.runner.start_prefill(req.prompt_ids, req.steer, watch)
            if (twin := seq.twin) is not None:
                twin.prefill = self.runner.start_prefill(twin.request.prompt_ids, twin.request.steer)
        prefill_tokens, joined = self._run_prefill(plan) if plan.prefill is not None else (0, [])
        rows = [*plan.decode, *joined]  # slot order
        if rows:
            self._run_decode(rows, prefill_tokens)
        elif plan.prefill is not None:
            self.observer.on_step(0, prefill_tokens)
        if self.runner.live_rows != len(self.sched.running):  # e.g. a KV release failed mid-step
            raise RuntimeError("the runner's KV slots and the scheduler's running rows disagree")
        return not plan.empty

    def _run_prefill(self, plan: StepPlan) -> tuple[int, list[Sequence]]:
        """One chunk of the oldest admitted prompt (a CAD twin's first); returns the prompt tokens
        processed and, when the prompt is done and its first token did not finish it, the rows that
        joined the decode batch (in slot order)."""
        seq = plan.prefill
        assert seq is not None and seq.prefill is not None
        twin = seq.twin
        state = twin.prefill if twin is not None and seq.twin_logits is None else seq.prefill
        before = state.done
        t0 = time.perf_counter()
        try:
            logits = self.runner.prefill_step(state, plan.prefill_tokens)
            tokens = state.done - before
            if state is not seq.prefill:
                seq.twin_logits = logits
                logits = None
            elif logits is not None and (
                self._auto_strength_restart(seq, seq.prefill) or self._indicator_restart(seq, seq.prefill)
            ):
                return tokens, []
        except Exception:  # noqa: BLE001 - this request fails alone
            log.exception("prefill failed for %s", seq.request_id)
            self._finish(seq, FinishReason.ERROR, "generation failed")
            return 0, []
        self.budget.observe_prefill(tokens, time.perf_counter() - t0)
        if logits is None:
            return tokens, []
        # the prompt is done: the row (after its twin) joins the decode batch
        state, seq.prefill = seq.prefill, None
        if state.context is not None and seq.request.watch_context:
            seq.context.append(state.context)
        with self._lock:
            slot = self.sched.prefilled(seq)
        joined = [seq]
        if twin is not None:
            assert twin.slot is not None and seq.request.cad is not None
            self.runner.admit(twin.prefill, twin.slot)
            twin.prefill = None
            logits = cad_logits(logits, seq.twin_logits, seq.request.cad.beta)
            seq.twin_logits = None
            joined = [twin, seq]
        self.runner.admit(state, slot)
        self._sample_and_accept([seq], logits.unsqueeze(0), first=True)
        return tokens, [] if seq.finished else joined

    def _auto_strength_restart(self, seq: Sequence, state: Any) -> bool:
        """strength "auto": once the unsteered prompt is prefilled, its last position's attention on the
        context picks the strength; above 1 the prompt is prefilled again with that steering (True)."""
        auto, req = seq.request.auto_strength, seq.request
        if auto is None or seq.auto_strength is not None or state.context_heads is None:
            return False
        masses = state.context_heads
        gates = head_gates(req.steer, len(masses), len(masses[0]))
        seq.auto_strength = choose_strength(masses, gates, auto)
        strength = seq.auto_strength[0]
        if strength == 1.0:
            return False
        req.steer = dataclasses.replace(req.steer, alpha=1.0 / strength)
        self.runner.restart_prefill(state, state.ids, req.steer, 0)
        state.watch = req.watch_context
        return True

    def _indicator_restart(self, seq: Sequence, state: Any) -> bool:
        """context_indicator "auto": once the plain prompt is prefilled, its last position's attention on
        the context decides; above the threshold the row continues with the marked prompt (True)."""
        plan = seq.request.indicator
        if plan is None or seq.indicator is not None:
            return False
        ratio = state.context[0] if state.context is not None else 0.0
        applied = ratio > plan.threshold
        seq.indicator = (applied, ratio)
        if not applied:
            return False
        req = seq.request
        req.prompt_ids, req.steer = list(plan.marked_ids), plan.marked_steer
        seq.detok = Detokenizer(self.tokenizer, req.prompt_ids, req.sampling.stop)
        self.runner.restart_prefill(state, plan.marked_ids, plan.marked_steer, plan.insert_at)
        state.watch = req.watch_context
        return True

    def _drafts(self, rows: list[Sequence]) -> list[list[int]] | None:
        """Guessed next tokens per row for this step, or None for a plain step: without speculation, when
        the batch is too large, or when no row has a guess. Rows whose context attention is measured guess
        nothing (one value per generated token), nor do CAD rows and their twins (a token's logits need
        both rows' at the same position, and the twin is fed what its request kept)."""
        spec = self.speculative
        if spec is None:
            return None
        per_row = min(spec.num_speculative_tokens, spec.max_step_tokens // len(rows) - 1)
        if per_row < 1:
            return None
        drafts: list[list[int]] = []
        for seq in rows:
            req = seq.request
            if req.watch_context or seq.twin is not None or seq.is_twin:
                drafts.append([])
                continue
            if seq.draft_score < _DRAFT_MIN_SCORE:  # its guesses keep failing: rest, then try again
                seq.draft_score += _DRAFT_RECOVERY
                drafts.append([])
                continue
            room = req.sampling.max_tokens - len(seq.generated) - 1  # tokens it may still emit after one
            # a guess's position must exist: a model with learned position embeddings has none past the
            # served length (padding positions past it are clamped by the runner; nothing reads them)
            headroom = self.info.max_model_len - len(req.prompt_ids) - len(seq.generated)
            drafts.append(propose([*req.prompt_ids, *seq.generated], spec, min(per_row, room, headroom)))
        return drafts if any(drafts) else None

    def _run_decode(self, rows: list[Sequence], prefill_tokens: int) -> None:
        t0 = time.perf_counter()
        drafts = None
        try:
            drafts = self._drafts(rows)
            width = 1 + max(map(len, drafts)) if drafts else 1
            # rows with fewer guesses are padded with their last token; those positions are never read
            tokens = [
                [s.last_token, *d, *[s.last_token] * (width - 1 - len(d))]
                for s, d in zip(rows, drafts or [[]] * len(rows), strict=True)
            ]
            watch = [i for i, s in enumerate(rows) if s.request.watch_context]
            steers = [s.request.steer for s in rows]
            result = self.runner.decode(tokens, steers, watch, max_position=self.info.max_model_len - 1)
            self.budget.observe_decode(time.perf_counter() - t0)
        except Exception:  # noqa: BLE001
            log.exception("decode step failed; failing %d rows", len(rows))
            for seq in rows:
                self._finish(seq, FinishReason.ERROR, "generation failed")
            return
        # Reported before any row's output is emitted: rows in the forward, and the warm-up's last step
        # is seen while the engine is still not ready.
        self.observer.on_step(len(rows), prefill_tokens)
        for i, value in result.context.items():
            rows[i].context.append(value)
        logits = result.logits
        twins = [s for s in rows if s.is_twin]
        if twins:  # a CAD row's first position: contrasted with its twin's, which is not sampled
            index = {id(s): i for i, s in enumerate(rows)}
            logits = logits.clone()
            for s in rows:
                if s.twin is not None and s.request.cad is not None:
                    i = index[id(s)]
                    logits[i, 0] = cad_logits(logits[i, 0], logits[index[id(s.twin)], 0], s.request.cad.beta)
        if drafts is None:
            mains = [i for i, s in enumerate(rows) if not s.is_twin]
            self._sample_and_accept([rows[i] for i in mains], logits[mains, 0])
            return
        for seq, draft, row_logits in zip(rows, drafts, logits, strict=True):
            if not seq.is_twin:
                self._verify(seq, draft, row_logits)
        for twin in twins:  # fed [token, padding...]: only the token's key stays
            if not twin.finished and twin.slot is not None:
                self.runner.reject(twin.slot, logits.shape[1] - 1)

    def _verify(self, seq: Sequence, draft: list[int], logits: torch.Tensor) -> None:
        """Sample the row position by position from its logits after each fed token ([Q, V]); continue
        while the sample is the next guess. Keys of fed tokens past the last kept one are dropped."""
        fed = logits.shape[0]
        kept = 0  # fed tokens whose keys stay: the row's real text
        accepted = 0  # guesses equal to the row's own sample (the last one too, when it ends the row)
        for j in range(len(draft) + 1):
            booked = len(seq.generated)
            self._sample_and_accept([seq], logits[j : j + 1], same_step=j > 0)
            kept = j + 1
            hit = j < len(draft) and len(seq.generated) > booked and seq.last_token == draft[j]
            accepted += hit
            if seq.finished or not hit:  # stopped, failed alone (nothing booked then), or a wrong guess
                break
        if draft:
            seq.draft_score = 0.6 * seq.draft_score + 0.4 * accepted / len(draft)
            self.observer.on_draft(len(draft), accepted)
        if not seq.finished and seq.slot is not None:
            self.runner.reject(seq.slot, fed - kept)

    @staticmethod
    def _feed_twin(seq: Sequence) -> None:
        """The twin decodes what its request generated."""
        if seq.twin is not None and not seq.finished:
            seq.twin.generated.append(seq.last_token)

    def _sample_and_accept(
        self, seqs: list[Sequence], logits: torch.Tensor, first: bool = False, same_step: bool = False
    ) -> None:
        """Sample and book every row; a row whose own sampling or bookkeeping raises fails alone, so one
        request's parameters can never fail its batch neighbours."""
        sampled = sample_rows(logits, [q.sampler for q in seqs])
        for seq, s in zip(seqs, sampled, strict=True):
            if s is None:
                self._finish(seq, FinishReason.ERROR, "sampling failed for this request")
                continue
            try:
                self._accept(seq, s, first=first, same_step=same_step)
                self._feed_twin(seq)
            except Exception:  # noqa: BLE001
                log.exception("output bookkeeping failed for %s", seq.request_id)
                self._finish(seq, FinishReason.ERROR, "generation failed")

    def _accept(self, seq: Sequence, s: Sampled, first: bool = False, same_step: bool = False) -> None:
        now = time.monotonic()
        req = seq.request
        if first:
            self.observer.on_first_token(req, now - req.arrival_time, seq.admitted_at - req.arrival_time)
        else:
            self.observer.on_token(req, None if same_step else now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated.append(s.token_id)
        p = req.sampling
        reason: FinishReason | None = None
        if (s.token_id in self.eos_ids and not p.ignore_eos) or s.token_id in p.stop_token_ids:
            text = ""
            reason = FinishReason.STOP
        else:
            text, hit = seq.detok.add(s.token_id)
            if hit:
                reason = FinishReason.STOP
        if reason is None and len(seq.generated) >= p.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None and len(req.prompt_ids) + len(seq.generated) >= self.info.max_model_len:
            reason = FinishReason.LENGTH
        lp = self._logprob(s) if p.logprobs else None
        if reason is None:
            seq.emit(self._output(seq, text, lp, None))
        else:
            self._finish(seq, reason, tail=text, lp=lp)

    def _logprob(self, s: Sampled) -> TokenLogprob:
        def text(t: int) -> str:
            return self.tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)

        return TokenLogprob(
            s.token_id, text(s.token_id), s.logprob or 0.0, tuple((t, text(t), lp) for t, lp in s.top)
        )

    def _output(
        self, seq: Sequence, text: str, lp: TokenLogprob | None, reason: FinishReason | None
    ) -> GenerationOutput:
        # The context value of this output's token, when measured (each step books one per watched row).
        fresh = bool(seq.generated) and len(seq.context) == len(seq.generated)
        return GenerationOutput(
            request_id=seq.request_id,
            token_ids=(seq.last_token,) if seq.generated else (),
            text=text,
            logprobs=(lp,) if lp is not None else (),
            finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_ids),
            completion_tokens=len(seq.generated),
            context_attention=(seq.context[-1],) if fresh else (),
            indicator=seq.indicator,
            auto_strength=seq.auto_strength,
        )

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        error: str | None = None,
        tail: str = "",
        lp: TokenLogprob | None = None,
    ) -> None:
        """Take the request out of the batch and send its last output (even when freeing its KV slot
        fails: the step then ends in `_recover`, see `_step`)."""
        if seq.finished:
            return
        with self._lock:
            releases = self.sched.finish(seq, reason)
        seq.prefill = None
        if seq.twin is not None:
            seq.twin.prefill, seq.twin_logits = None, None
        try:
            for release in releases:
                self.runner.release(release.slot, release.moved_from)
        finally:
            if reason in (FinishReason.STOP, FinishReason.LENGTH):
                tail += seq.detok.finish()
            self._emit_final(seq, reason, tail, lp, error)

    def _emit_final(
        self,
        seq: Sequence,
        reason: FinishReason,
        text: str,
        lp: TokenLogprob | None,
        error: str | None = None,
    ) -> None:
        """The request's last output (once: `_live` is the record of what still needs one)."""
        with self._lock:
            if self._live.get(seq.request_id) is not seq:
                return
            del self._live[seq.request_id]
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        out = self._output(seq, text, lp, reason)
        if error is not None:
            out = dataclasses.replace(out, error=error)
        if seq.context:
            out = dataclasses.replace(out, context_ratio=sum(v[0] for v in seq.context) / len(seq.context))
        self.observer.on_finish(seq.request, out, time.monotonic() - seq.request.arrival_time)
        seq.emit(out)

    def _fail_all(self, message: str, reason: FinishReason = FinishReason.ERROR) -> None:
        with self._lock:
            seqs = list(self._live.values())
        for seq in seqs:
            self._emit_final(seq, reason, "", None, message)


def _twin(request: GenerationRequest) -> Sequence:
    """The hidden context-free row of a CAD request: greedy (it never samples: its logits are only read),
    unsteered, as long as its request may run; it emits nothing."""
    assert request.cad is not None
    twin_request = GenerationRequest(
        request_id=f"{request.request_id}~cad",
        prompt_ids=list(request.cad.free_ids),
        sampling=SamplingParams(max_tokens=request.sampling.max_tokens, temperature=0.0),
        steer=SteerRow(),
        arrival_time=request.arrival_time,
    )
    return Sequence(twin_request, lambda out: None, is_twin=True)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return frozenset(ids)
