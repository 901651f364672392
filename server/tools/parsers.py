"""Finding tool calls in a model's free text (tool_choice "auto"), in the formats models are tuned on.

Two formats, as vLLM names them: `hermes` (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks: Qwen, Hermes, SmolLM and the fallback block the server adds to templates without tools) and
`llama3_json` (Llama 3.x: an optional `<|python_tag|>`, then `{"name": ..., "parameters": {...}}` objects
separated by `;`). A block whose JSON is not a call stays in the content: the client sees what the model
wrote instead of a call the model did not make, and parsing never raises.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """One call found in the output: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCallParser(Protocol):
    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(the content left, None when blank; the calls, in order) of a whole choice's text."""
        ...

    def streamable(self, text: str) -> int:
        """How much of `text` (a prefix of a choice's output) can be streamed as content already: none of
        it may belong to a call. Never shrinks as the text grows (what was streamed stays sent)."""
        ...


def compact(value: Any) -> str:
    """Arguments as OpenAI sends them: compact JSON, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def call_from(obj: Any, *keys: str) -> ParsedCall | None:
    """`obj` as a call when it is `{"name": str, <one of keys>: object}`; arguments given as a JSON
    string of an object (some models double-encode them) are accepted too."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in keys if k in obj), None)
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if args is None:
        args = {}
    return ParsedCall(obj["name"], compact(args)) if isinstance(args, dict) else None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _held_tail(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class HermesParser:
    """`<tool_call>...</tool_call>` blocks anywhere in the text; an unclosed last block counts when its
    JSON is complete (generation stopped on EOS right after it)."""

    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self.START not in text:
            return (text or None), []
        calls: list[ParsedCall] = []
        kept: list[str] = []
        pos = 0
        for m in self._BLOCK.finditer(text):
            call = call_from(_loads(m.group(1).strip()), "arguments", "parameters")
            if call is None:
                continue  # not a call: left in the content
            kept.append(text[pos : m.start()])
            calls.append(call)
            pos = m.end()
        kept.append(text[pos:])
        content = "".join(kept)
        return (content if content.strip() else None), calls

    def streamable(self, text: str) -> int:
        at = text.find(self.START)
        if at < 0:
            at = len(text) - _held_tail(text, self.START)
        return len(text[:at].rstrip())  # trailing blanks wait: they are dropped if a call follows


class Llama3JsonParser:
    """The whole output is calls: `<|python_tag|>` (optional), JSON objects separated by `;`. Text after
    the last call is content; output that does not start with a call is all content."""

    TAG = "<|python_tag|>"
    _decoder = json.JSONDecoder()
    _SEP = re.compile(r"\s*;?\s*")

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.lstrip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG) :].lstrip()
        calls: list[ParsedCall] = []
        pos = 0
        while pos < len(body) and body[pos] == "{":
            try:
                obj, end = self._decoder.raw_decode(body, pos)
            except ValueError:
                break
            call = call_from(obj, "parameters", "arguments")
            if call is None:
                break
            calls.append(call)
            sep = self._SEP.match(body, end)
            pos = sep.end() if sep else end
        if not calls:
            return (text or None), []
        rest = body[pos:]
        return (rest if rest.strip() else None), calls

    def streamable(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("{") or body.startswith(self.TAG) or self.TAG.startswith(body):
            return 0  # could still be a call: hold all of it
        return len(text)


PARSERS: dict[str, ToolCallParser] = {"hermes": HermesParser(), "llama3_json": Llama3JsonParser()}


def pick_parser(name: str | None, tokenizer: Any) -> ToolCallParser:
    """`--tool-call-parser` when given; else the format the model's chat template asks for: Llama 3's
    templates (`<|python_tag|>`, the `ipython` role) -> llama3_json; any other -> hermes, the format of
    the tools block the server adds to templates that have none."""
    if name:
        return PARSERS[name]
    template = getattr(tokenizer, "chat_template", None)
    return PARSERS[_format_of(template if isinstance(template, str) else "")]


@lru_cache(maxsize=8)
def _format_of(template: str) -> str:
    return "llama3_json" if "<|python_tag|>" in template or "ipython" in template else "hermes"
