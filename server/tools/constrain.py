"""tool_choice "required" and named functions as a JSON-schema grammar, vLLM's way: the sampler can only
write a valid call, so no parser has to guess. A named function's output IS its arguments (its
parameters schema); "required" writes `[{"name": ..., "arguments": {...}}, ...]` (vLLM says "parameters";
"arguments" is the key the hermes prompt block teaches), one item unless parallel calls are allowed.
`ConstrainedCalls` turns that output back into calls (server/tools/stream.py streams it).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from ctxsteer.server.engine.grammar import GrammarError
from ctxsteer.server.engine.request import Grammar
from ctxsteer.server.tools.parsers import ParsedCall
from ctxsteer.server.tools.stream import CallScanner

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def named_function(tool_choice: str | dict[str, Any]) -> str | None:
    """The function a tool_choice names (`{"type": "function", "function": {"name": N}}`), else None."""
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return fn["name"]
    return None


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema (an object of any shape when the tool declares none)."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools:
        fn = tool.get("function") or {}
        if isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") or ANY_OBJECT
    return out


def tool_grammar(
    tools: list[dict[str, Any]], tool_choice: str | dict[str, Any], parallel: bool
) -> Grammar | None:
    """The grammar that forces tool_choice's call (None for "none" and "auto": the model chooses).
    GrammarError (a 400 naming the field) for a function that is not in `tools`, or "required" without
    tools."""
    functions = _functions(tools)
    name = named_function(tool_choice)
    if name is not None:
        if name not in functions:
            raise GrammarError("tool_choice", f"the function {name!r} is not in tools")
        return Grammar("json_schema", json.dumps(functions[name]), param="tool_choice")
    if tool_choice != "required":
        return None
    if not functions:
        raise GrammarError("tools", 'tool_choice "required" needs at least one function in tools')
    return Grammar("json_schema", json.dumps(_calls_schema(functions, parallel)), param="tool_choice")


def _calls_schema(functions: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """`[{"name": const, "arguments": schema}, ...]` over every function; each function's `$defs` move
    to the root, where their `#/$defs/...` references now point."""
    defs: dict[str, Any] = {}
    items = []
    for name, params in functions.items():
        params = copy.deepcopy(params)
        for key, value in (params.pop("$defs", None) or {}).items():
            if defs.setdefault(key, value) != value:
                raise GrammarError("tools", f"two functions define $defs {key!r} differently")
        items.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


class ConstrainedCalls:
    """The parser of a forced call's output (the `ToolCallParser` protocol), read by the same
    `CallScanner` that streams it, so both answers agree: arguments as written, less the whitespace
    outside strings. Output cut by max_tokens is not valid JSON: a named function still gets its call
    (the arguments as written, finish_reason "length", as OpenAI does); a cut "required" array gives the
    calls whose name was written (the last one's arguments as far as they go), since a stream has sent
    them already, and is left as content only when no name was."""

    def __init__(self, name: str | None) -> None:
        self.name = name  # None: "required"

    def scanner(self, parallel: bool = True) -> CallScanner:
        """A fresh reader of one choice's output, for streaming it as `parse` reads it."""
        return CallScanner(self.name, parallel)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        scanner = self.scanner()
        scanner.feed(text)
        calls = scanner.calls()
        return (None, calls) if calls else ((text or None), [])

    def streamable(self, text: str) -> int:
        return 0  # all of it is the call


def constrained_parser(tool_choice: str | dict[str, Any]) -> ConstrainedCalls | None:
    """The parser of a forced call (named or "required"); None when the model writes free text."""
    name = named_function(tool_choice)
    if name is not None or tool_choice == "required":
        return ConstrainedCalls(name)
    return None
