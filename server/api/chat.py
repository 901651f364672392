"""POST /v1/chat/completions: validate -> render with the chat template -> steered token ranges ->
one engine request per choice -> a ChatCompletion, or a stream of chat.completion.chunk SSE frames.

Every response carries a top-level `steering` object (what was applied) next to the OpenAI fields;
stream responses put it on their last chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ctxsteer.server.api import sse
from ctxsteer.server.api.body import read_json
from ctxsteer.server.api.serving import (
    Generation,
    ServingContext,
    clamp_logprob,
    get_context,
    new_id,
    resolve_max_tokens,
    respond,
    sse_body,
    steer_row,
    steering_info,
)
from ctxsteer.server.engine.request import GenerationRequest, TokenLogprob
from ctxsteer.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    SteeringInfo,
    TokenLogprobInfo,
    TopLogprob,
)
from ctxsteer.steering.spans import render_chat, steered_ranges

router = APIRouter()


@dataclass(frozen=True, slots=True)
class _Prepared:
    ids: list[int]
    steering: SteeringInfo
    requests: list[GenerationRequest]


def _prepare(ctx: ServingContext, req: ChatCompletionRequest, response_id: str) -> _Prepared:
    """Tokenizer-bound work, run in a worker thread: render, locate steered tokens, size max_tokens."""
    spec = ctx.parse_spec(req.steering_object())
    messages = req.render_messages()
    rendered = render_chat(ctx.engine.tokenizer, messages, **req.template_options())
    n_prompt = len(rendered.ids)
    max_tokens = resolve_max_tokens(  # before any span work: an oversized prompt costs no more
        n_prompt, req.requested_max_tokens(), ctx.max_model_len, default=None, prompt_param="messages"
    )
    steered = steered_ranges(rendered, messages, spec)
    row = steer_row(spec, steered)
    requests = [
        GenerationRequest(
            request_id=f"{response_id}-{i}",
            prompt_ids=rendered.ids,
            sampling=req.to_sampling_params(max_tokens=max_tokens, choice=i),
            steer=row,
        )
        for i in range(req.num_choices)
    ]
    return _Prepared(rendered.ids, steering_info(spec, steered, n_prompt), requests)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(request: Request) -> Response:
    ctx = get_context(request)
    req = await read_json(request, ChatCompletionRequest)
    ctx.check_model(req.model)
    ctx.check_choices(req.num_choices)
    response_id = new_id("chatcmpl")
    prepared = await ctx.run_sync(_prepare, ctx, req, response_id)
    return await respond(
        request, ctx, req, response_id, prepared.requests, prepared.steering, _stream, _collect
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
    base: dict[str, Any], req: ChatCompletionRequest, steering: SteeringInfo, gen: Generation
) -> ChatCompletionResponse:
    n = req.num_choices
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprobInfo]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    top_n = req.top_logprobs or 0
    while not gen.done:
        i, out = await gen.next_event()
        texts[i].append(out.text)
        if req.logprobs:
            logprobs[i].extend(chat_logprobs(out.logprobs, top_n))
        if out.finish_reason is not None:
            finish[i] = str(out.finish_reason)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content="".join(texts[i])),
            logprobs=ChoiceLogprobs(content=logprobs[i]) if req.logprobs else None,
            finish_reason=finish[i],
        )
        for i in range(n)
    ]
    return ChatCompletionResponse(**base, choices=choices, usage=gen.usage(), steering=steering)


def _stream(
    base: dict[str, Any],
    req: ChatCompletionRequest,
    steering: SteeringInfo,
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
        return chunk([choice], steering=steering if last else None)

    roles = [
        chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        for i in range(req.num_choices)
    ]

    def usage() -> bytes:
        return chunk([], usage=gen.usage(), steering=steering)

    return sse_body(
        gen, first, frame_for=frame_for, usage_frame=usage if req.include_usage else None, head=roles
    )
