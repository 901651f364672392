"""Structured outputs and logit_bias end to end: `ctxsteer serve` on the embedded SmolLM2 (a real uvicorn
subprocess, one for the module) driven by the official openai SDK, as users call it: the SDK's `parse` and
`stream` helpers with a pydantic model, json_object, vLLM's `structured_outputs` (choice, regex), the
legacy completions route, n > 1, logit_bias, cut answers, and bad constraints as 400s that leave the
server serving, grammars past llguidance's parser limits included (on their first token, or a few tokens
in: then a streamed request's error event). tests/test_http_layer.py checks the 400s' shapes on a fake
engine; here they meet the real grammar compiler and tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

import httpx
import openai
import pytest
from server_metrics import samples
from server_process import ServerProcess
from structured_data import ALICE, Person, many_optional, ref_chain
from tools_data import WEATHER_TOOL

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
Timed = tuple[httpx.Response, float]
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


PERSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": Person.model_json_schema()},
}


def token_id(smollm2_server: ServerProcess, text: str) -> int:
    """The id of `text`, which must be one token (found through the server's own /tokenize)."""
    r = httpx.post(
        smollm2_server.url + "/tokenize", json={"prompt": text, "return_token_strs": True}, timeout=30
    )
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    assert len(ids) == 1, (text, r.json())
    return ids[0]


def first_tokens(smollm2_sdk: openai.OpenAI, messages: list[dict], n: int = 3, **kw: Any) -> list[str]:
    r = smollm2_sdk.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=n, temperature=0, logprobs=True, **kw
    )
    return [t.token for t in r.choices[0].logprobs.content]


def test_sdk_parse_returns_the_model_unsteered_and_steered(smollm2_sdk: openai.OpenAI) -> None:
    for extra in (None, {"steering": {"strength": 2}}):
        r = smollm2_sdk.chat.completions.parse(
            model=MODEL,
            messages=ALICE,
            response_format=Person,
            temperature=0,
            max_tokens=80,
            extra_body=extra,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Person), choice.message
        # greedy SmolLM2 reads the facts off the context (observed: Alice, 31, Paris, both ways)
        assert choice.message.parsed == Person(name="Alice", age=31, city="Paris")
        if extra is not None:
            report = r.model_extra["steering"]
            assert report["strength"] == 2 and report["steered_tokens"] > 0


