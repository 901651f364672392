"""Metadata routes: /v1/models, /health (process alive), /ready (engine warm), /version, /tokenize.

/health and /ready are split so that orchestrators restart a dead process but only route traffic to a
warm one. /tokenize shows exactly which prompt tokens a steering request would steer, without generating.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request

from ctxsteer.server.api.body import read_json
from ctxsteer.server.api.serving import ServingContext, get_context
from ctxsteer.server.errors import SERVER_ERROR, CtxsteerError, model_not_found
from ctxsteer.server.protocol import TokenizeRequest
from ctxsteer.server.responses import ModelCard, ModelList, TokenizeResponse
from ctxsteer.steering.spans import render_chat, render_text, steered_ranges

router = APIRouter()


def package_version() -> str:
    try:
        return metadata.version("ctxsteer")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _card(ctx: ServingContext) -> ModelCard:
    info = ctx.engine.info
    return ModelCard(
        id=ctx.model_name,
        created=ctx.created,
        max_model_len=ctx.max_model_len,
        num_layers=info.num_layers,
        num_heads=info.num_heads,
    )


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return ModelList(data=[_card(get_context(request))]).model_dump()


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    ctx = get_context(request)
    if model_id != ctx.model_name:
        raise model_not_found(model_id)
    return _card(ctx).model_dump()


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """Liveness: 200 while loading and serving; 503 once the engine failed to start, so that a
    supervisor's liveness probe restarts the process (loading itself is not a failure)."""
    error = get_context(request).start_error
    if error is not None:
        raise CtxsteerError(503, f"The engine failed to start: {error}", SERVER_ERROR, code="engine_failed")
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict[str, str]:
    if not get_context(request).engine.ready:
        raise CtxsteerError(
            503, "The model is not ready yet (loading or stopped).", SERVER_ERROR, code="not_ready"
        )
    return {"status": "ready"}


@router.get("/version")
async def version(request: Request) -> dict[str, str]:
    ctx = get_context(request)
    info = ctx.engine.info
    return {"version": package_version(), "model": ctx.model_name, "device": info.device, "dtype": info.dtype}


def _tokenize(ctx: ServingContext, req: TokenizeRequest) -> TokenizeResponse:
    tokenizer = ctx.engine.tokenizer
    if req.messages is not None:
        spec = ctx.parse_spec(req.steering)
        messages = [m.to_render() for m in req.messages]
        rendered = render_chat(tokenizer, messages, **req.template_options())
        steered = steered_ranges(rendered, messages, spec)
    else:
        rendered = render_text(tokenizer, req.prompt or "")
        steered = steered_ranges(rendered, None, ctx.completion_spec(req.steering))
    return TokenizeResponse(
        tokens=rendered.ids,
        count=len(rendered.ids),
        max_model_len=ctx.max_model_len,
        steered_spans=[(s, e) for s, e in steered],
        steered_tokens=sum(e - s for s, e in steered),
        token_strs=tokenizer.convert_ids_to_tokens(rendered.ids) if req.return_token_strs else None,
    )


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    ctx = get_context(request)
    req = await read_json(request, TokenizeRequest)
    ctx.check_model(req.model)
    return (await ctx.run_sync(_tokenize, ctx, req)).model_dump()
