"""Typed responses. Lenient on purpose (defaults, extra fields kept) so that any OpenAI-compatible server's
answers parse; ctxsteer's additions (`steering`, `max_model_len`) are simply None elsewhere."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "Choice",
    "ChunkChoice",
    "Delta",
    "Health",
    "Message",
    "Model",
    "SteeringReport",
    "Tokenization",
    "Usage",
]


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class SteeringReport(_Response):
    """What the server applied (ctxsteer only): compare it with what was asked for."""

    strength: float
    alpha: float
    steered_tokens: int
    prompt_tokens: int
    layers: Literal["all"] | list[int] = "all"


class Message(_Response):
    role: str = "assistant"
    content: str | None = None


class Choice(_Response):
    index: int = 0
    message: Message = Field(default_factory=Message)
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletion(_Response):
    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[Choice] = Field(default_factory=list)
    usage: Usage | None = None
    steering: SteeringReport | None = None

    @property
    def text(self) -> str:
        """The first choice's content ("" when there is none)."""
        return (self.choices[0].message.content or "") if self.choices else ""


class Delta(_Response):
    role: str | None = None
    content: str | None = None


class ChunkChoice(_Response):
    index: int = 0
    delta: Delta = Field(default_factory=Delta)
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletionChunk(_Response):
    """One streamed delta; `usage` and `steering` ride on the last chunks."""

    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None
    steering: SteeringReport | None = None

    @property
    def text(self) -> str:
        """New text of choice 0 in this chunk ("" for role, usage and finish chunks)."""
        return "".join(c.delta.content or "" for c in self.choices if c.index == 0)


class Model(_Response):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    max_model_len: int | None = None


class Health(_Response):
    """/health + /ready + /version in one: `ok` means alive and ready to generate."""

    status: str
    ready: bool
    version: str | None = None
    model: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.ready


class Tokenization(_Response):
    """POST /tokenize: the prompt's token ids and which of them the steering would steer."""

    tokens: list[int]
    count: int
    max_model_len: int
    steered_spans: list[tuple[int, int]] = Field(default_factory=list)
    steered_tokens: int = 0