def test_sdk_stream_helper_and_plain_stream(smollm2_sdk: openai.OpenAI) -> None:
    with smollm2_sdk.chat.completions.stream(
        model=MODEL, messages=ALICE, response_format=Person, temperature=0, max_tokens=80
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    assert "content.delta" in events and "content.done" in events
    assert isinstance(final.choices[0].message.parsed, Person)

    chunks = smollm2_sdk.chat.completions.create(
        model=MODEL, messages=ALICE, response_format=PERSON_FORMAT, temperature=0.8, seed=3, max_tokens=80,
        stream=True,
    )  # fmt: skip
    pieces, finish = [], None
    for chunk in chunks:
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "stop" and sum(1 for p in pieces if p) > 5, pieces  # really streamed, in pieces
    Person.model_validate_json("".join(pieces))


def test_json_object(smollm2_sdk: openai.OpenAI) -> None:
    r = smollm2_sdk.chat.completions.create(
        model=MODEL, messages=ALICE, response_format={"type": "json_object"}, temperature=0, max_tokens=80
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_structured_outputs_choice_and_regex(smollm2_sdk: openai.OpenAI) -> None:
    choices = ["no", "yes", "maybe not"]
    question = [{"role": "user", "content": "Is Paris in Germany? Answer yes or no."}]
    for temperature in (0, 1.5):
        r = smollm2_sdk.chat.completions.create(
            model=MODEL, messages=question, temperature=temperature, seed=11, max_tokens=20,
            extra_body={"structured_outputs": {"choice": choices}},
        )  # fmt: skip
        assert r.choices[0].message.content in choices, r.choices[0].message
    pattern = r"[A-Z][a-z]+ is [0-9]{1,3} years old\."
    r = smollm2_sdk.chat.completions.create(
        model=MODEL, messages=ALICE, temperature=0, max_tokens=30,
        extra_body={"structured_outputs": {"regex": pattern}},
    )  # fmt: skip
    assert re.fullmatch(pattern, r.choices[0].message.content), r.choices[0].message.content


def test_completions_with_a_json_schema(smollm2_sdk: openai.OpenAI) -> None:
    r = smollm2_sdk.completions.create(
        model=MODEL, prompt="Alice is 31 and lives in Paris. As JSON: ", temperature=0, max_tokens=80,
        extra_body={"response_format": PERSON_FORMAT},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    Person.model_validate_json(r.choices[0].text)


def test_n_choices_with_seed_each_follow_the_schema(smollm2_sdk: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": ALICE, "response_format": Person, "max_tokens": 80}
    r = smollm2_sdk.chat.completions.parse(n=2, seed=7, temperature=1.0, **kw)
    assert len(r.choices) == 2
    assert all(isinstance(c.message.parsed, Person) for c in r.choices), r.choices
    again = smollm2_sdk.chat.completions.parse(n=2, seed=7, temperature=1.0, **kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_logit_bias_bans_and_forces_tokens(smollm2_server: ServerProcess, smollm2_sdk: openai.OpenAI) -> None:
    greedy = first_tokens(smollm2_sdk, CAPITAL)
    first = token_id(smollm2_server, greedy[0])
    banned = first_tokens(smollm2_sdk, CAPITAL, logit_bias={str(first): -100})
    assert banned[0] != greedy[0], banned
    hello = token_id(smollm2_server, "Hello")
    assert greedy[0] != "Hello"
    assert first_tokens(smollm2_sdk, CAPITAL, logit_bias={str(hello): 100}) == ["Hello"] * 3
    # Under a grammar the constraint wins: a forced token the grammar forbids is never sampled.
    r = smollm2_sdk.chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=10, logit_bias={str(hello): 100},
        extra_body={"structured_outputs": {"choice": ["Paris", "Lyon"]}},
    )  # fmt: skip
    assert r.choices[0].message.content in ("Paris", "Lyon")


def test_a_cut_answer_finishes_with_length(smollm2_sdk: openai.OpenAI) -> None:
    r = smollm2_sdk.chat.completions.create(
        model=MODEL, messages=ALICE, response_format=PERSON_FORMAT, temperature=0, max_tokens=5
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)
    with pytest.raises(openai.LengthFinishReasonError):  # what the SDK's parse makes of it
        smollm2_sdk.chat.completions.parse(
            model=MODEL, messages=ALICE, response_format=Person, temperature=0, max_tokens=5
        )


def test_requests_with_different_constraints_share_a_batch(smollm2_server: ServerProcess) -> None:
    """Four rows in one batch (the server's --max-num-seqs 4), each with its own grammar or none: each
    follows its own, and the unconstrained row is the same greedy text as alone (no mask leaked to it)."""
    base = {"model": MODEL, "temperature": 0, "max_tokens": 40}
    bodies = [
        {**base, "messages": ALICE, "response_format": PERSON_FORMAT},
        {**base, "messages": ALICE, "structured_outputs": {"choice": ["Paris", "Lyon"]}},
        {**base, "messages": ALICE, "structured_outputs": {"regex": r"[0-9]{2}"}},
        {**base, "messages": CAPITAL},
    ]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=smollm2_server.url, timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=b) for b in bodies))

    texts = []
    for r in asyncio.run(run()):
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["message"]["content"])
    Person.model_validate_json(texts[0])
    assert texts[1] in ("Paris", "Lyon") and re.fullmatch(r"[0-9]{2}", texts[2]), texts
    alone = httpx.post(smollm2_server.url + "/v1/chat/completions", json=bodies[3], timeout=120).json()
    assert texts[3] == alone["choices"][0]["message"]["content"]
    assert "Paris" in texts[3] and texts[3] not in ("Paris", "Lyon"), texts[3]  # a sentence, unconstrained


