"""POST /v1/chat/completions: validate -> render with the chat template -> steered token ranges ->
one engine request per choice -> a ChatCompletion, or a stream of chat.completion.chunk SSE frames.

Every response carries a top-level `steering` object (what was applied) next to the OpenAI fields;
stream responses put it on their last chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ctxsteer.server.api import sse
from ctxsteer.server.api.auto_spans import resolve_auto_spans
from ctxsteer.server.api.generation import (
    Generation,
    clamp_logprob,
    collect_choices,
    serve_generation,
    sse_body,
)
from ctxsteer.server.api.serving import (
    Prepared,
    ServingContext,
    get_context,
    prepare_generation,
    render_with_indicator,
)
from ctxsteer.server.engine.request import TokenLogprob
from ctxsteer.server.errors import bad_request
from ctxsteer.server.protocol import ChatCompletionRequest
from ctxsteer.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    DeltaToolCall,
    TokenLogprobInfo,
    TopLogprob,
)
from ctxsteer.server.tools.constrain import constrained_parser
from ctxsteer.server.tools.output import ToolStream, finish_reason, parse_output, piece_deltas, tool_calls
from ctxsteer.server.tools.parsers import ToolCallParser, pick_parser

router = APIRouter()


def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest, response_id: str) -> Prepared:
    """Tokenizer-bound work, run in a worker thread: render with the chat template, then the shared steps."""
    spec = ctx.parse_spec(req.steering_object())
    mode = ctx.indicator_mode(req.context_indicator)
    if mode == "auto" and spec.cad:
        raise bad_request(
            'context_indicator "auto" and a CAD steering.method cannot be combined yet: the indicator would '
            "change the prompt after its context-free twin was made; fix one of them.",
            "context_indicator",
            "unsupported_combination",
        )
    if mode == "auto" and spec.auto is not None:
        raise bad_request(
            'context_indicator "auto" and steering.strength "auto" cannot be combined yet; fix one of them.',
            "context_indicator",
            "unsupported_combination",
        )
    rendered, messages, marked = render_with_indicator(
        ctx, req.render_messages(), mode, req.template_options()
    )
    return prepare_generation(
        ctx, req, response_id, rendered, messages, spec, default_max_tokens=None, prompt_param="messages",
        indicator_mode=mode if ctx.indicator_id is not None else None, marked=marked,
        auto_spans=req._auto_spans,  # steering.spans "auto": reported with what it cost
    )  # fmt: skip


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(request: Request) -> Response:
    ctx = get_context(request)
    stream, collect = partial(_stream, ctx), partial(_collect, ctx)
    return await serve_generation(
        request, ChatCompletionRequest, "chatcmpl", prepare_chat, stream, collect, resolve_auto_spans
    )


def tool_parser(ctx: ServingContext, req: ChatCompletionRequest) -> ToolCallParser | None:
    """How this request's output becomes tool calls; None when it cannot call any (no tools, or
    tool_choice "none"). A forced call (named, "required") was constrained to JSON; "auto" is free text
    in the model's own format (--tool-call-parser, else guessed from the chat template)."""
    choice = req.tool_choice or "auto"  # OpenAI's default with tools
    if not req.tools or choice == "none":
        return None
    forced = constrained_parser(choice if isinstance(choice, str) else choice.model_dump(exclude_none=True))
    if forced is not None:
        return forced
    return pick_parser(ctx.config.tool_call_parser, ctx.engine.tokenizer)


def _parallel(req: ChatCompletionRequest) -> bool:
    return req.parallel_tool_calls is not False  # OpenAI's default: allowed


def count_calls(ctx: ServingContext, n: int) -> None:
    if n and ctx.on_tool_calls is not None:
        ctx.on_tool_calls(n)


def chat_logprobs(logprobs: Sequence[TokenLogprob], top_n: int) -> list[TokenLogprobInfo]:
    return [
        TokenLogprobInfo(
            token=lp.token,
            logprob=clamp_logprob(lp.logprob),
            bytes=list(lp.token.encode("utf-8")),
            top_logprobs=[
                TopLogprob(token=tok, logprob=clamp_logprob(x), bytes=list(tok.encode("utf-8")))
                for _, tok, x in lp.top[:top_n]
            ],
        )
        for lp in logprobs
    ]


