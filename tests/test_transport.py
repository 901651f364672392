"""The HTTP transport (server/transport.py) on a real uvicorn, driven with raw sockets: slowloris-style
clients are cut off, oversized headers and too many connections refused, and every transport-level error
is an OpenAI-shaped JSON body, not uvicorn's plain text. Last, `ctxsteer serve` exits 0 after SIGTERM."""

from __future__ import annotations

import argparse
import json
import resource
import select
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from server_process import serve
from uvicorn_thread import in_thread
from waiting import DEADLINE_S, wait_for

from ctxsteer.server import transport
from ctxsteer.server.config import ServerConfig
from ctxsteer.server.transport import GracefulServer, connection_limit, uvicorn_config

REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
# A timer set to 1 s must not fire early (0.7: the server starts some clocks a little before the client's);
# it may be late on a loaded machine, but not as late as the defaults (keep-alive 5 s, header read 10 s,
# body read 30 s), which would mean the flag was ignored.
EARLY_S, LATE_S = 0.7, 4.5


async def app(scope: dict, receive: Any, send: Any) -> None:
    """Reads the whole body, answers 200 JSON with its length; /boom raises before responding."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/boom":
        raise RuntimeError("boom")
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"ok": True, "body_bytes": size}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def running(overrides: dict[str, Any] | None = None, **config: Any) -> Iterator[int]:
    """A GracefulServer with `uvicorn_config` (what `ctxsteer serve` uses) on a free port, in a thread."""
    cfg = ServerConfig(**config)
    server = GracefulServer(
        uvicorn_config(
            app, cfg, host="127.0.0.1", port=0, log_level="error", lifespan="off", **(overrides or {})
        )
    )
    with in_thread(server, stop_timeout_s=5) as port:
        yield port


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after this reply

    def error(self) -> dict[str, Any]:
        """The OpenAI error object, after checking the shape and the content type."""
        assert self.headers.get("content-type") == "application/json", self.headers
        doc = json.loads(self.body)
        assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}, doc
        err = doc["error"]
        assert isinstance(err["message"], str) and err["message"] and err["param"] is None
        assert err["type"] in ("invalid_request_error", "server_error") and isinstance(err["code"], str)
        return err


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_reply(sock: socket.socket, timeout: float = DEADLINE_S, wait_close: bool = True) -> Reply:
    """One response: headers, a Content-Length body, then (if `wait_close`) whether EOF follows."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without a response: {buf!r}"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    closed = False
    if wait_close:  # a close comes right after the reply; the wait for one that is not coming is short
        sock.settimeout(5.0)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
    return Reply(int(status_line.split()[1]), headers, body, closed)


def wait_closed(sock: socket.socket, timeout: float = DEADLINE_S) -> float:
    """Seconds until the server closes `sock` (fails if it stays open past `timeout`)."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    try:
        assert sock.recv(1) == b"", "expected EOF"
    except TimeoutError:
        pytest.fail(f"connection still open after {timeout} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


# (a) header read timeout


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: te"], ids=["nothing", "partial-header"])
def test_stalled_headers_get_408_and_close(sent: bytes) -> None:
    with running(timeout_header_read_s=1.0) as port, connect(port) as sock:
        t0 = time.monotonic()
        sock.sendall(sent)
        reply = read_reply(sock)
        elapsed = time.monotonic() - t0
    assert reply.status == 408 and reply.closed and reply.headers["connection"] == "close"
    assert reply.error()["code"] == "request_timeout"
    assert EARLY_S < elapsed < LATE_S, elapsed


def test_trickled_headers_are_cut_off_at_the_deadline() -> None:
    """Slowloris: a byte every 0.2 s keeps the socket busy but must not push the deadline back. The
    client trickles until the server answers, so a server whose deadline moves with each byte never does
    (the test fails at its deadline), however slow the machine."""
    with running(timeout_header_read_s=1.0) as port, connect(port) as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
        while not select.select([sock], [], [], 0.2)[0]:  # a byte every 0.2 s until the answer comes
            assert time.monotonic() - t0 < DEADLINE_S, "still trickling: the deadline never came"
            try:
                sock.sendall(b"a")
            except OSError:  # the server answered and closed meanwhile
                break
        elapsed = time.monotonic() - t0
        reply = read_reply(sock)
    assert reply.status == 408 and reply.closed and reply.error()["code"] == "request_timeout"
    assert EARLY_S < elapsed < LATE_S, elapsed


def test_header_deadline_restarts_per_request_and_not_while_idle() -> None:
    """On keep-alive, idle time is the keep-alive timeout's business; the header clock starts again with
    the next request's first byte."""
    with running(timeout_header_read_s=1.0, timeout_keep_alive_s=5.0) as port, connect(port) as sock:
        sock.sendall(REQUEST)
        assert read_reply(sock, wait_close=False).status == 200
        time.sleep(1.5)  # idle past the header timeout: still open
        sock.sendall(REQUEST)
        assert read_reply(sock, wait_close=False).status == 200
        t0 = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\n")
        reply = read_reply(sock)
        assert EARLY_S < time.monotonic() - t0 < LATE_S
    assert reply.status == 408 and reply.closed and reply.error()["code"] == "request_timeout"