BAD = [
    pytest.param(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "y"}}}},
        "response_format", "invalid_grammar", id="schema-unknown-type",
    ),
    pytest.param(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/x"}}}},
        "response_format", "invalid_grammar", id="schema-dangling-ref",
    ),
    pytest.param(
        {"structured_outputs": {"regex": "a("}},
        "structured_outputs", "invalid_grammar", id="regex",
    ),
    pytest.param(
        {"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs", "invalid_grammar", id="lark"
    ),
    pytest.param(
        {"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}},
        "structured_outputs", "invalid_value", id="both-constraints",
    ),
    pytest.param({"logit_bias": {"1": 100.5}}, "logit_bias", "invalid_value", id="bias-out-of-range"),
    pytest.param(
        {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "invalid_value", id="bias-too-many"
    ),
    pytest.param({"logit_bias": {"-3": 1}}, "logit_bias", "invalid_value", id="bias-bad-key"),
    pytest.param({"logit_bias": {"49152": 1}}, "logit_bias", "invalid_value", id="bias-past-vocab"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param", "code"), BAD)
def test_bad_constraints_are_400s_and_the_server_stays_healthy(
    smollm2_server: ServerProcess, smollm2_sdk: openai.OpenAI, extra: dict, param: str, code: str
) -> None:
    """Through the SDK (extra_body carries them as a user's code would) and on both routes."""
    with pytest.raises(openai.BadRequestError) as e:
        smollm2_sdk.chat.completions.create(model=MODEL, messages=ALICE, max_tokens=4, extra_body=extra)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["code"] == code, e.value.body
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        smollm2_sdk.completions.create(model=MODEL, prompt="Alice is", max_tokens=4, extra_body=extra)
    assert e.value.body["param"] == param, e.value.body
    assert httpx.get(smollm2_server.url + "/health", timeout=10).status_code == 200
    r = smollm2_sdk.chat.completions.parse(
        model=MODEL, messages=ALICE, response_format=Person, temperature=0, max_tokens=80
    )
    assert isinstance(r.choices[0].message.parsed, Person)


async def _beside_good(url: str, good: dict, bad: list[dict]) -> tuple[list[httpx.Response], list[Timed]]:
    """Two `good` requests decoding while every `bad` body arrives (each timed from its send)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:

        async def timed(body: dict) -> Timed:
            start = time.perf_counter()
            r = await http.post("/v1/chat/completions", json=body)
            return r, time.perf_counter() - start

        goods = [asyncio.create_task(http.post("/v1/chat/completions", json=good)) for _ in range(2)]
        await asyncio.sleep(0.2)  # the good ones are admitted and decoding
        bads = await asyncio.gather(*(timed(b) for b in bad))
        return list(await asyncio.gather(*goods)), list(bads)


def _assert_as_alone(smollm2_server: ServerProcess, good: dict, goods: list[httpx.Response]) -> None:
    alone = httpx.post(smollm2_server.url + "/v1/chat/completions", json=good, timeout=120).json()
    for r in goods:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"] == alone["choices"][0]["message"]
        Person.model_validate_json(r.json()["choices"][0]["message"]["content"])


GOOD = {
    "model": MODEL,
    "messages": ALICE,
    "temperature": 0,
    "max_tokens": 80,
    "response_format": PERSON_FORMAT,
}


def test_bad_requests_never_fail_a_concurrent_good_one(smollm2_server: ServerProcess) -> None:
    """Good constrained requests in flight while every bad body of BAD arrives: the bad ones are 400s,
    the good ones finish as they do alone."""
    bad = [{"model": MODEL, "messages": ALICE, "max_tokens": 4, **p.values[0]} for p in BAD]
    goods, bads = asyncio.run(_beside_good(smollm2_server.url, GOOD, bad))
    assert [r.status_code for r, _ in bads] == [400] * len(BAD), [r.text for r, _ in bads]
    _assert_as_alone(smollm2_server, GOOD, goods)


def _slow_schema() -> dict[str, Any]:
    """A 2 MB, 150k-way alternation: llguidance takes ~3 s on the 2-core EPYC to refuse it (its lexer is
    too big), past COMPILE_TIMEOUT_S (1 s). New each time: a grammar that ran out of time is remembered."""
    words = "|".join(f"w{i}x{i * 7}" for i in range(150_000))
    return {"type": "string", "pattern": f"^({words})-{uuid.uuid4().hex}$"}


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def _deep_tool(tool_choice: Any) -> dict[str, Any]:
    deep = {"type": "function", "function": {"name": "deep", "parameters": ref_chain(50)}}
    return {"tools": [WEATHER_TOOL, deep], "tool_choice": tool_choice}


LARK_CHAIN = "start: r0\n" + "".join(f'r{i}: "x" r{i + 1}\n' for i in range(3000)) + 'r3000: "y"\n'
PAST_BOUNDS = [  # (extra body, param, what the message says)
    (_json_schema(ref_chain(1500)), "response_format", "nests deeper than 128"),  # killed the process
    ({"structured_outputs": {"json": ref_chain(1500)}}, "structured_outputs", "nests deeper than 128"),
    ({"structured_outputs": {"grammar": LARK_CHAIN}}, "structured_outputs", "3002 rules"),  # killed it too
    (_deep_tool("required"), "tools[1].function.parameters", "nests deeper than 128"),
    (_deep_tool({"type": "function", "function": {"name": "deep"}}), "tools[1].function.parameters", "nests"),
]


def test_grammars_past_the_bounds_are_fast_400s_beside_a_good_request(smollm2_server: ServerProcess) -> None:
    """server/engine/grammar.py's bounds: too deep a schema or Lark grammar (which overflowed llguidance's
    stack: the server process died), and one whose compile runs past COMPILE_TIMEOUT_S, are 400s naming
    the field (a forced tool call's: the tool), in seconds, while good requests decode undisturbed."""
    cases = [*PAST_BOUNDS, (_json_schema(_slow_schema()), "response_format", "longer than 1 s to compile")]
    bad = [{"model": MODEL, "messages": ALICE, "max_tokens": 4, **extra} for extra, _, _ in cases]
    goods, bads = asyncio.run(_beside_good(smollm2_server.url, GOOD, bad))
    for (r, seconds), (_, param, says) in zip(bads, cases, strict=True):
        assert r.status_code == 400, r.text[:500]
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert (error["param"], error["code"], error["type"]) == (
            param,
            "invalid_grammar",
            "invalid_request_error",
        )
        assert says in error["message"], error
        assert seconds < 4, f"{param}: {seconds:.1f} s"
    _assert_as_alone(smollm2_server, GOOD, goods)
    assert httpx.get(smollm2_server.url + "/health", timeout=10).status_code == 200


def _server_errors(url: str) -> float:
    """5xx responses the server has counted (ctxsteer_http_requests_total), any route."""
    return sum(v for labels, v in samples(url, "ctxsteer_http_requests_total") if labels["status"][0] == "5")


def test_a_grammar_past_the_parser_limits_on_its_first_token_is_a_400_beside_a_good_request(
    smollm2_server: ServerProcess,
) -> None:
    """2000 optional properties pass validation but trip llguidance's row limit on the object's "{": the
    mask built with the row catches it, so the request is a 400 before admission, whole and streamed (was
    a 500 after the prefill), and on /v1/responses names `text.format`; good requests decode undisturbed;
    no 5xx counted."""
    errors = _server_errors(smollm2_server.url)
    bad = {"model": MODEL, "messages": ALICE, "max_tokens": 20, **_json_schema(many_optional(2000))}
    goods, bads = asyncio.run(_beside_good(smollm2_server.url, GOOD, [bad, {**bad, "stream": True}]))
    for r, _ in bads:  # refused up front (the row's mask is built in `generate`), not while generating
        error = _assert_grammar_400(r, "response_format", "max is 2000")
        assert "cannot be compiled" in error["message"] and "<state>" not in error["message"], error
    _assert_as_alone(smollm2_server, GOOD, goods)
    fmt = {"type": "json_schema", "name": "x", "schema": many_optional(2000)}
    body = {"model": MODEL, "input": "Hi", "text": {"format": fmt}}
    _assert_grammar_400(
        httpx.post(smollm2_server.url + "/v1/responses", json=body, timeout=120), "text.format", "max is 2000"
    )
    assert _server_errors(smollm2_server.url) == errors


def test_a_grammar_past_the_parser_limits_later_is_a_400_or_a_streams_error_event(
    smollm2_server: ServerProcess,
) -> None:
    """A short required string first: the limit trips a few tokens in, on the token closing that string.
    Whole: a 400 `invalid_grammar` naming the field, with llguidance's reason; streamed (the 200 went out
    with the first token): the stream's error event, typed `invalid_request_error`; a good request in the
    same batch finishes as alone; no 5xx counted."""
    errors = _server_errors(smollm2_server.url)
    late = many_optional(2000, a={"type": "string", "maxLength": 2})
    bad = {"model": MODEL, "messages": ALICE, "max_tokens": 60, "temperature": 0, **_json_schema(late)}
    goods, [(r, _)] = asyncio.run(_beside_good(smollm2_server.url, GOOD, [bad]))
    error = _assert_grammar_400(r, "response_format", "while generating")
    assert "max is 2000" in error["message"] and "<state>" not in error["message"], error
    _assert_as_alone(smollm2_server, GOOD, goods)
    with httpx.stream(
        "POST", smollm2_server.url + "/v1/chat/completions", json={**bad, "stream": True}, timeout=120
    ) as s:
        assert s.status_code == 200
        data = [line.removeprefix("data: ") for line in s.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[0])["choices"][0]["delta"]  # tokens before the error
    last = json.loads(data[-2])["error"]
    assert (last["type"], last["code"], last["param"]) == (
        "invalid_request_error",
        "invalid_grammar",
        "response_format",
    )
    assert last["message"] == error["message"]
    assert _server_errors(smollm2_server.url) == errors


def _assert_grammar_400(r: httpx.Response, param: str, says: str) -> dict[str, Any]:
    assert r.status_code == 400, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_grammar",
        param,
    )
    assert says in error["message"], error
    return error
