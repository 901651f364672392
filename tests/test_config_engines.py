"""Server flags: engine-specific ones are refused with the other engine instead of being silently ignored;
each is declared once, on ServerConfig, and parses from argv and env alike."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

from ctxsteer.server.config import ServerConfig

REPO = Path(__file__).resolve().parent.parent


def test_local_engine_flag_is_refused_with_vllm() -> None:
    assert ServerConfig(prefill_stall_share=0.75).prefill_stall_share == 0.75
    with pytest.raises(ValueError, match="--prefill-stall-share: is a local engine setting"):
        ServerConfig(engine="vllm", prefill_stall_share=0.75)
    with pytest.raises(ValueError, match="--prefill-stall-share"):
        ServerConfig(prefill_stall_share=-1)


def test_vllm_flag_is_refused_with_the_local_engine() -> None:
    assert ServerConfig(engine="vllm", tensor_parallel_size=2).tensor_parallel_size == 2
    with pytest.raises(ValueError, match="--tensor-parallel-size: is a vLLM engine setting"):
        ServerConfig(tensor_parallel_size=2)


def test_every_setting_is_one_declared_flag() -> None:
    """Each field carries its flag (argparse, env var and checks come from it), and the vLLM engine's
    settings, which main.py copies from ServerConfig by name, all exist there."""
    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    assert all("flag" in f.metadata for f in fields.values())
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    dests = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    assert dests == set(fields)
    vllm_build = ast.parse((REPO / "server" / "engine" / "vllm" / "build.py").read_text())
    settings = next(n for n in vllm_build.body if isinstance(n, ast.ClassDef) and n.name == "VllmSettings")
    names = {s.target.id for s in settings.body if isinstance(s, ast.AnnAssign)}
    assert names and names <= set(fields)


def test_flags_parse_from_argv_and_env_with_their_checks() -> None:
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    ns = parser.parse_args(["--api-key", "a,b", "--api-key", "c", "--no-ui", "--port", "9"])
    config = ServerConfig.from_args(ns, {"CTXSTEER_DTYPE": "FLOAT32", "CTXSTEER_PORT": "7"})
    assert (config.api_keys, config.ui, config.port, config.dtype) == (("a", "b", "c"), False, 9, "float32")
    with pytest.raises(ValueError, match=r"CTXSTEER_UI='maybe': expected true or false"):
        ServerConfig.from_args(argparse.Namespace(), {"CTXSTEER_UI": "maybe"})
    with pytest.raises(ValueError, match=r"--max-num-seqs: must be >= 1, got 0"):
        ServerConfig.from_args(argparse.Namespace(), {"CTXSTEER_MAX_NUM_SEQS": "0"})
    with pytest.raises(ValueError, match=r"--timeout-body-read: must be > 0, got nan"):
        ServerConfig(timeout_body_read_s=float("nan"))
    assert ServerConfig(max_model_len=None).max_model_len is None  # unset optional settings skip checks
