"""Python client for ctxsteer (and any OpenAI-compatible server): chat with per-request attention steering.

    from ctxsteer.clients import Client, Steering
    with Client() as client:  # CTXSTEER_BASE_URL or http://127.0.0.1:8000/v1
        answer = client.ask("What year was it finished?", context=document, strength=2)
        print(answer.text, answer.steering)

Torch-free: importing this package pulls in httpx and pydantic only.
"""

from ctxsteer.clients.async_client import AsyncClient
from ctxsteer.clients.client import Client
from ctxsteer.clients.config import DEFAULT_BASE_URL, RetryPolicy
from ctxsteer.clients.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from ctxsteer.clients.steering import Steering, SteeringError
from ctxsteer.clients.stream import AsyncChatStream, ChatStream
from ctxsteer.clients.types import (
    ChatCompletion,
    ChatCompletionChunk,
    Health,
    Model,
    SteeringReport,
    Tokenization,
    Usage,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AsyncChatStream",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatStream",
    "Client",
    "ClientError",
    "Health",
    "InternalServerError",
    "Model",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "Steering",
    "SteeringError",
    "SteeringReport",
    "Tokenization",
    "Usage",
]
