"""One conversation of `ctxsteer chat`: its history, the loaded context documents, the steering strength,
and streaming one answer to a terminal. Shared by the one-shot mode and the REPL.

A document loaded with --context or /context rides in the next user message (documents first, then the
question, as `Client.ask` does), so it enters the history once and is steered in every later turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

from ctxsteer.clients.base import Focus
from ctxsteer.clients.client import Client
from ctxsteer.clients.errors import ClientError
from ctxsteer.clients.prompts import ask_steering, user_content
from ctxsteer.clients.stream import ChatStream

__all__ = ["ChatSession", "describe"]


@dataclass
class ChatSession:
    client: Client
    strength: float | None = None
    system: str | None = None
    focus: Focus = "turn"
    params: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    documents: list[tuple[str, str]] = field(default_factory=list)  # (name, text), in load order
    _attached: list[str] = field(default_factory=list)  # document texts already in `history`
    _pending: list[str] = field(default_factory=list)  # document texts for the next user message

    def add_context(self, name: str, text: str) -> None:
        self.documents.append((name, text))
        self._pending.append(text)

    def reset(self) -> None:
        """Forget the conversation; the loaded documents go with the next message again."""
        self.history.clear()
        self._attached.clear()
        self._pending = [text for _, text in self.documents]

    def answer(self, question: str, out: TextIO) -> ChatStream:
        """Stream the answer to `out` and record the turn. On Ctrl-C the partial answer is kept (it is what
        the user saw) and KeyboardInterrupt propagates; on an error nothing is recorded."""
        user = {"role": "user", "content": user_content(question, self._pending)}
        system = [{"role": "system", "content": self.system}] if self.system else []
        docs = self._attached + self._pending
        stream = self.client.stream_chat(
            [*system, *self.history, user], ask_steering(docs, self.strength, focus=self.focus), **self.params
        )
        try:
            with stream:
                for chunk in stream:
                    if chunk.text:
                        out.write(chunk.text)
                        out.flush()
        except KeyboardInterrupt:
            _end_line(out, stream.text)
            if stream.text:
                self._record(user, stream.text)
            raise
        except ClientError:
            _end_line(out, stream.text)
            raise
        _end_line(out, stream.text)
        self._record(user, stream.text)
        return stream

    def _record(self, user: dict[str, Any], reply: str) -> None:
        self.history += [user, {"role": "assistant", "content": reply}]
        self._attached += self._pending
        self._pending = []


def _end_line(out: TextIO, text: str) -> None:
    """Finish the answer's last line, so that what follows starts on a fresh one."""
    if text and not text.endswith("\n"):
        out.write("\n")
        out.flush()


def _num(x: float) -> str:
    return f"{x:g}"


def describe(stream: ChatStream) -> str:
    """The line shown after an answer: token usage and the steering the server says it applied."""
    u = stream.usage
    usage = (
        f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens" if u else "usage not reported"
    )
    s = stream.steering
    if s is None:
        steering = "steering not reported (server without ctxsteer steering?)"
    elif s.alpha == 1.0:
        steering = "steering off (strength 1)"
    else:
        layers = s.layers if s.layers == "all" else ",".join(map(str, s.layers))
        steering = (
            f"steering strength {_num(s.strength)} (alpha {_num(s.alpha)}) on {s.steered_tokens} of "
            f"{s.prompt_tokens} prompt tokens, layers {layers}"
        )
    finish = f", finish {stream.finish_reason}" if stream.finish_reason else ""
    return f"[{usage}{finish} | {steering}]"
