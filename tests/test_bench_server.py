"""The side-by-side bookkeeping of `ctxsteer bench server` (pure functions; the servers are exercised by
running the benchmark itself), and the start-and-wait-until-ready helper every server launcher uses."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

from ctxsteer.server.bench.grammar_compile import SCHEMAS, compile_stats, compile_times_ms
from ctxsteer.server.bench.launch import free_port, started, wait_ready
from ctxsteer.server.bench.load import Contender, StreamResult, _sustained, ratio_range, rotation, summarize
from ctxsteer.server.bench.server import add_ratios
from ctxsteer.server.bench.structured import EXTRACTION_SCHEMA, extraction_messages, structured_ratios
from ctxsteer.server.engine.grammar import _compiled, to_llguidance


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


def _run(c: int, tok_s: float) -> dict:
    return {"concurrency": c, "aggregate_tok_s": tok_s, "ttft_p50_s": 0.5}


def test_ratios_against_the_peer_and_the_peer_in_ctxsteers_dtype():
    doc = {
        "concurrent": [_run(1, 30.0), _run(8, 120.0)],
        "unsteered_at_top": _run(8, 100.0),
        "single_no_speculation": _run(1, 15.0),
        "peer": {"dtype": "float32", "concurrent": [_run(1, 10.0), _run(8, 40.0)]},
        "peer_same_dtype": {"dtype": "bfloat16", "concurrent": [_run(1, 20.0), _run(8, 80.0)]},
    }
    by_c = add_ratios(doc, 8)
    assert sorted(by_c) == [1, 8]
    assert doc["batch_speedup_8"] == pytest.approx(4.0)
    assert doc["steered_throughput_ratio"] == pytest.approx(1.2)
    assert (doc["vs_transformers_serve_1"], doc["vs_transformers_serve_8"]) == pytest.approx((3.0, 3.0))
    assert doc["vs_transformers_serve_1_no_speculation"] == pytest.approx(1.5)
    same = (doc["vs_transformers_serve_1_same_dtype"], doc["vs_transformers_serve_8_same_dtype"])
    assert same == pytest.approx((1.5, 1.5))
    assert doc["vs_transformers_serve_1_no_speculation_same_dtype"] == pytest.approx(0.75)


def test_no_same_dtype_keys_without_that_peer():
    doc = {"concurrent": [_run(8, 120.0)], "peer": {"concurrent": [_run(8, 40.0)]}}
    add_ratios(doc, 8)
    assert doc["vs_transformers_serve_8"] == pytest.approx(3.0)
    assert not any(k.endswith("_same_dtype") for k in doc)


# ---------------------------------------------------------------- structured outputs: ratio, compile time


def test_structured_ratio_is_aggregate_over_aggregate_with_per_round_range():
    constrained = summarize(8, False, [_wave([40, 40], 1.0), _wave([30, 30], 2.0), _wave([50, 50], 1.0)])
    free = summarize(8, False, [_wave([50, 50], 1.0), _wave([30, 30], 1.5), _wave([50, 50], 1.0)])
    out = structured_ratios(constrained, free)
    assert out["structured_throughput_ratio"] == pytest.approx((240 / 4.0) / (260 / 3.5))
    r = out["structured_throughput_ratio_range"]
    assert (r["min"], r["median"], r["max"], r["rounds"]) == pytest.approx((0.75, 0.8, 1.0, 3))


def test_summarize_counts_how_the_streams_ended():
    batch, wall = _wave([5, 7, 9], 1.0)
    batch[0].finish, batch[1].finish = "stop", "length"
    assert summarize(3, False, [(batch, wall)])["finish_reasons"] == {"stop": 1, "length": 1, "unknown": 1}


def _closed_loop(durations_s: list[float], streams: int) -> tuple[list[tuple[int, int]], list[int], dict]:
    """`_sustained` against a fake server whose request k takes durations_s[k] and reports 5 completion
    tokens in 2 chunks. Returns (request, requests in flight when it arrived) in arrival order, the
    requests' message indices, and the round summarized."""
    arrivals: list[tuple[int, int]] = []
    in_flight: set[int] = set()

    async def handler(request: httpx.Request) -> httpx.Response:
        k = int(json.loads(request.content)["messages"][0]["content"])
        arrivals.append((k, len(in_flight)))
        in_flight.add(k)
        await asyncio.sleep(durations_s[k])
        in_flight.discard(k)
        chunks = [{"choices": [{"delta": {"content": "ab"}}]}, {"choices": [{"delta": {"content": "c"}}]}]
        chunks += [{"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"completion_tokens": 5}}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body)

    contender = Contender("x", "http://bench", "m", False, messages=lambda _p, k: [{"content": str(k)}])

    async def main() -> tuple[list[StreamResult], float]:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            return await _sustained(client, contender, streams, 1, len(durations_s) // 2, 0, 16)

    wave = asyncio.run(main())
    return arrivals, [k for k, _ in arrivals], summarize(streams, False, [wave])


def test_sustained_load_keeps_every_stream_busy_until_the_rounds_requests_are_done():
    """Closed loop: a stream that finishes sends the next request at once, while its neighbour's long one
    runs (waves would wait for it: nothing in flight at each arrival after the first wave). Round 1 of
    4 requests is requests 4..7, each sent once; tokens are the usage's completion_tokens."""
    durations = [0.0] * 4 + [0.01, 0.5, 0.01, 0.01]  # round 1: request 5 is the slow one
    arrivals, sent, res = _closed_loop(durations, streams=2)
    assert sorted(sent) == [4, 5, 6, 7]
    assert arrivals[:2] == [(4, 0), (5, 1)]  # two streams start together
    assert [n for _, n in arrivals[2:]] == [1, 1]  # 6 and 7 went out while 5 was still running
    assert max(n for _, n in arrivals) < 2  # never more than 2 streams
    assert res["completion_tokens"] == 4 * 5 and res["requests"] == 4
    assert res["finish_reasons"] == {"stop": 4}


def test_extraction_prompts_cycle_through_the_documents_and_name_every_field():
    first, again = extraction_messages(256, 0), extraction_messages(0, 8)
    assert first == again  # the same prompt for the same index, whatever --prompt-tokens says
    assert extraction_messages(0, 1) != first
    assert all(name in first[0]["content"] for name in EXTRACTION_SCHEMA["properties"])


def test_compile_times_are_first_compiles_against_the_vocabulary(monkeypatch: pytest.MonkeyPatch):
    import llguidance

    from ctxsteer.server.bench import grammar_compile

    hits: list[int] = []

    def counted(grammar):
        text = to_llguidance(grammar)
        hits.append(_compiled.cache_info().hits)
        return text

    monkeypatch.setattr(grammar_compile, "to_llguidance", counted)
    table = llguidance.LLTokenizer("byte")  # the served model's table in the bench; tiny here
    times = compile_times_ms(SCHEMAS[:3], table, runs=2)
    assert len(times) == 6 and all(t >= 0 for row in times for t in row)
    assert hits == [0] * 6, "every compile is a first one: the cache is cleared before each run"
    stats = compile_stats(times)
    totals = sorted(b + m for b, m, _ in times)
    assert stats["grammar_compile_ms_max"] == totals[-1]
    assert totals[0] <= stats["grammar_compile_ms_p50"] <= stats["grammar_compile_ms_p90"] <= totals[-1]
    assert stats["grammar_compile_samples"] == 6


def test_compile_stats_percentiles():
    times = [(float(i), 0.5, 0.1) for i in range(10)]  # totals 0.5 .. 9.5
    stats = compile_stats(times)
    assert (stats["grammar_compile_ms_p50"], stats["grammar_compile_ms_p90"]) == (5.0, 8.5)
    assert (stats["grammar_matcher_ms_p50"], stats["grammar_first_mask_ms_p50"]) == (0.5, 0.1)


# ---------------------------------------------------------------- launch: start a server, wait until ready


def test_started_waits_for_ready_and_stops_the_server(tmp_path: Path) -> None:
    (tmp_path / "ready").write_text("yes")
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(tmp_path)]
    log = tmp_path / "server.log"
    with started(cmd, f"http://127.0.0.1:{port}", "/ready", timeout_s=60, log=log, every_s=0.05) as proc:
        assert httpx.get(f"http://127.0.0.1:{port}/ready").text == "yes"
    assert proc.poll() is not None, "stopped when the block ends"
    assert "GET /ready" in log.read_text()


def test_a_server_that_exits_or_never_gets_ready_fails_with_its_output() -> None:
    crash = [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)exited with 3:.*bad flag"):
        with started(crash, f"http://127.0.0.1:{free_port()}", timeout_s=60, every_s=0.05):
            pass
    silent = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"]
    with pytest.raises(RuntimeError, match=r"(?s)/ready not ready after 0.3s:.*loading"):
        with started(silent, f"http://127.0.0.1:{free_port()}", timeout_s=0.3, every_s=0.05, grace_s=5):
            pass
    with pytest.raises(RuntimeError, match="not ready after"):
        wait_ready(f"http://127.0.0.1:{free_port()}", "/health", timeout_s=0.1, every_s=0.05)
