"""The Python client (`ctxsteer.clients`) against a live `ctxsteer serve` with the tiny model, plus a
plain OpenAI-style stub server for what a non-ctxsteer server does (no steering, odd errors, 503s)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_process import ServerProcess, free_port, serve

from ctxsteer.clients import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    Steering,
    SteeringError,
)
from ctxsteer.clients.config import resolve_api_key, resolve_base_url
from ctxsteer.clients.prompts import ask_messages
from ctxsteer.clients.session import describe

KEY = "test-key"
DOC = "The Eiffel Tower is in Paris. It was completed in 1889."
MSGS = [{"role": "user", "content": f"Context: {DOC}\nQuestion: when was it completed?"}]


SLOTS = 4  # no test here sends more at once, except to provoke a 429


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """No queue (request SLOTS + 1 gets 429) and an API key: one server startup serves every test."""
    flags = ("--max-num-seqs", str(SLOTS), "--max-queue", "0", "--api-key", KEY)
    with serve(str(tiny_model_dir), *flags, log_dir=tmp_path_factory.mktemp("logs")) as sp:
        yield sp


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


# ---------------------------------------------------------------- round trips


def test_client_and_cli_import_no_torch() -> None:
    """`ctxsteer chat` must start fast and the client must install without torch."""
    code = (
        "import sys, ctxsteer.server.cli, ctxsteer.clients, ctxsteer.clients.cli, ctxsteer.clients.repl\n"
        "print(sorted({'torch', 'transformers', 'fastapi'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_chat_reports_steering_and_resolves_the_model(client: Client, tiny_model_dir: Path) -> None:
    r = client.chat(MSGS, Steering(strength=2), max_tokens=6, temperature=0, ignore_eos=True)
    assert r.model == tiny_model_dir.name  # no model given: the server's first listed one was used
    assert r.usage is not None and r.usage.completion_tokens == 6
    assert r.choices[0].finish_reason == "length" and isinstance(r.text, str)
    s = r.steering
    assert s is not None and (s.strength, s.alpha, s.layers) == (2.0, 0.5, "all")
    assert 0 < s.steered_tokens < s.prompt_tokens == r.usage.prompt_tokens


def test_stream_equals_non_stream_and_keeps_totals(client: Client) -> None:
    kwargs: dict[str, Any] = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    whole = client.chat(MSGS, 3, **kwargs)
    with client.stream_chat(MSGS, {"strength": 3}, **kwargs) as stream:
        deltas = [chunk.text for chunk in stream]
    assert "".join(deltas) == stream.text == whole.text
    assert stream.steering == whole.steering
    assert stream.usage is not None and whole.usage is not None
    # the prefix cache served the later request part of its prompt: the totals match, not the details
    drop = {"prompt_tokens_details"}
    assert stream.usage.model_dump(exclude=drop) == whole.usage.model_dump(exclude=drop)
    assert stream.finish_reason == "length"


def test_async_client_concurrent_chat_and_stream(server: ServerProcess) -> None:
    async def main() -> tuple[list[Any], Any, Any]:
        async with AsyncClient(server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as ac:
            chats = asyncio.gather(*(ac.chat(MSGS, s, max_tokens=4, temperature=0) for s in (1, 2, 4)))
            stream = ac.stream_chat(MSGS, 2, max_tokens=4, temperature=0)
            texts = [c.text async for c in stream]
            return await chats, (stream, "".join(texts)), await ac.health()

    chats, (stream, streamed), health = asyncio.run(main())
    assert [c.steering.strength for c in chats] == [1.0, 2.0, 4.0]
    assert streamed == stream.text == chats[1].text  # same greedy request, streamed or not
    assert health.ok and health.model


def test_ask_puts_context_then_question_in_one_steered_user_turn(client: Client) -> None:
    assert ask_messages("Q?", [DOC, "more"], system="S") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": f"{DOC}\n\nmore\n\nQ?"},
    ]
    turn = client.ask("When?", context=DOC, strength=2, max_tokens=2)
    only_doc = client.ask("When?", context=DOC, strength=2, focus="context", max_tokens=2)
    messages = ask_messages("When?", DOC)
    user_turn = client.tokenize(messages, steering=Steering()).steered_tokens  # default target: user
    doc = client.tokenize(messages, steering=Steering(spans=[DOC])).steered_tokens
    assert (turn.steering.steered_tokens, only_doc.steering.steered_tokens) == (user_turn, doc)
    assert user_turn > doc > 0 and turn.steering.strength == only_doc.steering.strength == 2.0


def test_tokenize_models_health(client: Client, tiny_model_dir: Path) -> None:
    t = client.tokenize(MSGS, steering=Steering(spans=[DOC]))
    assert t.count == len(t.tokens) and t.steered_tokens == sum(e - s for s, e in t.steered_spans) > 0
    [model] = client.models()
    assert model.id == tiny_model_dir.name and model.max_model_len == t.max_model_len
    health = client.health()
    assert (health.status, health.ready, health.model) == ("ok", True, model.id)


def test_connections_are_reused(server: ServerProcess) -> None:
    ports: list[int] = []

    def record(response: httpx.Response) -> None:
        ports.append(response.extensions["network_stream"].get_extra_info("client_addr")[1])

    with httpx.Client(event_hooks={"response": [record]}) as http:
        c = Client(server.url + "/v1", api_key=KEY, http_client=http)
        c.models()
        c.chat(MSGS, max_tokens=1)
        c.close()  # not ours: must stay open
        c.models()
    assert len(ports) == 4 and len(set(ports)) == 1  # models, model lookup for chat, chat, models


# ---------------------------------------------------------------- errors


def test_server_errors_carry_the_openai_fields(client: Client) -> None:
    with pytest.raises(NotFoundError) as e:
        client.chat(MSGS, model="no-such-model", max_tokens=1)
    assert (e.value.status, e.value.type, e.value.param, e.value.code) == (
        404,
        "invalid_request_error",
        "model",
        "model_not_found",
    )
    with pytest.raises(BadRequestError) as e:
        client.chat(MSGS, max_tokens=1, temperature=5)
    assert (e.value.status, e.value.param) == (400, "temperature") and "temperature" in e.value.message
    with pytest.raises(BadRequestError) as e:  # valid for the client, not for a 3-layer model
        client.chat(MSGS, Steering(layers=[7]), max_tokens=1)
    assert (e.value.param, e.value.code) == ("steering.layers[0]", "invalid_steering")


BAD_STEERING = [
    {"strength": 0.5},
    {"alpha": 0},
    {"strength": 2, "alpha": 0.5},
    {"targets": "user"},
    {"targets": ["robot"]},
    {"spans": [""]},
    {"layers": [True]},
    {"heads": {"x": [0]}},
    {"heads": [0], "head_profile": "p"},
    {"colour": "red"},
]


def test_client_validates_steering_like_the_server(client: Client, server: ServerProcess) -> None:
    for bad in BAD_STEERING:
        with pytest.raises(SteeringError) as e:
            Steering.from_dict(bad)
        body = {"messages": MSGS, "max_tokens": 1, "steering": bad}
        headers = {"Authorization": f"Bearer {KEY}"}
        answer = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert answer.status_code == 400, bad
        assert answer.json()["error"]["param"] == e.value.field, bad
        with pytest.raises(SteeringError):  # and nothing is sent
            client.chat(MSGS, bad, max_tokens=1)


def test_auth_and_env_configuration(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CTXSTEER_BASE_URL", "CTXSTEER_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(AuthenticationError) as e, Client(server.url + "/v1", max_retries=0) as c:
        c.models()
    assert (e.value.status, e.value.code) == (401, "invalid_api_key")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)  # bare host: /v1 is added
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with Client() as c:
        assert c.base_url == server.url + "/v1" and c.models()
    monkeypatch.setenv("CTXSTEER_API_KEY", "wrong")  # ours win over OpenAI's
    with pytest.raises(AuthenticationError), Client(max_retries=0) as c:
        c.models()
    assert resolve_api_key("explicit") == "explicit"
    assert resolve_base_url("http://h:1/v1/") == "http://h:1/v1"
    with pytest.raises(ValueError):
        resolve_base_url("localhost:8000")


def test_connection_errors_and_timeouts() -> None:
    with Client(f"http://127.0.0.1:{free_port()}/v1", retry=RetryPolicy(max_retries=1, backoff_s=0.01)) as c:
        with pytest.raises(APIConnectionError, match="cannot connect"):
            c.models()


def test_read_timeout_is_a_timeout_error(server: ServerProcess) -> None:
    with Client(server.url + "/v1", api_key=KEY, timeout=0.05, max_retries=0) as c:
        with pytest.raises(APITimeoutError):
            c.chat(MSGS, max_tokens=300, ignore_eos=True)


# ---------------------------------------------------------------- retries


class _Hog:
    """Occupy every slot with long streams until close(): the next request gets 429."""

    def __init__(self, server: ServerProcess) -> None:
        self.client = Client(server.url + "/v1", api_key=KEY, max_retries=0)
        self.streams = [self.client.stream_chat(MSGS, max_tokens=400, ignore_eos=True) for _ in range(SLOTS)]
        for stream in self.streams:
            next(iter(stream))  # the role chunk: this request holds a slot now

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        self.client.close()


def test_429_maps_to_rate_limit_error_with_retry_after(server: ServerProcess) -> None:
    hog = _Hog(server)
    try:
        with pytest.raises(RateLimitError) as e, Client(server.url + "/v1", api_key=KEY, max_retries=0) as c:
            c.chat(MSGS, max_tokens=1)
        assert (e.value.status, e.value.type, e.value.code) == (429, "rate_limit_error", "queue_full")
        assert e.value.retry_after == 1.0
    finally:
        hog.close()


def test_retry_on_429_waits_for_retry_after_then_succeeds(server: ServerProcess) -> None:
    hog = _Hog(server)
    seen: list[tuple[float, int]] = []

    def on_response(response: httpx.Response) -> None:
        seen.append((time.monotonic(), response.status_code))
        if response.status_code == 429:
            hog.close()  # free the slots: the retry can only succeed if it waits and tries again

    with httpx.Client(event_hooks={"response": [on_response]}) as http:
        c = Client(server.url + "/v1", api_key=KEY, max_retries=3, http_client=http)
        r = c.chat(MSGS, max_tokens=2)
    statuses = [s for _, s in seen]
    assert statuses == [200, 429, 200] and r.usage.completion_tokens == 2  # models, rejected, retried
    assert seen[2][0] - seen[1][0] >= 1.0  # Retry-After: 1


def test_retry_policy_delays() -> None:
    p = RetryPolicy(max_retries=2, backoff_s=0.5, max_retry_after_s=10)
    assert 3.0 <= p.delay(0, status=429, retry_after=3) <= 3.3
    assert 0.375 <= p.delay(0, status=503) <= 0.5 and 0.75 <= p.delay(1, status=None) <= 1.0
    assert p.delay(2, status=429) is None  # retries used up
    assert p.delay(0, status=400) is None and p.delay(0, status=500) is None
    assert p.delay(0, status=429, retry_after=30) is None  # longer than we are willing to wait


# ---------------------------------------------------------------- a server that knows nothing of steering


class _Stub(BaseHTTPRequestHandler):
    """OpenAI-shaped answers without `steering`; scripted failures via the class attributes."""

    bodies: list[dict[str, Any]] = []
    fail_first: list[tuple[int, dict[str, str], bytes]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, json.dumps({"object": "list", "data": [{"id": "stub-model"}]}).encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        if type(self).fail_first:
            status, headers, payload = type(self).fail_first.pop(0)
            return self._send(status, payload, headers)
        if not body.get("stream"):
            answer = {"id": "x", "model": body["model"], "choices": [{"message": {"content": "hi there"}}]}
            return self._send(200, json.dumps(answer).encode())
        chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
        events = (
            ": keep-alive\n\n"
            "event: message\nid: 1\ndata: " + json.dumps(chunk) + "\n\n"
            'data: {"choices": [{"index": 0,\ndata: "delta": {"content": " there"}, '
            '"finish_reason": "stop"}]}\n\n'
            "data: [DONE]\n\n"
        )
        self._send(200, events.encode(), {"Content-Type": "text/event-stream"})


@pytest.fixture
def stub() -> Iterator[str]:
    _Stub.bodies, _Stub.fail_first = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_server_without_steering_still_chats(stub: str) -> None:
    with Client(stub) as c:
        r = c.chat(MSGS, Steering(strength=2), max_tokens=3)
        stream = c.stream_chat(MSGS, 2)
        assert [chunk.text for chunk in stream] == ["hi", " there"]
    assert r.text == "hi there" and r.steering is None and r.usage is None
    assert stream.text == "hi there" and stream.finish_reason == "stop" and stream.steering is None
    assert "steering not reported" in describe(stream)
    sent = _Stub.bodies[0]
    assert sent["model"] == "stub-model" and sent["steering"] == {"strength": 2} and sent["max_tokens"] == 3
    assert _Stub.bodies[1]["stream"] is True and _Stub.bodies[1]["stream_options"] == {"include_usage": True}


def test_closed_stream_sends_nothing_and_bad_calls_fail_early(stub: str) -> None:
    with Client(stub, model="m") as c:
        stream = c.stream_chat(MSGS)
        stream.close()
        assert list(stream) == [] and stream.text == ""
        with pytest.raises(TypeError, match="stream_chat"):
            c.chat(MSGS, stream=True)
        with pytest.raises(TypeError, match="not both"):
            c.ask("q", strength=2, steering=Steering(strength=3))
        with pytest.raises(SteeringError):
            c.stream_chat(MSGS, {"strength": 0})  # at the call, not at the first iteration
    assert _Stub.bodies == []


def test_503_is_retried_and_foreign_error_bodies_map(stub: str) -> None:
    _Stub.fail_first = [(503, {"Retry-After": "0"}, b'{"error": {"message": "warming up"}}')]
    with Client(stub, model="m") as c:
        assert c.chat(MSGS).text == "hi there" and len(_Stub.bodies) == 2
        _Stub.fail_first = [(422, {}, b'{"detail": "nope"}'), (500, {}, b"<html>oops</html>")]
        with pytest.raises(APIError) as e:
            c.chat(MSGS)
        assert (e.value.status, e.value.message) == (422, "nope")
        with pytest.raises(APIError) as e:
            c.chat(MSGS)
        assert (e.value.status, e.value.message) == (500, "<html>oops</html>")


def test_error_frame_inside_a_stream_raises(stub: str) -> None:
    frame = {"error": {"message": "engine died", "type": "server_error", "code": "engine_unavailable"}}
    body = f"data: {json.dumps(frame)}\n\ndata: [DONE]\n\n".encode()
    _Stub.fail_first = [(200, {"Content-Type": "text/event-stream"}, body)]
    with Client(stub, model="m") as c, pytest.raises(APIError) as e:
        list(c.stream_chat(MSGS))
    assert (e.value.status, e.value.type, e.value.code) == (None, "server_error", "engine_unavailable")
