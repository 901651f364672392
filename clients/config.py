"""Where the server is, how to authenticate, and when to retry: resolved once per client."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_TIMEOUT", "RetryPolicy", "resolve_api_key", "resolve_base_url"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
# Generation can take minutes; connecting cannot. A stream's read timeout is the gap between tokens.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


def _env(*names: str) -> str | None:
    for name in names:
        if value := os.environ.get(name, "").strip():
            return value
    return None


def resolve_base_url(url: str | None = None) -> str:
    """Argument, else CTXSTEER_BASE_URL, else OPENAI_BASE_URL, else the local default. A bare
    `http://host:port` gets `/v1` appended, since that is where every OpenAI-compatible API lives."""
    url = (url or _env("CTXSTEER_BASE_URL", "OPENAI_BASE_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base URL must look like http://host:port/v1, got {url!r}")
    return url if parts.path else url + "/v1"


def resolve_api_key(key: str | None = None) -> str | None:
    """Argument, else CTXSTEER_API_KEY, else OPENAI_API_KEY; None sends no Authorization header."""
    return key or _env("CTXSTEER_API_KEY", "OPENAI_API_KEY")


def root_url(base_url: str) -> str:
    """Server root for the non-OpenAI routes (/health, /ready, /version, /tokenize)."""
    return base_url.removesuffix("/v1")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry on 429/503 (the server says "later") and on failed connects (nothing was sent yet).

    A Retry-After header is honoured exactly (plus up to 10% jitter); without one the wait doubles from
    `backoff_s`. A Retry-After beyond `max_retry_after_s` is not waited out: the error is raised at once.
    """

    max_retries: int = 2
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 60.0
    statuses: frozenset[int] = frozenset({429, 503})

    def delay(self, attempt: int, *, status: int | None, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retrying failed attempt `attempt` (0-based), or None to give up.
        `status` None means the connection could not be made."""
        if attempt >= self.max_retries or (status is not None and status not in self.statuses):
            return None
        if retry_after is not None:
            if retry_after > self.max_retry_after_s:
                return None
            return retry_after * (1.0 + 0.1 * random.random())
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.75 + 0.25 * random.random())
