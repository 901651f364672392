"""Structured-output metrics at GET /metrics: `ctxsteer_structured_output_requests_total` counts each accepted
HTTP request with a grammar once (not once per choice) under its kind, and
`ctxsteer_grammar_compile_seconds` observes every grammar the HTTP side builds, refused ones included.
Both are recorded where the request is prepared, so the FakeEngine app (fast, no model) is enough."""

from __future__ import annotations

from typing import Any

import pytest
from test_metrics import MSGS, Scrape, fake_app, live, scrape

from ctxsteer.server.metrics import STRUCTURED_KINDS

COUNTER = "ctxsteer_structured_output_requests_total"
COMPILES = "ctxsteer_grammar_compile_seconds_count"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}

# (body fields, the kind it is counted under); each kind at least once, both spellings of JSON.
STRUCTURED: list[tuple[dict[str, Any], str]] = [
    ({"response_format": {"type": "json_object"}}, "json_object"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
        "json_schema",
    ),
    ({"structured_outputs": {"json": SCHEMA}}, "json_schema"),
    ({"structured_outputs": {"json_object": True}}, "json_object"),
    ({"structured_outputs": {"regex": r"[0-9]{3}"}}, "regex"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice"),
    ({"structured_outputs": {"grammar": 'start: "a" | "b"'}}, "grammar"),
]


def kinds(m: Scrape) -> dict[str, float]:
    return {kind: m.value(COUNTER, kind=kind) for kind in STRUCTURED_KINDS}


def test_every_kind_is_exported_at_zero_before_traffic() -> None:
    """Zero-valued series from the start, so dashboards show 0 instead of "no data"."""
    app, _ = fake_app()
    with live(app) as s:
        m = scrape(s.http)
    assert set(STRUCTURED_KINDS) == {"json_object", "json_schema", "regex", "choice", "grammar"}
    assert kinds(m) == dict.fromkeys(STRUCTURED_KINDS, 0)
    assert m.value(COMPILES) == 0 and m.value("ctxsteer_grammar_compile_seconds_sum") == 0


@pytest.mark.parametrize(("fields", "kind"), STRUCTURED, ids=[k for _, k in STRUCTURED])
def test_one_count_per_request_under_its_kind(fields: dict[str, Any], kind: str) -> None:
    app, _ = fake_app()
    with live(app) as s:
        chat = {"model": "fake-model", "messages": MSGS, "max_tokens": 2, "n": 3, **fields}
        r = s.http.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 3
        m = scrape(s.http)
    assert kinds(m) == {k: float(k == kind) for k in STRUCTURED_KINDS}  # once, though n=3
    assert m.value(COMPILES) == 1


def test_completions_streams_refusals_and_unstructured_requests() -> None:
    app, _ = fake_app()
    regex = {"structured_outputs": {"regex": "[ab]+"}}
    with live(app) as s:
        base = {"model": "fake-model", "max_tokens": 2}
        chat = {**base, "messages": MSGS}

        def post(path: str, body: dict[str, Any], status: int = 200) -> None:
            r = s.http.post(path, json=body)
            assert r.status_code == status, r.text

        post("/v1/completions", {**base, "prompt": "Say a or b:", **regex})
        with s.http.stream("POST", "/v1/chat/completions", json={**chat, **regex, "stream": True}) as st:
            assert st.status_code == 200 and any(line == "data: [DONE]" for line in st.iter_lines())
        post("/v1/chat/completions", chat)  # no grammar: neither counted nor compiled
        post("/v1/chat/completions", {**chat, "logit_bias": {"5": 10}})  # a bias is no grammar
        post("/v1/chat/completions", {**chat, "response_format": {"type": "text"}})
        # refused: a grammar that does not compile (compiled, not counted) ...
        post(
            "/v1/chat/completions", {**chat, "structured_outputs": {"grammar": "start: undefined_rule"}}, 400
        )
        # ... and a valid grammar with a token outside the vocabulary (compiled, not counted)
        post("/v1/chat/completions", {**chat, **regex, "logit_bias": {"999999": 1}}, 400)
        m = scrape(s.http)
    assert kinds(m) == {k: float(2 if k == "regex" else 0) for k in STRUCTURED_KINDS}
    assert m.value(COMPILES) == 4
    assert m.value("ctxsteer_grammar_compile_seconds_sum") > 0
    assert m.value("ctxsteer_grammar_compile_seconds_bucket", le="+Inf") == 4
