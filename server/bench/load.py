"""The load side of `ctxsteer bench server`: streaming chat requests in waves (or, `_sustained`, in a
closed loop per stream), what each stream saw (TTFT, inter-token gaps, tokens), the side-by-side rounds
that compare servers on one shared CPU, and the loads behind the memory and arrival-latency figures."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

MIXED_STRENGTHS = (1.5, 2.0, 3.0, 1.25, 4.0, 2.5, 1.75, 6.0)
_DOC = (
    "The harbour board met every quarter to settle accounts with the fishing cooperatives. In the spring the "
    "ledgers showed a shortfall in ice deliveries, and the clerk traced it to a miscounted shipment from the "
    "northern depot. "
)


# Tokens of one engine step (n-gram speculation keeps several per step) reach the client as separate
# events a few microseconds apart; ITL is the wait between deliveries, so those gaps are not counted.
SAME_STEP_S = 0.002


@dataclass
class StreamResult:
    ttft_s: float
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None
    finish: str | None = None  # the choice's finish_reason: "stop" (ended by itself) or "length"


def build_messages(prompt_tokens: int, i: int) -> list[dict]:
    """~prompt_tokens tokens (4 chars/token estimate) of document + a request for a long answer.

    No `ignore_eos` (transformers serve rejects it): greedy answers from the same model and prompt are
    the same on both servers, and tok/s counts the tokens each server really produced.
    """
    doc = (_DOC * (prompt_tokens * 4 // len(_DOC) + 1))[: prompt_tokens * 4]
    return [
        {"role": "user", "content": f"Document {i}:\n{doc}\n\nRetell this document in detail, step by step."}
    ]


async def one_stream(
    client: httpx.AsyncClient,
    model: str,
    msgs: list[dict],
    max_tokens: int,
    steering: dict | None,
    extra: dict | None = None,
):
    """One streaming request (`extra`: more body fields, e.g. a response_format); what the client saw."""
    body: dict = (extra or {}) | {
        "model": model,
        "messages": msgs,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if steering is not None:
        body["steering"] = steering
    t0 = time.perf_counter()
    res = StreamResult(ttft_s=float("nan"))
    last = None
    chunks = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return res
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                res.tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or []:
                res.finish = choice.get("finish_reason") or res.finish
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - t0
                    elif now - last > SAME_STEP_S:
                        res.itls.append(now - last)
                    last = now
                    chunks += 1
    res.tokens = res.tokens or chunks
    return res


def _steering(i: int, steered: bool) -> dict | None:
    return {"strength": MIXED_STRENGTHS[i % len(MIXED_STRENGTHS)]} if steered else None


Wave = tuple[list[StreamResult], float]  # the streams of one wave, its wall time
Messages = Callable[[int, int], list[dict]]  # (prompt tokens, prompt index) -> the chat messages


async def _wave(client: httpx.AsyncClient, model: str, concurrency: int, index: int, prompt_tokens: int,
                max_tokens: int, steered: bool, messages: Messages = build_messages,
                extra: dict | None = None) -> Wave:  # fmt: skip
    """`concurrency` simultaneous streams; wave `index` always sends the same prompts."""
    t0 = time.perf_counter()
    batch = await asyncio.gather(
        *(
            one_stream(
                client,
                model,
                messages(prompt_tokens, index * concurrency + i),
                max_tokens,
                _steering(i, steered),
                extra,
            )  # fmt: skip
            for i in range(concurrency)
        )
    )
    return list(batch), time.perf_counter() - t0


async def _sustained(client: httpx.AsyncClient, c: Contender, concurrency: int, index: int, requests: int,
                     prompt_tokens: int, max_tokens: int) -> Wave:  # fmt: skip
    """Closed loop (vLLM's `--max-concurrency`): `concurrency` streams, each sending its next request as
    soon as its previous one ends, until the round's `requests` requests are done (round `index` always
    sends the same ones). Returns them as one wave: its wall time runs until the last one ends."""
    todo = iter(range(index * requests, (index + 1) * requests))  # shared: each stream takes the next one
    results: list[StreamResult] = []

    async def stream() -> None:
        for k in todo:
            msgs, steering = c.messages(prompt_tokens, k), _steering(k, c.steered)
            results.append(await one_stream(client, c.model, msgs, max_tokens, steering, c.extra))

    t0 = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def summarize(concurrency: int, steered: bool, waves: list[Wave]) -> dict:
    """Aggregate = all tokens / all wall time; `round_tok_s` per wave, for ranges."""
    results = [r for batch, _ in waves for r in batch]
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    tokens = sum(r.tokens for r in results)
    itls = [x for r in results for x in r.itls]
    return {
        "concurrency": concurrency,
        "steered": steered,
        "aggregate_tok_s": tokens / sum(wall for _, wall in waves),
        "round_tok_s": [sum(r.tokens for r in batch) / wall for batch, wall in waves],
        "ttft_p50_s": statistics.median(r.ttft_s for r in results),
        "itl_p50_s": statistics.median(itls) if itls else None,
        "completion_tokens": tokens,
        "requests": len(results),
        "finish_reasons": dict(Counter(r.finish or "unknown" for r in results)),
    }


async def load(url: str, model: str, concurrency: int, rounds: int, prompt_tokens: int, max_tokens: int,
               steered: bool) -> dict:  # fmt: skip
    """`rounds` waves of `concurrency` simultaneous streams."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        waves = [
            await _wave(client, model, concurrency, rnd, prompt_tokens, max_tokens, steered)
            for rnd in range(rounds)
        ]
    return summarize(concurrency, steered, waves)


