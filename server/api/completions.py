"""POST /v1/completions (legacy text completions).

A raw prompt has no roles, so steering here means only `steering.spans`: substrings of the prompt whose
tokens keep full attention. Asking for steering without spans is a 400; the server's default strength
is simply not applied (there is nothing to steer toward).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ctxsteer.server.api import sse
from ctxsteer.server.api.generation import (
    Generation,
    clamp_logprob,
    collect_choices,
    serve_generation,
    sse_body,
)
from ctxsteer.server.api.serving import Prepared, ServingContext, prepare_generation
from ctxsteer.server.engine.request import TokenLogprob
from ctxsteer.server.errors import bad_request
from ctxsteer.server.protocol import CompletionRequest
from ctxsteer.server.responses import CompletionChoice, CompletionLogprobs, CompletionResponse
from ctxsteer.steering.spans import render_text

router = APIRouter()
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


def _prepare(ctx: ServingContext, req: CompletionRequest, response_id: str) -> Prepared:
    spec = ctx.completion_spec(req.steering_object())
    rendered = render_text(ctx.engine.tokenizer, req.prompt_text)
    if not rendered.ids:  # e.g. whitespace a tokenizer drops: there is nothing to continue from
        raise bad_request("The prompt has no tokens; send a non-empty prompt.", "prompt", "empty_prompt")
    return prepare_generation(
        ctx,
        req,
        response_id,
        rendered,
        None,
        spec,
        default_max_tokens=DEFAULT_MAX_TOKENS,
        prompt_param="prompt",
    )


@router.post("/v1/completions", response_model=None)
async def create_completion(request: Request) -> Response:
    return await serve_generation(request, CompletionRequest, "cmpl", _prepare, _stream, _collect)


class _Logprobs:
    """Accumulates the legacy format: parallel lists plus character offsets into prompt + completion."""

    def __init__(self, top_n: int, offset: int) -> None:
        self.top_n, self.offset = top_n, offset

    def convert(self, logprobs: Sequence[TokenLogprob]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in logprobs:
            out.tokens.append(lp.token)
            out.token_logprobs.append(clamp_logprob(lp.logprob))
            out.top_logprobs.append({tok: clamp_logprob(x) for _, tok, x in lp.top[: self.top_n]})
            out.text_offset.append(self.offset)
            self.offset += len(lp.token)
        return out


async def _collect(base: dict[str, Any], req: CompletionRequest, gen: Generation) -> CompletionResponse:
    n = req.num_choices
    trackers = [_Logprobs(req.logprobs or 0, len(req.prompt_text)) for _ in range(n)]
    logprobs = [CompletionLogprobs() for _ in range(n)]

    def on_output(i: int, out: Any) -> None:
        if req.logprobs is not None:
            part = trackers[i].convert(out.logprobs)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(logprobs[i], name).extend(getattr(part, name))

    texts, finish = await collect_choices(gen, n, on_output)
    choices = [
        CompletionChoice(
            index=i,
            text=texts[i],
            logprobs=logprobs[i] if req.logprobs is not None else None,
            finish_reason=finish[i],
        )
        for i in range(n)
    ]
    return CompletionResponse(**base, choices=choices, usage=gen.usage(), **gen.extras())


def _stream(
    base: dict[str, Any],
    req: CompletionRequest,
    gen: Generation,
    first: tuple[int, Any],
) -> AsyncIterator[bytes]:
    trackers = [_Logprobs(req.logprobs or 0, len(req.prompt_text)) for _ in range(req.num_choices)]

    def frame_for(i: int, out: Any, last: bool) -> bytes | None:
        lps = trackers[i].convert(out.logprobs) if req.logprobs is not None else None
        if not (out.text or out.logprobs or out.finish_reason is not None):
            return None
        reason = None if out.finish_reason is None else str(out.finish_reason)
        choice = CompletionChoice(index=i, text=out.text, logprobs=lps, finish_reason=reason)
        extras = gen.extras() if last else {}
        return sse.frame(CompletionResponse(**base, choices=[choice], **extras))

    def usage() -> bytes:
        return sse.frame(CompletionResponse(**base, choices=[], usage=gen.usage(), **gen.extras()))

    return sse_body(gen, first, frame_for=frame_for, usage_frame=usage if req.include_usage else None)
