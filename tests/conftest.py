"""Shared fixtures: hermetic tiny models and tokenizer from ``tests/tiny.py`` (no hub access)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

# Nothing in the suite may reach the hub; an explicit HF_HUB_OFFLINE=0 from the caller still wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's own policy, not the server's: `ctxsteer serve` keeps libgomp's default wait policy (spin
# briefly, then sleep; server/cli.py and server/engine/local/omp.py say why). Here pytest, the servers it
# starts (they inherit this environment) and their clients share a few cores, and OpenMP workers spinning
# beside another busy process turn millisecond decode steps into hundreds of ms; PASSIVE makes each
# forward slower but keeps the processes from starving one another.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import openai  # noqa: E402
import pytest  # noqa: E402
from server_process import ServerProcess, serve  # noqa: E402
from tiny import ARCHS, make_model, make_tokenizer, make_trimming_tokenizer, save_tiny_model  # noqa: E402
from transformers import PreTrainedModel, PreTrainedTokenizerFast  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer (default-system-prompt ChatML template). Shared by the session: don't mutate it."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def trimming_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer whose template trims message content. Shared by the session: don't mutate it."""
    return make_trimming_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local HF directory with the tiny llama (seed 0) and the tiny tokenizer. Don't write into it."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(params=ARCHS)
def tiny_arch(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over every tiny architecture."""
    return request.param


@pytest.fixture
def tiny_model(tiny_arch: str) -> PreTrainedModel:
    """A fresh tiny model (seed 0, fp32, sdpa) for each architecture in turn; free to mutate."""
    return make_model(tiny_arch)


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`ctxsteer serve` on the embedded SmolLM2 (a real uvicorn subprocess, 4 rows), one per module."""
    with serve(None, "--max-num-seqs", "4", log_dir=tmp_path_factory.mktemp("smollm2")) as sp:
        yield sp


@pytest.fixture(scope="module")
def smollm2_sdk(smollm2_server: ServerProcess) -> openai.OpenAI:
    """The official openai SDK on that server (no retries: a failure shows as itself)."""
    return openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="none", max_retries=0, timeout=120)
