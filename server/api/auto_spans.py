"""`steering.spans: "auto"` on /v1/chat/completions: before the request is prepared, one short greedy
generation (through the engine, batched with everything else) asks the model to quote the sentences of
the user's messages and the tools' results that answer the question; the located sentences replace "auto"
as the request's spans (steering/auto_spans.py). Cost, bounded: one prefill of those texts under a short
instruction and at most QUOTE_MAX_TOKENS generated tokens, reported in `steering.spans_generation`.
When nothing quoted can be located (or the quoting prompt does not fit), the default targets apply and
`steering.spans` is empty.

With tools, the evidence is often not in a user message at all: in agentic RAG the retrieved documents
come back as `tool` messages, so their contents are quoted (and located) as the users' are, in the order
of the conversation. The tool definitions and the assistant's calls are not: they are no one's evidence,
a span is only ever found in a message's content, and a tools block in the quoting prompt would invite
the model to call a tool instead of quoting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ctxsteer.server.api.serving import ServingContext, new_id
from ctxsteer.server.engine.request import FinishReason, GenerationRequest, SamplingParams
from ctxsteer.server.protocol import ChatCompletionRequest
from ctxsteer.server.responses import SpansGenerationInfo
from ctxsteer.steering.auto_spans import QUOTE_MAX_TOKENS, locate_quotes, quote_messages
from ctxsteer.steering.spans import render_chat

QUOTED_ROLES = ("user", "tool")


def wants_auto_spans(req: ChatCompletionRequest) -> bool:
    steering = req.steering_object()
    return isinstance(steering, dict) and steering.get("spans") == "auto"


def quote_sources(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """What the quoting generation reads and its quotes are located in: the contents of the user's
    messages and of the tools' results, in the conversation's order."""
    return [str(m.get("content") or "") for m in messages if m.get("role") in QUOTED_ROLES]


async def resolve_auto_spans(ctx: ServingContext, req: ChatCompletionRequest) -> ChatCompletionRequest:
    """The request with "auto" replaced by the located spans (or left out); unchanged without "auto"."""
    if not wants_auto_spans(req):
        return req
    sources = quote_sources(req.render_messages())
    prompt = quote_messages([{"role": "user", "content": text} for text in sources])
    quote = await ctx.run_sync(render_chat, ctx.engine.tokenizer, prompt)
    text, completion = "", 0
    if len(quote.ids) + QUOTE_MAX_TOKENS <= ctx.max_model_len:
        params = SamplingParams(max_tokens=QUOTE_MAX_TOKENS, temperature=0.0)
        async for out in ctx.engine.generate(GenerationRequest(new_id("spans"), quote.ids, params)):
            text += out.text
            completion = out.completion_tokens
            if out.finish_reason == FinishReason.ERROR:
                text = ""  # the request goes on with the default targets
    found = locate_quotes(text, sources)
    steering: dict[str, Any] = dict(req.steering_object() or {})
    if found:
        steering["spans"] = found
    else:
        steering.pop("spans")
    resolved = req.model_copy(update={"steering": steering})
    cost = SpansGenerationInfo(prompt_tokens=len(quote.ids), completion_tokens=completion, quote=text)
    resolved._auto_spans = (found, cost)
    return resolved
