"""The contract between the HTTP layer and the engine. The HTTP side imports only this and request.py."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ctxsteer.server.engine.request import GenerationOutput, GenerationRequest


class EngineError(Exception):
    """Base of the errors the engine raises to the HTTP layer."""


class QueueFull(EngineError):
    """The bounded waiting queue is full: answer 429 with Retry-After."""

    def __init__(self, retry_after_s: int = 1) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after_s = retry_after_s


class EngineDead(EngineError):
    """The engine thread stopped (crash or shutdown): answer 503."""


class EngineObserver:
    """Hooks for metrics (all optional; called by the engine, must be cheap and never raise)."""

    def on_step(self, batch_size: int, prefill_tokens: int) -> None: ...
    def on_first_token(self, request: GenerationRequest, ttft_s: float, queue_s: float) -> None: ...
    def on_token(self, request: GenerationRequest, itl_s: float | None) -> None:
        """A token after the first; `itl_s` None for a further token of the same engine step (n-gram
        speculation), which counts as generated but is no inter-token interval (as in vLLM)."""

    def on_finish(self, request: GenerationRequest, out: GenerationOutput, e2e_s: float) -> None: ...
    def on_draft(self, drafted: int, accepted: int) -> None:
        """A row verified `drafted` guessed tokens (n-gram speculation) and kept `accepted` of them."""


class Capability(StrEnum):
    """What an engine may serve beyond plain generation; the HTTP side refuses what it lacks with a 400."""

    STEERING = "steering"  # the attention bias (a request's alpha)
    CAD = "cad"  # context-aware decoding (a context-free twin row per request)
    PREFILL_ATTENTION = (
        "prefill_attention"  # measuring attention live: "auto" modes, report.context_attention
    )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str  # served model name
    path: str  # what was loaded (hub id, dir or gguf file)
    device: str  # "cpu" | "cuda:0" ...
    dtype: str  # "float32" | "bfloat16" ...
    max_model_len: int
    num_layers: int
    num_heads: int  # query heads per layer
    steering_unsupported: str | None = None  # why this engine cannot steer this model (steered -> 400)
    context_attention: bool = False  # the engine measures live context attention (`watch_context`)
    cad: bool = False  # the engine serves context-aware decoding (`GenerationRequest.cad`)

    @property
    def capabilities(self) -> frozenset[Capability]:
        """What this engine serves, from its flags: the one set the HTTP side checks requests against."""
        flags = {
            Capability.STEERING: self.steering_unsupported is None,
            Capability.CAD: self.cad,
            Capability.PREFILL_ATTENTION: self.context_attention,
        }
        return frozenset(c for c, on in flags.items() if on)


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_usage: float  # 0..1 of the KV/token budget in use


class AsyncEngine(abc.ABC):
    """Owns the model on its own thread; the event loop only awaits queues.

    `generate` yields outputs of one request until one carries `finish_reason`. Cancelling the
    iteration (client disconnect) aborts the request; its slot is freed within one engine step.
    """

    info: ModelInfo
    tokenizer: Any  # a transformers tokenizer: used for chat rendering and /tokenize

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Admit the request (raises QueueFull / EngineDead at once) and stream its outputs."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None: ...

    @property
    @abc.abstractmethod
    def max_requests(self) -> int:
        """The most requests the engine can ever hold at once (running + waiting): a request with more
        choices than this can never be admitted, which is a 400, not a 429."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True once a warm-up generation succeeded and the engine thread is alive."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the engine thread and run the warm-up generation."""

    @abc.abstractmethod
    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish (up to the timeout), then stop the thread."""


async def warm_up(engine: AsyncEngine) -> None:
    """One short greedy generation through the engine's whole path; raises if it fails (then not ready)."""
    from ctxsteer.server.engine.request import FinishReason, SamplingParams

    ids = engine.tokenizer("Hello", add_special_tokens=True)["input_ids"]
    warm = GenerationRequest("warmup", list(ids), SamplingParams(max_tokens=2, temperature=0.0))
    async for out in engine.generate(warm):
        if out.finish_reason == FinishReason.ERROR:
            raise RuntimeError(f"warm-up generation failed: {out.error}")
