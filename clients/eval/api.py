"""The harness's only view of a server: async HTTP to the OpenAI chat API plus ctxsteer's optional extras.

Plain httpx rather than a client library, so the harness evaluates any OpenAI-compatible endpoint: the
`steering` field is sent on every request (other servers ignore it) and `/tokenize` is used only where it
exists. Failures are typed so the runner can tell "skip this cell" from "stop everything".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

# Generous: on a CPU, a long prompt queued behind seven others can take many minutes.
DEFAULT_TIMEOUT_S = 1800.0


class EvalError(RuntimeError):
    """Base class of harness errors that the CLI reports in one line."""


class ServerUnreachable(EvalError):
    """Nothing answers at the URL (connection refused, DNS, TLS, or connect timeout)."""


class ContextTooLong(EvalError):
    """This cell's prompt (+ answer budget) does not fit the model's context: skip it, keep going."""


class RequestFailed(EvalError):
    """The server answered with an error for this request."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    max_model_len: int | None  # None: the server does not say (not ctxsteer/vLLM)
    num_layers: int | None = None  # ctxsteer's model card says: what steering.layers/heads index
    num_heads: int | None = None


@dataclass(frozen=True, slots=True)
class ChatResult:
    text: str
    prompt_tokens: int | None
    steering: dict[str, Any] | None  # what ctxsteer applied; None from servers without steering
    indicator: dict[str, Any] | None = None  # ctxsteer's `context_indicator` report, when one was asked for


def root_url(url: str) -> str:
    """`http://h:p`, `http://h:p/` and `http://h:p/v1` all name the same server."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


# The harness's stand-in for `"strength": "auto"` (the server picks per request): real strengths are >= 1,
# so 0 can never clash with one, and results stay keyed, sorted and stored as numbers.
AUTO_STRENGTH = 0.0


def steering_payload(
    strength: float,
    method: str | None = None,
    cad_beta: float | None = None,
    context: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Explicit even at strength 1, so a server-side default strength cannot leak into the baseline.
    With a CAD method the context is sent as the one steered span: the server's context-free twin is the
    prompt without exactly that text (the question stays), and attention steering targets it too."""
    steering: dict[str, Any] = {"strength": "auto" if strength == AUTO_STRENGTH else float(strength)}
    if method is not None and method != "attention":
        steering["method"] = method
        if cad_beta is not None:
            steering["cad_beta"] = cad_beta
        if context:
            steering["spans"] = [context]
    return {"steering": {**steering, **(extra or {})}}


class EvalAPI:
    """Async client for one server; use as `async with EvalAPI(url) as api:`."""

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        context_indicator: str | None = None,
        method: str | None = None,
        cad_beta: float | None = None,
        steering_extra: dict[str, Any] | None = None,
    ) -> None:
        self.url = root_url(url)
        self.model = model
        # sent on every chat request when set: models tuned with `ctxsteer finetune` ("on"/"off"/"auto")
        self.context_indicator = context_indicator
        self.method, self.cad_beta = method, cad_beta  # ctxsteer's steering.method (CAD), when set
        self.steering_extra = steering_extra  # more steering fields on every request (--steering JSON)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout, limits=limits)
        self._has_tokenize: bool | None = None

    @classmethod
    def for_config(cls, cfg: Any) -> EvalAPI:
        """The client of a run's config (NIHConfig, QAConfig, ...): connection and per-request fields."""
        return cls(
            cfg.url,
            model=cfg.model,
            api_key=cfg.api_key,
            timeout_s=cfg.timeout_s,
            context_indicator=getattr(cfg, "context_indicator", None),
            method=getattr(cfg, "method", None),
            cad_beta=getattr(cfg, "cad_beta", None),
            steering_extra=getattr(cfg, "steering_extra", None),
        )

    async def __aenter__(self) -> EvalAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """One request; transport failures become typed errors (a timeout fails only this cell)."""
        try:
            return await self._http.request(method, path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise ServerUnreachable(
                f"cannot reach {self.url} ({e or type(e).__name__}); is the server running? "
                "(ctxsteer serve --port PORT)"
            ) from e
        except httpx.TimeoutException as e:
            raise RequestFailed(f"{method} {path} timed out ({type(e).__name__})") from e
        except httpx.TransportError as e:
            raise ServerUnreachable(f"lost the connection to {self.url}: {e or type(e).__name__}") from e

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self._send("POST", path, body)

    async def model_info(self) -> ModelInfo:
        """The served model (the one named with --model, else the first listed) and its context length."""
        r = await self._send("GET", "/v1/models")
        if r.status_code != 200:
            raise RequestFailed(f"GET {self.url}/v1/models answered {r.status_code}: {r.text[:200]}")
        cards = r.json().get("data") or []
        if self.model is not None:
            card = next((c for c in cards if c.get("id") == self.model), {"id": self.model})
        elif cards:
            card = cards[0]
        else:
            raise RequestFailed(f"{self.url}/v1/models lists no model; pass --model")
        self.model = str(card["id"])
        mml = card.get("max_model_len") or card.get("context_length")
        layers, heads = card.get("num_layers"), card.get("num_heads")
        return ModelInfo(
            self.model,
            int(mml) if isinstance(mml, int) else None,
            layers if isinstance(layers, int) else None,
            heads if isinstance(heads, int) else None,
        )

    async def tokenize(self, body: dict[str, Any]) -> int | None:
        """Token count from ctxsteer's `POST /tokenize`; None where the server has no such route."""
        if self._has_tokenize is False:
            return None
        r = await self._post("/tokenize", {"model": self.model, **body})
        if r.status_code in (404, 405, 501):
            self._has_tokenize = False
            return None
        if r.status_code != 200:
            raise RequestFailed(f"POST /tokenize answered {r.status_code}: {r.text[:200]}")
        self._has_tokenize = True
        return int(r.json()["count"])

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        strength: float,
        max_tokens: int,
        seed: int = 0,
        stop: list[str] | None = None,
        context: str | None = None,
        steering: dict[str, Any] | None = None,
    ) -> ChatResult:
        """One greedy chat completion at the given steering strength (`context`: the text a CAD method
        removes from its twin prompt; `steering`: a whole steering object instead)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": seed,
            **(
                {"steering": steering}
                if steering is not None
                else steering_payload(strength, self.method, self.cad_beta, context, self.steering_extra)
            ),
        }
        if stop:
            body["stop"] = stop
        if self.context_indicator is not None:
            body["context_indicator"] = self.context_indicator
        r = await self._post("/v1/chat/completions", body)
        if r.status_code != 200:
            raise _error(r)
        data = r.json()
        usage = data.get("usage") or {}
        return ChatResult(
            text=data["choices"][0]["message"].get("content") or "",
            prompt_tokens=usage.get("prompt_tokens"),
            steering=data.get("steering"),
            indicator=data.get("context_indicator"),
        )


def _error(r: httpx.Response) -> EvalError:
    try:
        err = r.json().get("error") or {}
    except ValueError:
        err = {}
    message = str(err.get("message") or r.text[:300])
    code = str(err.get("code") or "")
    if r.status_code in (400, 413) and (
        code == "context_length_exceeded" or "context length" in message.lower() or r.status_code == 413
    ):
        return ContextTooLong(message)
    return RequestFailed(f"{r.status_code}: {message}")