def test_stalled_body_gets_408() -> None:
    with running(timeout_body_read_s=1.0) as port, connect(port) as sock:
        t0 = time.monotonic()
        sock.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        reply = read_reply(sock)
        assert EARLY_S < time.monotonic() - t0 < LATE_S
    assert reply.status == 408 and reply.closed and reply.error()["code"] == "request_timeout"


def test_slow_but_moving_body_is_fine() -> None:
    """The body timeout is per stall, not for the whole body: 2 s of body, no pause near the 1 s timeout
    (pauses of 0.1 s: ten times the margin a loaded machine needs to keep a sleep short)."""
    with running(timeout_body_read_s=1.0) as port, connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 20\r\n\r\n")
        for _ in range(20):
            time.sleep(0.1)
            sock.sendall(b"x")
        reply = read_reply(sock, wait_close=False)
    assert reply.status == 200 and json.loads(reply.body)["body_bytes"] == 20


# (b) header size


def _send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the server may answer and stop reading before all of it went out
        pass


def test_one_megabyte_of_headers_gets_431() -> None:
    with running() as port, connect(port) as sock:
        _send_ignoring_reset(
            sock, b"GET / HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
        )
        reply = read_reply(sock)
    assert reply.status == 431 and reply.closed
    assert reply.error()["code"] == "request_header_fields_too_large"


def test_many_headers_over_the_limit_in_one_read_get_431() -> None:
    """A complete header block over the limit (one read, so counted when the headers end)."""
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(80))  # ~5 KiB
    with running(max_header_bytes=4096) as port, connect(port) as sock:
        _send_ignoring_reset(sock, b"GET / HTTP/1.1\r\nHost: test\r\n" + headers + b"\r\n")
        reply = read_reply(sock)
    assert reply.status == 431 and reply.error()["code"] == "request_header_fields_too_large"


def test_headers_under_the_limit_pass() -> None:
    with running() as port, connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 32768 + b"\r\n\r\n")
        assert read_reply(sock, wait_close=False).status == 200


# (c) uvicorn's own plain-text answers


