"""Request schemas of POST /v1/responses (the subset of OpenAI's Responses API that vLLM serves) and their
conversion to a chat completion request: the route runs the chat pipeline, so steering, output grammars
and tool calling mean here exactly what they mean on /v1/chat/completions.

Everything that needs server-side state (`store: true`, `previous_response_id`, `background: true`,
`conversation`) is a 400: this server keeps no responses, so the client sends the whole conversation in
`input`. Checks across fields raise at the culprit (`located`), so the 400 names the Responses parameter,
not a chat one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ctxsteer.server.protocol import ChatCompletionRequest, ReportOptions
from ctxsteer.server.protocol_base import OpenAIBaseModel
from ctxsteer.server.protocol_tools import TOOL_CHOICE_RULE, FunctionDef, located
from ctxsteer.steering.spec import MAX_STRENGTH

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_STATELESS = "is not supported: this server stores no responses; send the whole conversation in 'input'"


class InputText(OpenAIBaseModel):
    """A text part of a message item (`output_text` parts come back from earlier responses)."""

    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(OpenAIBaseModel):
    type: Literal["message"] | None = None  # the short form ({"role", "content"}) leaves it out
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        """Content as one string: parts are joined with newlines, as chat joins its text parts."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class FunctionCallItem(OpenAIBaseModel):
    """A call the model made in an earlier turn (sent back before its result)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(pattern=NAME_PATTERN)
    arguments: str


class FunctionCallOutputItem(OpenAIBaseModel):
    """The result of an earlier call: a chat `tool` message."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str


def _item_kind(v: Any) -> str | None:
    """The union's tag: a message item may omit `type`; any other item kind is refused by name."""
    kind = (v.get("type") if isinstance(v, dict) else getattr(v, "type", None)) or "message"
    return _TAGS.get(kind) if isinstance(kind, str) else None


# dashed tags: the 400's `param` leaves them out of its path (input[0].role, not input[0].message.role)
_TAGS = {"message": "message-item", "function_call": "function-call", "function_call_output": "call-output"}


InputItem = Annotated[
    Annotated[MessageItem, Tag("message-item")]
    | Annotated[FunctionCallItem, Tag("function-call")]
    | Annotated[FunctionCallOutputItem, Tag("call-output")],
    Discriminator(
        _item_kind,
        custom_error_type="unsupported_parameter",
        custom_error_message="input items must be messages, 'function_call' or 'function_call_output' items",
    ),
]


class FunctionTool(FunctionDef):
    """A function tool in the Responses shape: chat's function definition, flat (no nested `function`)."""

    type: Literal["function"]


class FunctionToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    name: str


ToolChoice = Literal["none", "auto", "required"] | FunctionToolChoice


class TextFormat(OpenAIBaseModel):
    """`text.format`: plain text, any JSON object, or JSON valid against `schema` (chat's response_format)."""

    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON value
    strict: bool | None = None

    @model_validator(mode="after")
    def _name_with_schema(self) -> TextFormat:
        if self.type == "json_schema" and self.name is None:
            raise located("TextFormat", ("name",), "a 'json_schema' format needs a 'name'")
        return self

    def response_format(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        spec = {
            "name": self.name,
            "schema": self.schema_,
            "description": self.description,
            "strict": self.strict,
        }
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}

    def echo(self) -> dict[str, Any]:
        """As the response states it (the SDK's config wants a schema with a json_schema format)."""
        out = self.model_dump(by_alias=True, exclude_none=True, include=set(type(self).model_fields))
        if self.type == "json_schema":
            out.setdefault("schema", {})
        return out


class TextConfig(OpenAIBaseModel):
    format: TextFormat | None = None


class ResponsesRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra=TOOL_CHOICE_RULE)

    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None  # a system message before the input
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None  # None = "auto" with tools
    parallel_tool_calls: bool | None = None  # None = true
    stream: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None  # accepted and echoed; nothing is stored
    steering: dict[str, Any] | None = None  # as on chat completions (validated when prepared)
    steering_strength: float | None = Field(None, ge=1.0, le=MAX_STRENGTH)
    report: ReportOptions | None = None
    # Server-side state, which this server does not keep: only the values that need none are accepted.
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None  # a stored conversation's id: state too

    @field_validator("steering_strength")
    @classmethod
    def _one_steering(cls, strength: float | None, info: ValidationInfo) -> float | None:
        if strength is not None and info.data.get("steering") is not None:
            raise PydanticCustomError(
                "invalid_value", "give either 'steering' or 'steering_strength', not both"
            )
        return strength

    @field_validator("store", "previous_response_id", "background", "conversation")
    @classmethod
    def _stateless(cls, v: Any, info: ValidationInfo) -> Any:
        if v not in (None, False):
            name = str(info.field_name)
            raise PydanticCustomError(
                "unsupported_parameter", "'{name}' {why}", {"name": name, "why": _STATELESS}
            )
        return v

    @model_validator(mode="after")
    def _tools_agree(self) -> ResponsesRequest:
        title = type(self).__name__
        names = [t.name for t in self.tools or ()]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise located(title, ("tools", i, "name"), f"duplicate function name {name!r}")
        choice = self.tool_choice
        if choice not in (None, "none"):
            if not names:
                raise located(title, ("tool_choice",), "tool_choice other than 'none' needs 'tools'")
            if isinstance(choice, FunctionToolChoice) and choice.name not in names:
                raise located(title, ("tool_choice",), f"no tool is a function named {choice.name!r}")
            fmt = self.text.format if self.text is not None else None
            if choice != "auto" and fmt is not None and fmt.type != "text":
                raise located(
                    title, ("text", "format"), "a JSON text.format cannot be combined with a forced call"
                )
        _check_call_ids(title, self.input)
        return self

    # ------------------------------------------------------------ conversions

    @property
    def num_choices(self) -> int:
        return 1  # the Responses API has no `n`

    def chat_messages(self) -> list[dict[str, Any]]:
        """`instructions` as a system message, then the input; consecutive function_call items (and the
        assistant message before them) become one assistant message with `tool_calls`."""
        out: list[dict[str, Any]] = []
        if self.instructions is not None:
            out.append({"role": "system", "content": self.instructions})
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                out.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function"}
                call["function"] = {"name": item.name, "arguments": item.arguments}
                if not out or out[-1]["role"] != "assistant":
                    out.append({"role": "assistant", "content": None})
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return out

    def to_chat(self) -> ChatCompletionRequest:
        """The chat completion request this request runs as."""
        fmt = self.text.format if self.text is not None else None
        choice = self.tool_choice
        body = {
            "model": self.model,
            "messages": self.chat_messages(),
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": self.stream,
            "user": self.user,
            "steering": self.steering,
            "steering_strength": self.steering_strength,
            "report": self.report.model_dump() if self.report is not None else None,
            "response_format": fmt.response_format() if fmt is not None else None,
            "tools": [_chat_tool(t) for t in self.tools] if self.tools else None,
            "tool_choice": _chat_choice(choice) if choice is not None else None,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})

    def echo(self) -> dict[str, Any]:
        """The request fields a Response object states (OpenAI's defaults where they were left out)."""
        fmt = self.text.format if self.text is not None and self.text.format is not None else None
        choice = self.tool_choice or "auto"
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "tools": [t.model_dump(include=set(FunctionTool.model_fields)) for t in self.tools or ()],
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(include={"type", "name"}),
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "text": {"format": fmt.echo() if fmt is not None else {"type": "text"}},
            "metadata": self.metadata or {},
            "user": self.user,
        }


def _check_call_ids(title: str, items: str | list[Any]) -> None:
    """Every function_call_output answers a function_call item before it (by call_id)."""
    seen: set[str] = set()
    for i, item in enumerate(items if isinstance(items, list) else ()):
        if isinstance(item, FunctionCallItem):
            seen.add(item.call_id)
        elif isinstance(item, FunctionCallOutputItem) and item.call_id not in seen:
            msg = f"{item.call_id!r} is not the call_id of an earlier function_call item"
            raise located(title, ("input", i, "call_id"), msg)


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    fn = tool.model_dump(include={"name", "description", "parameters", "strict"}, exclude_none=True)
    return {"type": "function", "function": fn}


def _chat_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.name}}
