"""The context-dependency indicator of Wang, Bai, Peng & Hsieh (arXiv 2411.02688): a special token `[IND]`
appended to the user turn of context-dependent examples during conditional fine-tuning, and at inference
to requests that need their context. Model-agnostic: the token goes at the end of the last user message's
content, so every chat template puts it before its own end-of-turn tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ctxsteer.steering.rows import SteerRow
from ctxsteer.steering.spec import SteeringError

INDICATOR = "[IND]"
IndicatorMode = Literal["off", "on", "auto"]  # context_indicator: never, always, by measured attention
MODES: tuple[str, ...] = get_args(IndicatorMode)


def indicator_id(tokenizer: Any) -> int | None:
    """The id of `[IND]` when the tokenizer has it as one added (special) token, else None."""
    added = getattr(tokenizer, "get_added_vocab", lambda: {})()
    tid = added.get(INDICATOR)
    return int(tid) if tid is not None else None


def mark_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A copy with `[IND]` appended to the content of the last user message (no separator: a special
    token splits the text around it, so the rest tokenizes exactly as without it)."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str) or content is None:
            m["content"] = (content or "") + INDICATOR
        else:  # OpenAI text parts
            m["content"] = [*content, {"type": "text", "text": INDICATOR}]
        return out
    raise SteeringError("context_indicator", "needs a user message to mark")


def insertion_point(plain: Sequence[int], marked: Sequence[int], token_id: int) -> int:
    """Where `marked` is `plain` with the indicator token inserted; SteeringError if it is not (a template
    that rewrites the text around it)."""
    i = 0
    while i < len(plain) and plain[i] == marked[i]:
        i += 1
    if len(marked) != len(plain) + 1 or marked[i] != token_id or list(marked[i + 1 :]) != list(plain[i:]):
        raise SteeringError(
            "context_indicator", "this chat template does not render the indicator as one inserted token"
        )
    return i


@dataclass(frozen=True, slots=True)
class IndicatorPlan:
    """`context_indicator: "auto"` for one request: prefill the plain prompt, measure the attention of its
    last position on the context; above `threshold`, continue with the marked prompt instead (its KV up to
    `insert_at` is reused, only the tokens from there on are prefilled again)."""

    insert_at: int
    marked_ids: tuple[int, ...]
    marked_steer: SteerRow
    threshold: float
