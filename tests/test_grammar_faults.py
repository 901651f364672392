"""A grammar that trips llguidance's limits while generating is the request's fault, not the server's: the
engine says so on the failed row's output (`error_code` "invalid_grammar", `error_param` the grammar's
field), and `errors.generation_failed` makes it the 400 a grammar refused up front gets, or, once a stream's
200 is sent, an error event of type `invalid_request_error`. Here on a FakeEngine whose constrained rows
trip a few tokens in, through chat, legacy completions and /v1/responses (tests/test_structured_http.py
has the same against SmolLM2 and real llguidance limits)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine
from test_http_layer import MODEL, MSGS, TOKENIZER, Live, assert_error, live

from ctxsteer.server.engine.request import FinishReason, GenerationOutput, GenerationRequest
from ctxsteer.server.errors import generation_failed

REASON = "Parser Error: Current row has 4003 items; max is 2000"
SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}


class TrippingEngine(FakeEngine):
    """A constrained request's grammar trips after `trip_after` tokens, reported as the local engine
    reports it (`server/engine/local/grammar_mask.py`); unconstrained ones run as usual."""

    trip_after = 2

    async def _run(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        grammar, sent = request.sampling.grammar, 0
        inner = super()._run(request)
        try:
            async for out in inner:
                if grammar is not None and sent == self.trip_after:
                    yield GenerationOutput(
                        request.request_id, (), "", finish_reason=FinishReason.ERROR,
                        completion_tokens=sent, error=REASON, error_code="invalid_grammar",
                        error_param=grammar.param,
                    )  # fmt: skip
                    return
                yield out
                sent += 1
        finally:
            await inner.aclose()


@pytest.fixture(scope="module")
def srv() -> Iterator[Live]:
    with live(TrippingEngine(TOKENIZER)) as s:
        yield s


def _data(r: httpx.Response) -> list[Any]:
    """The JSON of every `data:` line of an SSE body (chat's `[DONE]` as the string)."""
    lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def _assert_grammar_error(error: dict[str, Any], param: str) -> None:
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_grammar",
        param,
    )
    assert REASON in error["message"] and "while generating" in error["message"], error


def test_the_mapping_decides_400_for_the_requests_fault_and_500_otherwise() -> None:
    base = GenerationOutput("r", (), "", finish_reason=FinishReason.ERROR, error=REASON)
    err = generation_failed(
        dataclasses.replace(base, error_code="invalid_grammar", error_param="tool_choice")
    )
    assert (err.status, err.type, err.code, err.param) == (
        400,
        "invalid_request_error",
        "invalid_grammar",
        "tool_choice",
    )
    assert REASON in err.message
    plain = generation_failed(base)
    assert (plain.status, plain.type, plain.code, plain.message) == (
        500,
        "server_error",
        "generation_error",
        REASON,
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": JSON_FORMAT}, "response_format"),
        ({"structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs"),
    ],
)
def test_chat_whole_is_a_400_and_streamed_an_error_event(
    srv: Live, extra: dict[str, Any], param: str
) -> None:
    _assert_grammar_error(assert_error(srv.chat(max_tokens=8, **extra), 400, param), param)
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 8, "stream": True, **extra}
    with srv.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200  # the first tokens went out before the grammar tripped
        events = _data(r)
    assert events[-1] == "[DONE]" and set(events[-2]) == {"error"}
    _assert_grammar_error(events[-2]["error"], param)
    assert sum(1 for e in events[:-2] if e["choices"][0]["delta"].get("content")) == TrippingEngine.trip_after
    assert srv.chat(max_tokens=3).status_code == 200  # unconstrained: unaffected


def test_legacy_completions_too(srv: Live) -> None:
    body = {"model": MODEL, "prompt": "Paris is", "max_tokens": 8, "response_format": JSON_FORMAT}
    _assert_grammar_error(
        assert_error(srv.http.post("/v1/completions", json=body), 400, "response_format"), "response_format"
    )


def test_responses_name_their_own_parameter(srv: Live) -> None:
    """/v1/responses runs as a chat request; the grammar's field is the Responses one (`text.format`),
    whole and in the stream's error event."""
    fmt = {"type": "json_schema", "name": "x", "schema": SCHEMA}
    body: dict[str, Any] = {"model": MODEL, "input": "Hi", "text": {"format": fmt}, "max_output_tokens": 8}
    _assert_grammar_error(
        assert_error(srv.http.post("/v1/responses", json=body), 400, "text.format"), "text.format"
    )
    with srv.http.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = _data(r)
    assert set(events[-1]) == {"error"} and events[0]["type"] == "response.created"
    _assert_grammar_error(events[-1]["error"], "text.format")
