"""The published OpenAPI document: the real request bodies, responses and errors, and the bearer scheme.

Routes read their bodies themselves (`read_json`, so that every failure is one OpenAI-shaped 400), which
hides the bodies from FastAPI's generator; this module states them, removes the 422 FastAPI assumes but
the server never sends, and lists the errors each route can answer with. Client generators and fuzzers
(schemathesis runs over this document in the test suite) then see the true contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ctxsteer.server.engine.interface import ModelInfo
from ctxsteer.server.protocol import UNSUPPORTED, ChatCompletionRequest, CompletionRequest, TokenizeRequest
from ctxsteer.server.protocol_responses import ResponsesRequest
from ctxsteer.server.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from ctxsteer.server.responses_api import ResponseObject
from ctxsteer.steering.schema import if_given, not_both, nullable, steering_json_schema
from ctxsteer.steering.spec import ROLES

ERRORS = {
    400: "Invalid request (the message names the parameter in `param`)",
    401: "Missing or wrong API key",
    404: "Unknown model or route",
    405: "Method not allowed",
    413: "Request body too large",
    415: "Content-Type is not application/json",
    429: "The server is at capacity; retry after `Retry-After` seconds",
    503: "The engine is not ready or is shutting down",
}
_GENERATE = (400, 401, 404, 413, 415, 429, 503)


@dataclass(frozen=True, slots=True)
class _Op:
    request: type[BaseModel] | None
    response: type[BaseModel] | dict[str, Any]
    errors: tuple[int, ...]
    stream: bool = False
    public: bool = False


# One server-sent event: `data` is a JSON chunk (the 200 schema's streaming twin), an `{"error": ...}`
# object if generation fails after the headers went out, or the final `[DONE]`.
_SSE_EVENT = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
    "description": "stream=true: SSE `data:` frames of JSON chunks, then `data: [DONE]`",
}
_STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
_VERSION = {
    "type": "object",
    "properties": {k: {"type": "string"} for k in ("version", "model", "device", "dtype")},
    "required": ["version", "model", "device", "dtype"],
}
OPS: dict[tuple[str, str], _Op] = {
    ("post", "/v1/chat/completions"): _Op(ChatCompletionRequest, ChatCompletionResponse, _GENERATE, True),
    ("post", "/v1/completions"): _Op(CompletionRequest, CompletionResponse, _GENERATE, True),
    ("post", "/v1/responses"): _Op(ResponsesRequest, ResponseObject, _GENERATE, True),
    ("post", "/tokenize"): _Op(TokenizeRequest, TokenizeResponse, (400, 401, 404, 413, 415)),
    ("get", "/v1/models"): _Op(None, ModelList, (401,)),
    ("get", "/v1/models/{model_id}"): _Op(None, ModelCard, (401, 404)),
    ("get", "/health"): _Op(None, _STATUS, (503,), public=True),  # 503: the engine failed to start
    ("get", "/ready"): _Op(None, _STATUS, (503,), public=True),
    ("get", "/version"): _Op(None, _VERSION, (), public=True),
}


def install_openapi(app: FastAPI, info: ModelInfo, *, auth: bool, profiles: list[str]) -> None:
    """Replace `app.openapi` with the generator below (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app, info, auth=auth, profiles=profiles)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI, info: ModelInfo, *, auth: bool, profiles: list[str]) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas: dict[str, Any] = {}
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    schemas.update(components.get("schemas", {}))
    ref = {cls: _add_schema(schemas, cls, mode) for cls, mode in _models()}
    _tighten_requests(schemas, info, profiles)
    components["schemas"] = schemas
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for (method, path), op in OPS.items():
        operation = doc.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        operation.pop("requestBody", None)
        responses: dict[str, Any] = {}
        body = {"schema": ref[op.response]} if not isinstance(op.response, dict) else {"schema": op.response}
        ok: dict[str, Any] = {"description": "Success", "content": {"application/json": body}}
        if op.stream:
            ok["content"]["text/event-stream"] = {"schema": _SSE_EVENT}
        responses["200"] = ok
        errors = [e for e in op.errors if auth or e != 401]
        errors += [e for e in (405,) if e not in errors]
        for status in errors:
            responses[str(status)] = {
                "description": ERRORS[status],
                "content": {"application/json": {"schema": ref[ErrorResponse]}},
            }
        operation["responses"] = responses
        if op.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref[op.request]}},
            }
        if auth:
            operation["security"] = [] if op.public else [{"bearer": []}]
    return doc


