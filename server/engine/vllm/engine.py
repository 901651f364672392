"""`VllmEngine`: ctxsteer's engine interface over vLLM's `AsyncLLM` (`ctxsteer serve --engine vllm`).

The HTTP layer is unchanged: it renders the chat, marks the steered token spans and validates the request
as for the local engine, then hands over prompt token ids. Each steered request carries its steering in
`SamplingParams.extra_args["ctxsteer"]` (read inside vLLM's attention by the plugin, `plugin.py`) and a
prefix-cache salt derived from it. vLLM does the scheduling, paged KV cache, detokenization, stop strings
and sampling; running/waiting/KV numbers are vLLM's own, taken from its scheduler stats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from vllm import SamplingParams as VllmSamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase

from ctxsteer.server.engine.grammar import GrammarError
from ctxsteer.server.engine.interface import (
    AsyncEngine,
    EngineDead,
    EngineObserver,
    EngineStats,
    ModelInfo,
    QueueFull,
    warm_up,
)
from ctxsteer.server.engine.request import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    Grammar,
    TokenLogprob,
)
from ctxsteer.server.engine.vllm.steer_args import EXTRA_ARGS_KEY, cache_salt, encode

log = logging.getLogger("ctxsteer.vllm")
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


class VllmEngine(AsyncEngine):
    def __init__(
        self,
        engine_args: AsyncEngineArgs,
        tokenizer: Any,
        info: ModelInfo,
        *,
        max_num_seqs: int,
        max_queue: int,
        observer: EngineObserver | None = None,
    ) -> None:
        self.engine_args, self.tokenizer, self.info = engine_args, tokenizer, info
        self.observer = observer or EngineObserver()
        self._capacity = max_num_seqs + max_queue
        self._llm: AsyncLLM | None = None
        self._live: dict[str, GenerationRequest] = {}
        self._stats = EngineStats(running=0, waiting=0, kv_usage=0.0)
        self._accepting = True
        self._ready = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- AsyncEngine ---------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self._llm is None or not self._accepting or self._llm.errored:
            raise EngineDead("the engine is not running")
        if len(self._live) >= self._capacity:
            raise QueueFull()
        params = self._sampling_params(request)
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_ids))
        salt = cache_salt((params.extra_args or {}).get(EXTRA_ARGS_KEY))
        if salt is not None:
            prompt["cache_salt"] = salt
        self._live[request.request_id] = request
        return self._stream(request, prompt, params)

    def abort(self, request_id: str) -> None:
        if request_id in self._live:
            self._abort_soon(request_id)

    @property
    def max_requests(self) -> int:
        return self._capacity

    @property
    def ready(self) -> bool:
        return self._ready and self._llm is not None and not self._llm.errored

    def stats(self) -> EngineStats:
        """vLLM's last scheduler numbers, bounded by the requests this server still holds: vLLM reports
        them per engine step, so after the last request leaves (finish or abort) no newer report comes."""
        live = len(self._live)
        s = self._stats
        running = min(s.running, live)
        return EngineStats(running=running, waiting=min(s.waiting, live - running), kv_usage=s.kv_usage)

    async def start(self) -> None:
        # vLLM starts its engine-core and worker processes here (minutes on CPU, compiling); the event loop
        # keeps answering /health meanwhile.
        self._llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args, self.engine_args, stat_loggers=[self._stat_logger]
        )
        dtype = str(self._llm.vllm_config.model_config.dtype).removeprefix("torch.")
        self.info = dataclasses.replace(self.info, dtype=dtype)
        await warm_up(self)
        self._ready = True

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._live and time.monotonic() < deadline and self.ready:
            await asyncio.sleep(0.05)
        llm, self._llm = self._llm, None
        self._ready = False
        if llm is not None:
            for rid in list(self._live):
                await llm.abort(rid)
            await asyncio.to_thread(llm.shutdown)

    # ---- internals -----------------------------------------------------------------------
    def _stat_logger(self, vllm_config: Any, engine_index: int = 0) -> StatLoggerBase:
        return _StatsSink(self)

    def _sampling_params(self, request: GenerationRequest) -> VllmSamplingParams:
        p = request.sampling
        steer = encode(request.steer, len(request.prompt_ids))
        return VllmSamplingParams(
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=p.seed,
            stop=list(p.stop) or None,
            stop_token_ids=list(p.stop_token_ids) or None,
            ignore_eos=p.ignore_eos,
            logprobs=p.top_logprobs if p.logprobs else None,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            logit_bias=dict(p.logit_bias) or None,
            structured_outputs=_structured(p.grammar),
            output_kind=RequestOutputKind.DELTA,
            extra_args=None if steer is None else {EXTRA_ARGS_KEY: steer},
        )

    async def _stream(
        self, request: GenerationRequest, prompt: TokensPrompt, params: VllmSamplingParams
    ) -> AsyncIterator[GenerationOutput]:
        assert self._llm is not None
        rid = request.request_id
        completion = 0
        last_at = first_at = 0.0
        finished = False
        try:
            async for ro in _grammar_checked(self._llm.generate(prompt, params, rid), request):
                now = time.monotonic()
                c = ro.outputs[0]
                completion += len(c.token_ids)
                if c.token_ids:
                    if not first_at:
                        first_at = now
                        self.observer.on_first_token(request, now - request.arrival_time, _queued_s(ro))
                    else:
                        self.observer.on_token(request, now - last_at)
                    last_at = now
                reason = _FINISH.get(c.finish_reason) if c.finish_reason else None
                if c.finish_reason and reason is None:
                    reason = FinishReason.ERROR
                out = GenerationOutput(
                    request_id=rid,
                    token_ids=tuple(c.token_ids),
                    text=c.text,
                    logprobs=self._logprobs(c, params.logprobs) if params.logprobs is not None else (),
                    finish_reason=reason,
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=completion,
                    cached_tokens=ro.num_cached_tokens,
                    error="generation failed" if reason == FinishReason.ERROR else None,
                )
                if reason is not None:
                    finished = True
                    self.observer.on_finish(request, out, now - request.arrival_time)
                yield out
                if finished:
                    return
        except EngineDeadError:
            log.exception("vLLM's engine died")
            finished = True
            yield GenerationOutput(
                request_id=rid,
                token_ids=(),
                text="",
                finish_reason=FinishReason.ERROR,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=completion,
                error="the engine failed",
            )
        finally:
            self._live.pop(rid, None)
            if not finished:  # the consumer went away (vLLM aborts a cancelled generate() too; idempotent)
                self._abort_soon(rid)

    def _abort_soon(self, request_id: str) -> None:
        """`AsyncLLM.abort` is a coroutine; ours is called from sync code (finally blocks, close())."""
        if self._llm is None:
            return
        task = asyncio.get_running_loop().create_task(self._llm.abort(request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _logprobs(self, c: Any, top_n: int) -> tuple[TokenLogprob, ...]:
        if not c.logprobs:
            return ()
        out = []
        for token_id, entries in zip(c.token_ids, c.logprobs, strict=False):
            chosen = entries.get(token_id)
            top = sorted(
                ((t, lp) for t, lp in entries.items() if lp.rank is not None and 1 <= lp.rank <= top_n),
                key=lambda item: item[1].rank,
            )
            out.append(
                TokenLogprob(
                    token_id,
                    self._text(token_id),
                    chosen.logprob if chosen is not None else float("-inf"),
                    tuple((t, self._text(t), lp.logprob) for t, lp in top),
                )
            )
        return tuple(out)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode(
            [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )


class _StatsSink(StatLoggerBase):
    """vLLM's per-step scheduler stats -> the engine's running/waiting/KV gauges and step metrics."""

    def __init__(self, engine: VllmEngine) -> None:
        self.engine = engine

    def record(
        self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
    ):
        if scheduler_stats is not None:
            self.engine._stats = EngineStats(
                running=scheduler_stats.num_running_reqs,
                waiting=scheduler_stats.num_waiting_reqs,
                kv_usage=float(scheduler_stats.kv_cache_usage),
            )
            if iteration_stats is not None:
                self.engine.observer.on_step(
                    scheduler_stats.num_running_reqs, int(getattr(iteration_stats, "num_prompt_tokens", 0))
                )

    def log_engine_initialized(self) -> None: ...


def _queued_s(ro: Any) -> float:
    """Seconds the request waited in vLLM's scheduler before its first step (engine-core timestamps of
    one clock; 0 when vLLM keeps no per-request stats)."""
    m = getattr(ro, "metrics", None)
    queued, scheduled = getattr(m, "queued_ts", 0.0), getattr(m, "scheduled_ts", 0.0)
    return max(0.0, scheduled - queued) if queued and scheduled else 0.0


def _structured(grammar: Grammar | None) -> StructuredOutputsParams | None:
    """The grammar under vLLM's own names; vLLM's configured backend compiles it."""
    if grammar is None:
        return None
    if grammar.kind == "json_schema":
        return StructuredOutputsParams(json=json.loads(grammar.source))
    if grammar.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if grammar.kind == "regex":
        return StructuredOutputsParams(regex=grammar.source)
    if grammar.kind == "choice":
        return StructuredOutputsParams(choice=json.loads(grammar.source))
    return StructuredOutputsParams(grammar=grammar.source)


async def _grammar_checked(outputs: AsyncIterator[Any], request: GenerationRequest) -> AsyncIterator[Any]:
    """vLLM rejects a grammar its backend cannot compile with a ValueError when the request is added:
    that is the client's 400 (GrammarError), not a server error."""
    grammar = request.sampling.grammar
    started = False
    try:
        async for out in outputs:
            started = True
            yield out
    except ValueError as e:
        if grammar is None or started:
            raise
        raise GrammarError(grammar.param, str(e)[:1000]) from None
