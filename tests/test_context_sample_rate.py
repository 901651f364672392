"""`--context-attention-sample-rate R` on a real `ctxsteer serve` (tiny model, local engine): a share R of
the requests that do not ask for the report is measured anyway, for the ctxsteer_context_attention_ratio
histogram, and the response stays as if unmeasured. test_context_report.py covers R = 0 (only requests
that ask are measured); here R = 1 (every request) and R = 0.5 (some, not all)."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_metrics import total
from server_process import ServerProcess, greedy_chat, serve
from tiny import save_tiny_model

MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Context: the launch moved to Friday.\nQuestion: when is the launch?"},
]
MEASURED = "ctxsteer_context_attention_ratio_count"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama"))


def _unasked(sp: ServerProcess, requests: int) -> float:
    """Send `requests` chats that do not ask for the report; how many of them were measured."""
    before = total(sp.url, MEASURED)
    for _ in range(requests):
        r = greedy_chat(sp, MESSAGES, 2)
        assert r.status_code == 200, r.text
        assert "context_attention" not in r.json()  # measured or not, the answer does not carry it
    return total(sp.url, MEASURED) - before


def test_rate_one_measures_every_request(model_dir: str, tmp_path: Path) -> None:
    with serve(model_dir, "--context-attention-sample-rate", "1", log_dir=tmp_path) as sp:
        assert _unasked(sp, 5) == 5
        ratio = total(sp.url, "ctxsteer_context_attention_ratio_sum") / 5
        assert 0 < ratio < 1  # the mean share of attention on the context, per measured request


def test_a_fractional_rate_measures_some_requests(model_dir: str, tmp_path: Path) -> None:
    """R = 0.5 over 40 requests: all or none measured has odds 2 x 2^-40."""
    with serve(model_dir, "--context-attention-sample-rate", "0.5", log_dir=tmp_path) as sp:
        assert 0 < _unasked(sp, 40) < 40
