"""The HTTP transport: uvicorn's httptools protocol with the limits that slow or hostile clients need.

uvicorn alone lets a client hold a connection (a file descriptor, and a worker's attention) forever by
trickling header bytes, accepts any number of connections until `accept()` fails with EMFILE, and answers
transport-level errors (bad request line, over capacity, app crashed before responding) in plain text.
`make_protocol(config)` returns a protocol class that, per connection:

- answers 408 when the request headers are not complete `timeout_header_read_s` after the connection
  opened (or, on a keep-alive connection, after the next request's first byte);
- answers 408 when the app waits for body bytes that do not come for `timeout_body_read_s`;
- answers 431 when the headers exceed `max_header_bytes`;
- answers 503 (Retry-After: 1) and closes at once when `max_connections` are already open;
- sends every one of these, and uvicorn's own 400/500/503, as an OpenAI-shaped JSON error.

`GracefulServer` is uvicorn's Server without the re-raise of SIGTERM/SIGINT after a clean drain, so
`ctxsteer serve` exits 0 then.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import resource
from collections.abc import Generator, Sequence
from typing import Any, ClassVar

import uvicorn
from uvicorn._types import ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, Scope
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from ctxsteer.server.config import ServerConfig
from ctxsteer.server.errors import INVALID_REQUEST, SERVER_ERROR, error_json

log = logging.getLogger("ctxsteer.server.transport")

FD_RESERVE = 64  # descriptors kept free for the listening socket, model files, logs and the like
LINGER_S = 2.0  # after a refusal, read and drop the client's leftovers so its kernel gets FIN, not RST
Headers = Sequence[tuple[bytes, bytes]]


def connection_limit(requested: int) -> int:
    """`requested`, but never more than the soft RLIMIT_NOFILE minus a reserve: past that, `accept()`
    fails with EMFILE and every client (health probes included) is refused without an answer."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft - FD_RESERVE))