async def _collect(
    ctx: ServingContext, base: dict[str, Any], req: ChatCompletionRequest, gen: Generation
) -> ChatCompletionResponse:
    n = req.num_choices
    logprobs: list[list[TokenLogprobInfo]] = [[] for _ in range(n)]
    top_n = req.top_logprobs or 0

    def on_output(i: int, out: Any) -> None:
        if req.logprobs:
            logprobs[i].extend(chat_logprobs(out.logprobs, top_n))

    texts, finish = await collect_choices(gen, n, on_output)
    parser, parallel = tool_parser(ctx, req), _parallel(req)
    choices = []
    for i in range(n):
        message, reason = AssistantMessage(content=texts[i]), finish[i]
        if parser is not None:
            content, calls = parse_output(parser, texts[i], parallel)
            if calls:
                message = AssistantMessage(content=content, tool_calls=tool_calls(calls))
                reason = finish_reason(reason, calls)
                count_calls(ctx, len(calls))
        logs = ChoiceLogprobs(content=logprobs[i]) if req.logprobs else None
        choices.append(ChatChoice(index=i, message=message, logprobs=logs, finish_reason=reason))
    return ChatCompletionResponse(**base, choices=choices, usage=gen.usage(), **gen.extras())


def _chunk_choices(
    i: int, text: str, logprobs: ChoiceLogprobs | None, calls: list[DeltaToolCall], finish: str | None
) -> list[ChatChunkChoice]:
    """One engine output of choice `i` as chunk choices: its content (and logprobs), then one chunk per
    call delta; the last carries the finish reason. None of them when there is nothing to say."""
    deltas = [DeltaMessage(tool_calls=[d]) for d in calls]
    if text or logprobs is not None or not deltas:
        deltas.insert(0, DeltaMessage(content=text or None))
    if not (text or logprobs is not None or calls or finish is not None):
        return []
    return [
        ChatChunkChoice(
            index=i,
            delta=delta,
            logprobs=logprobs if k == 0 else None,
            finish_reason=finish if k == len(deltas) - 1 else None,
        )
        for k, delta in enumerate(deltas)
    ]


def _stream(
    ctx: ServingContext,
    base: dict[str, Any],
    req: ChatCompletionRequest,
    gen: Generation,
    first: tuple[int, Any],
) -> AsyncIterator[bytes]:
    """SSE frames: a role chunk per choice, content chunks, finish chunks, optional usage chunk, [DONE].
    The `steering` object rides on the last chunk before [DONE]. With tools, each choice's text goes
    through a `ToolStream`: a forced call's deltas as it is generated; free text as content while it
    cannot be a call, then the calls' deltas before the finish."""
    parser = tool_parser(ctx, req)
    streams = [ToolStream(parser, _parallel(req)) for _ in range(req.num_choices)] if parser else None

    def chunk(choices: list[ChatChunkChoice], **extra: Any) -> bytes:
        return sse.frame(ChatCompletionChunk(**base, choices=choices, **extra))

    def frame_for(i: int, out: Any, last: bool) -> bytes | None:
        lps = chat_logprobs(out.logprobs, req.top_logprobs or 0) if req.logprobs else None
        text, finish = out.text, None if out.finish_reason is None else str(out.finish_reason)
        calls: list[DeltaToolCall] = []
        if streams is not None:
            text, parts = streams[i].feed(out.text)
            if finish is not None:
                rest, more, parsed = streams[i].finish()
                text, parts, finish = text + rest, parts + more, finish_reason(finish, parsed)
                count_calls(ctx, len(parsed))
            calls = piece_deltas(parts)
        pieces = _chunk_choices(i, text, ChoiceLogprobs(content=lps) if lps else None, calls, finish)
        return (
            b"".join(chunk([p], **(gen.extras() if last and p is pieces[-1] else {})) for p in pieces) or None
        )

    roles = [
        chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        for i in range(req.num_choices)
    ]

    def usage() -> bytes:
        return chunk([], usage=gen.usage(), **gen.extras())

    return sse_body(
        gen, first, frame_for=frame_for, usage_frame=usage if req.include_usage else None, head=roles
    )
