"""What the endpoints share: the per-app serving context, the one generation pipeline of chat and legacy
completions (`serve_generation`: parse -> prepare in a worker thread (`prepare_generation` fans out n
engine requests) -> stream or collect), and `Generation`, which drives the engine requests of one HTTP
request and guarantees that every unfinished one is aborted when the client goes away, an error occurs or
the response generator is closed. Each endpoint only renders its prompt and shapes its own responses.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from ctxsteer.server.api import sse
from ctxsteer.server.api.body import read_json
from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.interface import AsyncEngine
from ctxsteer.server.engine.request import FinishReason, GenerationOutput, GenerationRequest, SteerRow
from ctxsteer.server.errors import (
    SERVER_ERROR,
    CtxsteerError,
    bad_request,
    context_too_long,
    error_payload,
    model_not_found,
)
from ctxsteer.server.protocol import (
    AutoStrengthInfo,
    ChoiceContextAttention,
    ContextAttention,
    ContextIndicatorInfo,
    PromptTokensDetails,
    SteeringInfo,
    UsageInfo,
)
from ctxsteer.steering.cad import CadPlan, context_free_ids
from ctxsteer.steering.indicator import IndicatorPlan, insertion_point, mark_messages
from ctxsteer.steering.spans import RenderedPrompt, render_chat, steered_ranges
from ctxsteer.steering.spec import HeadMap, SteeringSpec, parse_steering

T = TypeVar("T")
Range = tuple[int, int]
LOGPROB_FLOOR = -9999.0  # -inf is not JSON; OpenAI clients expect a number


@dataclass
class ServingContext:
    """Everything a route needs, built once by `build_app` and kept on `app.state.serving`."""

    config: ServerConfig
    engine: AsyncEngine
    model_name: str
    head_profiles: dict[str, HeadMap] | None = None
    created: int = 0
    start_error: str | None = None  # the engine failed to start: the process is alive but cannot serve
    # Tokenization runs off the event loop, one call at a time: HF fast tokenizers are not safe to
    # reconfigure concurrently and rendering is cheap next to generation.
    tokenize_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
    indicator_id: int | None = None  # the tokenizer's `[IND]` token (models fine-tuned with it)

    @property
    def max_model_len(self) -> int:
        return self.engine.info.max_model_len

    def check_model(self, name: str | None) -> None:
        """Clients may omit `model`; a different name is a 404 like OpenAI's."""
        if name and name != self.model_name:
            raise model_not_found(name)

    def check_choices(self, n: int) -> None:
        """`n` beyond what the engine can ever hold would be refused forever: a 400 saying the limit,
        not a 429 inviting a retry."""
        limit = self.engine.max_requests
        if n > limit:
            raise bad_request(
                f"n={n} is more choices than this server can ever run at once (at most {limit}).",
                "n",
                "n_too_large",
            )

    def parse_spec(self, obj: dict[str, Any] | None) -> SteeringSpec:
        info = self.engine.info
        spec = parse_steering(
            obj,
            num_layers=info.num_layers,
            num_heads=info.num_heads,
            head_profiles=self.head_profiles,
            default_strength=self.config.default_steering_strength,
        )
        if (spec.active or spec.auto is not None) and info.steering_unsupported:
            raise bad_request(info.steering_unsupported, "steering", "steering_unsupported")
        if spec.cad and not info.cad:
            raise bad_request(
                f"steering.method {spec.method!r} (context-aware decoding) needs the local engine with "
                "--max-num-seqs of at least 2 (its context-free twin takes a second row); this server "
                "cannot run it.",
                "steering.method",
                "unsupported_method",
            )
        if spec.auto is not None and not info.context_attention:
            raise bad_request(
                'steering.strength "auto" measures the prompt\'s attention during prefill, which this engine '
                "(--engine vllm) does not; give a number.",
                "steering.strength",
                "unsupported_auto_strength",
            )
        return spec

    def indicator_mode(self, requested: str | None) -> str:
        """The request's context_indicator mode (the server's default when it gives none); 400 when it
        asks for the indicator on a model whose tokenizer has no `[IND]` token."""
        mode = requested or self.config.context_indicator
        if mode != "off" and self.indicator_id is None:
            raise bad_request(
                f"context_indicator {mode!r} needs a model fine-tuned with the [IND] token; this model's "
                'tokenizer has none. Send "off" or leave it out.',
                "context_indicator",
                "indicator_unavailable",
            )
        if mode == "auto" and not self.engine.info.context_attention:
            raise bad_request(
                'context_indicator "auto" measures the prompt\'s attention during prefill, which this engine '
                '(--engine vllm) does not; send "on" or "off".',
                "context_indicator",
                "unsupported_indicator_mode",
            )
        return mode

    def watch_context(self, requested: bool) -> bool:
        """Whether to measure a request's context attention: asked for in `report`, or sampled (at
        --context-attention-sample-rate) for the ratio histogram, on engines that measure it."""
        if not self.engine.info.context_attention:
            if requested:
                raise bad_request(
                    "report.context_attention is not available with this engine (the local engine "
                    "measures it; --engine vllm does not).",
                    "report.context_attention",
                    "unsupported_report",
                )
            return False
        rate = self.config.context_attention_sample_rate
        return requested or (rate > 0 and random.random() < rate)

    async def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizer work in a worker thread so a long prompt never stalls other streams."""
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=self.tokenize_limiter)


def get_context(request: Request) -> ServingContext:
    return request.app.state.serving


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def resolve_max_tokens(
    prompt_tokens: int, requested: int | None, max_model_len: int, *, default: int | None, prompt_param: str
) -> int:
    """max_tokens for the engine; 400 naming both numbers when the request cannot fit the context."""
    room = max_model_len - prompt_tokens
    if room < 1:
        raise context_too_long(prompt_tokens, None, max_model_len, prompt_param)
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise context_too_long(prompt_tokens, requested, max_model_len, "max_tokens")
    return requested


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request, ready for the engine: one engine request per choice, and the steering report."""

    steering: SteeringInfo
    requests: list[GenerationRequest]
    indicator_mode: str | None = None  # chat only: the context_indicator mode, reported in the response


