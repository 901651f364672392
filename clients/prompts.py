"""How a document and a question become one user turn for steering.

The paper (arXiv 2411.02688) steers the whole user turn: attention to every prompt token outside the
user's messages (system prompt, chat-template tokens, earlier assistant turns) is scaled by alpha =
1/strength. So `ask` puts the documents first and the question last in a single user message and steers
that turn (focus="turn", the default). focus="context" steers only the documents' text (via `spans`),
leaving the question unsteered, PASTA-style.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from ctxsteer.clients.steering import Steering

__all__ = ["ask_messages", "ask_steering", "context_list", "user_content"]

SEPARATOR = "\n\n"


def context_list(context: str | Sequence[str] | None) -> list[str]:
    """One document or several, stripped (a file's last newline is noise, and templates that trim
    message content would make an unstripped document unfindable as a span); blank ones are dropped."""
    if context is None:
        return []
    docs = [context] if isinstance(context, str) else list(context)
    return [d.strip() for d in docs if d.strip()]


def user_content(question: str, context: str | Sequence[str] | None = None) -> str:
    """Documents, then the question, separated by blank lines."""
    return SEPARATOR.join([*context_list(context), question])


def ask_messages(
    question: str, context: str | Sequence[str] | None = None, *, system: str | None = None
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_content(question, context)})
    return messages


def ask_steering(
    context: str | Sequence[str] | None,
    strength: float | None,
    *,
    focus: Literal["turn", "context"] = "turn",
) -> Steering | None:
    """None (the server's default) when nothing is asked for; else steer the user turn or the documents."""
    if focus not in ("turn", "context"):
        raise ValueError(f"focus must be 'turn' or 'context', got {focus!r}")
    docs = context_list(context)
    if focus == "context" and docs:
        return Steering(strength=strength, spans=docs)
    return None if strength is None else Steering(strength=strength)
