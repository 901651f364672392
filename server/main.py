"""`ctxsteer serve`: load the model, build the engine and app, serve with uvicorn, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI

from ctxsteer.server.api.serving import ServingContext
from ctxsteer.server.app import build_app
from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.cpu_prepack import prepack_linears
from ctxsteer.server.engine.interface import AsyncEngine, EngineObserver, ModelInfo
from ctxsteer.server.engine.loader import LoadedInfo, LoadError, load_model, served_max_len
from ctxsteer.server.engine.local.engine import LocalEngine
from ctxsteer.server.engine.local.omp import in_fresh_thread
from ctxsteer.server.metrics import MetricsObserver, install_metrics
from ctxsteer.server.transport import GracefulServer, uvicorn_config
from ctxsteer.steering.attention import ATTN_NAME, register

log = logging.getLogger("ctxsteer.server")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def model_name(config: ServerConfig, info: LoadedInfo) -> str:
    if config.served_model_name:
        return config.served_model_name
    if info.source in ("default", None) or info.source.lower() in ("smollm2", DEFAULT_MODEL_NAME.lower()):
        return DEFAULT_MODEL_NAME
    p = Path(info.source)
    return p.stem if p.suffix == ".gguf" else (p.name if p.exists() else info.source)


def build_engine(config: ServerConfig, observer: EngineObserver | None = None) -> AsyncEngine:
    """Load the model (raises LoadError / ValueError with a user-facing message) and wrap it in an engine."""
    if config.engine == "vllm":
        from ctxsteer.server.engine.vllm.build import VllmSettings, build_vllm_engine

        settings = VllmSettings(**{f.name: getattr(config, f.name) for f in dataclasses.fields(VllmSettings)})
        return build_vllm_engine(settings, observer, served_name=lambda info: model_name(config, info))
    if config.threads:
        torch.set_num_threads(config.threads)
    register()
    # Built off this thread, so that the engine thread owns the process's only OpenMP pool (omp.py).
    return in_fresh_thread(_build_local_engine, config, observer)


def _build_local_engine(config: ServerConfig, observer: EngineObserver | None) -> LocalEngine:
    model, tokenizer, info = load_model(
        config.model, device=config.device, dtype=config.dtype, attn_implementation=ATTN_NAME
    )
    if config.cpu_prepack == "auto" and (n := prepack_linears(model, batch_hint=config.max_num_seqs)):
        log.info("prepacked %d Linear weights for oneDNN (--cpu-prepack off disables)", n)
    minfo = ModelInfo(
        name=model_name(config, info),
        path=info.path,
        device=info.device,
        dtype=info.dtype,
        max_model_len=served_max_len(config.max_model_len, info.max_model_len),
        num_layers=info.num_layers,
        num_heads=info.num_heads,
    )
    return LocalEngine(
        model,
        tokenizer,
        minfo,
        max_num_seqs=config.max_num_seqs,
        max_queue=config.max_queue,
        kv_budget_tokens=config.kv_budget_tokens,
        prefill_chunk=config.prefill_chunk,
        prefill_stall_share=config.prefill_stall_share,
        speculative=config.speculative,
        observer=observer,
        # a prefix-cache hit changes where a prompt's chunks start: in bf16 that changes the last bits
        enable_prefix_caching=config.enable_prefix_caching
        if config.enable_prefix_caching is not None
        else not config.batch_invariant,
        batch_invariant=config.batch_invariant,
    )


def create_app(config: ServerConfig, engine: AsyncEngine, **app_kwargs) -> FastAPI:
    """The app plus the engine's lifecycle: warm-up once the socket is open (/ready then flips to 200),
    drain at exit."""
    app = build_app(config, engine, **app_kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_start(engine, app.state.serving))
        try:
            yield
        finally:
            task.cancel()
            await engine.shutdown(config.drain_timeout_s)

    app.router.lifespan_context = lifespan
    return app


async def _start(engine: AsyncEngine, ctx: ServingContext) -> None:
    try:
        await engine.start()
        log.info("ready: warm-up generation succeeded")
    except Exception as e:  # noqa: BLE001 - /ready stays 503, /health turns 503 (a supervisor restarts it)
        log.exception("engine start or warm-up failed; /ready stays 503 and /health answers 503")
        ctx.start_error = f"{type(e).__name__}: {e}"[:500]


def run(config: ServerConfig) -> int:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        return _exec_in_vllm_env()
    try:
        engine = build_engine(config, observer=_metrics_observer(config))
    except (LoadError, ValueError) as e:
        print(f"ctxsteer serve: {e}", file=sys.stderr)
        return 2
    try:
        app = create_app(config, engine, **_metrics_app_kwargs(config))
    except ValueError as e:  # a flag the loaded model cannot honour (e.g. --context-indicator)
        print(f"ctxsteer serve: {e}", file=sys.stderr)
        return 2
    i = engine.info
    log.info("model %s (%s) on %s, %s, max_model_len %d", i.name, i.path, i.device, i.dtype, i.max_model_len)
    log.info("serving on http://%s:%d/v1", config.host, config.port)
    server = GracefulServer(uvicorn_config(app, config))
    server.run()  # returns after a clean SIGTERM/SIGINT drain (GracefulServer does not re-raise it)
    return 0


def vllm_python() -> str:
    """The interpreter of an environment with vLLM: this one if it has vLLM, else $CTXSTEER_VLLM_PYTHON,
    else the `.venv-vllm` that `make venv-vllm` builds beside this checkout; LoadError if none."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    override = os.environ.get("CTXSTEER_VLLM_PYTHON")
    python = (
        Path(override) if override else Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    )
    if not python.is_file():
        raise LoadError(
            "--engine vllm needs vLLM, which is not installed in this environment; run `make venv-vllm` "
            "(scripts/vllm_env.sh) or install vllm, or set CTXSTEER_VLLM_PYTHON"
        )
    return str(python)


def _exec_in_vllm_env() -> int:
    """`--engine vllm` from an environment without vLLM: continue in one that has it, same arguments."""
    try:
        python = vllm_python()
    except LoadError as e:
        print(f"ctxsteer serve: {e}", file=sys.stderr)
        return 2
    if Path(sys.prefix).resolve() == Path(python).parent.parent.resolve():
        print("ctxsteer serve: vLLM does not import in its own environment", file=sys.stderr)
        return 2
    log.info("--engine vllm: continuing in %s", python)
    os.execv(python, [python, "-m", "ctxsteer.server.cli", *sys.argv[1:]])
    return 2  # not reached


def _metrics_observer(config: ServerConfig) -> EngineObserver | None:
    """The engine's metrics hooks. They exist before the app (and the served model name that labels every
    series); `install_metrics` binds them when it mounts /metrics."""
    return MetricsObserver()


def _metrics_app_kwargs(config: ServerConfig) -> dict:
    """GET /metrics, HTTP metrics and rejection counting; they read the observer back from the engine."""
    return {"metrics_router": install_metrics}
