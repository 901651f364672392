"""The document-chat scenario of `ctxsteer bench server` against real tiny-model servers: every turn
resends the history, follow-ups are served from the prefix cache when it is on, and not when it is off."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from server_process import serve
from tiny import save_tiny_model

from ctxsteer.server.bench.doc_chat import (
    QUESTIONS,
    Turn,
    doc_chat_keys,
    document,
    run_conversations,
    summarize,
)


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


def _res(first: float, follow: float, wall: float, share: float = 0.9) -> dict:
    return {"first_ttft_s": first, "followup_ttft_s": follow, "wall_s": wall, "followup_cached_share": share,
            "first_prompt_tokens": 4000}  # fmt: skip


def test_keys_are_per_round_ratios_against_the_peer() -> None:
    runs = {
        "ctxsteer": [_res(10.0, 1.0, 20.0), _res(12.0, 0.6, 30.0), _res(8.0, 2.0, 16.0)],
        "vllm": [_res(5.0, 0.5, 10.0), _res(6.0, 0.4, 45.0), _res(4.0, 0.5, 16.0)],
    }
    keys = doc_chat_keys(runs, 1, peer="vllm")
    assert keys["doc_chat_followup_ttft_ratio"] == pytest.approx(0.1)
    assert keys["doc_chat_followup_ttft_ratio_range"] == pytest.approx([0.05, 0.25])
    assert keys["doc_chat_vs_vllm"] == pytest.approx(1.0) and keys["doc_chat_vs_vllm_range"] == [0.5, 1.5]
    assert keys["doc_chat_first_ttft_vs_vllm"] == pytest.approx(0.5)
    assert keys["doc_chat_cached_share"] == pytest.approx(0.9)
    four = doc_chat_keys({"ctxsteer": runs["ctxsteer"]}, 4)
    assert "doc_chat_4_followup_ttft_ratio" in four and not any("vs_vllm" in k for k in four)
    assert "doc_chat_error" in doc_chat_keys({"ctxsteer": [{"error": "HTTP 500"}]}, 1)


# ---- plain vLLM in the throughput rotation ----------------------------------------------------------


def _wave_run(tok_s: list[float]) -> dict:
    return {"aggregate_tok_s": sum(tok_s) / len(tok_s), "round_tok_s": tok_s}


def test_vllm_peer_runs_beside_a_steered_ctxsteer_at_every_concurrency() -> None:
    from ctxsteer.server.bench.server import _contenders, _record_round

    vllm = ("http://v", "m")
    one = {c.name: c.steered for c in _contenders("m", 1, 8, "http://c", None, None, None, vllm)}
    assert one == {"ctxsteer": False, "vllm": False, "steered": True}  # single_tok_s stays unsteered
    top = {c.name: c.steered for c in _contenders("m", 8, 8, "http://c", None, None, None, vllm)}
    assert top == {"ctxsteer": True, "unsteered": False, "vllm": False}
    assert "vllm" not in {c.name for c in _contenders("m", 8, 8, "http://c", None, None, None)}

    doc: dict = {"concurrent": []}
    runs: dict = {"peer": [], "peer_same_dtype": []}
    res = {"ctxsteer": _wave_run([10, 10]), "steered": _wave_run([8, 12]), "vllm": _wave_run([4, 8])}
    _record_round(doc, res, 1, runs)
    assert doc["vs_vllm_1"] == pytest.approx(1.75)  # median of 8/4 and 12/8: the steered run's
    assert doc["vs_vllm_1_range"]["min"] == pytest.approx(1.5)
    assert doc["plain_vllm_peer"]["concurrent"] == [res["vllm"]]
