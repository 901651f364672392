"""The side-by-side bookkeeping of `ctxsteer bench server` (pure functions; the servers are exercised by
running the benchmark itself)."""

from __future__ import annotations

import pytest

from ctxsteer.server.bench.server import StreamResult, ratio_range, rotation, summarize


def test_rotation_gives_every_contender_every_position():
    items = ["a", "b", "c"]
    orders = [rotation(items, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for pos in range(3):
        assert sorted(o[pos] for o in orders) == items
    assert rotation(items, 4) == orders[1]
    assert rotation([], 2) == []


def _wave(tokens: list[int], wall: float) -> tuple[list[StreamResult], float]:
    return [StreamResult(ttft_s=0.1 * (i + 1), itls=[0.05], tokens=t) for i, t in enumerate(tokens)], wall


def test_summarize_aggregates_over_all_waves_and_keeps_each_wave():
    res = summarize(2, True, [_wave([10, 30], 2.0), _wave([20, 20], 4.0)])
    assert res["aggregate_tok_s"] == pytest.approx(
        80 / 6.0
    )  # all tokens / all wall time, not a mean of rates
    assert res["round_tok_s"] == pytest.approx([20.0, 10.0])
    assert res["completion_tokens"] == 80 and res["requests"] == 4
    assert res["ttft_p50_s"] == pytest.approx(0.15)


def test_summarize_refuses_failed_requests():
    batch, wall = _wave([5], 1.0)
    batch[0].error = "HTTP 500"
    with pytest.raises(RuntimeError, match="HTTP 500"):
        summarize(1, False, [(batch, wall)])


def test_ratio_range_pairs_rounds_in_order():
    a = {"round_tok_s": [30.0, 20.0, 45.0]}
    b = {"round_tok_s": [10.0, 20.0, 15.0]}
    r = ratio_range(a, b)
    assert (r["min"], r["median"], r["max"], r["rounds"]) == (1.0, 3.0, 3.0, 3)
    with pytest.raises(ValueError):
        ratio_range(a, {"round_tok_s": [1.0]})  # rounds must pair up
