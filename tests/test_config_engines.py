"""Engine-specific flags are refused with the other engine instead of being silently ignored."""

from __future__ import annotations

import pytest

from ctxsteer.server.config import ServerConfig


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
