"""Chat rendering -> token ids plus the token range of every message's content.

The model's own chat template renders the conversation; we then find where each message's content
landed in the rendered text (templates add roles, default system prompts, BOS, may `trim` content)
and map those character ranges to tokens through the tokenizer's offset mapping.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ctxsteer.steering.spec import SteeringError, SteeringSpec
from ctxsteer.steering.tool_render import content_range, supports_tools, template_input

Range = tuple[int, int]  # half-open [start, end)


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    text: str
    ids: list[int]
    message_spans: tuple[Range, ...]  # token range of each message's content
    message_chars: tuple[Range, ...]  # character range of each message's content in `text`
    offsets: tuple[Range, ...]  # character range of each token


def content_text(content: Any, field: str = "content") -> str:
    """A message's content as one string: plain text, or OpenAI text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, Sequence):
        parts = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise SteeringError(
                    f"{field}[{i}]", "only text parts ({'type': 'text', 'text': ...}) are supported"
                )
            parts.append(part["text"])
        return "\n".join(parts)
    raise SteeringError(field, "must be a string or a list of text parts")


def _sentinel(i: int) -> str:
    # Private-use characters: no template or user text plausibly contains them.
    return f"\ue000ctxsteer{i}\ue001"


_SENTINEL_RE = re.compile("\ue000ctxsteer(\\d+)\ue001")


def _locate_with_sentinels(
    tokenizer: Any, msgs: list[dict[str, Any]], text: str, options: dict[str, Any]
) -> list[Range] | None:
    """Render once more with each content replaced by a sentinel; walk the real text piece by piece.

    Empty contents stay empty (templates often render `if message.content` blocks, e.g. around tool calls):
    they get an empty range where the previous content ended."""
    skeleton_msgs = [{**m, "content": _sentinel(i) if m["content"] else ""} for i, m in enumerate(msgs)]
    try:
        skeleton = tokenizer.apply_chat_template(skeleton_msgs, tokenize=False, **options)
    except ValueError:
        return None
    found = [int(m.group(1)) for m in _SENTINEL_RE.finditer(skeleton)]
    if found != [i for i, m in enumerate(msgs) if m["content"]]:
        return None  # the template drops, repeats or reorders contents: fall back to searching
    pieces = iter(_SENTINEL_RE.split(skeleton)[::2])  # literal template text between contents
    first = next(pieces)
    if not text.startswith(first):
        return None
    pos, spans = len(first), []
    for m in msgs:
        if not m["content"]:
            spans.append((pos, pos))
            continue
        nxt = next(pieces)
        for cand in (m["content"], m["content"].strip(), m["content"].lstrip(), m["content"].rstrip()):
            if text.startswith(cand + nxt, pos):
                spans.append((pos, pos + len(cand)))
                pos += len(cand) + len(nxt)
                break
        else:
            return None
    return spans if pos == len(text) else None


def _locate_by_search(msgs: list[dict[str, Any]], text: str) -> list[Range]:
    """Fallback: find each content in order, after the previous one."""
    cursor, spans = 0, []
    for m in msgs:
        for cand in (m["content"], m["content"].strip()):
            idx = text.find(cand, cursor)
            if idx >= 0:
                spans.append((idx, idx + len(cand)))
                cursor = idx + len(cand)
                break
        else:
            spans.append((cursor, cursor))
    return spans


def _offsets_by_decoding(tokenizer: Any, ids: list[int]) -> list[Range]:
    """Offsets for tokenizers without an offset mapping, from cumulative decodes (O(n^2); fallback).

    A character split over several byte-level tokens decodes as U+FFFD until its last byte arrives; every
    token holding one of its bytes gets the character's range, as fast tokenizers' offset mappings give
    it, so a span ending on such a character keeps all of its tokens."""
    out: list[Range] = []
    complete = ""  # the decoded text so far without a trailing incomplete character
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        start = min(len(os.path.commonprefix([complete, cur])), len(complete))
        stable = cur.rstrip("\ufffd") if i + 1 < len(ids) else cur
        end = len(stable) + (1 if len(stable) < len(cur) else 0)  # an incomplete character counts as one
        out.append((start, max(start, end)))
        complete = stable
    return out


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[Range]]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return ids, _offsets_by_decoding(tokenizer, ids)


class TokenIndex:
    """char range -> token range in O(log n) per lookup, over a prompt's token offsets built once.

    Span search runs once per occurrence of every steered substring, so a per-lookup scan of all
    offsets would make one small request cost spans x matches x tokens.
    """

    def __init__(self, offsets: Sequence[Range]) -> None:
        self.offsets = offsets
        self.ends = [o[1] for o in offsets]
        starts = [o[0] for o in offsets]
        self.starts = starts if all(a <= b for a, b in zip(starts, starts[1:], strict=False)) else None

    def token_range(self, start: int, end: int) -> Range:
        """Tokens whose characters overlap [start, end); empty range at the right place if none do."""
        first = bisect.bisect_right(self.ends, start)  # first token ending after `start`
        if start >= end:
            return first, first
        if self.starts is not None:  # tokens from `first` on that start before `end`
            return first, max(first, bisect.bisect_left(self.starts, end, lo=first))
        last = first  # unsorted starts (rare special-token offsets): scan just this span's tokens
        while last < len(self.offsets) and self.offsets[last][0] < end:
            last += 1
        return first, max(first, last)


