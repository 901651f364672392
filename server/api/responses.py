"""POST /v1/responses: OpenAI's Responses API (the subset vLLM serves) on the chat pipeline. The request
becomes a chat completion request (`ResponsesRequest.to_chat`), which is resolved, prepared and generated
exactly as /v1/chat/completions does it (`serve_generation`); only the answer is shaped differently: one
Response object, or typed SSE events (`event:` + `data:` with a `sequence_number`) that end with
`response.completed` (or `response.incomplete` when max_output_tokens cut the output) instead of `[DONE]`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ctxsteer.server.api import chat, sse
from ctxsteer.server.api.auto_spans import resolve_auto_spans
from ctxsteer.server.api.generation import Generation, collect_choices, serve_generation, sse_body
from ctxsteer.server.api.serving import Prepared, ServingContext, get_context
from ctxsteer.server.engine.grammar import GrammarError
from ctxsteer.server.errors import CtxsteerError
from ctxsteer.server.protocol import ChatCompletionRequest
from ctxsteer.server.protocol_responses import ResponsesRequest
from ctxsteer.server.responses_api import (
    IncompleteDetails,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponseUsage,
    Status,
    new_item_id,
)
from ctxsteer.server.tools.output import ToolStream, new_call_id, parse_output
from ctxsteer.server.tools.parsers import ParsedCall
from ctxsteer.server.tools.stream import CallPiece

router = APIRouter()
# chat's parameter names in errors raised while preparing -> the Responses request's own
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}
_CHAT_TOOL = re.compile(r"^tools\[(\d+)\]\.function\.")  # a Responses function tool is flat: tools[i].x


@dataclass(frozen=True, slots=True)
class Turn:
    """A Responses request and the chat request it runs as; answers what the shared pipeline reads."""

    req: ResponsesRequest
    chat: ChatCompletionRequest

    @property
    def stream(self) -> bool:
        return bool(self.req.stream)

    def wants_context_attention(self) -> bool:
        return self.chat.wants_context_attention()


async def _resolve(ctx: ServingContext, req: ResponsesRequest) -> Turn:
    return Turn(req, await resolve_auto_spans(ctx, req.to_chat()))


def _prepare(ctx: ServingContext, turn: Turn, response_id: str) -> Prepared:
    """Chat's preparation; its 400s name the Responses parameter (max_output_tokens, not max_tokens), and
    so does its grammar's `param`, which the engine names when the grammar fails while generating."""
    try:
        prepared = chat.prepare_chat(ctx, turn.chat, response_id)
    except (CtxsteerError, GrammarError) as e:
        if isinstance(e, CtxsteerError) and e.param == "max_tokens":
            e.message = e.message.replace("max_tokens", "max_output_tokens")
        if e.param is not None:
            e.param = responses_param(e.param)
        raise
    for r in prepared.requests:
        if (g := r.sampling.grammar) is not None and (param := responses_param(g.param)) != g.param:
            r.sampling = dataclasses.replace(r.sampling, grammar=dataclasses.replace(g, param=param))
    return prepared


def responses_param(param: str) -> str:
    """A chat parameter name as the Responses request spells it (`tools[i].parameters`: flat tools)."""
    return _PARAMS.get(param) or _CHAT_TOOL.sub(r"tools[\1].", param)


@router.post("/v1/responses", response_model=None)
async def create_response(request: Request) -> Response:
    ctx = get_context(request)
    stream, collect = partial(_stream, ctx), partial(_collect, ctx)
    return await serve_generation(request, ResponsesRequest, "resp", _prepare, stream, collect, _resolve)


def _parallel(turn: Turn) -> bool:
    return turn.chat.parallel_tool_calls is not False


def _message(item_id: str, text: str, status: Status = "completed") -> OutputMessage:
    return OutputMessage(id=item_id, status=status, content=[OutputText(text=text)])


def _call(call: ParsedCall) -> OutputFunctionCall:
    return OutputFunctionCall(
        id=new_item_id("fc"), call_id=new_call_id(), name=call.name, arguments=call.arguments
    )


def _response(
    base: dict[str, Any], turn: Turn, output: list[OutputItem], finish: str | None, gen: Generation | None
) -> ResponseObject:
    """The Response object; `gen` None: still in progress (no usage or report yet)."""
    status: Status = "in_progress" if gen is None else "incomplete" if finish == "length" else "completed"
    return ResponseObject(
        id=base["id"].replace("resp-", "resp_", 1), created_at=base["created"], model=base["model"],
        status=status, output=output,
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
        usage=ResponseUsage.of(gen.usage()) if gen is not None else None,
        **turn.req.echo(), **(gen.extras() if gen is not None else {}),
    )  # fmt: skip


def _split(ctx: ServingContext, turn: Turn, text: str) -> tuple[str, list[ParsedCall]]:
    """The output's text and tool calls (counted for the metrics), as chat reads them."""
    parser = chat.tool_parser(ctx, turn.chat)
    if parser is None:
        return text, []
    content, calls = parse_output(parser, text, _parallel(turn))
    chat.count_calls(ctx, len(calls))
    return content or "", calls


async def _collect(ctx: ServingContext, base: dict[str, Any], turn: Turn, gen: Generation) -> ResponseObject:
    texts, finish = await collect_choices(gen, 1, lambda i, out: None)
    text, calls = _split(ctx, turn, texts[0])
    cut: Status = "incomplete" if finish[0] == "length" else "completed"
    output: list[OutputItem] = [_message(new_item_id("msg"), text, cut)] if text or not calls else []
    output += [_call(c) for c in calls]
    return _response(base, turn, output, finish[0], gen)