async def _send_error(
    send: ASGISendCallable, status: int, type: str, code: str, message: str, headers: Headers = ()
) -> None:
    """An error as ASGI messages (for uvicorn's in-cycle responses: 500 and the concurrency 503)."""
    body = error_json(message, type, code)
    start: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _over_capacity(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Stands in for uvicorn's plain-text `service_unavailable` (its `limit_concurrency` answer)."""
    msg = "The server is at its concurrency limit; retry shortly."
    await _send_error(send, 503, SERVER_ERROR, "server_overloaded", msg, [(b"retry-after", b"1")])


class GuardedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus header/body read timeouts, a header size cap, a connection cap and JSON
    errors. The limits are class attributes because uvicorn instantiates the class itself."""

    header_timeout_s: ClassVar[float] = 10.0
    body_timeout_s: ClassVar[float] = 30.0
    max_header_bytes: ClassVar[int] = 64 * 1024
    max_connections: ClassVar[int] = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._reading_headers = False  # from a request's first byte (or the connection) to its headers' end
        self._header_bytes = 0
        self._refused = False  # answered and closing: ignore whatever else the client sends

    # connection lifecycle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        full = len(self.connections) >= self.max_connections
        super().connection_made(transport)
        if full:
            self.connections.discard(self)  # a refused connection must not count against the cap
            log.warning("refused a connection: %d already open (--max-connections)", self.max_connections)
            msg = "The server has too many open connections; retry shortly."
            self._refuse(503, SERVER_ERROR, "too_many_connections", msg, [(b"retry-after", b"1")], False)
            return
        self._start_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_headers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._reading_headers and (self.cycle is None or self.cycle.response_complete):
            self._start_headers()  # idle keep-alive connection: even bare CRLFs start the header clock
        if self._reading_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._reading_headers and not self._refused and self._header_bytes > self.max_header_bytes:
            self._headers_too_large()

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._reading_headers:
            self._start_headers()  # a pipelined request behind one in flight

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._stop_headers()
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.max_header_bytes:  # the whole block came in one read
            self._headers_too_large()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    # uvicorn's own responses

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, INVALID_REQUEST, "invalid_http_request", msg)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if app is service_unavailable:
            app = _over_capacity
        cycle.send_500_response = functools.partial(  # type: ignore[method-assign]
            _send_error, cycle.send, 500, SERVER_ERROR, "internal_error", "Internal server error."
        )
        cycle.receive = self._timed_receive(cycle)  # type: ignore[method-assign]
        super()._start_asgi_task(cycle, app)

    # the limits

    def _start_headers(self) -> None:
        if self._refused:
            return
        self._reading_headers = True
        self._header_bytes = 0
        self._stop_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _stop_headers(self) -> None:
        self._reading_headers = False
        self._stop_timer()

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request stalled behind one in flight: finish that response, then close.
            self.cycle.keep_alive = False
            self._refused = True
            return
        msg = f"The request headers did not arrive within {self.header_timeout_s:g} s."
        self._refuse(408, INVALID_REQUEST, "request_timeout", msg)

    def _headers_too_large(self) -> None:
        msg = f"The request headers are larger than the server's limit of {self.max_header_bytes} bytes."
        self._refuse(431, INVALID_REQUEST, "request_header_fields_too_large", msg)

    def _timed_receive(self, cycle: RequestResponseCycle) -> ASGIReceiveCallable:
        """`cycle.receive`, but a body that stalls for `body_timeout_s` while the app waits gets a 408
        and the app sees a disconnect. Waits after the body (disconnect listeners) are not timed."""
        receive = cycle.receive

        async def timed() -> ASGIReceiveEvent:
            if not cycle.more_body or cycle.disconnected:
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    return await receive()
            except TimeoutError:
                if cycle.response_started:
                    self.transport.close()
                else:
                    msg = f"The request body stalled: no bytes for {self.body_timeout_s:g} s."
                    self._refuse(408, INVALID_REQUEST, "request_timeout", msg)
                cycle.disconnected = True  # the app's later sends are dropped instead of written
                return {"type": "http.disconnect"}

        return timed

    def _refuse(
        self, status: int, type: str, code: str, message: str, headers: Headers = (), linger: bool = True
    ) -> None:
        """Write a JSON error with `Connection: close` straight to the transport and close it."""
        self._refused = True
        self._stop_headers()
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            return
        body = error_json(message, type, code)
        head = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *headers,
        ]
        lines = b"".join(k + b": " + v + b"\r\n" for k, v in head)
        self.transport.write(STATUS_LINE[status] + lines + b"\r\n" + body)
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()  # FIN after the answer; the client's own FIN then closes us
            self.flow.resume_reading()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def make_protocol(config: ServerConfig) -> type[GuardedProtocol]:
    """A GuardedProtocol subclass bound to the config's limits, for `uvicorn.Config(http=...)`."""
    limit = connection_limit(config.max_connections)
    if limit < config.max_connections:
        log.warning(
            "--max-connections %d lowered to %d: the open-file limit (ulimit -n) leaves no more",
            config.max_connections,
            limit,
        )
    attrs = {
        "header_timeout_s": config.timeout_header_read_s,
        "body_timeout_s": config.timeout_body_read_s,
        "max_header_bytes": config.max_header_bytes,
        "max_connections": limit,
    }
    return type("ConfiguredProtocol", (GuardedProtocol,), attrs)


def uvicorn_config(app: Any, config: ServerConfig, **overrides: Any) -> uvicorn.Config:
    """The uvicorn settings `ctxsteer serve` runs with (tests pass overrides such as port=0)."""
    kwargs: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "log_level": config.log_level,
        "timeout_graceful_shutdown": int(config.drain_timeout_s) or None,
        "http": make_protocol(config),
        "timeout_keep_alive": config.timeout_keep_alive_s,  # typed int in uvicorn; a float works
    }
    return uvicorn.Config(app, **(kwargs | overrides))


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises the captured SIGTERM/SIGINT after shutting down (so the process dies by the
    signal: exit 143/130). After a clean drain that is a success, so swallow it; a forced exit (second
    Ctrl-C) keeps uvicorn's behaviour."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            try:
                yield
            finally:
                if not self.force_exit:
                    self._captured_signals.clear()