@pytest.mark.parametrize(
    "garbage", [b"\x00\x01\x02 garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"G E T\r\n\r\n"]
)
def test_malformed_request_gets_json_400(garbage: bytes) -> None:
    with running() as port, connect(port) as sock:
        sock.sendall(garbage)
        reply = read_reply(sock)
    assert reply.status == 400 and reply.closed
    err = reply.error()
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_http_request"


def test_app_crash_before_responding_gets_json_500() -> None:
    with running() as port, connect(port) as sock:
        sock.sendall(b"GET /boom HTTP/1.1\r\nHost: test\r\n\r\n")
        reply = read_reply(sock)
    assert reply.status == 500 and reply.error()["type"] == "server_error"


def test_uvicorn_concurrency_limit_gets_json_503() -> None:
    # limit_concurrency=1 counts the asking connection itself, so every request is over the limit.
    with running({"limit_concurrency": 1}) as port, connect(port) as sock:
        sock.sendall(REQUEST)
        reply = read_reply(sock)
    assert reply.status == 503 and reply.error()["type"] == "server_error"
    assert reply.headers["retry-after"] == "1"


# (d) connection cap


def test_connection_beyond_the_cap_gets_503_and_the_others_still_work() -> None:
    with running(max_connections=3) as port:
        first = [connect(port) for _ in range(3)]
        try:
            for sock in first:  # an answer on each: the server has accepted (and counts) all three
                sock.sendall(REQUEST)
                assert read_reply(sock, wait_close=False).status == 200
            with connect(port) as extra:
                reply = read_reply(extra)
            assert reply.status == 503 and reply.closed and reply.headers["retry-after"] == "1"
            err = reply.error()
            assert (err["type"], err["code"]) == ("server_error", "too_many_connections")
            for sock in first:  # the refusal did not disturb the three
                sock.sendall(REQUEST)
                assert read_reply(sock, wait_close=False).status == 200
            first.pop().close()  # a freed place is usable again, once the server has seen the close

            def freed() -> bool:
                with connect(port) as again:
                    again.sendall(REQUEST)
                    return read_reply(again, wait_close=False).status == 200

            wait_for(freed, "the freed place to come back")
        finally:
            for sock in first:
                sock.close()


def test_connection_cap_respects_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (200, 4096))
    assert connection_limit(1000) == 200 - transport.FD_RESERVE
    assert connection_limit(10) == 10
    assert transport.make_protocol(ServerConfig(max_connections=1000)).max_connections == 136
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert connection_limit(1000) == 1000


# (e) keep-alive timeout


def test_idle_keep_alive_connection_is_closed_after_the_timeout() -> None:
    with running(timeout_keep_alive_s=1.0, timeout_header_read_s=30.0) as port, connect(port) as sock:
        sock.sendall(REQUEST)
        assert read_reply(sock, wait_close=False).status == 200
        assert EARLY_S < wait_closed(sock) < LATE_S


# flags


def test_transport_flags_and_env() -> None:
    ap = argparse.ArgumentParser()
    ServerConfig.add_arguments(ap)
    ns = ap.parse_args(
        ["--timeout-header-read", "2.5", "--max-connections", "7", "--max-header-bytes", "2048"]
    )
    env = {
        "CTXSTEER_TIMEOUT_KEEP_ALIVE": "3",
        "CTXSTEER_TIMEOUT_BODY_READ": "4.5",
        "CTXSTEER_MAX_CONNECTIONS": "9",
    }
    cfg = ServerConfig.from_args(ns, env)
    assert (cfg.timeout_header_read_s, cfg.max_connections, cfg.max_header_bytes) == (2.5, 7, 2048)
    assert (cfg.timeout_keep_alive_s, cfg.timeout_body_read_s) == (3.0, 4.5)
    d = ServerConfig()
    assert (d.timeout_keep_alive_s, d.timeout_header_read_s, d.timeout_body_read_s) == (5, 10, 30)
    assert (d.max_header_bytes, d.max_connections) == (65536, 1000)
    for bad, flag in [
        ({"timeout_header_read_s": 0.0}, "--timeout-header-read"),
        ({"timeout_keep_alive_s": float("inf")}, "--timeout-keep-alive"),
        ({"timeout_body_read_s": -1.0}, "--timeout-body-read"),
        ({"max_header_bytes": 100}, "--max-header-bytes"),
        ({"max_connections": 0}, "--max-connections"),
    ]:
        with pytest.raises(ValueError, match=flag):
            ServerConfig(**bad)
    assert "public even when --api-key is set (as vLLM does)" in " ".join(ap.format_help().split())


# (f) the real `ctxsteer serve`


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_uses_the_transport_and_exits_0_after_a_drain(
    sig: signal.Signals, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with serve(str(tiny_model_dir), "--timeout-header-read", "1", log_dir=tmp_path) as sp:
        port = int(sp.url.rsplit(":", 1)[1])
        with connect(port) as sock:  # run() wired the protocol: JSON 400 ...
            sock.sendall(b"\x00garbage\r\n\r\n")
            assert read_reply(sock).error()["code"] == "invalid_http_request"
        with connect(port) as sock:  # ... and the flags
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            assert read_reply(sock).status == 408
        sp.proc.send_signal(sig)
        assert sp.proc.wait(30) == 0, sp.logs()