@dataclass(frozen=True, slots=True)
class Contender:
    """One side of a side-by-side run: a server and what it is sent (by default the retell prompts at the
    bench's --max-tokens; `extra` adds body fields, e.g. a response_format)."""

    name: str
    url: str
    model: str
    steered: bool
    messages: Messages = build_messages
    max_tokens: int | None = None
    extra: dict | None = field(default=None, compare=False)


def rotation(items: list, rnd: int) -> list:
    """The order of round `rnd`: each item starts one round in turn, so no one always goes first."""
    k = rnd % len(items) if items else 0
    return items[k:] + items[:k]


def side_by_side(
    contenders: list[Contender],
    concurrency: int,
    rounds: int,
    args: argparse.Namespace,
    sustained: int | None = None,
) -> dict:
    """Every contender runs the same waves, one wave at a time, in an order that rotates each round: a
    machine that speeds up or slows down during the run weighs on all of them alike (this shared CPU
    drifts by 10-30 % within minutes), and round r of each is a pair for the ratio's range. `sustained`:
    a round is instead `sustained` requests per stream in a closed loop (`_sustained`), not one wave."""

    async def main() -> dict[str, list[Wave]]:
        waves: dict[str, list[Wave]] = {c.name: [] for c in contenders}
        for rnd in range(rounds):
            for c in rotation(contenders, rnd):
                max_tokens = c.max_tokens or args.max_tokens
                async with httpx.AsyncClient(base_url=c.url, timeout=600) as client:
                    if sustained is not None:
                        wave = await _sustained(client, c, concurrency, rnd, concurrency * sustained,
                                                args.prompt_tokens, max_tokens)  # fmt: skip
                        tokens = sum(r.tokens for r in wave[0])
                        print(f"    round {rnd} {c.name}: {tokens / wave[1]:.1f} tok/s", flush=True)
                    else:
                        wave = await _wave(client, c.model, concurrency, rnd, args.prompt_tokens,
                                           max_tokens, c.steered, c.messages, c.extra)  # fmt: skip
                waves[c.name].append(wave)
        return waves

    waves = asyncio.run(main())
    out = {c.name: summarize(concurrency, c.steered, waves[c.name]) for c in contenders}
    for c in contenders:
        res = out[c.name]
        print(
            f"  {c.name:<15} c={concurrency:<3} steered={c.steered!s:<5} "
            f"{res['aggregate_tok_s']:7.1f} tok/s  ttft_p50 {res['ttft_p50_s']:.2f}s  "
            f"itl_p50 {res['itl_p50_s'] or 0:.3f}s",
            flush=True,
        )
    return out


def ratio_range(a: dict, b: dict) -> dict:
    """Median and range of the per-round ratios a/b (rounds run side by side)."""
    ratios = [x / y for x, y in zip(a["round_tok_s"], b["round_tok_s"], strict=True)]
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
    }


def warmup(url: str, model: str) -> None:
    asyncio.run(load(url, model, 1, 1, 32, 4, steered=False))


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process in MB (`VmHWM`: its peak), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def run_memory_load(url: str, model: str, pid: int, streams: int = 4, prompt_tokens: int = 5000) -> dict:
    """`streams` concurrent ~5,000-token prompts, then RSS with nothing running (does memory come back?)."""
    asyncio.run(load(url, model, streams, 1, prompt_tokens, 16, steered=True))
    time.sleep(2.0)  # the engine thread finishes its bookkeeping
    out = {"idle_rss_mb_after_load": rss_mb(pid), "peak_rss_mb": rss_mb(pid, "VmHWM")}
    idle, peak = out["idle_rss_mb_after_load"], out["peak_rss_mb"]
    print(f"  memory: idle {idle:.0f} MB after {streams} x {prompt_tokens} tok, peak {peak:.0f}", flush=True)
    return out


def run_arrivals(url: str, model: str, streams: int = 4, arrivals: int = 6, every_s: float = 0.75) -> dict:
    """Inter-token latency of `streams` running streams while `arrivals` new 512-token requests come in,
    one every `every_s` seconds (does a newcomer's prefill stall the running streams?)."""

    async def main() -> tuple[list[StreamResult], list[StreamResult]]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            running = [
                asyncio.create_task(one_stream(client, model, build_messages(256, 900 + i), 96, None))
                for i in range(streams)
            ]
            await asyncio.sleep(3.0)  # the running streams are past their prefill
            newcomers = []
            for j in range(arrivals):
                msgs = build_messages(512, 950 + j)
                newcomers.append(asyncio.create_task(one_stream(client, model, msgs, 8, None)))
                await asyncio.sleep(every_s)
            return list(await asyncio.gather(*running)), list(await asyncio.gather(*newcomers))

    results, newcomers = asyncio.run(main())
    errors = [r.error for r in results + newcomers if r.error]
    if errors:
        raise RuntimeError(f"arrivals: {errors[0]}")
    itls = sorted(x for r in results for x in r.itls)
    p50 = statistics.median(itls)
    p99 = itls[min(len(itls) - 1, int(0.99 * len(itls)))]
    print(f"  arrivals: running streams' ITL p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms", flush=True)
    return {"itl_p50_s_with_arrivals": p50, "itl_p99_s_with_arrivals": p99}
