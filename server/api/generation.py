"""Running a prepared generation and answering: `serve_generation` (the one pipeline of chat and legacy
completions: parse -> prepare in a worker thread -> stream or collect) and `Generation`, which drives the
engine requests of one HTTP request and guarantees that every unfinished one is aborted when the client
goes away, an error occurs or the response generator is closed. Each endpoint only renders its prompt
and shapes its own responses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from ctxsteer.server.api import sse
from ctxsteer.server.api.body import read_json
from ctxsteer.server.api.serving import Prepared, ServingContext, get_context, new_id
from ctxsteer.server.engine.interface import AsyncEngine
from ctxsteer.server.engine.request import FinishReason, GenerationOutput
from ctxsteer.server.errors import SERVER_ERROR, CtxsteerError, error_payload, generation_failed
from ctxsteer.server.responses import (
    ChoiceContextAttention,
    ContextAttention,
    ContextIndicatorInfo,
    PromptTokensDetails,
    UsageInfo,
)

LOGPROB_FLOOR = -9999.0  # -inf is not JSON; OpenAI clients expect a number


async def serve_generation(
    request: Request,
    model: type[Any],
    id_prefix: str,
    prepare: Callable[[ServingContext, Any, str], Prepared],
    stream: Callable[..., AsyncIterator[bytes]],
    collect: Callable[..., Awaitable[BaseModel]],
    resolve: Callable[[ServingContext, Any], Awaitable[Any]] | None = None,
) -> Response:
    """The pipeline of both generation endpoints: parse and check the body, `resolve` what needs the
    engine first (chat: steering.spans "auto"), `prepare` off the event loop (tokenizer work), then answer
    with SSE frames (`stream`) or one JSON body (`collect`)."""
    ctx = get_context(request)
    req = await read_json(request, model)
    ctx.check_model(req.model)
    ctx.check_choices(req.num_choices)
    if resolve is not None:
        req = await resolve(ctx, req)
    response_id = new_id(id_prefix)
    prepared = await ctx.run_sync(prepare, ctx, req, response_id)
    return await respond(request, ctx, req, response_id, prepared, stream, collect)


async def collect_choices(
    gen: Generation, n: int, on_output: Callable[[int, GenerationOutput], None]
) -> tuple[list[str], list[str | None]]:
    """Drain a non-streamed generation: each choice's text and finish reason (`on_output` sees every
    output, e.g. for logprobs)."""
    texts: list[list[str]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    while not gen.done:
        i, out = await gen.next_event()
        texts[i].append(out.text)
        on_output(i, out)
        if out.finish_reason is not None:
            finish[i] = str(out.finish_reason)
    return ["".join(t) for t in texts], finish


def clamp_logprob(x: float) -> float:
    return x if x > LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN to the floor


_END = object()
_DISCONNECTED = object()


class Generation:
    """The engine requests of one HTTP request, merged into one stream of `(choice, output)` events.

    Each engine iterator is pumped by its own task into one queue, next to a watcher of the client
    connection, so a disconnect is noticed even while no token is being sent. `close()` is synchronous
    on purpose: it runs in `finally` blocks of cancelled tasks, where anyio would cancel any await.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        prepared: Prepared,
        receive: Receive | None,
        *,
        report_context: bool = False,
    ) -> None:
        self.engine = engine
        self.prepared = prepared
        self.requests = list(prepared.requests)
        self.finished = [False] * len(self.requests)
        self.completion_tokens = [0] * len(self.requests)
        self.report_context = report_context
        # per choice: token index -> (as served, as if unsteered) context attention
        self.context: list[dict[int, tuple[float, float]]] = [{} for _ in self.requests]
        self.indicator_mode = prepared.indicator_mode
        self.indicator: tuple[bool, float] | None = None  # the engine's "auto" decision
        self.auto_strength: tuple[float, float, float] | None = None  # strength "auto": the engine's pick
        self.cached_tokens: int | None = None  # prefix-cache hits of the (shared) prompt, if reported
        # The prompt as served: an engine may re-plan it (an "auto" [IND] marker adds a token) and reports
        # the count in its outputs; the request itself is never changed.
        self.served_prompt = len(self.requests[0].prompt_ids)
        self._receive = receive
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._started: list[str] = []
        self._closed = False

    @property
    def done(self) -> bool:
        return all(self.finished)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens, plus its context-free twin's with CAD (computed as well)."""
        first = self.requests[0]
        return self.served_prompt + (len(first.cad.free_ids) if first.cad is not None else 0)

    def usage(self) -> UsageInfo:
        completion = sum(self.completion_tokens)
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=None
            if self.cached_tokens is None
            else PromptTokensDetails(cached_tokens=self.cached_tokens),
        )

    def extras(self) -> dict[str, Any]:
        """ctxsteer's top-level response fields: `steering` (with the engine's strength "auto" pick);
        `context_attention` when asked for; `context_indicator` on models that have the indicator."""
        steering = self.prepared.steering(self.auto_strength)
        out: dict[str, Any] = {"steering": steering}
        if self.report_context:
            out["context_attention"] = self.context_report(steering.steered_tokens)
        if self.indicator_mode is not None:
            out["context_indicator"] = self.indicator_report()
        return out

    def indicator_report(self) -> ContextIndicatorInfo:
        mode = self.indicator_mode
        if mode == "auto" and self.indicator is not None:
            applied, ratio = self.indicator
            threshold = self.requests[0].indicator.threshold if self.requests[0].indicator else None
            return ContextIndicatorInfo(
                mode=mode, applied=applied, ratio=round(ratio, 6), threshold=threshold
            )
        return ContextIndicatorInfo(mode=mode or "off", applied=mode == "on")

    def context_report(self, context_tokens: int) -> ContextAttention:
        def mean(xs: list[float]) -> float | None:
            return round(sum(xs) / len(xs), 6) if xs else None

        choices, served, plain = [], [], []
        for i, values in enumerate(self.context):
            s = [round(values[k][0], 6) for k in sorted(values)]
            u = [round(values[k][1], 6) for k in sorted(values)]
            served += s
            plain += u
            choices.append(
                ChoiceContextAttention(
                    index=i, ratio=mean(s), unsteered_ratio=mean(u), per_token=s, unsteered_per_token=u
                )
            )
        return ContextAttention(
            ratio=mean(served), unsteered_ratio=mean(plain), context_tokens=context_tokens, choices=choices
        )

    def start(self) -> None:
        """Admit every request now (QueueFull/EngineDead surface here, before any response is sent)."""
        try:
            for i, req in enumerate(self.requests):
                iterator = self.engine.generate(req)
                self._started.append(req.request_id)
                self._tasks.append(asyncio.create_task(self._pump(i, iterator)))
        except BaseException:
            self.close()
            raise
        if self._receive is not None:
            self._tasks.append(asyncio.create_task(self._watch(self._receive)))

    async def next_event(self) -> tuple[int, GenerationOutput]:
        """The next output of any choice. Raises ClientDisconnect, the engine's error, or a CtxsteerError
        for outputs that finished with `error`/`abort` (which a connected client must not see as text)."""
        while True:
            item = await self._queue.get()
            if item is _DISCONNECTED:
                raise ClientDisconnect()
            i, payload = item
            if payload is _END:
                if not self.finished[i]:  # the iterator stopped without a finish_reason
                    raise CtxsteerError(
                        500, "The generation ended unexpectedly.", SERVER_ERROR, code="engine_error"
                    )
                continue
            if isinstance(payload, BaseException):
                raise payload  # close() still aborts request i: abort() is idempotent
            out: GenerationOutput = payload
            self.served_prompt = max(self.served_prompt, out.prompt_tokens)
            if out.cached_tokens is not None:
                self.cached_tokens = max(self.cached_tokens or 0, out.cached_tokens)
            self.completion_tokens[i] = max(
                self.completion_tokens[i] + len(out.token_ids), out.completion_tokens
            )
            if out.indicator is not None:
                self.indicator = out.indicator
            if out.auto_strength is not None:
                self.auto_strength = out.auto_strength
            first = out.completion_tokens - len(out.context_attention)  # index of the first value's token
            for j, value in enumerate(out.context_attention):
                self.context[i][first + j] = value
            if out.finish_reason is not None:
                self.finished[i] = True
                if out.finish_reason == FinishReason.ERROR:
                    raise generation_failed(out)  # 500, or the request's own 400 (errors.py decides)
                if out.finish_reason == FinishReason.ABORT:
                    msg = "The request was cancelled by the server (shutting down?)."
                    raise CtxsteerError(503, msg, SERVER_ERROR, code="request_aborted")
            return i, out

    def close(self) -> None:
        """Abort unfinished engine requests and stop the pump/watcher tasks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for i, req in enumerate(self.requests):
            if req.request_id in self._started and not self.finished[i]:
                self.engine.abort(req.request_id)
        for task in self._tasks:
            task.cancel()

    async def _pump(self, i: int, iterator: Any) -> None:
        try:
            async for out in iterator:
                self._queue.put_nowait((i, out))
        except Exception as exc:  # handed to the consumer, which maps it to a response
            self._queue.put_nowait((i, exc))
        else:
            self._queue.put_nowait((i, _END))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._queue.put_nowait(_DISCONNECTED)
                return


async def respond(
    request: Request,
    ctx: ServingContext,
    req: Any,
    response_id: str,
    prepared: Prepared,
    stream: Callable[..., AsyncIterator[str]],
    collect: Callable[..., Awaitable[BaseModel]],
) -> Response:
    """Run the generation and answer with SSE frames (`stream`) or one JSON body (`collect`)."""
    gen = Generation(ctx.engine, prepared, request.receive, report_context=req.wants_context_attention())
    gen.start()
    base = {"id": response_id, "model": ctx.model_name, "created": int(time.time())}
    if req.stream:
        try:
            first = await gen.next_event()  # so that an immediate failure is still a real HTTP status
        except BaseException:
            gen.close()
            raise
        frames = stream(base, req, gen, first)
        return StreamingResponse(frames, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    try:
        body = await collect(base, req, gen)
    finally:
        gen.close()
    return JSONResponse(body.model_dump(mode="json"))


async def sse_body(
    gen: Generation,
    first: tuple[int, GenerationOutput],
    *,
    frame_for: Callable[[int, GenerationOutput, bool], bytes | None],
    usage_frame: Callable[[], bytes] | None,
    head: Sequence[bytes] = (),
) -> AsyncIterator[bytes]:
    """The SSE body both endpoints send: `head`, one frame per engine event that `frame_for(choice, out,
    last)` turns into one (`last`: no choice frame follows), the usage frame when asked for, `[DONE]`.

    An error after the 200 headers can only be reported as an error frame; a client that went away is
    not written to; closing the iterator aborts what is still generating.
    """
    try:
        for data in head:
            yield data
        event: tuple[int, GenerationOutput] | None = first
        while event is not None:
            data = frame_for(*event, gen.done and usage_frame is None)
            if data is not None:
                yield data
            event = None if gen.done else await gen.next_event()
        if usage_frame is not None:
            yield usage_frame()
        yield sse.DONE
    except ClientDisconnect:
        return
    except Exception as exc:  # noqa: BLE001
        yield sse.error_frame(error_payload(exc))
        yield sse.DONE
    finally:
        gen.close()
