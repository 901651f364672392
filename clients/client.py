"""`Client`: the synchronous ctxsteer client over one pooled httpx connection set."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx

from ctxsteer.clients.base import BaseClient, Focus, Messages
from ctxsteer.clients.config import DEFAULT_TIMEOUT, RetryPolicy
from ctxsteer.clients.errors import (
    APIError,
    NotFoundError,
    ServiceUnavailableError,
    error_from_response,
    error_from_transport,
)
from ctxsteer.clients.steering import SteeringLike
from ctxsteer.clients.stream import ChatStream
from ctxsteer.clients.types import ChatCompletion, Health, Model, Tokenization

__all__ = ["Client"]


class Client(BaseClient):
    """Talk to ctxsteer (or any OpenAI-compatible server) and steer attention per request.

    base_url:    default `CTXSTEER_BASE_URL`, then `OPENAI_BASE_URL`, then http://127.0.0.1:8000/v1.
    api_key:     default `CTXSTEER_API_KEY`, then `OPENAI_API_KEY`; None sends no Authorization.
    model:       default model; None uses the first one the server lists (asked once, then cached).
    timeout:     seconds or an httpx.Timeout (default: 10 s to connect, 600 s otherwise).
    max_retries: retries on 429/503 and failed connects, honouring Retry-After (or pass `retry=`).
    http_client: your own httpx.Client (proxies, event hooks); it is not closed by `close()`.

    Example:
        with Client() as client:
            print(client.ask("Who wrote it?", context=open("doc.txt").read(), strength=2).text)
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        retry: RetryPolicy | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key=api_key, model=model, timeout=timeout, max_retries=max_retries, retry=retry
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self.timeout)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ transport

    def _send(
        self, method: str, path: str, *, json: Any = None, stream: bool = False, retry: bool = True
    ) -> httpx.Response:
        """One request with retries; returns a 2xx response (unread when `stream`), raises otherwise."""
        url = self._url(path)
        policy = self.retry if retry else RetryPolicy(max_retries=0)
        attempt = 0
        while True:
            request = self._http.build_request(
                method, url, json=json, headers=self._headers(stream), timeout=self.timeout
            )
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = policy.delay(attempt, status=None) if isinstance(exc, httpx.ConnectError) else None
                if delay is None:
                    raise error_from_transport(exc, url) from exc
            else:
                if response.is_success:
                    return response
                if stream:
                    response.read()
                    response.close()
                error = error_from_response(response)
                delay = policy.delay(attempt, status=response.status_code, retry_after=error.retry_after)
                if delay is None:
                    raise error
            time.sleep(delay)
            attempt += 1

    def _json(self, method: str, path: str, json: Any = None, *, retry: bool = True) -> Any:
        response = self._send(method, path, json=json, retry=retry)
        try:
            return response.json()
        except ValueError:
            raise APIError(f"{path}: the server sent invalid JSON", status=response.status_code) from None

    def resolve_model(self, model: str | None = None) -> str:
        """`model`, else the client's default, else the server's first listed model (cached)."""
        if chosen := model or self.model:
            return chosen
        if self._resolved_model is None:
            self._resolved_model = self._first_model(self._json("GET", "models"))
        return self._resolved_model

    # ------------------------------------------------------------ API

    def chat(
        self, messages: Messages, steering: SteeringLike = None, *, model: str | None = None, **params: Any
    ) -> ChatCompletion:
        """One chat completion. `params` are OpenAI fields (max_tokens, temperature, seed, ...)."""
        body = self._chat_body(messages, steering, self.resolve_model(model), params, stream=False)
        return ChatCompletion.model_validate(self._json("POST", "chat/completions", body))

    def stream_chat(
        self, messages: Messages, steering: SteeringLike = None, *, model: str | None = None, **params: Any
    ) -> ChatStream:
        """Chunks as they arrive (sent on first iteration); asks for usage unless `stream_options` is set."""
        # Built now so that bad steering raises here, not at the first iteration.
        body = self._chat_body(messages, steering, model or self.model or "", params, stream=True)

        def open_response() -> httpx.Response:
            body["model"] = self.resolve_model(body["model"] or None)
            return self._send("POST", "chat/completions", json=body, stream=True)

        return ChatStream(open_response)

    def ask(
        self,
        question: str,
        context: str | Sequence[str] | None = None,
        strength: float | None = None,
        *,
        steering: SteeringLike = None,
        system: str | None = None,
        focus: Focus = "turn",
        model: str | None = None,
        **params: Any,
    ) -> ChatCompletion:
        """Ask about documents: they and the question form one steered user turn (see `prompts`)."""
        messages, spec = self._ask_args(question, context, strength, steering, system, focus)
        return self.chat(messages, spec, model=model, **params)

    def models(self) -> list[Model]:
        return [Model.model_validate(m) for m in self._models_data(self._json("GET", "models"))]

    def health(self) -> Health:
        """Alive (/health), ready to generate (/ready) and what runs (/version); no retries, as a probe."""
        status = self._health_status(self._json("GET", "/health", retry=False))
        try:
            ready = self._send("GET", "/ready", retry=False).is_success
        except ServiceUnavailableError:
            ready = False
        except NotFoundError:  # servers without /ready are ready when alive
            ready = True
        try:
            version = self._json("GET", "/version", retry=False)
        except NotFoundError:
            version = None
        return self._health(status, ready, version)

    def tokenize(
        self,
        messages: Messages | None = None,
        *,
        prompt: str | None = None,
        steering: SteeringLike = None,
        model: str | None = None,
        add_generation_prompt: bool | None = None,
    ) -> Tokenization:
        """The prompt's tokens and which ones `steering` would steer (ctxsteer only; nothing is generated)."""
        body = self._tokenize_body(messages, prompt, steering, model or self.model, add_generation_prompt)
        return Tokenization.model_validate(self._json("POST", "/tokenize", body))
