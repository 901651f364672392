"""Tool definitions, tool calls and tool results as the chat template renders them.

A template that knows tools (its text references `tools`) gets them the Hugging Face way: `tools=` beside
the messages, assistant `tool_calls` with arguments as objects, `tool` messages as they are. A template that
does not (the embedded SmolLM2's) would drop or mangle them, so they are rewritten into plain turns in the
hermes convention most open models were tuned on: the tool list and calling instructions in a system
message, each call as `<tool_call>{...}</tool_call>` text, each result as a user turn wrapped in
`<tool_response>`. Only the template input changes: a `tool` message keeps its role for steering, and each
message's span is still its own content (`TemplateInput.owners` says where it landed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_TOOLS_REF = re.compile(r"\btools\b")
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"


def supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders tools itself: its text references `tools`."""
    template = getattr(tokenizer, "chat_template", None)
    texts = template.values() if isinstance(template, Mapping) else [template]
    return any(isinstance(t, str) and _TOOLS_REF.search(t) for t in texts)


def tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt block of the fallback: the tools as JSON lines, then the hermes call format."""
    return TOOLS_HEADER + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_FOOTER


def _arguments(raw: Any) -> Any:
    """A call's arguments as templates expect them: the JSON object its text holds (else the text)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _calls(calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in calls:
        fn = c.get("function") or {}
        call = {
            "type": "function",
            "function": {"name": fn.get("name"), "arguments": _arguments(fn.get("arguments"))},
        }
        if c.get("id") is not None:
            call["id"] = c["id"]
        out.append(call)
    return out


def call_text(calls: Sequence[Mapping[str, Any]]) -> str:
    """Assistant tool calls as hermes text, one `<tool_call>` block each."""
    blocks = []
    for call in _calls(calls):
        fn = {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
        blocks.append(f"<tool_call>\n{json.dumps(fn, ensure_ascii=False)}\n</tool_call>")
    return "\n".join(blocks)


@dataclass(frozen=True, slots=True)
class TemplateInput:
    """What the template renders, and where each request message's content is in it."""

    messages: list[dict[str, Any]]  # the template's messages ("content" always a string)
    owners: list[int]  # request message i -> the index of the template message holding its content
    offsets: list[int]  # request message i -> where its content starts in that template content
    tools: list[dict[str, Any]] | None  # passed to the template (None: not, or none given)


def template_input(
    msgs: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, native: bool
) -> TemplateInput:
    """`msgs` (role, content string, optional tool_calls / tool_call_id) as the template takes them."""
    if native:
        out = []
        for m in msgs:
            t: dict[str, Any] = {"role": m["role"], "content": m["content"]}
            if m.get("tool_calls"):
                t["tool_calls"] = _calls(m["tool_calls"])
            if m.get("tool_call_id") is not None:
                t["tool_call_id"] = m["tool_call_id"]
            out.append(t)
        n = len(msgs)
        return TemplateInput(out, list(range(n)), [0] * n, [dict(x) for x in tools] if tools else None)
    out = []
    for m in msgs:
        content = m["content"]
        if m.get("tool_calls"):
            content = content + ("\n" if content else "") + call_text(m["tool_calls"])
        if m["role"] == "tool":
            out.append({"role": "user", "content": RESPONSE_OPEN + content + RESPONSE_CLOSE})
        else:
            out.append({"role": m["role"], "content": content})
    owners = list(range(len(msgs)))
    offsets = [len(RESPONSE_OPEN) if m["role"] == "tool" else 0 for m in msgs]
    if tools:
        block = tools_block(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = (out[0]["content"] + "\n\n" if out[0]["content"] else "") + block
        else:
            out.insert(0, {"role": "system", "content": block})
            owners = [i + 1 for i in owners]
    return TemplateInput(out, owners, offsets, None)


def content_range(
    text: str, wrapped: tuple[int, int], template_content: str, offset: int, content: str
) -> tuple[int, int]:
    """The range of a message's own `content`, which starts `offset` characters into `template_content`,
    given the range `wrapped` that template content landed in (whole, or stripped by the template)."""
    s, e = wrapped
    if template_content == content:
        return wrapped
    lead = (
        0 if text.startswith(template_content, s) else len(template_content) - len(template_content.lstrip())
    )
    start = min(max(s, s + offset - lead), e)
    for cand in (content, content.strip()):
        if cand and (at := text.find(cand, start, e)) >= 0:
            return at, at + len(cand)
    return start, start
