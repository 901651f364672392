"""build_app(config, engine): the FastAPI app; no module-level app or engine, so tests inject fakes.

The guard middleware is plain ASGI (not BaseHTTPMiddleware, which buffers and breaks cancellation of
streamed responses). It runs before any route and in this order: request id, API key (every route but
PUBLIC_PATHS, and /metrics only when a metrics key is set), body size (Content-Length first, then
counted while reading).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable

from fastapi import APIRouter, FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctxsteer.server.api import chat, completions, meta, responses, ui
from ctxsteer.server.api.openapi import install_openapi
from ctxsteer.server.api.serving import ServingContext
from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.interface import AsyncEngine
from ctxsteer.server.errors import (
    INVALID_REQUEST,
    CtxsteerError,
    error_response,
    install_exception_handlers,
    report_rejection,
)
from ctxsteer.server.errors import to_ctxsteer_error as _to_error
from ctxsteer.steering.indicator import indicator_id
from ctxsteer.steering.profiles import load_head_profiles
from ctxsteer.steering.spec import HeadMap

logger = logging.getLogger("ctxsteer.server.app")

REQUEST_ID_HEADER = "X-Request-Id"
# Answer without an API key: liveness/readiness probes, version, and the API description itself.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
# The playground's static files carry no data: the page asks for the key and sends it on every API call.
PUBLIC_PREFIXES = (ui.PREFIX + "/",)
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def build_app(
    config: ServerConfig,
    engine: AsyncEngine,
    *,
    metrics_router: APIRouter | Callable[[FastAPI], None] | None = None,
    head_profiles: dict[str, HeadMap] | None = None,
) -> FastAPI:
    """Wire routes, error handlers and the guard middleware around an engine.

    Engine lifecycle (start, warm-up, drain) is the caller's job, so /health answers during loading.
    `metrics_router` is an APIRouter to include, or a callable given the app (to mount /metrics).
    `head_profiles` defaults to the file named by `config.head_profiles`, validated against the model.
    """
    if head_profiles is None and config.head_profiles is not None:
        info = engine.info
        head_profiles = load_head_profiles(
            config.head_profiles, num_layers=info.num_layers, num_heads=info.num_heads
        )
    app = FastAPI(title="ctxsteer", version=meta.package_version())
    app.state.serving = ServingContext(
        config=config,
        engine=engine,
        model_name=config.served_model_name or engine.info.name,
        head_profiles=head_profiles,
        created=int(time.time()),
        indicator_id=indicator_id(engine.tokenizer),
    )
    if config.context_indicator != "off" and app.state.serving.indicator_id is None:
        raise ValueError(
            f"--context-indicator {config.context_indicator}: the model's tokenizer has no [IND] token "
            "(only models fine-tuned with the indicator token have one)"
        )
    install_exception_handlers(app)
    install_openapi(app, engine.info, auth=bool(config.api_keys), profiles=sorted(head_profiles or {}))
    for module in (meta, chat, completions, responses):
        app.include_router(module.router)
    if config.ui:
        ui.install(app)
    app.add_middleware(GuardMiddleware, config=config)
    # After the guard: a middleware the callable adds wraps it, so it also sees the guard's 401/413.
    if isinstance(metrics_router, APIRouter):
        app.include_router(metrics_router)
    elif metrics_router is not None:
        metrics_router(app)
    return app


class GuardMiddleware:
    """Request id, API-key auth, body-size limit, and the last-resort 500 for unexpected errors."""

    def __init__(self, app: ASGIApp, *, config: ServerConfig) -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in config.api_keys)
        self.metrics_key = config.metrics_api_key.encode() if config.metrics_api_key else None
        self.max_body = config.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given_id = headers.get(REQUEST_ID_HEADER, "")
        request_id = given_id if _CLIENT_ID_RE.fullmatch(given_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            denied = self._check_auth(scope["path"], headers) or self._check_length(headers)
            if denied is not None:
                report_rejection(scope.get("app"), denied)
                await error_response(denied)(scope, receive, send_with_id)
                return
            await self.app(scope, self._limited(receive), send_with_id)
        except ClientDisconnect:
            return  # nobody is listening; not an error
        except Exception as exc:
            if started:
                raise  # headers are out: let the server close the connection
            err = _to_error(exc, request_id)
            report_rejection(scope.get("app"), err)
            await error_response(err)(scope, receive, send_with_id)

    def _check_auth(self, path: str, headers: Headers) -> CtxsteerError | None:
        """Deny by default: with keys set, every route but the probes, the API document, the playground's
        static files and /metrics needs one (/tokenize and anything added later touch the tokenizer or
        model). /metrics takes its own key, or is public without one, as in vLLM."""
        if path == "/metrics":
            keys: tuple[bytes, ...] = (self.metrics_key,) if self.metrics_key is not None else ()
        elif path in PUBLIC_PATHS or path == ui.PREFIX or path.startswith(PUBLIC_PREFIXES):
            return None
        else:
            keys = self.keys
        if not keys:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode("utf-8", "replace") if scheme.lower() == "bearer" else b""
        ok = False
        for key in keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(given, key)
        if ok:
            return None
        msg = (
            "Missing API key: send 'Authorization: Bearer <key>'."
            if not given
            else "Incorrect API key provided."
        )
        return CtxsteerError(
            401, msg, INVALID_REQUEST, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )

    def _check_length(self, headers: Headers) -> CtxsteerError | None:
        length = headers.get("content-length")
        if length is None:
            return None
        if not length.isdigit():
            return CtxsteerError(400, "Invalid Content-Length header.", INVALID_REQUEST)
        return self._too_large() if int(length) > self.max_body else None

    def _too_large(self) -> CtxsteerError:
        msg = f"The request body is larger than the server's limit of {self.max_body} bytes."
        return CtxsteerError(413, msg, INVALID_REQUEST, code="request_too_large")

    def _limited(self, receive: Receive) -> Receive:
        """Count body bytes as they arrive: chunked uploads carry no Content-Length to check upfront."""
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise self._too_large()
            return message

        return limited_receive
