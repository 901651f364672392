"""POST /v1/chat/completions: validate -> render with the chat template -> steered token ranges ->
one engine request per choice -> a ChatCompletion, or a stream of chat.completion.chunk SSE frames.

Every response carries a top-level `steering` object (what was applied) next to the OpenAI fields;
stream responses put it on their last chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
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
from ctxsteer.server.api.serving import Prepared, ServingContext, prepare_generation, render_with_indicator
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
    TokenLogprobInfo,
    TopLogprob,
)

router = APIRouter()


def _prepare(ctx: ServingContext, req: ChatCompletionRequest, response_id: str) -> Prepared:
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
    return await serve_generation(
        request, ChatCompletionRequest, "chatcmpl", _prepare, _stream, _collect, resolve_auto_spans
    )


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
    base: dict[str, Any], req: ChatCompletionRequest, gen: Generation
) -> ChatCompletionResponse:
    n = req.num_choices
    logprobs: list[list[TokenLogprobInfo]] = [[] for _ in range(n)]
    top_n = req.top_logprobs or 0

    def on_output(i: int, out: Any) -> None:
        if req.logprobs:
            logprobs[i].extend(chat_logprobs(out.logprobs, top_n))

    texts, finish = await collect_choices(gen, n, on_output)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=texts[i]),
            logprobs=ChoiceLogprobs(content=logprobs[i]) if req.logprobs else None,
            finish_reason=finish[i],
        )
        for i in range(n)
    ]
    return ChatCompletionResponse(**base, choices=choices, usage=gen.usage(), **gen.extras())


def _stream(
    base: dict[str, Any],
    req: ChatCompletionRequest,
    gen: Generation,
    first: tuple[int, Any],
) -> AsyncIterator[bytes]:
    """SSE frames: a role chunk per choice, content chunks, finish chunks, optional usage chunk, [DONE].
    The `steering` object rides on the last chunk before [DONE]."""

    def chunk(choices: list[ChatChunkChoice], **extra: Any) -> bytes:
        return sse.frame(ChatCompletionChunk(**base, choices=choices, **extra))

    def frame_for(i: int, out: Any, last: bool) -> bytes | None:
        lps = chat_logprobs(out.logprobs, req.top_logprobs or 0) if req.logprobs else None
        if not (out.text or lps or out.finish_reason is not None):
            return None
        choice = ChatChunkChoice(
            index=i,
            delta=DeltaMessage(content=out.text or None),
            logprobs=ChoiceLogprobs(content=lps) if lps else None,
            finish_reason=None if out.finish_reason is None else str(out.finish_reason),
        )
        return chunk([choice], **(gen.extras() if last else {}))

    roles = [
        chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        for i in range(req.num_choices)
    ]

    def usage() -> bytes:
        return chunk([], usage=gen.usage(), **gen.extras())

    return sse_body(
        gen, first, frame_for=frame_for, usage_frame=usage if req.include_usage else None, head=roles
    )