@dataclass(frozen=True, slots=True)
class MarkedPrompt:
    """The prompt with `[IND]` inserted, for context_indicator "auto" (the engine decides which runs)."""

    rendered: RenderedPrompt
    messages: list[dict[str, Any]]
    insert_at: int


def render_with_indicator(
    ctx: ServingContext, messages: list[dict[str, Any]], mode: str, options: dict[str, Any]
) -> tuple[RenderedPrompt, list[dict[str, Any]], MarkedPrompt | None]:
    """Render a chat for its context_indicator mode: "on" marks the last user turn, "auto" also renders
    the marked variant and where the indicator token lands in it."""
    tokenizer = ctx.engine.tokenizer
    if mode == "on":
        messages = mark_messages(messages)
    rendered = render_chat(tokenizer, messages, **options)
    if mode != "auto":
        return rendered, messages, None
    assert ctx.indicator_id is not None
    marked_messages = mark_messages(messages)
    marked = render_chat(tokenizer, marked_messages, **options)
    at = insertion_point(rendered.ids, marked.ids, ctx.indicator_id)
    return rendered, messages, MarkedPrompt(marked, marked_messages, at)


def prepare_generation(
    ctx: ServingContext,
    req: Any,
    response_id: str,
    rendered: RenderedPrompt,
    messages: Sequence[dict[str, Any]] | None,
    spec: SteeringSpec,
    *,
    default_max_tokens: int | None,
    prompt_param: str,
    indicator_mode: str | None = None,
    marked: MarkedPrompt | None = None,
) -> Prepared:
    """Size max_tokens (before any span work: an oversized prompt costs no more), locate the steered
    tokens, fan out the n choices. With `marked` (context_indicator "auto") both prompts must fit."""
    n_prompt = len(rendered.ids)
    longest = len(marked.rendered.ids) if marked is not None else n_prompt
    max_tokens = resolve_max_tokens(
        longest, req.requested_max_tokens(), ctx.max_model_len, default=default_max_tokens,
        prompt_param=prompt_param,
    )  # fmt: skip
    steered = steered_ranges(rendered, messages, spec)
    row = steer_row(spec, steered)
    plan = None
    if marked is not None:
        marked_row = steer_row(spec, steered_ranges(marked.rendered, marked.messages, spec))
        threshold = ctx.config.context_indicator_threshold
        plan = IndicatorPlan(marked.insert_at, tuple(marked.rendered.ids), marked_row, threshold)
    watch = ctx.watch_context(req.wants_context_attention())
    cad = None
    if spec.cad_beta is not None:
        free = context_free_ids(rendered.ids, steered)
        if not free:
            raise bad_request(
                "steering.method with CAD contrasts the prompt with the prompt without its steered tokens, "
                "but every prompt token is steered here; steer only the context (e.g. steering.spans).",
                "steering.method",
                "nothing_outside_context",
            )
        cad = CadPlan(tuple(free), spec.cad_beta)
    requests = [
        GenerationRequest(
            request_id=f"{response_id}-{i}",
            prompt_ids=rendered.ids,
            sampling=req.to_sampling_params(max_tokens=max_tokens, choice=i),
            steer=row,
            watch_context=watch,
            indicator=plan,
            auto_strength=spec.auto,
            cad=cad,
        )
        for i in range(req.num_choices)
    ]
    return Prepared(steering_info(spec, steered, n_prompt), requests, indicator_mode)


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


