"""The document-chat scenario of `ctxsteer bench server` against real tiny-model servers: every turn
resends the history, follow-ups are served from the prefix cache when it is on, and not when it is off."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from server_process import serve
from tiny import save_tiny_model

from ctxsteer.server.bench.doc_chat import QUESTIONS, Turn, document, run_conversations, summarize


def test_documents_are_long_enough_and_each_its_own() -> None:
    a, b = document(1000, 0), document(1000, 1)
    assert 4000 <= len(a) < 4400 and a != b
    assert a.splitlines()[0] != b.splitlines()[0]  # the first block already differs: no shared KV


def test_summary_medians_and_cached_share() -> None:
    convs = [
        [Turn(2.0, 3.0, 100, 0), Turn(0.2, 1.0, 150, 96), Turn(0.4, 1.0, 200, 128)],
        [Turn(4.0, 5.0, 100, 0), Turn(0.3, 1.0, 150, 96), Turn(0.5, 1.0, 200, 160)],
    ]
    s = summarize(convs, 9.0)
    assert s["first_ttft_s"] == 3.0 and s["followup_ttft_s"] == pytest.approx(0.35)
    assert s["followup_cached_share"] == pytest.approx((96 + 128 + 96 + 160) / 700)
    assert "error" in summarize([[Turn(1.0, 1.0, error="HTTP 500")]], 1.0)


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama with room for five turns (its tokenizer takes ~1.5 characters per token)."""
    return save_tiny_model(tmp_path_factory.mktemp("doc") / "llama", "llama", max_position_embeddings=4096)


@pytest.mark.parametrize("caching", [True, False])
def test_follow_ups_reuse_the_document_only_with_caching_on(
    long_tiny: Path, tmp_path: Path, caching: bool
) -> None:
    flag = "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"
    with serve(str(long_tiny), flag, "--dtype", "float32", log_dir=tmp_path) as sp:
        model = httpx.get(sp.url + "/v1/models").json()["data"][0]["id"]
        res = asyncio.run(run_conversations(sp.url, model, 0, 2, 300, 8, {"strength": 2}))
    assert "error" not in res, res
    assert res["conversations"] == 2 and res["turns"] == len(QUESTIONS)
    if caching:  # the document and earlier questions (steered alike every turn) come from the cache
        assert res["followup_cached_share"] > 0.5
    else:
        assert res["followup_cached_share"] == 0
