"""OpenAI's `tool_calls` from parsed calls: whole (`message.tool_calls`) or streamed. Free text (tool_choice
"auto") must be parsed before a call can be sent, so `ToolStream` streams a choice's text as content only
while it cannot be the start of a call and holds the rest; at the end the calls go out as deltas the
openai SDK reassembles: per call, one delta with its index, id, type and name, then the arguments in
fragments."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from ctxsteer.server.responses import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from ctxsteer.server.tools.parsers import ParsedCall, ToolCallParser

FRAGMENT_CHARS = 16  # argument text per streamed delta


def new_call_id() -> str:
    """`call_` and 24 hex characters, the shape OpenAI's ids have."""
    return "call_" + secrets.token_hex(12)


def tool_calls(calls: Sequence[ParsedCall]) -> list[ToolCall]:
    return [
        ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
    ]


def finish_reason(engine_reason: str | None, calls: Sequence[ParsedCall]) -> str | None:
    """Reports "tool_calls" when the choice called something; a cut ("length") or an unfinished choice is
    reported as it is."""
    if calls and engine_reason not in ("length", None):
        return "tool_calls"
    return engine_reason


def parse_output(parser: ToolCallParser, text: str, parallel: bool) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a whole choice; without parallel calls only the first call is kept."""
    content, calls = parser.parse(text)
    return content, calls if parallel else calls[:1]


def call_deltas(calls: Sequence[ParsedCall], fragment: int = FRAGMENT_CHARS) -> list[DeltaToolCall]:
    """The stream deltas of `calls`, one per chunk, in order."""
    out: list[DeltaToolCall] = []
    for i, call in enumerate(calls):
        named = DeltaFunctionCall(name=call.name, arguments="")
        out.append(DeltaToolCall(index=i, id=new_call_id(), type="function", function=named))
        for at in range(0, len(call.arguments), fragment):
            piece = DeltaFunctionCall(arguments=call.arguments[at : at + fragment])
            out.append(DeltaToolCall(index=i, function=piece))
    return out


class ToolStream:
    """One choice's text while streaming with tools: `feed` returns the content that can be sent now,
    `finish` the content still to send and the calls."""

    def __init__(self, parser: ToolCallParser, parallel: bool) -> None:
        self.parser, self.parallel = parser, parallel
        self.text = ""
        self.sent = 0  # characters of `text` already streamed as content

    def feed(self, delta: str) -> str:
        self.text += delta
        ready = self.parser.streamable(self.text)
        if ready <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : ready], ready
        return out

    def finish(self) -> tuple[str, list[ParsedCall]]:
        content, calls = parse_output(self.parser, self.text, self.parallel)
        content = content or ""
        streamed = self.text[: self.sent]
        return (content[self.sent :] if content.startswith(streamed) else ""), calls