def steer_row(spec: SteeringSpec, steered: Sequence[Range]) -> SteerRow:
    return SteerRow(alpha=spec.alpha, steered=tuple(steered), layers=spec.layers, heads=spec.heads)


def steering_info(spec: SteeringSpec, steered: Sequence[Range], prompt_tokens: int) -> SteeringInfo:
    """What the request asked for; with strength "auto" the engine's choice replaces strength/alpha
    (`Generation.extras`)."""
    auto = spec.auto
    return SteeringInfo(
        strength=spec.strength,
        alpha=spec.alpha,
        steered_tokens=sum(e - s for s, e in steered),
        prompt_tokens=prompt_tokens,
        layers="all" if spec.layers is None else list(spec.layers),
        method=spec.method,
        cad_beta=spec.cad_beta,
        auto=None
        if auto is None
        else AutoStrengthInfo(target_ratio=auto.target_ratio, max_strength=auto.max_strength),
    )


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
        requests: Sequence[GenerationRequest],
        receive: Receive | None,
        *,
        report_context: bool = False,
        indicator_mode: str | None = None,
    ) -> None:
        self.engine = engine
        self.requests = list(requests)
        self.finished = [False] * len(self.requests)
        self.completion_tokens = [0] * len(self.requests)
        self.report_context = report_context
        # per choice: token index -> (as served, as if unsteered) context attention
        self.context: list[dict[int, tuple[float, float]]] = [{} for _ in self.requests]
        self.indicator_mode = indicator_mode
        self.indicator: tuple[bool, float] | None = None  # the engine's "auto" decision
        self.auto_strength: tuple[float, float, float] | None = None  # strength "auto": the engine's pick
        self.cached_tokens: int | None = None  # prefix-cache hits of the (shared) prompt, if reported
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
        return len(first.prompt_ids) + (len(first.cad.free_ids) if first.cad is not None else 0)

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

    def extras(self, steering: SteeringInfo) -> dict[str, Any]:
        """ctxsteer's top-level response fields: `steering`; `context_attention` when asked for;
        `context_indicator` on models that have the indicator."""
        if self.auto_strength is not None and steering.auto is not None:
            strength, unsteered, predicted = self.auto_strength
            auto = steering.auto.model_copy(
                update={"unsteered_ratio": round(unsteered, 6), "predicted_ratio": round(predicted, 6)}
            )
            steering = steering.model_copy(
                update={"strength": strength, "alpha": 1.0 / strength, "auto": auto}
            )
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
                    msg = out.error or "The generation failed."
                    raise CtxsteerError(500, msg, SERVER_ERROR, code="generation_error")
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
    gen = Generation(
        ctx.engine,
        prepared.requests,
        request.receive,
        report_context=req.wants_context_attention(),
        indicator_mode=prepared.indicator_mode,
    )
    steering = prepared.steering
    gen.start()
    base = {"id": response_id, "model": ctx.model_name, "created": int(time.time())}
    if req.stream:
        try:
            first = await gen.next_event()  # so that an immediate failure is still a real HTTP status
        except BaseException:
            gen.close()
            raise
        frames = stream(base, req, steering, gen, first)
        return StreamingResponse(frames, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    try:
        body = await collect(base, req, steering, gen)
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
