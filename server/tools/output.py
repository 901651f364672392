"""OpenAI's `tool_calls` from parsed calls: whole (`message.tool_calls`) or streamed, as deltas the openai
SDK reassembles: per call, one delta with its index, id, type and name, then the arguments in fragments.
A forced call (named, "required") is streamed as it is generated (`CallScanner`). Free text (tool_choice
"auto") must be parsed before a call can be sent, so `ToolStream` streams it as content only while it
cannot be the start of a call and holds the rest; its calls go out at the end."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from ctxsteer.server.responses import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from ctxsteer.server.tools.constrain import ConstrainedCalls
from ctxsteer.server.tools.parsers import ParsedCall, ToolCallParser
from ctxsteer.server.tools.stream import CallPiece

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


def call_pieces(calls: Sequence[ParsedCall], fragment: int = FRAGMENT_CHARS) -> list[CallPiece]:
    """Whole calls as stream pieces: per call its header, then its arguments in `fragment` characters."""
    out: list[CallPiece] = []
    for i, call in enumerate(calls):
        out.append(CallPiece(i, call.name))
        out += [
            CallPiece(i, None, call.arguments[k : k + fragment])
            for k in range(0, len(call.arguments), fragment)
        ]
    return out


def piece_deltas(pieces: Sequence[CallPiece]) -> list[DeltaToolCall]:
    """The chat stream's deltas of `pieces`, one per chunk: a header gets the call's new id."""
    return [
        DeltaToolCall(
            index=p.index,
            id=new_call_id(),
            type="function",
            function=DeltaFunctionCall(name=p.name, arguments=""),
        )
        if p.name is not None
        else DeltaToolCall(index=p.index, function=DeltaFunctionCall(arguments=p.arguments))
        for p in pieces
    ]


def call_deltas(calls: Sequence[ParsedCall], fragment: int = FRAGMENT_CHARS) -> list[DeltaToolCall]:
    """The stream deltas of whole `calls`, one per chunk, in order."""
    return piece_deltas(call_pieces(calls, fragment))


class ToolStream:
    """One choice's text while streaming with tools: `feed` returns the content and call pieces that can
    be sent now, `finish` the content and pieces still to send and the calls."""

    def __init__(self, parser: ToolCallParser, parallel: bool) -> None:
        self.parser, self.parallel = parser, parallel
        self.scanner = parser.scanner(parallel) if isinstance(parser, ConstrainedCalls) else None
        self.text = ""
        self.sent = 0  # characters of `text` already streamed as content

    def feed(self, delta: str) -> tuple[str, list[CallPiece]]:
        self.text += delta
        if self.scanner is not None:
            return "", self.scanner.feed(delta)
        ready = self.parser.streamable(self.text)
        if ready <= self.sent:
            return "", []
        out, self.sent = self.text[self.sent : ready], ready
        return out, []

    def finish(self) -> tuple[str, list[CallPiece], list[ParsedCall]]:
        """A forced call's output has streamed already (or, not a call at all, is content now); free
        text is parsed here, its calls sent whole."""
        if self.scanner is not None:
            calls = self.scanner.calls()
            return ("" if calls else self.text), [], calls
        content, calls = parse_output(self.parser, self.text, self.parallel)
        content = content or ""
        streamed = self.text[: self.sent]
        rest = content[self.sent :] if content.startswith(streamed) else ""
        return rest, call_pieces(calls), calls
