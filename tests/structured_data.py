"""Pydantic models, prompts and schemas shared by the structured-output tests (local engine, SDK, LangChain,
vLLM): a person that terminates under any sampling, the weather tool's parameters as a model, a schema
nested past the grammar bounds, and objects of many optional properties (past llguidance's parser limits)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

ALICE = [{"role": "user", "content": "Alice is 31 and lives in Paris. Give her name, age and city as JSON."}]


class Person(BaseModel):
    """Terminates under any sampling: bounded string, bounded integer, an enum."""

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)
    city: Literal["Paris", "London", "Rome", "Berlin"]


class WeatherArgs(BaseModel, extra="forbid"):
    """get_weather's parameters (tests/tools_data.py) as a model: arguments that validate against it parse."""

    city: Literal["Paris", "London", "Rome"]


def ref_chain(n: int) -> dict[str, Any]:
    """A JSON schema of n objects, each holding the next through a `$ref`: 3n + 3 levels deep counting the
    refs (server/engine/grammar.py's MAX_SCHEMA_DEPTH is 128). Some 700 killed the server before that bound
    (llguidance's compile recursion overflowed the stack)."""
    defs = {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
    return {"$defs": {**defs, f"d{n}": {"type": "string"}}, "$ref": "#/$defs/d0"}


def many_optional(n: int, **first: Any) -> dict[str, Any]:
    """An object of `first` (required) and then `n` optional string properties. It passes validation, but
    once the object is open llguidance's parser has about 4n items in one row, past its limit of 2000
    (server/engine/grammar.py's PARSER_LIMITS) from n = 500: on the first token ("{") without `first`;
    with a short required string first, on the token that closes that string, a few tokens in."""
    props = {**first, **{f"p{i}": {"type": "string"} for i in range(n)}}
    return {"type": "object", "properties": props, "required": list(first)}
