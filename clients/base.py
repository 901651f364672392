"""What the sync and async clients share: configuration, URLs, headers and request bodies (no I/O)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any, Literal

import httpx

from ctxsteer.clients.config import DEFAULT_TIMEOUT, RetryPolicy, resolve_api_key, resolve_base_url, root_url
from ctxsteer.clients.errors import APIError
from ctxsteer.clients.prompts import ask_messages, ask_steering
from ctxsteer.clients.steering import Steering, SteeringLike
from ctxsteer.clients.types import Health

Messages = Sequence[Mapping[str, Any]]
Focus = Literal["turn", "context"]


@functools.cache
def _user_agent() -> str:
    try:
        return f"ctxsteer-client/{metadata.version('ctxsteer')}"
    except metadata.PackageNotFoundError:
        return "ctxsteer-client"


class BaseClient:
    """Holds the settings; subclasses add the transport. See `Client` for the arguments."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.model = model
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self._resolved_model: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    def _url(self, path: str) -> str:
        """`"chat/completions"` is relative to the /v1 base URL; `"/health"` to the server root."""
        return root_url(self.base_url) + path if path.startswith("/") else f"{self.base_url}/{path}"

    def _headers(self, stream: bool = False) -> dict[str, str]:
        accept = "text/event-stream" if stream else "application/json"
        headers = {"User-Agent": _user_agent(), "Accept": accept}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    @staticmethod
    def _models_data(listing: Any) -> list[Any]:
        data = listing.get("data") if isinstance(listing, dict) else None
        return data if isinstance(data, list) else []

    @classmethod
    def _first_model(cls, listing: Any) -> str:
        data = cls._models_data(listing)
        if not data or not isinstance(data[0], dict) or not data[0].get("id"):
            raise APIError("the server lists no models; pass model=...")
        return str(data[0]["id"])

    @staticmethod
    def _health_status(body: Any) -> str:
        return str(body.get("status", "unknown")) if isinstance(body, dict) else "unknown"

    @staticmethod
    def _health(status: str, ready: bool, version: Any) -> Health:
        info = version if isinstance(version, dict) else {}
        return Health(status=status, ready=ready, version=info.get("version"), model=info.get("model"))

    @staticmethod
    def _chat_body(
        messages: Messages, steering: SteeringLike, model: str, params: dict[str, Any], *, stream: bool
    ) -> dict[str, Any]:
        """The request body: OpenAI params as given, plus `steering` only when asked for, so servers that
        do not know it still chat (unknown fields are ignored by most OpenAI-compatible servers)."""
        if isinstance(messages, str | bytes):
            raise TypeError("messages must be a list of {'role', 'content'} dicts (use ask() for a question)")
        if "stream" in params:
            raise TypeError("do not pass stream=: call chat() or stream_chat()")
        extra = params.pop("extra_body", None) or {}  # accepted for code written for the openai SDK
        body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in messages], **params, **extra}
        spec = Steering.coerce(steering)
        if spec is not None:
            body["steering"] = spec.to_dict()
        if stream:
            body["stream"] = True
            body.setdefault("stream_options", {"include_usage": True})
        return body

    @staticmethod
    def _ask_args(
        question: str,
        context: str | Sequence[str] | None,
        strength: float | None,
        steering: SteeringLike,
        system: str | None,
        focus: Focus,
    ) -> tuple[list[dict[str, Any]], Steering | None]:
        if steering is not None and strength is not None:
            raise TypeError("give either strength= or steering=, not both")
        messages = ask_messages(question, context, system=system)
        spec = Steering.coerce(steering) or ask_steering(context, strength, focus=focus)
        return messages, spec

    @staticmethod
    def _tokenize_body(
        messages: Messages | None,
        prompt: str | None,
        steering: SteeringLike,
        model: str | None,
        add_generation_prompt: bool | None,
    ) -> dict[str, Any]:
        if (messages is None) == (prompt is None):
            raise TypeError("give exactly one of messages or prompt")
        body: dict[str, Any] = {"model": model}
        if messages is not None:
            body["messages"] = [dict(m) for m in messages]
        else:
            body["prompt"] = prompt
        spec = Steering.coerce(steering)
        if spec is not None:
            body["steering"] = spec.to_dict()
        if add_generation_prompt is not None:
            body["add_generation_prompt"] = add_generation_prompt
        return body
