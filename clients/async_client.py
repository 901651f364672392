"""`AsyncClient`: the asyncio twin of `Client` (same arguments, same methods, awaited)."""

from __future__ import annotations

import asyncio
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
from ctxsteer.clients.stream import AsyncChatStream
from ctxsteer.clients.types import ChatCompletion, Health, Model, Tokenization

__all__ = ["AsyncClient"]


class AsyncClient(BaseClient):
    """Async client; see `Client` for the arguments. `stream_chat` is not awaited: `async for` it.

    Example:
        async with AsyncClient() as client:
            answer = await client.chat([{"role": "user", "content": "Hi"}], steering=Steering(strength=2))
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
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key=api_key, model=model, timeout=timeout, max_retries=max_retries, retry=retry
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(
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
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = policy.delay(attempt, status=None) if isinstance(exc, httpx.ConnectError) else None
                if delay is None:
                    raise error_from_transport(exc, url) from exc
            else:
                if response.is_success:
                    return response
                if stream:
                    await response.aread()
                    await response.aclose()
                error = error_from_response(response)
                delay = policy.delay(attempt, status=response.status_code, retry_after=error.retry_after)
                if delay is None:
                    raise error
            await asyncio.sleep(delay)
            attempt += 1

    async def _json(self, method: str, path: str, json: Any = None, *, retry: bool = True) -> Any:
        response = await self._send(method, path, json=json, retry=retry)
        try:
            return response.json()
        except ValueError:
            raise APIError(f"{path}: the server sent invalid JSON", status=response.status_code) from None

    async def resolve_model(self, model: str | None = None) -> str:
        """`model`, else the client's default, else the server's first listed model (cached)."""
        if chosen := model or self.model:
            return chosen
        if self._resolved_model is None:
            self._resolved_model = self._first_model(await self._json("GET", "models"))
        return self._resolved_model

    async def chat(
        self, messages: Messages, steering: SteeringLike = None, *, model: str | None = None, **params: Any
    ) -> ChatCompletion:
        body = self._chat_body(messages, steering, await self.resolve_model(model), params, stream=False)
        return ChatCompletion.model_validate(await self._json("POST", "chat/completions", body))

    def stream_chat(
        self, messages: Messages, steering: SteeringLike = None, *, model: str | None = None, **params: Any
    ) -> AsyncChatStream:
        body = self._chat_body(messages, steering, model or self.model or "", params, stream=True)

        async def open_response() -> httpx.Response:
            body["model"] = await self.resolve_model(body["model"] or None)
            return await self._send("POST", "chat/completions", json=body, stream=True)

        return AsyncChatStream(open_response)

    async def ask(
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
        messages, spec = self._ask_args(question, context, strength, steering, system, focus)
        return await self.chat(messages, spec, model=model, **params)

    async def models(self) -> list[Model]:
        return [Model.model_validate(m) for m in self._models_data(await self._json("GET", "models"))]

    async def health(self) -> Health:
        status = self._health_status(await self._json("GET", "/health", retry=False))
        try:
            ready = (await self._send("GET", "/ready", retry=False)).is_success
        except ServiceUnavailableError:
            ready = False
        except NotFoundError:
            ready = True
        try:
            version = await self._json("GET", "/version", retry=False)
        except NotFoundError:
            version = None
        return self._health(status, ready, version)

    async def tokenize(
        self,
        messages: Messages | None = None,
        *,
        prompt: str | None = None,
        steering: SteeringLike = None,
        model: str | None = None,
        add_generation_prompt: bool | None = None,
    ) -> Tokenization:
        body = self._tokenize_body(messages, prompt, steering, model or self.model, add_generation_prompt)
        return Tokenization.model_validate(await self._json("POST", "/tokenize", body))
