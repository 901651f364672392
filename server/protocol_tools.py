"""Request schemas of chat messages and tool calling: messages and their text parts, OpenAI's `tools` and
`tool_choice`, assistant messages that carry `tool_calls` and `tool` messages that answer them, and the
checks across them (protocol.py's requests use them). Reading calls out of the output is server/tools/.

Cross-field errors are raised as ValidationErrors located at the culprit (`located`), so the 400's
`param` names it (e.g. `messages[3].tool_call_id`) and not just the request.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from ctxsteer.server.protocol_base import OpenAIBaseModel
from ctxsteer.steering.spec import ROLES

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LEGACY = "is not supported (the legacy functions API; use 'tools')"
# The schema of a chat request: a tool_choice other than "none" needs tools (that a named one is among them
# is checked only).
TOOL_CHOICE_RULE = {
    "dependentSchemas": {
        "tool_choice": {
            "anyOf": [
                {"properties": {"tool_choice": {"enum": ["none", None]}}},
                {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
            ]
        }
    }
}


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def located(title: str, loc: tuple[str | int, ...], message: str, value: Any = None) -> ValidationError:
    """A 400-bound validation error at `loc` (raised from a validator, pydantic prefixes outer locations)."""
    err = PydanticCustomError("invalid_value", message)
    return ValidationError.from_exception_data(title, [InitErrorDetails(type=err, loc=loc, input=value)])


class FunctionDef(OpenAIBaseModel):
    name: str = Field(pattern=_NAME.pattern)  # in the schema too: generated clients send valid names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments object
    strict: bool | None = None


class ChatTool(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    """`{"type": "function", "function": {"name": ...}}`: the model must call this function."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunction(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text, as the API returned it


class ToolCall(OpenAIBaseModel):
    """A call the assistant made earlier in the conversation (sent back with its result)."""

    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ContentPart(OpenAIBaseModel):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise _invalid(f"content part type {self.type!r} is not supported; only 'text' parts are")
        if self.text is None:
            raise _invalid("a 'text' content part needs a 'text' string")
        return self


# The published schema states what a schema can: a tool message's id and content are required, other roles
# carry no tool_call_id, only the assistant tool_calls (that the id answers an earlier call is checked only).
_MESSAGE_RULES = {
    "if": {"properties": {"role": {"const": "tool"}}, "required": ["role"]},
    "then": {
        "required": ["tool_call_id", "content"],
        "properties": {"content": {"type": ["string", "array"]}, "tool_call_id": {"type": "string"}},
    },
    "else": {"properties": {"tool_call_id": {"type": "null"}}},
}


def first_not_tool(schema: dict[str, Any]) -> None:
    """The schema of `messages`: a tool result answers an earlier call, so it never opens the conversation
    (the first item is a message whose role is not "tool")."""
    for arr in (schema, *schema.get("anyOf", ())):
        if "items" in arr:
            not_tool = {"properties": {"role": {"not": {"const": "tool"}}}}
            arr["prefixItems"] = [{"allOf": [arr["items"], not_tool]}]


class ChatMessage(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra=_MESSAGE_RULES)

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    steer: bool | None = None  # ctxsteer: force this message in (True) or out (False) of the steered context
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made (its content may be null)
    tool_call_id: str | None = None  # role "tool": the call whose result this is

    @field_validator("role")
    @classmethod
    def _role(cls, role: str) -> str:
        if role == "developer":  # OpenAI's newer name for the system role
            return "system"
        if role == "function":
            raise PydanticCustomError("unsupported_parameter", f"role 'function' {LEGACY}")
        if role not in ROLES:
            raise _invalid(f"unknown role {role!r}; expected one of {ROLES}")
        return role

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        check_message(self)
        return self

    def text(self) -> str:
        """Content as one string: text parts are joined with newlines."""
        if isinstance(self.content, list):
            return "\n".join(p.text or "" for p in self.content)
        return self.content or ""

    def to_render(self) -> dict[str, Any]:
        """The dict `steering.spans.render_chat` expects."""
        out: dict[str, Any] = {"role": self.role, "content": self.text(), "steer": self.steer}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def tool_dicts(tools: Sequence[ChatTool] | None) -> list[dict[str, Any]] | None:
    """Plain OpenAI-shaped tool dicts (unset fields left out); None when there are none."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def check_tools(title: str, tools: Sequence[ChatTool] | None) -> None:
    """Function names are unique (a call names one)."""
    seen: set[str] = set()
    for i, tool in enumerate(tools or ()):
        if tool.function.name in seen:
            raise located(
                title, ("tools", i, "function", "name"), f"duplicate function name {tool.function.name!r}"
            )
        seen.add(tool.function.name)


def check_tool_choice(title: str, tools: Sequence[ChatTool] | None, choice: ToolChoice | None) -> None:
    """tool_choice needs tools (but "none"), and a named one must be among them."""
    if choice is None or choice == "none":
        return
    if not tools:
        raise located(title, ("tool_choice",), "tool_choice other than 'none' needs 'tools'")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
        raise located(title, ("tool_choice",), f"no tool is a function named {choice.function.name!r}")


def check_tool_messages(title: str, messages: Sequence[Any]) -> None:
    """Every `tool` message answers a call an earlier assistant message made (by its id)."""
    ids: set[str] = set()
    for i, m in enumerate(messages):
        for call in m.tool_calls or ():
            ids.add(call.id)
        if m.role == "tool" and m.tool_call_id not in ids:
            raise located(
                title,
                ("messages", i, "tool_call_id"),
                f"{m.tool_call_id!r} is not the id of a tool call of an earlier assistant message",
            )


def check_message(m: Any) -> None:
    """One message's tool fields (ChatMessage's own validator): calls only from the assistant, results only
    in `tool` messages, which need the call's id and content; a tool-call message is never steered."""
    title = "ChatMessage"
    if m.tool_calls is not None and m.role != "assistant":
        raise located(title, ("tool_calls",), "only assistant messages carry tool_calls")
    if m.role == "tool":
        if m.tool_call_id is None:
            raise located(title, ("tool_call_id",), "a 'tool' message needs the tool_call_id it answers")
        if m.content is None:
            raise located(title, ("content",), "a 'tool' message needs content (the tool's result)")
    elif m.tool_call_id is not None:
        raise located(title, ("tool_call_id",), "only 'tool' messages carry tool_call_id")
    if m.tool_calls and m.steer:
        raise located(title, ("steer",), "an assistant message with tool_calls is never steered")


def forced_tool(tools: Sequence[ChatTool] | None, choice: ToolChoice | None) -> str | dict[str, Any] | None:
    """tool_choice when it forces a call ("required" or a named function), in the form server.tools takes."""
    if not tools or choice is None or choice in ("none", "auto"):
        return None
    if isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.function.name}}


def check_tool_request(
    title: str,
    tools: Sequence[ChatTool] | None,
    choice: ToolChoice | None,
    messages: Sequence[Any],
    formats: dict[str, Any],
) -> None:
    """A chat request's tools, tool_choice and tool messages fit together; a forced call is its own output
    constraint, so it excludes the `formats` (response_format, structured_outputs) other than text."""
    check_tools(title, tools)
    check_tool_choice(title, tools, choice)
    check_tool_messages(title, messages)
    if forced_tool(tools, choice) is None:
        return
    for name, fmt in formats.items():
        if fmt is not None and getattr(fmt, "type", None) != "text":
            shown = choice if isinstance(choice, str) else "naming a function"
            raise located(title, (name,), f"'{name}' cannot be combined with tool_choice {shown!r}")