def _models() -> list[tuple[type[BaseModel], str]]:
    reqs = [
        (m, "validation")
        for m in (ChatCompletionRequest, CompletionRequest, TokenizeRequest, ResponsesRequest)
    ]
    resps = [
        ChatCompletionResponse,
        CompletionResponse,
        ResponseObject,
        TokenizeResponse,
        ModelList,
        ModelCard,
        ErrorResponse,
    ]
    return reqs + [(m, "serialization") for m in resps]


def _add_schema(schemas: dict[str, Any], cls: type[BaseModel], mode: str) -> dict[str, str]:
    schema = cls.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)  # type: ignore[arg-type]
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas[cls.__name__] = schema
    return {"$ref": f"#/components/schemas/{cls.__name__}"}


def _tighten_requests(schemas: dict[str, Any], info: ModelInfo, profiles: list[str]) -> None:
    """What pydantic cannot say from the type hints, written as JSON Schema so that the document is exact
    where JSON Schema can be: roles and content parts, stop and prompt limits, the fields that depend on
    one another, the steering object, and the only values accepted for OpenAI fields not implemented here.
    What it cannot express (prompt + max_tokens within the context; spans that occur in the prompt) is
    in the descriptions and answered with a 400 naming the parameter."""
    stop = {"type": "string", "minLength": 1}
    for name in ("ChatCompletionRequest", "CompletionRequest", "TokenizeRequest"):
        model = schemas[name]
        props = model["properties"]
        steering = steering_json_schema(
            info.num_layers, info.num_heads, profiles, auto_spans=name == "ChatCompletionRequest"
        )
        props["steering"] = nullable(steering)
        for field, (allowed, why) in UNSUPPORTED.items():
            if field in props:
                props[field] = {"enum": [*allowed, None], "description": f"Not implemented: {why}."}
        if "stop" in props:
            props["stop"] = {
                "anyOf": [stop, {"type": "array", "items": stop, "maxItems": 4}, {"type": "null"}]
            }
        rules = model.setdefault("allOf", [])
        if "stream_options" in props:
            rules.append(
                if_given(
                    "stream_options", {"required": ["stream"], "properties": {"stream": {"const": True}}}
                )
            )
            rules.append(not_both("steering", "steering_strength"))
        if "max_tokens" in props:
            props["max_tokens"]["description"] = "prompt tokens + max_tokens must fit max_model_len"
    chat = schemas["ChatCompletionRequest"]
    chat["allOf"].append(
        if_given(
            "top_logprobs",
            {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
            {"type": "integer", "minimum": 1},
        )
    )
    _tighten_bodies(schemas)
    _tighten_responses(
        schemas, steering_json_schema(info.num_layers, info.num_heads, profiles, auto_spans=True)
    )


def _tighten_responses(schemas: dict[str, Any], steering: dict[str, Any]) -> None:
    """/v1/responses: chat's steering object, and no value that would need server-side state."""
    model = schemas["ResponsesRequest"]
    props = model["properties"]
    props["steering"] = nullable(steering)
    stateless = "Not implemented: this server stores no responses."
    for field in ("store", "background"):
        props[field] = {"enum": [False, None], "description": stateless}
    props["previous_response_id"] = {"type": "null", "description": stateless}
    model.setdefault("allOf", []).append(not_both("steering", "steering_strength"))
    fmt = schemas["TextFormat"]
    fmt["if"] = {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]}
    fmt["then"] = {"required": ["name"], "properties": {"name": {"type": "string"}}}


def _tighten_bodies(schemas: dict[str, Any]) -> None:
    """Each body's own rules: the legacy prompt, /tokenize's one-of, roles and text-only content parts."""
    cmpl = schemas["CompletionRequest"]["properties"]
    text = {"type": "string", "minLength": 1}
    cmpl["prompt"] = {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}]}
    cmpl["echo"] = {"enum": [False, None], "description": "Not implemented."}
    cmpl["suffix"] = {"enum": ["", None], "description": "Not implemented."}
    cmpl["best_of"] = {
        "anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}],
        "description": "must equal n",
    }
    pair = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}
    schemas["TokenizeResponse"]["properties"]["steered_spans"] = {"type": "array", "items": pair}
    tok = schemas["TokenizeRequest"]
    absent = {"type": "null"}
    tok["oneOf"] = [
        {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": absent}},
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": absent}},
    ]
    message = schemas["ChatMessage"]["properties"]
    message["role"] = {"enum": [*ROLES, "developer"]}
    part = schemas["ContentPart"]
    part["properties"]["type"] = {"const": "text"}
    part["properties"]["text"] = {"type": "string"}
    part["required"] = ["type", "text"]
