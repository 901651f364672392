"""The HTTP half of the Prometheus metrics: an ASGI middleware that counts and times every response.

Apart from `metrics.py` because it works on raw ASGI messages and route templates, not on engine events;
`install_metrics` mounts it. Label values stay bounded: route templates, never raw paths.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctxsteer.server.errors import CLIENT_CLOSED

if TYPE_CHECKING:
    from ctxsteer.server.metrics import Metrics

# Probes and scrapes would drown the request rate; vLLM leaves them out of its HTTP metrics too.
UNTRACKED_PATHS = frozenset({"/metrics", "/health", "/ready"})
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"  # one label for every unknown path: scanners cannot blow up cardinality


class HttpMetricsMiddleware:
    """Counts and times every response by method, route template and status. Plain ASGI (not
    BaseHTTPMiddleware): streamed responses are timed to their last byte and cancellation still reaches
    them. Installed outside the guard, so 401/413 answers it gives are counted too."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACKED_PATHS:
            await self.app(scope, receive, send)
            return
        status: int | None = None
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            status = status or 500
            raise
        finally:
            seconds = time.perf_counter() - started
            # no response at all: the client left first (the guard swallows that disconnect)
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.record_http(method, _route(scope), status or CLIENT_CLOSED, seconds)


def _route(scope: Scope) -> str:
    """The route template ("/v1/models/{model_id:path}"), never the raw path: label values stay bounded."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    # Answered before routing (the guard's 401/413): the path itself when it is a fixed route's.
    app = scope.get("app")
    return scope["path"] if scope["path"] in _fixed_paths(app) else UNMATCHED_ROUTE


def _fixed_paths(app: Any) -> frozenset[str]:
    """Parameter-free paths of the app's documented routes, from its OpenAPI schema (public and cached,
    unlike FastAPI's internal route tree)."""
    cached = getattr(getattr(app, "state", None), "metrics_fixed_paths", None)
    if cached is None:
        try:
            cached = frozenset(p for p in app.openapi().get("paths", {}) if "{" not in p)
        except Exception:  # noqa: BLE001 - a label is not worth a failed request
            cached = frozenset()
        if app is not None:
            app.state.metrics_fixed_paths = cached
    return cached
