"""Tensor parallelism on vLLM's CPU build: with `--tensor-parallel-size 2` every worker holds half of the
query heads, and per-head steering must follow the shard (global head = rank x local heads + local head).

A tiny random-weight Qwen2 (GQA: 4 query heads, 2 KV heads, head_dim 32, which vLLM's CPU kernel supports)
is served by vLLM with TP=2 and by the local engine; greedy tokens must be identical and chosen-token
logprobs within 1e-3, for whole-model steering and for head selections on one shard and on both.
"""

from __future__ import annotations

import pytest

from tests.server_process import serve
from tests.test_vllm_backend import assert_same_greedy, chat, tokens, vllm_python
from tests.tiny import save_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-qwen2")
    shape = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
    return str(save_tiny_model(path, "qwen2", **shape))


@pytest.fixture(scope="module")
def tp_url(tiny_dir: str, tmp_path_factory: pytest.TempPathFactory):
    python = vllm_python()
    args = ("--engine", "vllm", "--dtype", "float32", "--tensor-parallel-size", "2", "--enforce-eager")
    # Two ranks on a 2-core machine: one core each, none reserved for the front-end.
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0|1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    log_dir = tmp_path_factory.mktemp("vllm-tp")
    with serve(tiny_dir, *args, log_dir=log_dir, timeout_s=900, python=python, env=env) as sp:
        yield sp.url


@pytest.fixture(scope="module")
def local_tiny_url(tiny_dir: str, tmp_path_factory: pytest.TempPathFactory):
    with serve(tiny_dir, "--dtype", "float32", log_dir=tmp_path_factory.mktemp("local-tiny")) as sp:
        yield sp.url


MESSAGES = [
    {"role": "system", "content": "Answer briefly and only from the document."},
    {"role": "user", "content": "Document: the vault code is 7-1-9, set on Monday by the night clerk. Code?"},
]


@pytest.mark.parametrize(
    "steering",
    [
        None,
        {"strength": 4},
        {"strength": 16, "heads": {"0": [0, 1], "2": [1]}},  # rank 0's heads only
        {"strength": 16, "heads": {"0": [3], "1": [1, 2]}},  # rank 1's, and a layer spanning both
    ],
)
def test_tp2_steering_equals_local_engine(tp_url: str, local_tiny_url: str, steering: dict | None) -> None:
    a = chat(tp_url, MESSAGES, steering, max_tokens=10)
    b = chat(local_tiny_url, MESSAGES, steering, max_tokens=10)
    assert_same_greedy(a, b)


def test_tp2_head_selection_has_an_effect(tp_url: str) -> None:
    """Guards the comparison: steering rank 1's heads changes what rank 0's alone gives."""
    one = tokens(
        chat(tp_url, MESSAGES, {"strength": 64, "heads": {"0": [0], "1": [0], "2": [0]}}, max_tokens=10)
    )
    two = tokens(
        chat(tp_url, MESSAGES, {"strength": 64, "heads": {"0": [3], "1": [3], "2": [3]}}, max_tokens=10)
    )
    plain = tokens(chat(tp_url, MESSAGES, None, max_tokens=10))
    assert one != plain and two != plain and one != two
