"""LangChain's `ChatOpenAI` (langchain-openai) against `ctxsteer serve` on the embedded SmolLM2 (a real
uvicorn subprocess): structured output through a pydantic model, tool calling through `bind_tools`, and a
steered tool-result turn (tests/langchain_checks.py, which tests/test_vllm_backend.py runs on
`--engine vllm` too).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server_process import ServerProcess, serve

try:
    from langchain_checks import bound_call, structured_output, tool_round_trip
except ImportError as exc:  # `make test` installs it (pyproject's dev extra)
    pytest.skip(
        f"langchain-openai is not installed ({exc}); pip install -e '.[dev]'", allow_module_level=True
    )

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serve(None, "--max-num-seqs", "4", log_dir=tmp_path_factory.mktemp("langchain")) as sp:
        yield sp


def test_with_structured_output_returns_the_model(server: ServerProcess) -> None:
    structured_output(server.url)


@pytest.mark.parametrize("tool_choice", ["get_weather", "required", "any"])
def test_bind_tools_gives_a_call_whose_args_validate(server: ServerProcess, tool_choice: str) -> None:
    bound_call(server.url, tool_choice)


def test_tool_result_round_trip_steered(server: ServerProcess) -> None:
    """The agent loop: the call, the tool's own output as a ToolMessage, a steered final answer."""
    tool_round_trip(server.url)
