"""Response schemas of POST /v1/responses: the Response object (output items, usage, the request fields
the openai SDK's `Response` model requires echoed back, ctxsteer's `steering` report) and the typed
events of its stream. Ids have OpenAI's shapes (`resp_`, `msg_`, `fc_`, `call_`), which clients log and
send back as input items."""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import Field

from ctxsteer.server.responses import (
    ContextAttention,
    ContextIndicatorInfo,
    ResponseModel,
    SteeringInfo,
    UsageInfo,
)

Status = Literal["in_progress", "completed", "incomplete"]


def new_item_id(prefix: str) -> str:
    """`msg_`/`fc_` and 24 hex characters (a call's own `call_id` comes from server.tools.output)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def _omit_none(v: Any) -> bool:
    return v is None


class OutputText(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(ResponseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Status = "completed"
    content: list[OutputText]


class OutputFunctionCall(ResponseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str  # JSON text
    status: Status = "completed"


OutputItem = Annotated[OutputMessage | OutputFunctionCall, Field(discriminator="type")]


class InputTokensDetails(ResponseModel):
    cached_tokens: int = 0


class OutputTokensDetails(ResponseModel):
    reasoning_tokens: int = 0


class ResponseUsage(ResponseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)

    @classmethod
    def of(cls, usage: UsageInfo) -> ResponseUsage:
        """Chat's usage in the Responses names (prefix-cache hits where the engine reports them)."""
        details = usage.prompt_tokens_details
        return cls(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=details.cached_tokens if details else 0),
        )


class IncompleteDetails(ResponseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(ResponseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    model: str
    status: Status
    incomplete_details: IncompleteDetails | None = None
    error: None = None
    output: list[OutputItem]
    usage: ResponseUsage | None = None  # None while in progress (stream events)
    # the request, echoed (OpenAI's defaults where it left them out)
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float
    top_p: float
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    text: dict[str, Any]
    metadata: dict[str, str]
    user: str | None = None
    store: bool = False
    previous_response_id: None = None
    background: bool = False
    # ctxsteer: what was applied (in stream events, only on the final response)
    steering: SteeringInfo | None = Field(None, exclude_if=_omit_none)
    context_attention: ContextAttention | None = Field(None, exclude_if=_omit_none)
    context_indicator: ContextIndicatorInfo | None = Field(None, exclude_if=_omit_none)

    @property
    def output_text(self) -> str:
        """The text of every output message, as the SDK's property joins it."""
        return "".join(
            c.text for item in self.output if isinstance(item, OutputMessage) for c in item.content
        )
