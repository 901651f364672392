"""Fuzzing the served API (reliability issue): schemathesis over the published OpenAPI document with all
its checks, and a hypothesis generator of hostile chat/completions/tokenize bodies.

Both run against a real uvicorn on 127.0.0.1 serving the tiny Llama through the real engine, wired as
`ctxsteer serve` wires it. Invariant: every response is 2xx or a 4xx in the OpenAI error shape, never a
5xx; the server stays ready; a fixed greedy probe gives the same answer before and after. The example
counts are bounded for CI; `CTXSTEER_FUZZ_EXAMPLES` / `CTXSTEER_ST_EXAMPLES` raise them for a long run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_metrics import Live, live, wait_for

from ctxsteer.server.config import ServerConfig
from ctxsteer.server.main import build_engine, create_app

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("CTXSTEER_FUZZ_EXAMPLES", "150"))  # hypothesis bodies (cheap)
ST_EXAMPLES = int(os.environ.get("CTXSTEER_ST_EXAMPLES", "15"))  # schemathesis, per operation and phase
PROBE = {"messages": [{"role": "user", "content": "Say something."}], "temperature": 0, "max_tokens": 8}
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=os.environ.get("CTXSTEER_FUZZ_RANDOM") is None,  # CI: the same cases every run
)


@pytest.fixture(scope="module")
def served(tiny_model_dir) -> Iterator[Live]:
    config = ServerConfig(
        model=str(tiny_model_dir), api_keys=(KEY,), max_num_seqs=4, max_queue=4, max_model_len=96
    )
    app = create_app(config, build_engine(config))
    with live(app, lifespan="on") as s:
        wait_for(lambda: s.http.get("/ready").status_code == 200, "/ready")
        probe = s.http.post("/v1/chat/completions", json=PROBE, headers=AUTH)
        assert probe.status_code == 200
        yield s
        assert s.http.get("/ready").status_code == 200
        after = s.http.post("/v1/chat/completions", json=PROBE, headers=AUTH)
        assert after.json()["choices"] == probe.json()["choices"]  # nothing leaked into other requests


# Schema-valid bodies the server must still refuse, because JSON Schema cannot say why: prompt tokens +
# max_tokens beyond the context, steering spans absent from the prompt, best_of != n. Every other check
# runs, including its converse (schema-invalid data must be rejected).
EXCLUDED_CHECKS = "positive_data_acceptance"


def run_schemathesis(url: str, *, max_examples: int, seed: int, extra: tuple[str, ...] = ()) -> str:
    """`st run` over the published document; returns its output; fails on any finding."""
    cmd = [
        str(Path(sys.executable).with_name("st")),
        "run",
        url + "/openapi.json",
        "-H",
        f"Authorization: Bearer {KEY}",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        "--exclude-checks",
        EXCLUDED_CHECKS,
        "--request-timeout",
        "60",
        "--no-color",
        *extra,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "NO_COLOR": "1"}
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    return text


def test_openapi_document_holds_under_schemathesis(served: Live) -> None:
    """No 5xx, documented statuses, content types and headers, response bodies (and SSE events) valid
    against the published schemas, schema-invalid data rejected, auth enforced, unsupported methods 405."""
    text = run_schemathesis(served.url, max_examples=ST_EXAMPLES, seed=1)
    assert "No issues found" in text and "9 selected / 9 total" in text, text[-3000:]


# ---- hypothesis: hostile bodies ------------------------------------------------------------------------

_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # incl. surrogates, controls
_numbers = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 1e-320, 5e-324, 1e308, 2**63, -(2**63) - 1, 10**400]),
)
_scalar = st.one_of(st.none(), st.booleans(), _numbers, _text)
_json = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=12,
)
_role = st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool"]), _text)
_content = st.one_of(
    _text,
    st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": _text}), max_size=2
    ),
    _json,
)
_message = st.fixed_dictionaries(
    {"role": _role, "content": _content}, optional={"steer": _scalar, "name": _scalar}
)
_steering = st.one_of(
    _json,
    st.fixed_dictionaries(
        {},
        optional={
            "strength": _numbers,
            "alpha": _numbers,
            "targets": st.lists(_role, max_size=3),
            "spans": st.lists(_text, max_size=3),
            "layers": st.one_of(st.just("all"), st.lists(_numbers, max_size=3)),
            "heads": st.one_of(
                st.lists(_numbers, max_size=3),
                st.dictionaries(_text, st.lists(_numbers, max_size=2), max_size=2),
            ),
            "head_profile": _text,
        },
    ),
)
_common = {
    "max_tokens": _numbers,
    "temperature": _numbers,
    "top_p": _numbers,
    "top_k": _numbers,
    "seed": _numbers,
    "n": st.one_of(st.integers(-2, 12), _numbers),
    "stop": st.one_of(_text, st.lists(_text, max_size=5), _json),
    "presence_penalty": _numbers,
    "frequency_penalty": _numbers,
    "logprobs": st.one_of(st.booleans(), _numbers),
    "top_logprobs": _numbers,
    "stream": st.booleans(),
    "steering": _steering,
    "steering_strength": _numbers,
    "model": st.one_of(st.just("tiny"), _text),
    "tools": _json,
    "extra_field": _json,
}
_chat = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(_message, min_size=0, max_size=3), _json)}, optional=_common
)
_completion = st.fixed_dictionaries(
    {"prompt": st.one_of(_text, st.lists(_text, max_size=2), _json)}, optional=_common
)
_tokenize = st.fixed_dictionaries(
    {},
    optional={
        "prompt": _text,
        "messages": st.lists(_message, max_size=2),
        "steering": _steering,
        "add_generation_prompt": _scalar,
    },
)
_deep = st.integers(1, 3000).map(lambda d: '{"messages": ' + "[" * d + "]" * d + "}")
_BODIES = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), _chat),
    st.tuples(st.just("/v1/completions"), _completion),
    st.tuples(st.just("/tokenize"), _tokenize),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize"]), _deep),
)


def _encode(body: Any) -> bytes:
    raw = body if isinstance(body, str) else json.dumps(body, allow_nan=True)  # NaN/Infinity literals too
    return raw.encode("utf-8", "surrogatepass")


@given(_BODIES)
@FUZZ_SETTINGS
def test_hostile_bodies_get_2xx_or_an_openai_4xx(served: Live, route_body: tuple[str, Any]) -> None:
    route, body = route_body
    headers = {**AUTH, "Content-Type": "application/json"}
    with httpx.Client(base_url=served.url, timeout=60) as http:
        r = http.post(route, content=_encode(body), headers=headers)
        assert r.status_code < 500, (r.status_code, r.text[:500])
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")
            assert '"error"' not in r.text, r.text[-500:]