def char_to_token_range(offsets: Sequence[Range], start: int, end: int) -> Range:
    """Tokens whose characters overlap [start, end) (one-off lookup; use TokenIndex for many)."""
    return TokenIndex(offsets).token_range(start, end)


def _request_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Role and content string of each message, with its tool calls or the call it answers."""
    if not messages:
        raise SteeringError("messages", "must contain at least one message")
    msgs = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if not isinstance(role, str):
            raise SteeringError(f"messages[{i}].role", "is required")
        msg = {"role": role, "content": content_text(m.get("content"), f"messages[{i}].content")}
        for key in ("tool_calls", "tool_call_id"):
            if m.get(key) is not None:
                msg[key] = m[key]
        msgs.append(msg)
    return msgs


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> RenderedPrompt:
    """Render with the tokenizer's chat template and map every message's content to its tokens.

    `continue_final_message` leaves the last message open (transformers cuts the rendering right after its
    content), so generation continues it, e.g. an assistant answer prefix. `tools` (OpenAI tool dicts),
    assistant `tool_calls` and `tool` messages go to the template if it renders tools, else through the
    hermes fallback of steering.tool_render; either way a message's span is its own content."""
    msgs = _request_messages(messages)
    inp = template_input(msgs, tools, supports_tools(tokenizer))
    options: dict[str, Any] = {"add_generation_prompt": add_generation_prompt}
    if continue_final_message:
        if not msgs[-1]["content"].strip():
            raise SteeringError(
                "messages", "continue_final_message needs a final message with text to continue"
            )
        options = {"add_generation_prompt": False, "continue_final_message": True}
    if inp.tools:
        options["tools"] = inp.tools
    try:
        text = tokenizer.apply_chat_template(inp.messages, tokenize=False, **options)
    except ValueError as e:  # e.g. the template drops part of the message to continue
        raise SteeringError("messages", f"the chat template cannot render these messages: {e}") from e
    tmsgs = inp.messages
    located = _locate_with_sentinels(tokenizer, tmsgs, text, options) or _locate_by_search(tmsgs, text)
    chars = [
        content_range(text, located[t], tmsgs[t]["content"], off, m["content"])
        for m, t, off in zip(msgs, inp.owners, inp.offsets, strict=True)
    ]
    ids, offsets = _tokenize(tokenizer, text, add_special_tokens=False)
    index = TokenIndex(offsets)
    spans = tuple(index.token_range(s, e) for s, e in chars)
    return RenderedPrompt(text, ids, spans, tuple(chars), tuple(offsets))


def render_text(tokenizer: Any, prompt: str) -> RenderedPrompt:
    """A raw completion prompt: one 'message' covering the whole text (BOS etc. as the tokenizer adds)."""
    ids, offsets = _tokenize(tokenizer, prompt, add_special_tokens=True)
    span = char_to_token_range(offsets, 0, len(prompt))
    return RenderedPrompt(prompt, ids, (span,), ((0, len(prompt)),), tuple(offsets))


def merge_ranges(ranges: Sequence[Range]) -> tuple[Range, ...]:
    out: list[list[int]] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


def steered_ranges(
    rendered: RenderedPrompt, messages: Sequence[Mapping[str, Any]] | None, spec: SteeringSpec
) -> tuple[Range, ...]:
    """Token ranges of the prompt that are the steered context (their keys keep full attention).

    A message is steered if its `steer` flag says so, else if its role is in `spec.targets`; an assistant
    message with `tool_calls` never is (the model's own calls are not context). Every
    occurrence of each `spec.spans` substring inside any message content is steered as well.
    `messages=None` (raw completions) steers only spans.
    """
    ranges: list[Range] = []
    if messages is not None:
        for i, (m, span) in enumerate(zip(messages, rendered.message_spans, strict=True)):
            flag = m.get("steer")
            if flag is not None and not isinstance(flag, bool):
                raise SteeringError(f"messages[{i}].steer", "must be a boolean")
            if m.get("tool_calls"):
                continue
            if flag if flag is not None else m.get("role") in spec.targets:
                ranges.append(span)
    index = TokenIndex(rendered.offsets) if spec.spans else None
    for j, needle in enumerate(spec.spans):
        hits = 0
        for cs, ce in rendered.message_chars:
            # Non-overlapping occurrences, each mapped in O(log n): linear in the prompt per span.
            start = rendered.text.find(needle, cs, ce)
            while start >= 0:
                ranges.append(index.token_range(start, start + len(needle)))  # type: ignore[union-attr]
                hits += 1
                start = rendered.text.find(needle, start + len(needle), ce)
        if not hits:
            raise SteeringError(f"steering.spans[{j}]", f"{needle[:60]!r} was not found in any message")
    return merge_ranges(ranges)