class _Events:
    """Typed SSE events of one response: `event: <type>` and `data:` JSON with the type and a
    sequence number; the output items as they stand, for the final response."""

    def __init__(self) -> None:
        self.seq = 0
        self.output: list[OutputItem] = []
        self.message: OutputMessage | None = None  # the open message item
        self.call: OutputFunctionCall | None = None  # the open function call item
        self.text = ""

    def emit(self, kind: str, **payload: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **_plain(payload)}
        self.seq += 1
        return f"event: {kind}\n".encode() + sse.frame(data)

    def text_delta(self, delta: str) -> list[bytes]:
        """The delta, after opening the message item and its text part on the first one."""
        frames = [] if self.message is not None else self._open_message()
        self.text += delta
        at = self._where()
        frames.append(
            self.emit("response.output_text.delta", **at, content_index=0, delta=delta, logprobs=[])
        )
        return frames

    def close_message(self, status: Status) -> list[bytes]:
        """Close the message item (opened, empty, when the output had neither text nor calls)."""
        if self.message is None:
            return []
        at, part = self._where(), OutputText(text=self.text)
        done = _message(self.message.id, self.text, status)
        self.output[at["output_index"]] = done
        self.message = None
        return [
            self.emit("response.output_text.done", **at, content_index=0, text=self.text, logprobs=[]),
            self.emit("response.content_part.done", **at, content_index=0, part=part),
            self.emit("response.output_item.done", output_index=at["output_index"], item=done),
        ]

    def call_piece(self, piece: CallPiece) -> list[bytes]:
        """A call's item added with empty arguments on its header (the previous call's closed), then
        each argument fragment as a delta."""
        if piece.name is not None:
            frames = self.close_call()
            self.call = _call(ParsedCall(piece.name, "")).model_copy(update={"status": "in_progress"})
            self.output.append(self.call)
            return [
                *frames,
                self.emit("response.output_item.added", output_index=len(self.output) - 1, item=self.call),
            ]
        assert self.call is not None
        self.call.arguments += piece.arguments
        at = {"item_id": self.call.id, "output_index": self.output.index(self.call)}
        return [self.emit("response.function_call_arguments.delta", **at, delta=piece.arguments)]

    def close_call(self) -> list[bytes]:
        """The open call's item done, its arguments as streamed (cut ones too, as `_collect` has them)."""
        if self.call is None:
            return []
        index, done = self.output.index(self.call), self.call.model_copy(update={"status": "completed"})
        self.output[index], self.call = done, None
        at = {"item_id": done.id, "output_index": index}
        return [
            self.emit(
                "response.function_call_arguments.done", **at, name=done.name, arguments=done.arguments
            ),
            self.emit("response.output_item.done", output_index=index, item=done),
        ]

    def open_empty(self) -> list[bytes]:
        return self._open_message()

    def _open_message(self) -> list[bytes]:
        self.message = OutputMessage(id=new_item_id("msg"), status="in_progress", content=[])
        self.output.append(self.message)
        at = self._where()
        return [
            self.emit("response.output_item.added", output_index=at["output_index"], item=self.message),
            self.emit("response.content_part.added", **at, content_index=0, part=OutputText(text="")),
        ]

    def _where(self) -> dict[str, Any]:
        assert self.message is not None
        return {"item_id": self.message.id, "output_index": self.output.index(self.message)}


def _plain(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in payload.items()}


def _stream(
    ctx: ServingContext, base: dict[str, Any], turn: Turn, gen: Generation, first: tuple[int, Any]
) -> AsyncIterator[bytes]:
    """response.created / in_progress, the message's text as deltas (with tools, only what cannot be a
    call), the calls' items (a forced call's as it is generated, parsed ones at the end), then the final
    response. Errors after the headers are sent as chat's `{"error": ...}` frame, which the SDK raises as
    an APIError."""
    parser = chat.tool_parser(ctx, turn.chat)
    tools = ToolStream(parser, _parallel(turn)) if parser is not None else None
    events = _Events()
    head = [
        events.emit("response.created", response=_response(base, turn, [], None, None)),
        events.emit("response.in_progress", response=_response(base, turn, [], None, None)),
    ]

    def frame_for(i: int, out: Any, last: bool) -> bytes | None:
        finish = None if out.finish_reason is None else str(out.finish_reason)
        text, pieces, calls = out.text, [], []  # pieces: CallPiece; calls: ParsedCall
        if tools is not None:
            text, pieces = tools.feed(out.text)
            if finish is not None:
                rest, more, calls = tools.finish()
                text, pieces = text + rest, pieces + more
                chat.count_calls(ctx, len(calls))
        cut: Status = "incomplete" if finish == "length" else "completed"
        frames = events.text_delta(text) if text else []
        if pieces:
            frames += events.close_message(cut)
        for piece in pieces:
            frames += events.call_piece(piece)
        if finish is None:
            return b"".join(frames) or None
        if events.message is None and not calls and not events.output:
            frames += events.open_empty()
        frames += events.close_message(cut) + events.close_call()
        final = _response(base, turn, events.output, finish, gen)
        frames.append(events.emit(f"response.{final.status}", response=final))
        return b"".join(frames)

    return _without_done(sse_body(gen, first, frame_for=frame_for, usage_frame=None, head=head))


async def _without_done(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The Responses stream ends with its final event: chat's `[DONE]` sentinel is dropped."""
    try:
        async for data in frames:
            if data != sse.DONE:
                yield data
    finally:
        if isinstance(frames, AsyncGenerator):
            await frames.aclose()
