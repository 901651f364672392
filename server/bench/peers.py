"""The servers `ctxsteer bench server` compares ctxsteer with, started here: `transformers serve
--continuous-batching` and plain `vllm serve` (from the project's vLLM environment, nothing steered), both
on the default model's converted directory."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx

from ctxsteer.server.bench.launch import free_port, started
from ctxsteer.server.bench.load import warmup

PEER_SERVER = "transformers serve --continuous-batching"
PLAIN_VLLM = "vllm serve (unsteered, prefix caching on)"


@contextmanager
def peer_server(args: argparse.Namespace, dtype: str | None = None) -> Iterator[tuple[str, str] | dict]:
    """transformers serve --continuous-batching on the converted HF directory of the default model (in
    `dtype`, else its own default: the checkpoint's float32); yields its URL and model name, or
    {"error": ...} when it does not start."""
    from ctxsteer.server.engine.loader import load_model

    _, _, info = load_model(None, device="cpu")  # ensures the converted directory exists; cheap when cached
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    cmd = [exe, "serve", info.path, "--port", str(port), "--host", "127.0.0.1", "--continuous-batching"]
    # CB's default sizing wants GBs for its paged cache and mask on CPU: size it for 8 x (256 + 64) tokens.
    cmd += ["--device", "cpu", "--attn-implementation", "sdpa", "--cb-max-batch-tokens", "256"]
    cmd += ["--cb-block-size", "32", "--cb-num-blocks", "128"]
    cmd += ["--dtype", dtype] if dtype else []
    print(f"starting transformers serve (peer{f', {dtype}' if dtype else ''}) on {url}", flush=True)
    with ExitStack() as stack:
        try:
            stack.enter_context(started(cmd, url, "/health"))
            warmup(url, info.path)
        except (RuntimeError, httpx.HTTPError) as e:
            print(f"peer failed: {e}", file=sys.stderr)
            yield {"error": str(e)[:500]}
            return
        yield url, info.path


def _vllm_model_dir(python: str) -> str:
    """The directory ctxsteer's vLLM backend loads for the default model (converted once, cached)."""
    code = "from ctxsteer.server.engine.loader import prepare_checkpoint as p; print(p(None)[0])"
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@contextmanager
def plain_vllm(args: argparse.Namespace, top: int, dtype: str | None = None) -> Iterator[tuple[str, str]]:
    """`vllm serve` on the default model in `dtype` (else --dtype), prefix caching on (vLLM's default),
    both cores bound (server.engine.vllm.cpu_env); yields its URL and served model name. LoadError when no
    vLLM environment exists."""
    from ctxsteer.server.engine.vllm.cpu_env import apply_cpu_defaults
    from ctxsteer.server.main import vllm_python

    python = vllm_python()
    apply_cpu_defaults(os.environ)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe, model_dir = os.path.join(os.path.dirname(python), "vllm"), _vllm_model_dir(python)
    cmd = [exe, "serve", model_dir, "--port", str(port),
           "--host", "127.0.0.1", "--dtype", dtype or args.dtype or "auto", "--max-num-seqs", str(top),
           "--served-model-name", args.model]  # fmt: skip
    print(f"starting plain vllm serve (peer) on {url}", flush=True)
    with started(cmd, url, "/health", timeout_s=1200):
        warmup(url, args.model)
        yield url, args.model
