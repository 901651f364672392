"""The engine: one thread owns the model and runs the step loop; asyncio callers get per-request queues.

Each step is schedule -> execute -> update: the scheduler (no tensors) applies aborts, admits waiting
requests and plans one prefill chunk of the oldest admitted prompt plus one decode step over every running
row (`scheduler.Scheduler`); the core executes the plan on the runner and books the outputs into each
request's one record (`row.Row`), through its plug-ins: the logits pipeline, the draft proposer, the
after-prefill hooks and the output book (`core.EngineCore`). Newcomers join between steps and finished
rows leave at once. Aborts are queued and applied at the start of the next step; a step that fails fails
the admitted rows and resets the batch, and the loop goes on serving.
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
from ctxsteer.server.engine.local.core import EngineCore, PlugIns
from ctxsteer.server.engine.local.detok import Detokenizer
from ctxsteer.server.engine.local.drafts import NgramProposer
from ctxsteer.server.engine.local.grammar_mask import GrammarTokens
from ctxsteer.server.engine.local.hooks import PrefillHooks
from ctxsteer.server.engine.local.logits import LogitsPipeline
from ctxsteer.server.engine.local.ngram import NgramConfig
from ctxsteer.server.engine.local.output import OutputBook, eos_ids
from ctxsteer.server.engine.local.prefix_cache import PREFIX_CACHE_SHARE, PrefixCache
from ctxsteer.server.engine.local.row import Row, cad_twin
from ctxsteer.server.engine.local.runner import ModelRunner
from ctxsteer.server.engine.local.scheduler import PrefillBudget, Scheduler
from ctxsteer.server.engine.request import FinishReason, GenerationOutput, GenerationRequest, TokenLogprob

log = logging.getLogger("ctxsteer.engine")


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
        enable_prefix_caching: bool = True,
        prefix_cache_share: float = PREFIX_CACHE_SHARE,
        batch_invariant: bool = False,
    ) -> None:
        # CAD needs two rows of the batch per request
        info = dataclasses.replace(info, context_attention=True, cad=max_num_seqs >= 2)
        self.info, self.tokenizer = info, tokenizer
        budget = kv_budget_tokens or max_num_seqs * info.max_model_len
        prefix = PrefixCache(int(budget * prefix_cache_share)) if enable_prefix_caching else None
        self.runner = ModelRunner(model, max_rows=max_num_seqs, prefix=prefix)
        self.budget = PrefillBudget(prefill_chunk, share=prefill_stall_share)
        self.sched = Scheduler(
            max_num_seqs=max_num_seqs, max_queue=max_queue, kv_budget_tokens=budget, budget=self.budget
        )
        self.observer = observer or EngineObserver()
        eos = eos_ids(model, tokenizer)
        self.book = OutputBook(tokenizer, eos, info.max_model_len, self.observer)
        self.logits = LogitsPipeline(GrammarTokens.build(tokenizer, _vocab_size(model, tokenizer), eos))
        self._lock = threading.RLock()  # _emit_final may run while the step holds it
        drafts = NgramProposer(speculative, info.max_model_len) if speculative is not None else None
        plugins = PlugIns(self.book, PrefillHooks(self.runner, tokenizer), self.logits, drafts)
        self.core = EngineCore(
            self.runner,
            self.sched,
            self._lock,
            self.observer,
            plugins,
            self._emit_final,
            info.max_model_len,
            batch_invariant,
        )
        self._wake = threading.Event()
        self._aborts: set[str] = set()
        self._live: dict[str, Row] = {}  # every accepted, unfinished request: none can be lost
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
        row = Row(
            request,
            lambda out: loop.call_soon_threadsafe(queue.put_nowait, out),
            sampler=self.logits.row_state(request.sampling),
            detok=Detokenizer(self.tokenizer, request.prompt_ids, request.sampling.stop),
        )
        if request.cad is not None:
            row.twin = cad_twin(request)
        with self._lock:
            # Rows whose abort is pending leave at the next step: their places are already free, so a
            # client that cancels and retries at once is not told to retry later. (An id whose request
            # finished in the meantime frees nothing.)
            leaving = sum(self._live[r].seats for r in self._aborts if r in self._live)
            self.sched.add(row, leaving=leaving)  # raises QueueFull
            self._live[request.request_id] = row
        self._wake.set()
        return self._stream(row, queue)

    async def _stream(
        self, row: Row, queue: asyncio.Queue[GenerationOutput]
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
                self.abort(row.request_id)

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
                running=self.sched.active,
                waiting=len(self.sched.waiting),
                kv_usage=self.sched.kv_usage(self.runner.prefix.tokens if self.runner.prefix else 0),
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
        for row in orphans:
            row.prefill = None
            self._emit_final(row, FinishReason.ERROR, "", None, "generation failed")

    # ---- one step: schedule -> execute -> update --------------------------------------------
    def _step(self) -> bool:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            plan = self.sched.schedule(aborts)
        self.core.run(plan)
        return not plan.empty

    def _emit_final(
        self, row: Row, reason: FinishReason, text: str, lp: TokenLogprob | None, error: str | None = None
    ) -> None:
        """The request's last output (once: `_live` is the record of what still needs one)."""
        with self._lock:
            if self._live.get(row.request_id) is not row:
                return
            del self._live[row.request_id]
        self.book.final(row, reason, text, lp, error)

    def _fail_all(self, message: str, reason: FinishReason = FinishReason.ERROR) -> None:
        with self._lock:
            rows = list(self._live.values())
        for row in rows:
            self._emit_final(row, reason, "", None, message)


def _vocab_size(model: Any, tokenizer: Any) -> int:
    """The width of the model's logits (may exceed the tokenizer's length: padded embedding tables)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    width = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    return int(width or len(tokenizer))
