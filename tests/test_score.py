"""`ctxsteer score` on a tiny model: output schema, the ratio equal to a direct measurement, resume after an
interruption, threshold by value and by percentile, summary and histogram files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import make_model, make_tokenizer, save_tiny_model

from ctxsteer.server.training.score import main, percentile
from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.reliance import attention_ratio
from ctxsteer.steering.spans import render_chat

EXAMPLES = [
    {"id": "a", "messages": [{"role": "user", "content": "The key is 7. What is the key?"},
                             {"role": "assistant", "content": "The key is 7."}]},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Name a colour of the sky."},
                             {"role": "assistant", "content": "Blue, mostly, on clear days."}]},
    {"id": "c", "messages": [{"role": "user", "content": "hi"}]},  # no response: skipped
    {"id": "d", "messages": [{"role": "user", "content": "Cats purr when content. Why do cats purr?"},
                             {"role": "assistant", "content": "Because they are content."}]},
    {"id": "e", "messages": [{"role": "user", "content": "Count to three."},
                             {"role": "assistant", "content": "One, two, three."}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "qwen2")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_schema_values_threshold_and_files(model_dir: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "data.jsonl", EXAMPLES)
    out = tmp_path / "scored.jsonl"
    args = [str(data), "--out", str(out), "--model", str(model_dir), "--batch-size", "2", "--no-progress"]
    assert main([*args, "--percentile", "50"]) == 0
    rows = _read(out)
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "e"] and [r["index"] for r in rows] == list(
        range(5)
    )
    assert rows[2]["user_attention_ratio"] is None and "two chat messages" in rows[2]["skipped"]
    ratios = [r["user_attention_ratio"] for r in rows if r["user_attention_ratio"] is not None]
    assert all(0.0 < x < 1.0 for x in ratios)
    summary = json.loads((tmp_path / "scored.summary.json").read_text())
    assert summary["scored"] == 4 and summary["skipped"] == 1
    assert (
        summary["threshold"] == pytest.approx(percentile(ratios, 50))
        and "percentile" in summary["threshold_rule"]
    )
    assert [r["context_dependent"] for r in rows] == [
        None if r["user_attention_ratio"] is None else r["user_attention_ratio"] > summary["threshold"]
        for r in rows
    ]
    assert (tmp_path / "scored.hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the first example's ratio, measured directly: response queries on user-content keys
    register()
    model, tok = make_model("qwen2", attn_implementation=ATTN_NAME), make_tokenizer()
    r = render_chat(tok, EXAMPLES[0]["messages"], add_generation_prompt=False)
    n = len(r.ids)
    key_mask, query_mask = torch.zeros(1, n), torch.zeros(1, n)
    key_mask[0, r.message_spans[0][0] : r.message_spans[0][1]] = 1
    query_mask[0, r.message_spans[1][0] : r.message_spans[1][1]] = 1
    want = attention_ratio(
        model, torch.tensor([r.ids]), torch.ones(1, n, dtype=torch.long), key_mask, query_mask
    )
    assert rows[0]["user_attention_ratio"] == pytest.approx(float(want[0]), abs=1e-5)

    # a fixed threshold, on the same scores (nothing left to score: no model load needed)
    assert main([*args, "--threshold", "0.0"]) == 0
    assert all(r["context_dependent"] for r in _read(out) if r["user_attention_ratio"] is not None)


def test_resume_scores_only_what_is_missing(model_dir: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "data.jsonl", EXAMPLES)
    fresh = tmp_path / "fresh.jsonl"
    base = ["--model", str(model_dir), "--no-progress", "--batch-size", "3"]
    assert main([str(data), "--out", str(fresh), *base]) == 0
    # an interrupted run: two lines written, the third torn
    out = tmp_path / "resumed.jsonl"
    lines = fresh.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:10])
    first = _read(fresh)
    planted = dict(first[0], user_attention_ratio=0.123456)  # proves line 0 is kept, not recomputed
    out.write_text(json.dumps(planted) + "\n" + lines[1] + "\n" + lines[2][:10])
    assert main([str(data), "--out", str(out), *base]) == 0
    got = _read(out)
    assert got[0]["user_attention_ratio"] == 0.123456
    for a, b in zip(got[1:], first[1:], strict=True):
        assert a["user_attention_ratio"] == pytest.approx(b["user_attention_ratio"], abs=1e-6) or (
            a["user_attention_ratio"] is None and b["user_attention_ratio"] is None
        )
