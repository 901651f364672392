"""The one place where exceptions become OpenAI-shaped error responses.

Body: `{"error": {"message", "type", "param", "code"}}`. Status choices:
  400 validation (pydantic, steering, malformed JSON, prompt too long)   401 bad/missing API key
  404 unknown model or route   405 wrong method   413 body too large   415 Content-Type not JSON
  429 engine queue full (+ Retry-After)   503 engine dead / not ready   500 anything else (generic message;
  the traceback goes to the log, never to the client). A generation that failed is a 500 unless the engine
  says the request was at fault (`generation_failed`): then the 400 it would have had up front.
Code raises typed errors (CtxsteerError, SteeringError, QueueFull, EngineDead, ValidationError) and never
builds error responses itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ctxsteer.server.engine.grammar import GrammarError
from ctxsteer.server.engine.interface import EngineDead, QueueFull
from ctxsteer.server.engine.request import GenerationOutput
from ctxsteer.server.responses import ErrorInfo, ErrorResponse
from ctxsteer.steering.spec import SteeringError

logger = logging.getLogger("ctxsteer.server.errors")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
CLIENT_CLOSED = 499  # nginx's "client closed request": never seen by anyone, keeps logs honest


class CtxsteerError(Exception):
    """An error with a definite HTTP status and a message safe to show to the client."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> CtxsteerError:
    return CtxsteerError(400, message, INVALID_REQUEST, param, code)


def model_not_found(name: str) -> CtxsteerError:
    return CtxsteerError(
        404, f"The model '{name}' does not exist", INVALID_REQUEST, "model", "model_not_found"
    )


def context_too_long(
    prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str
) -> CtxsteerError:
    if max_tokens is None:
        msg = f"The prompt has {prompt_tokens} tokens, which leaves no room to generate within the "
        msg += f"model's maximum context length of {max_model_len} tokens."
    else:
        msg = f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
        msg += (
            f"{prompt_tokens + max_tokens} tokens, more than the maximum context length of {max_model_len}."
        )
    return CtxsteerError(400, msg, INVALID_REQUEST, param, "context_length_exceeded")


def generation_failed(out: GenerationOutput) -> CtxsteerError:
    """The error of an engine output that finished with FinishReason.ERROR: the response's status, or a
    stream's error event once its 200 is sent. A request at fault is the client's: `invalid_grammar` (its
    grammar tripped llguidance's limits while generating) is a 400 naming the grammar's field, as one
    refused up front is; anything else is the server's 500."""
    if out.error_code == "invalid_grammar":
        param = out.error_param or "response_format"
        msg = f"Invalid value for '{param}': the output constraint failed while generating: {out.error}"
        return bad_request(msg, param, "invalid_grammar")
    return CtxsteerError(500, out.error or "The generation failed.", SERVER_ERROR, code="generation_error")


def _body(err: CtxsteerError) -> dict[str, Any]:
    info = ErrorInfo(message=err.message, type=err.type, param=err.param, code=err.code)
    return ErrorResponse(error=info).model_dump()


def error_json(message: str, type: str, code: str) -> bytes:
    """The error body as bytes, for answers written below the app (the transport's own 4xx/5xx)."""
    return json.dumps(_body(CtxsteerError(0, message, type, code=code))).encode()


def error_response(err: CtxsteerError) -> JSONResponse:
    return JSONResponse(_body(err), status_code=err.status, headers=err.headers)


def error_payload(exc: BaseException) -> dict[str, Any]:
    """The `{"error": ...}` dict for an exception, e.g. for an SSE error frame after headers were sent."""
    return _body(to_ctxsteer_error(exc))


