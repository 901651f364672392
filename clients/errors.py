"""Client exceptions: every failure the server reports becomes an `APIError` carrying the OpenAI error
fields, so callers branch on `status`/`code`/`param` instead of parsing messages.

Hierarchy: ClientError > APIError (the server answered) > BadRequestError, AuthenticationError, ...;
ClientError > APIConnectionError (no answer) > APITimeoutError. `SteeringError` (a ValueError) is raised
before sending when a `Steering` is invalid.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ClientError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "error_from_body",
    "error_from_response",
    "error_from_transport",
]


class ClientError(Exception):
    """Base of everything this client raises about a request (except SteeringError)."""


class APIError(ClientError):
    """The server answered with an error.

    status:      HTTP status; None when the error arrived as a frame inside a 200 event stream.
    type, param, code: the OpenAI error fields (None when the server did not send them).
    retry_after: seconds from the Retry-After header, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.body = body

    def __str__(self) -> str:
        where = f" ({self.param})" if self.param else ""
        head = f"{self.status} " if self.status is not None else ""
        kind = self.code or self.type or "error"
        return f"{head}{kind}{where}: {self.message}"


class BadRequestError(APIError):
    """400: the request was invalid (the `param` names the field)."""


class AuthenticationError(APIError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404: unknown model or route."""


class RateLimitError(APIError):
    """429: the server is at capacity; raised once retries are exhausted."""


class InternalServerError(APIError):
    """5xx other than 503."""


class ServiceUnavailableError(InternalServerError):
    """503: engine not ready or not running; raised once retries are exhausted."""


class APIConnectionError(ClientError):
    """No usable answer: the server could not be reached or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The request timed out (connect, read or write)."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unparsable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_body(
    body: Any, status: int | None, fallback: str, retry_after: float | None = None
) -> APIError:
    """Map an error body to the right exception. Accepts OpenAI's `{"error": {...}}`, the flat
    `{"message", "type", ...}` some servers send, and FastAPI's `{"detail": ...}`."""
    info: dict[str, Any] = {}
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            info = body["error"]
        elif isinstance(body.get("error"), str):
            info = {"message": body["error"]}
        elif "message" in body:
            info = body
        elif "detail" in body:
            detail = body["detail"]
            info = {"message": detail if isinstance(detail, str) else json.dumps(detail)}
    cls = _BY_STATUS.get(status or 0) or (InternalServerError if (status or 0) >= 500 else APIError)

    def field(name: str) -> str | None:
        value = info.get(name)
        return None if value is None else str(value)

    return cls(
        field("message") or fallback,
        status=status,
        type=field("type"),
        param=field("param"),
        code=field("code"),
        retry_after=retry_after,
        body=body,
    )


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for a non-2xx response whose body has been read."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    text = body.strip()[:500] if isinstance(body, str) else ""
    fallback = text or f"HTTP {response.status_code} {response.reason_phrase}".strip()
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    return error_from_body(body, response.status_code, fallback, retry_after)


def error_from_transport(exc: httpx.TransportError, url: str) -> APIConnectionError:
    """Why no answer came, in words a CLI user can act on."""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request to {url} timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return APIConnectionError(f"cannot connect to {url} (is the server running?): {exc}")
    return APIConnectionError(f"connection to {url} failed: {exc or type(exc).__name__}")
