"""Response schemas of the OpenAI-compatible API (pydantic v2), with ctxsteer's additions, and the one
builder of the response's `steering` report (`steering_info`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ctxsteer.steering.indicator import IndicatorMode
from ctxsteer.steering.spec import SteeringSpec, strength_to_alpha


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _now() -> int:
    return int(time.time())


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


class PromptTokensDetails(ResponseModel):
    cached_tokens: int


class UsageInfo(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Only from engines with a prefix cache (--engine vllm); left out of the JSON otherwise.
    prompt_tokens_details: PromptTokensDetails | None = Field(default=None, exclude_if=lambda v: v is None)


class AutoStrengthInfo(ResponseModel):
    """`strength: "auto"`: the bound and target asked for, and what the prompt's measure gave: its last
    position's attention on the context without steering, and as predicted at the chosen strength."""

    target_ratio: float
    max_strength: float
    unsteered_ratio: float | None = None
    predicted_ratio: float | None = None


class SpansGenerationInfo(ResponseModel):
    """steering.spans "auto": what the quoting generation cost and what it said."""

    prompt_tokens: int
    completion_tokens: int
    quote: str


class SteeringInfo(ResponseModel):
    """What steering was applied: echoed so clients can log and compare runs."""

    strength: float
    alpha: float
    steered_tokens: int
    prompt_tokens: int
    layers: Literal["all"] | list[int]
    method: str = "attention"
    cad_beta: float | None = Field(None, exclude_if=lambda v: v is None)
    spans: list[str] | None = Field(None, exclude_if=lambda v: v is None)  # with spans "auto": the choice
    spans_generation: SpansGenerationInfo | None = Field(None, exclude_if=lambda v: v is None)
    auto: AutoStrengthInfo | None = Field(None, exclude_if=lambda v: v is None)


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(ResponseModel):
    content: list[TokenLogprobInfo] | None


class FunctionCall(ResponseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None (JSON null) when the answer is only tool calls
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


def _omit_none(v: Any) -> bool:
    return v is None


class ChoiceContextAttention(ResponseModel):
    """One choice's context attention: per generated token, the share of attention (mean over layers and
    heads) that the query predicting it paid to the context tokens."""

    index: int
    ratio: float | None  # mean of per_token (None: no token generated)
    unsteered_ratio: float | None
    per_token: list[float]
    unsteered_per_token: list[float]  # the same scores without the steering bias (same hidden states)


class ContextAttention(ResponseModel):
    """`report.context_attention`: how much the response attended to the context (the steered tokens,
    i.e. by default the user messages), as served and as if unsteered."""

    ratio: float | None  # over every generated token of every choice
    unsteered_ratio: float | None
    context_tokens: int
    choices: list[ChoiceContextAttention]


class ContextIndicatorInfo(ResponseModel):
    """Whether `[IND]` was appended to the user turn (models tuned with the indicator). With "auto":
    the prompt's last-position attention on the context that decided, and the threshold."""

    mode: IndicatorMode
    applied: bool
    ratio: float | None = Field(None, exclude_if=_omit_none)
    threshold: float | None = Field(None, exclude_if=_omit_none)


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    steering: SteeringInfo
    context_attention: ContextAttention | None = Field(None, exclude_if=_omit_none)
    context_indicator: ContextIndicatorInfo | None = Field(None, exclude_if=_omit_none)


class DeltaFunctionCall(ResponseModel):
    name: str | None = Field(None, exclude_if=_omit_none)
    arguments: str | None = Field(None, exclude_if=_omit_none)


class DeltaToolCall(ResponseModel):
    """A piece of a streamed call: the first names it (id, type, name), the rest add argument text."""

    index: int
    id: str | None = Field(None, exclude_if=_omit_none)
    type: Literal["function"] | None = Field(None, exclude_if=_omit_none)
    function: DeltaFunctionCall


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_omit_none)
    content: str | None = Field(None, exclude_if=_omit_none)
    tool_calls: list[DeltaToolCall] | None = Field(None, exclude_if=_omit_none)


class ChatChunkChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = Field(None, exclude_if=_omit_none)
    steering: SteeringInfo | None = Field(None, exclude_if=_omit_none)
    context_attention: ContextAttention | None = Field(None, exclude_if=_omit_none)
    context_indicator: ContextIndicatorInfo | None = Field(None, exclude_if=_omit_none)


class CompletionLogprobs(ResponseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(ResponseModel):
    """Also the streaming chunk type: OpenAI streams legacy completions as `text_completion` objects."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(None, exclude_if=_omit_none)
    steering: SteeringInfo | None = Field(None, exclude_if=_omit_none)
    context_attention: ContextAttention | None = Field(None, exclude_if=_omit_none)


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ctxsteer"
    max_model_len: int
    # ctxsteer: the ranges `steering.layers` / `steering.heads` index (e.g. for `ctxsteer profile`)
    num_layers: int | None = Field(None, exclude_if=lambda v: v is None)
    num_heads: int | None = Field(None, exclude_if=lambda v: v is None)


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(ResponseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    steered_spans: list[tuple[int, int]]
    steered_tokens: int
    token_strs: list[str] | None = Field(None, exclude_if=_omit_none)


def steering_info(
    spec: SteeringSpec,
    steered: Sequence[tuple[int, int]],
    prompt_tokens: int,
    *,
    auto_spans: tuple[list[str], SpansGenerationInfo] | None = None,
    auto_pick: tuple[float, float, float] | None = None,
) -> SteeringInfo:
    """The response's `steering` object: what the request asked for, with what was chosen for it
    (`auto_spans`: the spans "auto" located and what quoting them cost; `auto_pick`: the engine's
    (strength, unsteered ratio, predicted ratio) for strength "auto")."""
    strength, alpha, auto = spec.strength, spec.alpha, None
    if spec.auto is not None:
        measured: dict[str, float] = {}
        if auto_pick is not None:
            strength, unsteered, predicted = auto_pick
            alpha = strength_to_alpha(strength)
            measured = {"unsteered_ratio": round(unsteered, 6), "predicted_ratio": round(predicted, 6)}
        auto = AutoStrengthInfo(
            target_ratio=spec.auto.target_ratio, max_strength=spec.auto.max_strength, **measured
        )
    spans, cost = auto_spans if auto_spans is not None else (None, None)
    return SteeringInfo(
        strength=strength,
        alpha=alpha,
        steered_tokens=sum(e - s for s, e in steered),
        prompt_tokens=prompt_tokens,
        layers="all" if spec.layers is None else list(spec.layers),
        method=spec.method,
        cad_beta=spec.cad_beta,
        spans=spans,
        spans_generation=cost,
        auto=auto,
    )
