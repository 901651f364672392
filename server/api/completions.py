"""POST /v1/completions (legacy text completions).

A raw prompt has no roles, so steering here means only `steering.spans`: substrings of the prompt whose
tokens keep full attention. Asking for steering without spans is a 400; the server's default strength
is simply not applied (there is nothing to steer toward).
"""

from __future__ import annotations

import dataclasses
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
from ctxsteer.server.errors import bad_request
from ctxsteer.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SteeringInfo,
)
from ctxsteer.steering.spans import render_text, steered_ranges
from ctxsteer.steering.spec import SteeringError, SteeringSpec

router = APIRouter()
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


def completion_spec(ctx: ServingContext, obj: dict[str, Any] | None) -> SteeringSpec:
    """The steering spec for a raw prompt: spans only (see the module docstring)."""
    spec = ctx.parse_spec(obj)
    if obj is not None and obj.get("targets") is not None:
        raise SteeringError("steering.targets", "a raw prompt has no roles; use steering.spans instead")
    if not spec.spans:
        if obj is not None and spec.active:
            raise SteeringError(
                "steering.spans", "steering a raw prompt needs spans (substrings of the prompt)"
            )
        spec = dataclasses.replace(spec, alpha=1.0)
    return spec


@dataclass(frozen=True, slots=True)
class _Prepared:
    steering: SteeringInfo
    requests: list[GenerationRequest]


def _prepare(ctx: ServingContext, req: CompletionRequest, response_id: str) -> _Prepared:
    spec = completion_spec(ctx, req.steering_object())
    rendered = render_text(ctx.engine.tokenizer, req.prompt_text)
    n_prompt = len(rendered.ids)
    if n_prompt == 0:  # e.g. whitespace a tokenizer drops: there is nothing to continue from
        raise bad_request("The prompt has no tokens; send a non-empty prompt.", "prompt", "empty_prompt")
    max_tokens = resolve_max_tokens(  # before any span work: an oversized prompt costs no more
        n_prompt,
        req.requested_max_tokens(),
        ctx.max_model_len,
        default=DEFAULT_MAX_TOKENS,
        prompt_param="prompt",
    )
    steered = steered_ranges(rendered, None, spec)
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
    return _Prepared(steering_info(spec, steered, n_prompt), requests)


@router.post("/v1/completions", response_model=None)
async def create_completion(request: Request) -> Response:
    ctx = get_context(request)
    req = await read_json(request, CompletionRequest)
    ctx.check_model(req.model)
    ctx.check_choices(req.num_choices)
    response_id = new_id("cmpl")
    prepared = await ctx.run_sync(_prepare, ctx, req, response_id)
    return await respond(
        request, ctx, req, response_id, prepared.requests, prepared.steering, _stream, _collect
    )


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


async def _collect(
    base: dict[str, Any], req: CompletionRequest, steering: SteeringInfo, gen: Generation
) -> CompletionResponse:
    n = req.num_choices
    texts: list[list[str]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    trackers = [_Logprobs(req.logprobs or 0, len(req.prompt_text)) for _ in range(n)]
    logprobs = [CompletionLogprobs() for _ in range(n)]
    while not gen.done:
        i, out = await gen.next_event()
        texts[i].append(out.text)
        if req.logprobs is not None:
            part = trackers[i].convert(out.logprobs)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(logprobs[i], name).extend(getattr(part, name))
        if out.finish_reason is not None:
            finish[i] = str(out.finish_reason)
    choices = [
        CompletionChoice(
            index=i,
            text="".join(texts[i]),
            logprobs=logprobs[i] if req.logprobs is not None else None,
            finish_reason=finish[i],
        )
        for i in range(n)
    ]
    return CompletionResponse(**base, choices=choices, usage=gen.usage(), steering=steering)


def _stream(
    base: dict[str, Any],
    req: CompletionRequest,
    steering: SteeringInfo,
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
        return sse.frame(CompletionResponse(**base, choices=[choice], steering=steering if last else None))

    def usage() -> bytes:
        return sse.frame(CompletionResponse(**base, choices=[], usage=gen.usage(), steering=steering))

    return sse_body(gen, first, frame_for=frame_for, usage_frame=usage if req.include_usage else None)
