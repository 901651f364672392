"""Request schemas of structured outputs and token biases: OpenAI's `response_format` and `logit_bias`,
and vLLM's `structured_outputs` extension (same names and meaning as vLLM's), turned into the engine's
`Grammar` and bias list. Whether a grammar compiles is checked when the request is prepared
(`server.engine.grammar`), so its 400 carries the library's reason.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ctxsteer.server.engine.request import Grammar
from ctxsteer.server.protocol_base import OpenAIBaseModel

MAX_LOGIT_BIAS = 300  # OpenAI's limits: at most 300 entries, each in [-100, 100]
LOGIT_BIAS_RANGE = 100.0
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


class JsonSchemaFormat(OpenAIBaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON value, as OpenAI's
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise _invalid("must be 1 to 64 characters of a-z, A-Z, 0-9, underscores and dashes")
        return name


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise _invalid("'json_schema' is required with type 'json_schema' and allowed only with it")
        return self

    def grammar(self) -> Grammar | None:
        if self.type == "json_object":
            return Grammar("json_object")
        if self.json_schema is not None:
            return Grammar("json_schema", json.dumps(self.json_schema.schema_ or {}))
        return None


class StructuredOutputs(OpenAIBaseModel):
    """vLLM's extension: exactly one of a JSON schema, a regex, a list of choices or a grammar (Lark)."""

    model_config = ConfigDict(populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar_: str | None = Field(None, alias="grammar")
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [
            v for v in (self.json_, self.regex, self.choice, self.grammar_, self.json_object or None) if v
        ]
        if len(given) != 1:
            raise _invalid("give exactly one of 'json', 'regex', 'choice', 'grammar' or 'json_object'")
        return self

    def grammar(self) -> Grammar:
        param = "structured_outputs"
        if self.json_ is not None:
            text = self.json_ if isinstance(self.json_, str) else json.dumps(self.json_)
            return Grammar("json_schema", text, param)
        if self.regex is not None:
            return Grammar("regex", self.regex, param)
        if self.choice is not None:
            return Grammar("choice", json.dumps(self.choice), param)
        if self.grammar_ is not None:
            return Grammar("grammar", self.grammar_, param)
        return Grammar("json_object", "", param)


def check_logit_bias(bias: dict[str, float] | None) -> dict[str, float] | None:
    """OpenAI's rules: token ids as decimal strings, at most 300, each bias in [-100, 100]."""
    if bias is None:
        return None
    if len(bias) > MAX_LOGIT_BIAS:
        raise _invalid(f"at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(bias)}")
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 12:
            raise _invalid(f"keys must be token ids (non-negative integers as strings), got {key!r}")
        if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
            raise _invalid(f"biases must be in [-100, 100], got {value} for token {key}")
    return bias


def logit_bias_pairs(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    return tuple((int(k), float(v)) for k, v in (bias or {}).items())