def to_ctxsteer_error(exc: BaseException, request_id: str | None = None) -> CtxsteerError:
    """Map any exception to a CtxsteerError; unexpected ones are logged with their traceback."""
    if isinstance(exc, CtxsteerError):
        return exc
    if isinstance(exc, SteeringError):
        return bad_request(f"Invalid value for '{exc.field}': {exc.message}", exc.field, "invalid_steering")
    if isinstance(exc, GrammarError):
        msg = f"Invalid value for '{exc.param}': the output constraint cannot be compiled: {exc.reason}"
        return bad_request(msg, exc.param, "invalid_grammar")
    if isinstance(exc, ValidationError | RequestValidationError):
        return _from_validation(exc.errors())
    if isinstance(exc, QueueFull):
        return CtxsteerError(
            429,
            "The server is at capacity; retry later.",
            "rate_limit_error",
            None,
            "queue_full",
            headers={"Retry-After": str(max(1, int(exc.retry_after_s)))},
        )
    if isinstance(exc, EngineDead):
        return CtxsteerError(
            503, "The inference engine is not running.", SERVER_ERROR, None, "engine_unavailable"
        )
    if isinstance(exc, StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return CtxsteerError(exc.status_code, message, INVALID_REQUEST, headers=dict(exc.headers or {}))
    logger.error("unhandled error (request %s)", request_id or "-", exc_info=exc)
    return CtxsteerError(500, "The server had an internal error while processing the request.", SERVER_ERROR)


def _clean_loc(loc: Sequence[int | str]) -> str | None:
    """Dotted param path from a pydantic loc, dropping union-member tags like 'str' or 'list[ContentPart]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out and part in ("body", "query", "path", "header", "cookie"):
            continue  # FastAPI's location prefix
        elif "[" in part or "-" in part or part[:1].isupper() or part in _TYPE_TAGS:
            continue
        else:
            out += f".{part}" if out else part
    return out or None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def _from_validation(errors: Sequence[Any]) -> CtxsteerError:
    """One 400 for the most specific failure (unions report each branch; the deepest one is the real one)."""
    if not errors:
        return bad_request("Invalid request.")
    located = [(_clean_loc(e.get("loc", ())), e) for e in errors]
    root = param_root(located[0][0])
    located = [(loc, e) for loc, e in located if param_root(loc) == root]
    depth = max(len(loc or "") for loc, _ in located)
    param, first = next((loc, e) for loc, e in located if len(loc or "") == depth)
    msgs: list[str] = []
    for loc, e in located:
        if loc == param and (m := str(e.get("msg", "invalid value"))) not in msgs:
            msgs.append(m.removeprefix("Value error, "))
    if first.get("type") == "unsupported_parameter":  # its message already names the parameter
        return bad_request(msgs[0], param, "unsupported_parameter")
    where = f" for '{param}'" if param else ""
    return bad_request(
        f"Invalid value{where}: {' or '.join(msgs)}", param, str(first.get("type") or "invalid_value")
    )


def param_root(param: str | None) -> str:
    """The top-level field of a dotted param path ("messages[0].content" -> "messages")."""
    return (param or "").split(".")[0].split("[")[0]


def rejection_reason(err: CtxsteerError) -> str | None:
    """The `requests_rejected_total` reason of an error answered before generation; None = not one."""
    if err.code == "queue_full":
        return "queue_full"
    if err.code == "context_length_exceeded":
        return "too_long"
    if err.status == 401:
        return "unauthorized"
    if 400 <= err.status < 500:
        return "invalid"  # 400 / 404 / 405 / 413 / 415
    return None


def report_rejection(app: Any, err: CtxsteerError) -> None:
    """Tell `app.state.rejection_hook(reason)` (set by the metrics layer; absent = no-op) that a request was
    refused, so the HTTP layer counts rejections without importing prometheus."""
    hook = getattr(getattr(app, "state", None), "rejection_hook", None)
    reason = rejection_reason(err)
    if hook is not None and reason is not None:
        hook(reason)


async def _handle(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientDisconnect):
        return Response(status_code=CLIENT_CLOSED)
    err = to_ctxsteer_error(exc)
    report_rejection(request.app, err)
    return error_response(err)


def install_exception_handlers(app: FastAPI) -> None:
    """Route every typed error through `to_ctxsteer_error`; the catch-all for the rest is in the app
    middleware, so unexpected errors are logged once and answered without leaking `str(e)`."""
    for exc_type in (
        CtxsteerError,
        SteeringError,
        GrammarError,
        ValidationError,
        RequestValidationError,
        QueueFull,
        EngineDead,
        StarletteHTTPException,
        ClientDisconnect,
    ):
        app.add_exception_handler(exc_type, _handle)
