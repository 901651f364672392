"""The HTTP layer against a FakeEngine, through a real uvicorn server, with httpx and the openai SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fake_engine import FakeEngine, make_byte_tokenizer
from fastapi import APIRouter
from uvicorn_thread import in_thread

from ctxsteer.server.app import build_app
from ctxsteer.server.config import ServerConfig

TOKENIZER = make_byte_tokenizer()
MODEL = "fake-model"
MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Context: Paris is in France. Q: where?"},
]
PROFILES = {"retrieval": {0: (1,), 2: (0, 3)}}


@dataclass
class Live:
    url: str
    engine: FakeEngine
    http: httpx.Client

    def sdk(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=10)

    def chat(self, **body: Any) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS, **body})


@contextmanager
def live(engine: FakeEngine | None = None, metrics_router: Any = None, **config: Any) -> Iterator[Live]:
    """A uvicorn server on a free port in a background thread."""
    engine = engine or FakeEngine(TOKENIZER)
    app = build_app(ServerConfig(**config), engine, head_profiles=PROFILES, metrics_router=metrics_router)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    with in_thread(server, start_timeout_s=10, stop_timeout_s=5) as port:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as http:
            yield Live(url, engine, http)


@pytest.fixture(scope="module")
def srv() -> Iterator[Live]:
    with live() as s:
        yield s


def expected_text(engine: FakeEngine, max_tokens: int | None = None) -> str:
    req = engine.requests[-1]
    return TOKENIZER.decode(engine.echo_ids(req)[: max_tokens or req.sampling.max_tokens])


def sse_events(lines: Iterator[str]) -> list[Any]:
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ------------------------------------------------------------------ meta


def test_models_health_version(srv: Live) -> None:
    models = srv.sdk().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "ctxsteer" and models.data[0].model_extra["max_model_len"] == 256
    assert srv.sdk().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        srv.sdk().models.retrieve("other")
    assert srv.http.get("/health").json() == {"status": "ok"}
    assert srv.http.get("/ready").status_code == 200
    assert srv.http.get("/version").json()["model"] == MODEL
    assert_error(srv.http.get("/no/such/route"), 404, None)


def test_ready_is_503_until_engine_ready() -> None:
    with live(FakeEngine(TOKENIZER, ready=False)) as s:
        err = assert_error(s.http.get("/ready"), 503, None)
        assert err["code"] == "not_ready"
        assert s.http.get("/health").status_code == 200


def test_request_id_header(srv: Live) -> None:
    r = srv.http.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = srv.http.get("/health", headers={"X-Request-Id": "bad id; <x>"})
    assert len(r.headers["x-request-id"]) == 32 and r.headers["x-request-id"] != "bad id"


# ------------------------------------------------------------------ chat


def test_chat_non_stream_shape(srv: Live) -> None:
    r = srv.chat(max_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected_text(srv.engine)}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    prompt_tokens = len(srv.engine.requests[-1].prompt_ids)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
    }
    steering = body["steering"]
    assert steering["strength"] == 1.0 and steering["alpha"] == 1.0 and steering["layers"] == "all"
    assert steering["prompt_tokens"] == prompt_tokens and steering["steered_tokens"] == len(
        MSGS[1]["content"]
    )


def test_default_max_tokens_fills_context(srv: Live) -> None:
    srv.chat()
    req = srv.engine.requests[-1]
    assert req.sampling.max_tokens == 256 - len(req.prompt_ids)


def test_sdk_steering_reaches_engine_and_matches_tokenize(srv: Live) -> None:
    resp = srv.sdk().chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=3, extra_body={"steering": {"strength": 4, "layers": [0, 2]}}
    )
    row = srv.engine.requests[-1].steer
    assert row.alpha == 0.25 and row.layers == (0, 2) and row.heads is None
    assert resp.model_extra["steering"]["layers"] == [0, 2] and resp.model_extra["steering"]["strength"] == 4
    tok = srv.http.post("/tokenize", json={"messages": MSGS, "steering": {"strength": 4}}).json()
    assert tok["tokens"] == srv.engine.requests[-1].prompt_ids and tok["count"] == len(tok["tokens"])
    assert [tuple(s) for s in tok["steered_spans"]] == list(row.steered)
    start, end = row.steered[0]
    assert TOKENIZER.decode(tok["tokens"][start:end]) == MSGS[1]["content"]


def test_flat_strength_head_profile_and_message_flag(srv: Live) -> None:
    srv.chat(max_tokens=1, steering_strength=2.0)
    assert srv.engine.requests[-1].steer.alpha == 0.5
    srv.chat(max_tokens=1, steering={"alpha": 0.2, "head_profile": "retrieval"})
    assert srv.engine.requests[-1].steer.heads == PROFILES["retrieval"]
    msgs = [{**MSGS[0], "steer": True}, {**MSGS[1], "steer": False}]
    r = srv.http.post(
        "/v1/chat/completions", json={"messages": msgs, "max_tokens": 1, "steering_strength": 2}
    )
    assert r.json()["steering"]["steered_tokens"] == len(MSGS[0]["content"])


def test_default_strength_from_config() -> None:
    with live(default_steering_strength=3.0) as s:
        s.chat(max_tokens=1)
        assert s.engine.requests[-1].steer.alpha == pytest.approx(1 / 3)


def test_n_choices_with_seed(srv: Live) -> None:
    resp = srv.sdk().chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, n=3, seed=7)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [r.sampling.seed for r in srv.engine.requests[-3:]] == [7, 8, 9]
    assert len({r.request_id for r in srv.engine.requests[-3:]}) == 3
    assert resp.usage.completion_tokens == 6


def test_sampling_params_are_passed(srv: Live) -> None:
    srv.chat(max_completion_tokens=4, temperature=0, top_p=0.5, top_k=5, stop="x", presence_penalty=1)
    sp = srv.engine.requests[-1].sampling
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.stop) == (4, 0.0, 0.5, 5, ("x",))
    assert sp.presence_penalty == 1.0 and sp.seed is None and not sp.logprobs


def test_chat_logprobs_format(srv: Live) -> None:
    resp = srv.sdk().chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].bytes == list(content[0].token.encode()) and content[0].logprob == -0.25


def test_sdk_stream_matches_non_stream(srv: Live) -> None:
    full = srv.sdk().chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6)
    chunks = list(
        srv.sdk().chat.completions.create(
            model=MODEL, messages=MSGS, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].model_extra["steering"]["alpha"] == 1.0
    assert all("steering" not in (c.model_extra or {}) for c in chunks[:-1])


def test_raw_stream_framing_without_usage(srv: Live) -> None:
    with srv.http.stream(
        "POST", "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2, "stream": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length" and "steering" in events[-2]
    assert "usage" not in events[-2]


def test_async_sdk_stream_and_non_stream(srv: Live) -> None:
    async def main() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        full = await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4)
        stream = await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return full.choices[0].message.content or "", "".join(parts)

    full, streamed = asyncio.run(main())
    assert full == streamed == expected_text(srv.engine)


def test_unknown_fields_are_ignored(srv: Live) -> None:
    r = srv.chat(max_tokens=1, some_future_param={"x": 1}, logit_bias={}, response_format={"type": "text"})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ completions


def test_completions_with_spans_and_logprobs(srv: Live) -> None:
    prompt = "Paris is in France. Where is Paris?"
    resp = srv.sdk().completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=4,
        logprobs=2,
        extra_body={"steering": {"strength": 2, "spans": ["France"]}},
    )
    req = srv.engine.requests[-1]
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.choices[0].text == expected_text(srv.engine)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == 4 and lp.text_offset[0] == len(prompt) and len(lp.top_logprobs[0]) == 2
    [(start, end)] = req.steer.steered
    assert TOKENIZER.decode(req.prompt_ids[start:end]) == "France" and req.steer.alpha == 0.5
    assert srv.engine.requests[-1].sampling.max_tokens == 4


def test_completions_stream_and_default_max_tokens(srv: Live) -> None:
    chunks = list(srv.sdk().completions.create(model=MODEL, prompt=["Hello there, world"], stream=True))
    assert srv.engine.requests[-1].sampling.max_tokens == 16
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text(srv.engine)
    assert chunks[-1].choices[0].finish_reason == "length" and "steering" in chunks[-1].model_extra


def test_completions_default_strength_without_spans_is_off() -> None:
    with live(default_steering_strength=4.0) as s:
        r = s.http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 1})
        assert r.status_code == 200 and s.engine.requests[-1].steer.alpha == 1.0


def test_tokenize_prompt_with_spans(srv: Live) -> None:
    r = srv.http.post("/tokenize", json={"prompt": "find the needle here", "steering": {"spans": ["needle"]}})
    body = r.json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    [[start, end]] = body["steered_spans"]
    assert TOKENIZER.decode(body["tokens"][start:end]) == "needle" and body["steered_tokens"] == end - start


def test_tokenize_token_strs_as_vllm() -> None:
    """`return_token_strs` adds each token's vocabulary string (vLLM's /tokenize field); off by default."""
    with live() as s:
        plain = s.http.post("/tokenize", json={"prompt": "find the needle"}).json()
        body = s.http.post("/tokenize", json={"prompt": "find the needle", "return_token_strs": True}).json()
    assert "token_strs" not in plain
    assert body["token_strs"] == TOKENIZER.convert_ids_to_tokens(body["tokens"]) and body["token_strs"]


def test_context_report_refused_where_the_engine_cannot_measure(srv: Live) -> None:
    """The fake engine, like --engine vllm, does not measure context attention: asking is a clear 400;
    not asking (and the server's sampling) never fails a request."""
    r = srv.chat(report={"context_attention": True})
    assert assert_error(r, 400, "report.context_attention")["code"] == "unsupported_report"
    ok = srv.chat(report={"context_attention": False})
    assert ok.status_code == 200 and "context_attention" not in ok.json()


def test_auto_strength_refused_where_the_engine_cannot_measure(srv: Live) -> None:
    r = srv.chat(steering={"strength": "auto"})
    assert assert_error(r, 400, "steering.strength")["code"] == "unsupported_auto_strength"


@pytest.mark.parametrize("method", ["cad", "attention+cad"])
def test_cad_refused_where_the_engine_cannot_run_it(srv: Live, method: str) -> None:
    """The fake engine, like --engine vllm (or --max-num-seqs 1), has no CAD twin rows: a clear 400."""
    r = srv.chat(steering={"method": method})
    assert assert_error(r, 400, "steering.method")["code"] == "unsupported_method"
    ok = srv.chat(steering={"method": "attention", "strength": 2})
    assert ok.status_code == 200 and ok.json()["steering"]["method"] == "attention"


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_context_indicator_needs_a_tuned_model(srv: Live, mode: str) -> None:
    """A model whose tokenizer has no [IND]: asking for the indicator is a 400; "off" is fine and reports
    nothing; a server default other than off is refused at start-up."""
    r = srv.chat(context_indicator=mode)
    assert assert_error(r, 400, "context_indicator")["code"] == "indicator_unavailable"
    ok = srv.chat(context_indicator="off")
    assert ok.status_code == 200 and "context_indicator" not in ok.json()
    with pytest.raises(ValueError, match="no \\[IND\\] token"):
        build_app(ServerConfig(context_indicator=mode), FakeEngine(TOKENIZER))


def test_ui_page_public_api_behind_key_and_no_ui() -> None:
    """The playground's files are served without a key (they carry no data; the page asks for the key),
    the API they call still wants it, and `--no-ui` removes the page."""
    with live(api_keys=("k",)) as s:
        r = s.http.get("/ui", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/ui/"
        page = s.http.get("/ui/")
        assert page.status_code == 200 and 'src="app.js"' in page.text
        assert s.http.get("/ui/app.js").status_code == 200 and s.http.get("/ui/style.css").status_code == 200
        assert s.http.get("/v1/models").status_code == 401
        assert s.http.get("/uix").status_code == 401  # only the page's own prefix is public
    with live(ui=False) as s:
        assert s.http.get("/ui/").status_code == 404 and s.http.get("/ui").status_code == 404


# ------------------------------------------------------------------ bad input

NAN = "NaN"
CHAT_BAD: list[tuple[str, dict[str, Any] | str, str | None]] = [
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("max_tokens string", {"max_tokens": "5"}, "max_tokens"),
    ("max_tokens negative", {"max_tokens": -1}, "max_tokens"),
    ("temperature NaN", '{"messages": MSGS, "temperature": NaN}', "temperature"),
    ("temperature too big", {"temperature": 3}, "temperature"),
    ("strength NaN", '{"messages": MSGS, "steering": {"strength": NaN}}', "steering.strength"),
    ("strength inf", '{"messages": MSGS, "steering": {"strength": Infinity}}', "steering.strength"),
    ("strength negative", {"steering": {"strength": -2}}, "steering.strength"),
    ("strength below one", {"steering": {"strength": 0.5}}, "steering.strength"),
    ("strength string", {"steering": {"strength": "2"}}, "steering.strength"),
    ("strength and alpha", {"steering": {"strength": 2, "alpha": 0.5}}, "steering"),
    ("alpha zero", {"steering": {"alpha": 0}}, "steering.alpha"),
    ("both steering forms", {"steering": {"strength": 2}, "steering_strength": 2}, "steering_strength"),
    ("flat strength below one", {"steering_strength": 0.5}, "steering_strength"),
    ("steering not object", {"steering": "strong"}, "steering"),
    ("layer out of range", {"steering": {"layers": [99]}}, "steering.layers[0]"),
    ("span not found", {"steering": {"spans": ["absent text"]}}, "steering.spans[0]"),
    ("unknown head profile", {"steering": {"head_profile": "nope"}}, "steering.head_profile"),
    ("unknown steering field", {"steering": {"bogus": 1}}, "steering.bogus"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("tool role without id", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ("function role", {"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ("content number", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0]",
    ),
    (
        "steer flag string",
        {"messages": [{"role": "user", "content": "x", "steer": "yes"}]},
        "messages[0].steer",
    ),
    ("huge max_tokens", {"max_tokens": 10**9}, "max_tokens"),
    ("top_logprobs 50", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("five stops", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("stop number", {"stop": 3}, "stop"),
    ("n zero", {"n": 0}, "n"),
    ("seed string", {"seed": "x"}, "seed"),
    ("stream bool string", {"stream": "true"}, "stream"),
    ("tool without type", {"tools": [{"function": {"name": "f"}}]}, "tools[0].type"),
    ("tool_choice without tools", {"tool_choice": "auto"}, "tool_choice"),
    ("legacy functions", {"functions": [{"name": "f"}]}, "functions"),
    ("response_format unknown type", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("json_schema without schema object", {"response_format": {"type": "json_schema"}}, "response_format"),
    (
        "json_schema that cannot compile",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "y"}}}},
        "response_format",
    ),
    (
        "json_schema bad name",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
        "response_format.json_schema.name",
    ),
    (
        "structured_outputs two kinds",
        {"structured_outputs": {"regex": "a", "choice": ["a"]}},
        "structured_outputs",
    ),
    ("structured_outputs bad regex", {"structured_outputs": {"regex": "a("}}, "structured_outputs"),
    (
        "both output constraints",
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
        "structured_outputs",
    ),
    ("logit_bias out of range", {"logit_bias": {"1": 101}}, "logit_bias"),
    ("logit_bias key not an id", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("logit_bias too many", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("logit_bias past the vocabulary", {"logit_bias": {"10000000": 1}}, "logit_bias"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize(("case", "body", "param"), CHAT_BAD, ids=[c[0] for c in CHAT_BAD])
def test_chat_bad_input(srv: Live, case: str, body: dict[str, Any] | str, param: str | None) -> None:
    if isinstance(body, str):
        r = srv.http.post(
            "/v1/chat/completions",
            content=body.replace("MSGS", json.dumps(MSGS)),
            headers={"content-type": "application/json"},
        )
    else:
        r = srv.chat(**body)
    err = assert_error(r, 400, param)
    assert err["type"] == "invalid_request_error"
    assert srv.http.get("/health").status_code == 200


def test_prompt_too_long_names_both_numbers(srv: Live) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        srv.sdk().chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1000)
    n_prompt = len(srv.http.post("/tokenize", json={"messages": MSGS}).json()["tokens"])
    assert (
        f"({n_prompt} tokens)" in exc.value.message
        and "(1000)" in exc.value.message
        and "256" in exc.value.message
    )
    long_msgs = [{"role": "user", "content": "x" * 300}]
    err = assert_error(srv.http.post("/v1/chat/completions", json={"messages": long_msgs}), 400, "messages")
    assert err["code"] == "context_length_exceeded"


COMPLETION_BAD: list[tuple[str, dict[str, Any], str | None]] = [
    ("echo", {"prompt": "x", "echo": True}, "echo"),
    ("token ids", {"prompt": [1, 2, 3]}, "prompt"),
    ("two prompts", {"prompt": ["a", "b"]}, "prompt"),
    ("missing prompt", {}, "prompt"),
    ("strength without spans", {"prompt": "abc", "steering": {"strength": 2}}, "steering.spans"),
    ("targets", {"prompt": "abc", "steering": {"spans": ["a"], "targets": ["user"]}}, "steering.targets"),
    ("logprobs 50", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("suffix", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("tools", {"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("tool_choice", {"prompt": "x", "tool_choice": "auto"}, "tool_choice"),
]


@pytest.mark.parametrize(("case", "body", "param"), COMPLETION_BAD, ids=[c[0] for c in COMPLETION_BAD])
def test_completions_bad_input(srv: Live, case: str, body: dict[str, Any], param: str | None) -> None:
    assert_error(srv.http.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize(
    ("content", "ctype", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b'{"messages": []}', "text/plain", 415),
        (b"messages=hi", "application/x-www-form-urlencoded", 415),
    ],
)
def test_malformed_bodies(srv: Live, content: bytes, ctype: str, status: int) -> None:
    assert_error(
        srv.http.post("/v1/chat/completions", content=content, headers={"content-type": ctype}), status, None
    )
    assert srv.chat(max_tokens=1).status_code == 200


def test_tokenize_needs_exactly_one_input(srv: Live) -> None:
    assert_error(srv.http.post("/tokenize", json={"prompt": "a", "messages": MSGS}), 400, None)


def test_unknown_model_is_404(srv: Live) -> None:
    with pytest.raises(openai.NotFoundError):
        srv.sdk().chat.completions.create(model="gpt-4o", messages=MSGS)
    assert srv.http.post("/v1/completions", json={"model": "x", "prompt": "a"}).status_code == 404


def test_wrong_method_is_openai_shaped(srv: Live) -> None:
    assert_error(srv.http.get("/v1/chat/completions"), 405, None)


def test_body_size_limit() -> None:
    with live(max_body_bytes=2048) as s:
        big = {"messages": [{"role": "user", "content": "x" * 4000}]}
        err = assert_error(s.http.post("/v1/chat/completions", json=big), 413, None)
        assert "2048" in err["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}]}'

        assert_error(s.http.post("/v1/chat/completions", content=chunks()), 413, None)
        assert s.chat(max_tokens=1).status_code == 200


# ------------------------------------------------------------------ auth, capacity, failures


def test_api_key_auth() -> None:
    with live(api_keys=("k1", "k2")) as s:
        with pytest.raises(openai.AuthenticationError):
            s.sdk("wrong").models.list()
        assert_error(s.http.get("/v1/models"), 401, None)
        assert s.sdk("k2").chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1).choices
        assert s.http.get("/health").status_code == 200 and s.http.get("/ready").status_code == 200
        r = s.http.get("/v1/models", headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200


def test_metrics_hook_and_key() -> None:
    router = APIRouter()

    @router.get("/metrics")
    def metrics() -> dict[str, int]:
        return {"requests": 1}

    with live(metrics_router=router, metrics_api_key="m", api_keys=("k",)) as s:
        assert_error(s.http.get("/metrics"), 401, None)
        assert_error(s.http.get("/metrics", headers={"Authorization": "Bearer k"}), 401, None)
        assert s.http.get("/metrics", headers={"Authorization": "Bearer m"}).json() == {"requests": 1}
    hooked: list[object] = []
    build_app(ServerConfig(), FakeEngine(TOKENIZER), metrics_router=hooked.append)
    assert len(hooked) == 1
    with live(metrics_router=router) as s:  # no metrics key: /metrics is open
        assert s.http.get("/metrics").status_code == 200


def test_queue_full_is_429_with_retry_after() -> None:
    with live(FakeEngine(TOKENIZER, capacity=0)) as s:
        r = s.chat(max_tokens=1)
        assert_error(r, 429, None)
        assert r.headers["retry-after"] == "3"
        with pytest.raises(openai.RateLimitError):
            s.sdk().chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)


def test_partial_admission_aborts_admitted_choices() -> None:
    with live(FakeEngine(TOKENIZER, capacity=1, delay_s=0.05)) as s:
        assert_error(s.chat(max_tokens=3, n=2), 429, None)
        assert s.engine.aborted == [s.engine.requests[0].request_id]


def test_dead_engine_is_503() -> None:
    engine = FakeEngine(TOKENIZER)
    engine.dead = True
    with live(engine) as s:
        with pytest.raises(openai.InternalServerError) as exc:
            s.sdk().chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)
        assert exc.value.status_code == 503
        assert s.http.get("/ready").status_code == 503


def test_engine_failure_non_stream_hides_details() -> None:
    engine = FakeEngine(TOKENIZER)
    with live(engine) as s:
        engine.fail_after = 2
        err = assert_error(s.chat(max_tokens=5), 500, None)
        assert "secret" not in err["message"] and err["type"] == "server_error"
        engine.fail_with_output = True
        assert assert_error(s.chat(max_tokens=5), 500, None)["message"] == "the fake engine failed"
        engine.fail_after = None
        assert s.chat(max_tokens=1).status_code == 200


def test_engine_failure_mid_stream_sends_error_frame() -> None:
    engine = FakeEngine(TOKENIZER)
    with live(engine) as s:
        engine.fail_after = 2
        body = {"messages": MSGS, "max_tokens": 5, "stream": True}
        with s.http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]" and set(events[-2]) == {"error"}
        assert (
            events[-2]["error"]["type"] == "server_error" and "secret" not in events[-2]["error"]["message"]
        )
        assert sum(1 for e in events[:-2] if e["choices"][0]["delta"].get("content")) == 2
        engine.fail_after = None
        assert s.chat(max_tokens=1).status_code == 200


def test_client_disconnect_mid_stream_aborts() -> None:
    engine = FakeEngine(TOKENIZER, delay_s=0.05)
    with live(engine) as s:
        body = {"messages": MSGS, "max_tokens": 100, "stream": True}
        with s.http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        assert engine.abort_event.wait(5), "engine.abort was not called"
        assert engine.aborted == [engine.requests[-1].request_id]
        assert s.chat(max_tokens=1).status_code == 200


def test_client_disconnect_non_stream_aborts() -> None:
    engine = FakeEngine(TOKENIZER, delay_s=0.05)
    with live(engine) as s:
        with pytest.raises(httpx.ReadTimeout):
            s.http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 100}, timeout=0.3)
        assert engine.abort_event.wait(5), "engine.abort was not called"
        assert engine.aborted == [engine.requests[-1].request_id]


# ------------------------------------------------------------------ config


def test_config_flags_env_and_errors() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    ns = parser.parse_args(["--port", "9000", "--api-key", "a,b", "--api-key", "c"])
    env = {"CTXSTEER_PORT": "1", "CTXSTEER_MAX_NUM_SEQS": "4", "CTXSTEER_DEFAULT_STEERING_STRENGTH": "2.5"}
    cfg = ServerConfig.from_args(ns, env)
    assert (cfg.port, cfg.max_num_seqs, cfg.default_steering_strength) == (9000, 4, 2.5)
    assert cfg.api_keys == ("a", "b", "c") and cfg.host == "127.0.0.1"
    with pytest.raises(ValueError, match="CTXSTEER_PORT"):
        ServerConfig.from_args(argparse.Namespace(), {"CTXSTEER_PORT": "abc"})
    with pytest.raises(ValueError, match="--default-steering-strength"):
        ServerConfig(default_steering_strength=0.5)
    with pytest.raises(ValueError, match="--head-profiles"):
        ServerConfig(head_profiles="/no/such/file.json")


class _FailingStart(FakeEngine):
    async def start(self) -> None:
        raise RuntimeError("no memory for the KV cache")


def test_failed_engine_start_makes_health_503() -> None:
    """Loading is alive (200); an engine that failed to start is not, so a liveness probe restarts it."""
    from ctxsteer.server.main import create_app

    app = create_app(ServerConfig(), _FailingStart(TOKENIZER, ready=False), head_profiles=PROFILES)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="on")
    )
    with in_thread(server, start_timeout_s=10, stop_timeout_s=5) as port:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for _ in range(100):
                r = http.get("/health")
                if r.status_code != 200:
                    break
                time.sleep(0.02)
            err = assert_error(r, 503, None)
            assert err["code"] == "engine_failed" and "no memory for the KV cache" in err["message"]
            assert assert_error(http.get("/ready"), 503, None)["code"] == "not_ready"


def test_steering_unsupported_by_the_engine_is_400() -> None:
    """An engine that cannot steer this model (vLLM with softcapping, ALiBi, sinks) refuses steered
    requests with a 400 before generating; unsteered ones are served."""
    import dataclasses

    engine = FakeEngine(TOKENIZER)
    engine.info = dataclasses.replace(engine.info, steering_unsupported="no steering with ALiBi here")
    with live(engine) as s:
        err = assert_error(s.chat(max_tokens=2, steering={"strength": 2}), 400, "steering")
        assert err["code"] == "steering_unsupported" and "ALiBi" in err["message"]
        assert s.chat(max_tokens=2).status_code == 200
        assert s.chat(max_tokens=2, steering={"strength": 1}).status_code == 200


def test_continue_final_message_and_add_generation_prompt(srv: Live) -> None:
    """vLLM's chat extensions: continue an assistant prefix (lm-eval's RULER tasks send one) instead of
    opening a new turn; the user message stays the steered context; both true is a 400."""
    msgs = [*MSGS, {"role": "assistant", "content": "The answer is"}]
    body = {"messages": msgs, "continue_final_message": True, "steering": {"strength": 2}}
    assert srv.chat(**body, max_tokens=2).status_code == 200
    sent = srv.engine.requests[-1]
    tok = srv.http.post("/tokenize", json=body).json()
    assert tok["tokens"] == sent.prompt_ids
    assert TOKENIZER.decode(sent.prompt_ids).endswith("The answer is")
    start, end = sent.steer.steered[0]
    assert TOKENIZER.decode(sent.prompt_ids[start:end]) == MSGS[1]["content"]
    new_turn = srv.http.post("/tokenize", json={"messages": msgs}).json()["tokens"]
    assert new_turn[: len(sent.prompt_ids)] == sent.prompt_ids  # same text, cut where the turn closes
    assert "assistant" in TOKENIZER.decode(new_turn[len(sent.prompt_ids) :])  # ...and a new turn opened
    no_prompt = srv.http.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert len(sent.prompt_ids) < len(no_prompt["tokens"]) < len(new_turn)  # closed turn, nothing opened
    both = {"continue_final_message": True, "add_generation_prompt": True}
    assert_error(srv.chat(messages=msgs, **both), 400, "continue_final_message")
    assert_error(srv.http.post("/tokenize", json={"messages": msgs, **both}), 400, "continue_final_message")
    empty = [*MSGS, {"role": "assistant", "content": ""}]
    assert_error(srv.chat(messages=empty, continue_final_message=True), 400, "messages")
