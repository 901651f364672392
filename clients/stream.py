"""Streamed chat completions: SSE decoding, and the sync/async stream objects that yield chunks while
keeping the totals (text, finish reason, usage, steering) for after the loop.

Closing a stream early (break, Ctrl-C, `close()`) closes its HTTP response, which makes the server
abort the generation instead of finishing it for nobody.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from typing import Any

import httpx

from ctxsteer.clients.errors import APIError, error_from_body, error_from_transport
from ctxsteer.clients.types import ChatCompletionChunk, SteeringReport, Usage

__all__ = ["AsyncChatStream", "ChatStream", "SSEDecoder", "parse_chunk"]


class SSEDecoder:
    """Line-by-line server-sent-events decoder: returns an event's data once its blank line arrives.
    Handles multi-line data, comments and `event:`/`id:` fields, which other servers may send."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            data, self._data = "\n".join(self._data), []
            return data or None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None


def parse_chunk(data: str) -> ChatCompletionChunk | None:
    """A chunk, or None for `[DONE]`; an `{"error": ...}` frame (sent after a 200) raises APIError."""
    if data.strip() == "[DONE]":
        return None
    try:
        obj: Any = json.loads(data)
    except ValueError:
        raise APIError(f"malformed stream event: {data[:200]!r}") from None
    if isinstance(obj, dict) and "error" in obj:
        raise error_from_body(obj, None, "the server reported an error mid-stream")
    return ChatCompletionChunk.model_validate(obj)


class _Totals:
    """What a finished (or stopped) stream amounts to."""

    def __init__(self) -> None:
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.steering: SteeringReport | None = None

    def add(self, chunk: ChatCompletionChunk) -> None:
        self.text += chunk.text
        for choice in chunk.choices:
            if choice.index == 0 and choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
        self.usage = chunk.usage or self.usage
        self.steering = chunk.steering or self.steering


class ChatStream(_Totals):
    """Iterate for `ChatCompletionChunk`s (the request is sent on first iteration); then read `.text`,
    `.finish_reason`, `.usage`, `.steering`. Use as a context manager to close it early for sure."""

    def __init__(self, open_response: Callable[[], httpx.Response]) -> None:
        super().__init__()
        self._open = open_response
        self._response: httpx.Response | None = None
        self._iter: Generator[ChatCompletionChunk, None, None] | None = None
        self._closed = False

    def __iter__(self) -> Generator[ChatCompletionChunk, None, None]:
        if self._iter is None:
            self._iter = self._chunks()
        return self._iter

    def _chunks(self) -> Generator[ChatCompletionChunk, None, None]:
        if self._closed:
            return
        self._response = self._open()
        decoder = SSEDecoder()
        try:
            for line in self._response.iter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                chunk = parse_chunk(data)
                if chunk is None:
                    return
                self.add(chunk)
                yield chunk
            if (data := decoder.feed("")) is not None and (chunk := parse_chunk(data)) is not None:
                self.add(chunk)  # a last event without its blank line
                yield chunk
        except httpx.TransportError as exc:
            raise error_from_transport(exc, str(self._response.url)) from exc
        finally:
            self._response.close()

    def close(self) -> None:
        """Stop reading; the server aborts the generation when the connection closes."""
        self._closed = True
        if self._iter is not None:
            self._iter.close()
        if self._response is not None:
            self._response.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncChatStream(_Totals):
    """The async twin of ChatStream: `async for chunk in stream`, `async with stream`, `await aclose()`."""

    def __init__(self, open_response: Callable[[], Awaitable[httpx.Response]]) -> None:
        super().__init__()
        self._open = open_response
        self._response: httpx.Response | None = None
        self._iter: AsyncGenerator[ChatCompletionChunk, None] | None = None
        self._closed = False

    def __aiter__(self) -> AsyncGenerator[ChatCompletionChunk, None]:
        if self._iter is None:
            self._iter = self._chunks()
        return self._iter

    async def _chunks(self) -> AsyncGenerator[ChatCompletionChunk, None]:
        if self._closed:
            return
        self._response = await self._open()
        decoder = SSEDecoder()
        try:
            async for line in self._response.aiter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                chunk = parse_chunk(data)
                if chunk is None:
                    return
                self.add(chunk)
                yield chunk
            if (data := decoder.feed("")) is not None and (chunk := parse_chunk(data)) is not None:
                self.add(chunk)  # a last event without its blank line
                yield chunk
        except httpx.TransportError as exc:
            raise error_from_transport(exc, str(self._response.url)) from exc
        finally:
            await self._response.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._iter is not None:
            await self._iter.aclose()
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
