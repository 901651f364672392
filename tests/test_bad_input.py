"""Bad input is a 400 in the OpenAI shape naming the parameter, never a 5xx (reliability issue, class 2-4, 7).

Each case here was a 500 (or a wrong status) before its fix. Served by a real uvicorn with a FakeEngine.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

import pytest
from fake_engine import FakeEngine
from test_http_layer import MSGS, TOKENIZER, live

from ctxsteer.steering.spans import RenderedPrompt, TokenIndex, steered_ranges
from ctxsteer.steering.spec import SteeringSpec

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
CHAT = '{"messages": [{"role": "user", "content": "hi"}]'  # an open object: cases append fields

# (route, raw JSON body, expected param or None)
CASES: dict[str, tuple[str, str, str | None]] = {
    "empty completion prompt": ("/v1/completions", '{"prompt": ""}', "prompt"),
    "empty completion prompt list": ("/v1/completions", '{"prompt": [""]}', "prompt"),
    "JSON nested thousands deep": (
        "/v1/chat/completions",
        CHAT + ', "x": ' + "[" * 5000 + "]" * 5000 + "}",
        None,
    ),
    "JSON nested 500 deep in steering": (
        "/v1/chat/completions",
        CHAT + ', "steering": {"spans": ' + "[" * 500 + "]" * 500 + "}}",
        "steering",
    ),
    "integer with 5000 digits": ("/v1/chat/completions", CHAT + ', "max_tokens": ' + "9" * 5000 + "}", None),
    "integer with 4000 digits as a float": (
        "/v1/chat/completions",
        CHAT + ', "temperature": ' + "9" * 4000 + "}",
        "temperature",
    ),
    "lone surrogate in chat": (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "a \\ud800 b"}]}',
        "messages[0].content",
    ),
    "lone surrogate in a text part": (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
        "messages[0].content[0].text",
    ),
    "lone surrogate in completions": ("/v1/completions", '{"prompt": "x \\udc00"}', "prompt"),
    "lone surrogate in tokenize": ("/tokenize", '{"prompt": "x \\udc00"}', "prompt"),
    "lone surrogate in a span": (
        "/v1/chat/completions",
        CHAT + ', "steering": {"spans": ["\\ud83d"], "strength": 2}}',
        "steering.spans[0]",
    ),
    "huge integer strength": (
        "/v1/chat/completions",
        CHAT + ', "steering": {"strength": ' + "9" * 400 + "}}",
        "steering.strength",
    ),
    "huge integer alpha": (
        "/v1/chat/completions",
        CHAT + ', "steering": {"alpha": ' + "9" * 400 + "}}",
        "steering.alpha",
    ),
    "alpha with an infinite reciprocal": (
        "/v1/chat/completions",
        CHAT + ', "steering": {"alpha": 5e-324}}',
        "steering.alpha",
    ),
    "strength whose alpha is subnormal": (
        "/v1/chat/completions",
        CHAT + ', "steering": {"strength": 1.7e308}}',
        "steering.strength",
    ),
    "huge steering_strength shorthand": (
        "/v1/chat/completions",
        CHAT + ', "steering_strength": ' + "9" * 400 + "}",
        "steering_strength",
    ),
    "layer key with spaces": (
        "/v1/chat/completions",
        CHAT + ', "steering": {"strength": 2, "heads": {" 1 ": [0]}}}',
        "steering.heads. 1 ",
    ),
    "layer key with an underscore": (
        "/v1/chat/completions",
        CHAT + ', "steering": {"strength": 2, "heads": {"1_0": [0]}}}',
        "steering.heads.1_0",
    ),
    "layer key in Arabic-Indic digits": (
        "/v1/chat/completions",
        CHAT + ', "steering": {"strength": 2, "heads": {"\\u0661": [0]}}}',
        "steering.heads.\u0661",
    ),
    "too many spans": (
        "/v1/chat/completions",
        CHAT + ', "steering": {"strength": 2, "spans": [' + ",".join(['"h"'] * 500) + "]}}",
        "steering.spans",
    ),
}


def _assert_openai_400(r: Any, param: str | None) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param, err


@pytest.fixture(scope="module")
def keyed():
    with live(FakeEngine(TOKENIZER, max_requests=6), api_keys=(KEY,)) as s:
        yield s


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_400_naming_the_param(keyed, name: str) -> None:
    route, body, param = CASES[name]
    r = keyed.http.post(route, content=body.encode("utf-8", "surrogatepass"), headers=AUTH)
    _assert_openai_400(r, param)
    assert keyed.http.get("/ready").status_code == 200


def test_validated_before_generating(keyed) -> None:
    """Nothing reached the engine for any bad case: the 400s come before generation, never after."""
    before = len(keyed.engine.requests)
    for route, body, _ in CASES.values():
        keyed.http.post(route, content=body.encode("utf-8", "surrogatepass"), headers=AUTH)
    assert len(keyed.engine.requests) == before


def test_n_beyond_what_the_server_can_ever_hold_is_a_400(keyed) -> None:
    body = {"messages": MSGS, "n": 7}
    _assert_openai_400(keyed.http.post("/v1/chat/completions", json=body, headers=AUTH), "n")
    body = {"prompt": "abc", "n": 7}
    _assert_openai_400(keyed.http.post("/v1/completions", json=body, headers=AUTH), "n")
    ok = keyed.http.post("/v1/chat/completions", json={"messages": MSGS, "n": 6}, headers=AUTH)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 6


def test_every_model_route_needs_the_key_probes_stay_public(keyed) -> None:
    for method, path, body in [
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("POST", "/v1/chat/completions", {"messages": MSGS}),
        ("POST", "/v1/completions", {"prompt": "hi"}),
        ("GET", "/v1/models", None),
        ("POST", "/detokenize", {"tokens": [1]}),  # unknown routes too: deny by default
    ]:
        r = keyed.http.request(method, path, json=body)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    ok = keyed.http.post("/tokenize", json={"prompt": "hi"}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["count"] == 2
    for path in ("/health", "/ready", "/version", "/openapi.json"):
        assert keyed.http.get(path).status_code == 200, path


def test_spans_are_located_in_linear_time() -> None:
    """128 one-letter spans over a 100 KB prompt: ~10^5 occurrences each mapped in O(log n). The old
    per-occurrence scan of every token offset needed ~10^10 steps here (hours); the bound is generous."""
    text = "abcdefghij" * 10_000
    offsets = tuple((i, i + 1) for i in range(len(text)))
    rendered = RenderedPrompt(text, list(range(len(text))), ((0, len(text)),), ((0, len(text)),), offsets)
    spans = tuple(("abcdefghij" * 2)[i % 10 : i % 10 + 1 + (i // 10) % 10] for i in range(128))
    t0 = time.monotonic()
    ranges = steered_ranges(rendered, None, SteeringSpec(alpha=0.5, targets=(), spans=spans))
    assert time.monotonic() - t0 < 30
    assert ranges == ((0, len(text)),)  # every letter is one of the one-letter spans


def _scan(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """The previous implementation: a full scan per lookup."""
    ends = [o[1] for o in offsets]
    first = bisect.bisect_right(ends, start)
    last = first
    while last < len(offsets) and offsets[last][0] < end and start < end:
        last += 1
    return first, max(first, last)


def test_token_index_matches_a_brute_force_scan() -> None:
    with_empty = [(0, 0), (0, 3), (3, 4), (4, 4), (4, 9), (9, 12), (12, 12), (12, 15)]
    unsorted_starts = [(0, 3), (3, 5), (0, 5), (5, 8), (8, 9)]
    for offs in (with_empty, unsorted_starts):
        index = TokenIndex(offs)
        for start in range(17):
            for end in range(start, 18):
                assert index.token_range(start, end) == _scan(offs, start, end), (offs, start, end)


def test_the_openapi_document_states_the_real_contract(keyed) -> None:
    doc = keyed.http.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, method, body in [
        ("/v1/chat/completions", "post", "ChatCompletionRequest"),
        ("/v1/completions", "post", "CompletionRequest"),
        ("/tokenize", "post", "TokenizeRequest"),
    ]:
        op = doc["paths"][path][method]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/" + body) and op["security"] == [{"bearer": []}]
        assert "422" not in op["responses"]
        assert {"400", "401", "413", "415"} <= set(op["responses"])
        err = op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert err.endswith("/ErrorResponse")
    for code in ("429", "503"):
        assert code in doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert doc["paths"]["/health"]["get"]["security"] == []
    steering = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["steering"]
    strength = steering["anyOf"][0]["properties"]["strength"]["anyOf"][0]  # [0]: given, [1]: null
    assert strength["anyOf"] == [{"type": "number", "minimum": 1, "maximum": 1e300}, {"const": "auto"}]
