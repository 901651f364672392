"""Long-run reliability checks against a real `ctxsteer serve` subprocess (`make test-reliability`).

Why this exists next to the test suite: pytest proves behaviour request by request, but not what the
server does under sustained overload, a storm of disconnects, SIGTERM mid-stream, slow-loris sockets or
ten minutes of mixed traffic. Each section below starts its own server on the embedded SmolLM2 model
(127.0.0.1 only, so isolation is real and a crash cannot leak into the next section), drives it, and
records figures plus invariants in a markdown report. A section that fails records its error and the
run goes on; every wait has a hard deadline, so the run always ends by itself. Exit status 1 when any
5xx was seen, an invariant failed or a section could not run.

    .venv/bin/python -m tests.reliability.long_run --out docs/reliability.md [--quick] [--soak-s 600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from ctxsteer.server.engine.local.prefix_cache import PREFIX_CACHE_SHARE
from tests.server_process import ServerProcess, serve

REPO = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
REQUEST_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# After a 429 a client pauses this long: the pressure stays far above capacity, yet on a small machine the
# run measures the server rather than a client busy-looping on instant rejections.
REJECT_PAUSE_S = 0.1
HEADER_TIMEOUT_S = 10.0  # what slow-clients passes as --timeout-header-read when the flag exists
SLOW_BOUND_S = 30.0  # how long slow sockets and the idle keep-alive connection are watched
SETTLE_BOUND_S = 30.0  # cancel storm: time allowed for the engine gauges to return to baseline
CONTEXT = (
    "Kerr Island has one lighthouse. It was painted red in 1931 and repainted white in 1987. "
    "The keeper, Ana Ruiz, rows to the mainland every Tuesday."
)
PROBE = {
    "messages": [{"role": "user", "content": "List three primary colours."}],
    "temperature": 0,
    "max_tokens": 16,
}
SHORT_CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}


@dataclass(frozen=True)
class Plan:
    """Sizes of every section; `--quick` scales them down for a smoke run."""

    quick: bool = False
    overload_s: float = 60.0
    overload_clients: int = 64
    cancel_streams: int = 30
    sigterm_streams: int = 8
    slow_sockets: int = 50
    soak_s: float = 600.0
    soak_concurrency: int = 4
    schemathesis_s: float = 600.0

    @classmethod
    def build(cls, quick: bool, soak_s: float | None) -> Plan:
        if quick:
            soak = 60.0 if soak_s is None else soak_s
            return cls(
                True,
                overload_s=10,
                overload_clients=16,
                cancel_streams=10,
                slow_sockets=20,
                soak_s=soak,
                schemathesis_s=60,
            )
        return cls() if soak_s is None else cls(soak_s=soak_s)


@dataclass
class Section:
    """One section's outcome: figures for the table, invariants, 5xx seen, or the error that stopped it."""

    title: str
    figures: list[tuple[str, str]] = field(default_factory=list)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    server_5xx: int = 0
    error: str | None = None
    seconds: float = 0.0

    def fig(self, name: str, value: object) -> None:
        self.figures.append((name, value if isinstance(value, str) else _fmt(value)))

    def check(self, name: str, ok: bool) -> None:
        self.checks.append((name, bool(ok)))

    @property
    def ok(self) -> bool:
        return self.error is None and self.server_5xx == 0 and all(ok for _, ok in self.checks)


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) or "none"
    return str(value)


def pct(values: list[float], q: float, scale: float = 1.0) -> float | None:
    if not values:
        return None
    s = [v * scale for v in sorted(values)]
    return s[min(len(s) - 1, int(q * len(s)))]


# ---- /metrics


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def metric_values(text: str | None) -> dict[str, float]:
    """`ctxsteer_*` sample name -> value summed over labels (the exposition text, parsed loosely)."""
    out: dict[str, float] = {}
    for line in (text or "").splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1).startswith("ctxsteer_"):
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
            except ValueError:
                continue
    return out


def _settled(name: str, value: float, baseline: float) -> bool:
    """Back to baseline: running/waiting exactly; the KV gauge also counts the prefix cache's blocks,
    which an idle engine keeps (at most PREFIX_CACHE_SHARE of the budget)."""
    if "kv_cache_usage" in name:
        return value <= max(baseline, PREFIX_CACHE_SHARE) + 1e-9
    return abs(value - baseline) < 1e-9


def engine_gauges(text: str | None) -> dict[str, float]:
    """The running / waiting / KV-usage gauges, found by name so a rename elsewhere does not break this."""
    words = ("running", "waiting", "kv_cache_usage_perc")
    return {k: v for k, v in metric_values(text).items() if any(w in k for w in words)}


async def scrape(c: httpx.AsyncClient) -> str | None:
    try:
        r = await c.get("/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    return r.text if r.status_code == 200 else None


# ---- shared request helpers


async def probe(c: httpx.AsyncClient) -> str:
    """The fixed greedy probe: identical text before and after a disturbance shows no state leaked."""
    r = await c.post(CHAT, json=PROBE, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def error_body_problem(r: httpx.Response) -> str | None:
    """None if `r` carries an OpenAI error body `{"error": {message, type, param, code}}`, else why not."""
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return "body is not {'error': {...}}"
    missing = [k for k in ("message", "type", "param", "code") if not isinstance(err, dict) or k not in err]
    return f"error object lacks {missing}" if missing else None


@dataclass
class StreamResult:
    status: int
    chunks: int = 0
    done: bool = False
    finish: dict[int, str] = field(default_factory=dict)  # choice index -> finish_reason
    errors: int = 0  # error frames after the 200 headers
    transport: str | None = None

    @property
    def normal(self) -> bool:
        return self.done and not self.errors and bool(self.finish) and self.transport is None


def parse_frame(line: str, res: StreamResult) -> None:
    if not line.startswith("data:"):
        return
    data = line[5:].strip()
    res.chunks += 1
    if data == "[DONE]":
        res.done = True
        return
    obj = json.loads(data)
    if "error" in obj:
        res.errors += 1
    for choice in obj.get("choices") or ():
        if choice.get("finish_reason"):
            res.finish[choice.get("index", 0)] = choice["finish_reason"]


async def read_stream(
    c: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    on_chunk: Callable[[StreamResult], bool] | None = None,
) -> StreamResult:
    """POST a streaming request and parse its SSE frames; `on_chunk` returning True closes it early."""
    async with c.stream("POST", path, json=body) as r:
        res = StreamResult(r.status_code)
        if r.status_code != 200:
            await r.aread()
            return res
        async for line in r.aiter_lines():
            parse_frame(line, res)
            if on_chunk is not None and res.chunks and on_chunk(res):
                break
        return res


def count_5xx(statuses: Counter[str]) -> int:
    return sum(n for k, n in statuses.items() if k.isdigit() and k.startswith("5"))


def log_figures(sec: Section, sp: ServerProcess) -> None:
    text = sp.logs()
    sec.fig("server log: tracebacks / ERROR lines", f"{text.count('Traceback')} / {text.count(' ERROR ')}")


def run_async(coro: Any, budget_s: float, what: str) -> Any:
    """Run a section's coroutine under a hard deadline (TimeoutError names the section)."""

    async def bounded() -> Any:
        try:
            return await asyncio.wait_for(coro, budget_s)
        except TimeoutError:
            raise TimeoutError(f"{what} exceeded its {budget_s:.0f} s deadline") from None

    return asyncio.run(bounded())


# ---- 1. overload


def overload(sec: Section, plan: Plan, logs: Path) -> None:
    """Far more clients than batch + queue: excess must get fast, well-formed 429s, never a 5xx."""
    flags = ("--max-num-seqs", "4", "--max-queue", "8")
    sec.fig("server flags", " ".join(flags))
    sec.fig("clients / duration s", f"{plan.overload_clients} / {plan.overload_s:.0f}")
    with serve(None, *flags, log_dir=logs) as sp:
        run_async(_overload(sp, sec, plan), plan.overload_s + 60, "overload")
    log_figures(sec, sp)


async def _overload(sp: ServerProcess, sec: Section, plan: Plan) -> None:
    statuses: Counter[str] = Counter()
    bad_429: Counter[str] = Counter()
    lat: dict[str, list[float]] = {"200": [], "429": []}
    limits = httpx.Limits(max_connections=plan.overload_clients + 4, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=sp.url, timeout=REQUEST_TIMEOUT, limits=limits) as c:
        before = metric_values(await scrape(c))
        started = time.monotonic()
        deadline = started + plan.overload_s

        async def client() -> None:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await c.post(CHAT, json=SHORT_CHAT)
                except httpx.HTTPError as e:
                    statuses[f"transport {type(e).__name__}"] += 1
                    await asyncio.sleep(REJECT_PAUSE_S)
                    continue
                code = str(r.status_code)
                statuses[code] += 1
                lat.setdefault(code, []).append(time.perf_counter() - t0)
                if r.status_code == 429:
                    problem = error_body_problem(r)
                    if "retry-after" not in r.headers:
                        problem = "no Retry-After" + (f"; {problem}" if problem else "")
                    if problem:
                        bad_429[problem] += 1
                    await asyncio.sleep(REJECT_PAUSE_S)

        await asyncio.gather(*(client() for _ in range(plan.overload_clients)))
        elapsed = time.monotonic() - started  # the deadline plus the tail of requests in flight then
        after = metric_values(await scrape(c))
    name = "ctxsteer_requests_rejected_total"
    delta = after[name] - before[name] if name in before and name in after else None
    n5 = count_5xx(statuses)
    transport = sum(n for k, n in statuses.items() if k.startswith("transport"))
    sec.server_5xx += n5
    sec.fig("requests", sum(statuses.values()))
    sec.fig("by status", statuses)
    sec.fig("200 per s", statuses["200"] / elapsed)
    sec.fig("200 latency p50 / p95 s", f"{_fmt(pct(lat['200'], 0.5))} / {_fmt(pct(lat['200'], 0.95))}")
    sec.fig(
        "429 latency p50 / p95 ms", f"{_fmt(pct(lat['429'], 0.5, 1e3))} / {_fmt(pct(lat['429'], 0.95, 1e3))}"
    )
    sec.fig("5xx", n5)
    sec.fig("transport errors", transport)
    sec.fig(f"{name} delta", "n/a" if delta is None else f"{delta:.0f}")
    sec.fig("malformed 429s", bad_429 or 0)
    sec.check("some requests served (200 > 0)", statuses["200"] > 0)
    sec.check("admission control engaged (429 > 0)", statuses["429"] > 0)
    sec.check("every 429 has Retry-After and an OpenAI error body", not bad_429)
    sec.check("no transport errors", transport == 0)
    if delta is not None:
        sec.check(f"{name} grew by the number of 429s", delta == statuses["429"])


# ---- 2. cancel storm


def cancel_storm(sec: Section, plan: Plan, logs: Path) -> None:
    """Clients that vanish mid-stream must free their batch slots and KV budget, and leave no trace in
    what later requests generate."""
    sec.fig("streams", plan.cancel_streams)
    with serve(None, log_dir=logs) as sp:
        run_async(_cancel_storm(sp, sec, plan), 180, "cancel storm")
    log_figures(sec, sp)


async def _cancel_storm(sp: ServerProcess, sec: Section, plan: Plan) -> None:
    rng = random.Random(7)
    cuts = [rng.randint(1, 3) for _ in range(plan.cancel_streams)]
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 256,
        "ignore_eos": True,  # without the abort these would keep decoding for a long while
        "stream": True,
    }

    async def one(cut: int) -> StreamResult:
        # Own client per stream: leaving it closes the TCP connection, as a vanished client would.
        async with httpx.AsyncClient(base_url=sp.url, timeout=REQUEST_TIMEOUT) as c:
            try:
                return await read_stream(c, CHAT, body, lambda r: r.chunks >= cut)
            except httpx.HTTPError as e:
                return StreamResult(0, transport=type(e).__name__)

    async with httpx.AsyncClient(base_url=sp.url, timeout=REQUEST_TIMEOUT) as c:
        before_text = await probe(c)
        baseline = engine_gauges(await scrape(c))
        results = await asyncio.gather(*(one(k) for k in cuts))
        t0 = time.monotonic()
        settled: float | None = None
        last: dict[str, float] = {}
        while time.monotonic() - t0 < SETTLE_BOUND_S:
            last = engine_gauges(await scrape(c))
            if baseline and last.keys() == baseline.keys():
                if all(_settled(k, last[k], baseline[k]) for k in baseline):
                    settled = time.monotonic() - t0
                    break
            await asyncio.sleep(0.25)
        after_text = await probe(c)
    statuses = Counter(str(r.status) if r.transport is None else f"transport {r.transport}" for r in results)
    sec.server_5xx += count_5xx(statuses)
    sec.fig("by status", statuses)
    sec.fig("chunks read before closing", Counter(r.chunks for r in results))
    sec.fig("gauges at baseline", baseline or "n/a (no running/waiting gauges in /metrics)")
    sec.fig("gauges after the storm", last or "n/a")
    sec.fig("back to baseline after s", "n/a" if settled is None else settled)
    sec.fig("probe text", repr(before_text))
    sec.check("every stream opened with 200", statuses == Counter({"200": len(results)}))
    if baseline:
        sec.check(f"running/waiting/KV back to baseline within {SETTLE_BOUND_S:.0f} s", settled is not None)
    sec.check("greedy probe identical before and after", before_text == after_text)


# ---- 3. SIGTERM under load


def sigterm(sec: Section, plan: Plan, logs: Path) -> None:
    """SIGTERM must stop new work at once yet let running streams finish (drain), then exit cleanly."""
    sec.fig("streams", plan.sigterm_streams)
    with serve(None, log_dir=logs) as sp:
        run_async(_sigterm(sp, sec, plan), 150, "sigterm")
    log_figures(sec, sp)


async def _sigterm(sp: ServerProcess, sec: Section, plan: Plan) -> None:
    body = {
        "messages": [{"role": "user", "content": "Describe a harbour at dawn."}],
        "max_tokens": 48,
        "ignore_eos": True,  # all 48 tokens: still decoding when the signal lands
        "stream": True,
    }
    started = [asyncio.Event() for _ in range(plan.sigterm_streams)]

    async def one(ev: asyncio.Event) -> StreamResult:
        def first_chunk(_: StreamResult) -> bool:
            ev.set()
            return False  # keep reading to the end

        async with httpx.AsyncClient(base_url=sp.url, timeout=REQUEST_TIMEOUT) as c:
            try:
                return await read_stream(c, CHAT, body, first_chunk)
            except httpx.HTTPError as e:
                return StreamResult(0, transport=type(e).__name__)
            finally:
                ev.set()

    tasks = [asyncio.create_task(one(ev)) for ev in started]
    await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 60)
    sp.proc.send_signal(signal.SIGTERM)
    t_signal = time.monotonic()
    await asyncio.sleep(0.5)  # let the handler run: the probe must meet a server that knows
    try:
        async with httpx.AsyncClient(base_url=sp.url, timeout=5) as c:
            r = await c.post(CHAT, json=SHORT_CHAT)
        refusal = f"HTTP {r.status_code}"
        refused = r.status_code == 503
    except httpx.ConnectError:
        refusal, refused = "connection refused", True
    except httpx.HTTPError as e:
        refusal, refused = f"{type(e).__name__} (not refused)", False
    results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    try:
        code: int | None = await asyncio.to_thread(sp.proc.wait, 60)
    except subprocess.TimeoutExpired:
        code = None
    exit_s = time.monotonic() - t_signal
    normal = sum(r.normal and set(r.finish.values()) <= {"stop", "length"} for r in results)
    sec.fig("finished normally (finish_reason + [DONE])", f"{normal} / {len(results)}")
    sec.fig("finish reasons", Counter(v for r in results for v in r.finish.values()))
    errors = sum(r.errors > 0 for r in results), sum(r.transport is not None for r in results)
    sec.fig("streams with error frames / transport errors", "{} / {}".format(*errors))
    sec.fig("new request 0.5 s after SIGTERM", refusal)
    if code is None:
        exit_text = "did not exit within 60 s"
    else:
        exit_text = str(code) if code >= 0 else f"{code} (killed by {signal.Signals(-code).name})"
    sec.fig("exit code (expected 0)", exit_text)
    sec.fig("SIGTERM to exit s", exit_s if code is not None else "n/a")
    sec.server_5xx += sum(500 <= r.status < 600 for r in results)
    sec.check("every running stream finished normally", normal == len(results))
    sec.check("new request refused after SIGTERM (connection refused or 503)", refused)
    sec.check("server exited", code is not None)


# ---- 4. slow clients


def header_timeout_flag() -> bool:
    """Whether this checkout's `ctxsteer serve` knows --timeout-header-read (it is being added)."""
    cmd = [sys.executable, "-m", "ctxsteer.server.cli", "serve", "--help"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO).stdout
    except subprocess.TimeoutExpired:
        return False
    return "--timeout-header-read" in out


def slow_clients(sec: Section, plan: Plan, logs: Path) -> None:
    """Slow-loris sockets and idle keep-alives must be closed on a timer, and must not block real traffic."""
    flag = header_timeout_flag()
    flags = ("--timeout-header-read", f"{HEADER_TIMEOUT_S:g}") if flag else ()
    sec.fig("server flags", " ".join(flags) or "none (--timeout-header-read not accepted yet)")
    with serve(None, *flags, log_dir=logs) as sp:
        port = int(sp.url.rsplit(":", 1)[1])
        run_async(_slow_clients(sp, sec, plan, port, flag), SLOW_BOUND_S + 60, "slow clients")
    log_figures(sec, sp)


def partial_sockets(port: int, n: int, bound_s: float) -> list[tuple[float | None, bytes]]:
    """Open `n` sockets that each send half a request line, then watch when the server closes them.
    Returns (seconds from connect to close or None, bytes received) per socket."""
    sel = selectors.DefaultSelector()
    t_open: dict[socket.socket, float] = {}
    got: dict[socket.socket, bytearray] = {}
    closed: dict[socket.socket, float] = {}
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            t_open[s] = time.monotonic()
            s.sendall(b"GET /v1/mod")
            s.setblocking(False)
            got[s] = bytearray()
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + bound_s
        while len(closed) < len(t_open) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except (ConnectionResetError, BlockingIOError) as e:
                    if isinstance(e, BlockingIOError):
                        continue
                    data = b""
                if data:
                    got[s] += data
                else:
                    closed[s] = time.monotonic() - t_open[s]
                    sel.unregister(s)
        return [(closed.get(s), bytes(got[s])) for s in t_open]
    finally:
        for s in t_open:
            s.close()
        sel.close()


def idle_keepalive(port: int, bound_s: float) -> tuple[float | None, str]:
    """One complete GET /health on a keep-alive connection, then silence: seconds until the server closes
    it (None = still open at `bound_s`) and the response's status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                return 0.0, "closed before answering"
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        need = int(m.group(1)) if m else 0
        while len(rest) < need:
            chunk = s.recv(4096)
            if not chunk:
                break
            rest += chunk
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        t0 = time.monotonic()
        s.settimeout(0.5)
        while time.monotonic() - t0 < bound_s:
            try:
                if not s.recv(4096):
                    return time.monotonic() - t0, status
            except TimeoutError:
                continue
            except ConnectionResetError:
                return time.monotonic() - t0, status
        return None, status


async def _slow_clients(sp: ServerProcess, sec: Section, plan: Plan, port: int, flag: bool) -> None:
    slow = asyncio.create_task(asyncio.to_thread(partial_sockets, port, plan.slow_sockets, SLOW_BOUND_S))
    idle = asyncio.create_task(asyncio.to_thread(idle_keepalive, port, SLOW_BOUND_S))
    normal: Counter[str] = Counter()
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=sp.url, timeout=REQUEST_TIMEOUT) as c:
        while not (slow.done() and idle.done()):
            t0 = time.perf_counter()
            try:
                r = await c.post(CHAT, json={**SHORT_CHAT, "max_tokens": 4})
                normal[str(r.status_code)] += 1
                lat.append(time.perf_counter() - t0)
            except httpx.HTTPError as e:
                normal[f"transport {type(e).__name__}"] += 1
            await asyncio.wait({slow, idle}, timeout=1.0)
    sockets = await slow
    idle_s, idle_status = await idle
    times = [t for t, _ in sockets if t is not None]
    got_408 = sum(data.startswith(b"HTTP/1.1 408") for _, data in sockets)
    sec.server_5xx += count_5xx(normal)
    sec.fig("partial-request sockets", len(sockets))
    sec.fig(f"closed by the server within {SLOW_BOUND_S:.0f} s", len(times))
    if times:
        spread = min(times), statistics.median(times), max(times)
        sec.fig("close after s (min / median / max)", " / ".join(f"{t:.1f}" for t in spread))
    sec.fig("answered 408 before closing", got_408)
    sec.fig("idle keep-alive: response", idle_status)
    sec.fig("idle keep-alive: closed after s", "still open" if idle_s is None else f"{idle_s:.1f}")
    sec.fig("normal requests meanwhile (by status)", normal)
    sec.fig("normal request latency p50 / max s", f"{_fmt(pct(lat, 0.5))} / {_fmt(max(lat, default=None))}")
    if flag:
        sec.check(f"every slow socket closed within {SLOW_BOUND_S:.0f} s", len(times) == len(sockets))
        sec.check(
            f"slow sockets closed by {HEADER_TIMEOUT_S + 5:g} s (header timeout {HEADER_TIMEOUT_S:g} s + 5)",
            bool(times) and max(times) <= HEADER_TIMEOUT_S + 5,
        )
    sec.check(f"idle keep-alive connection closed within {SLOW_BOUND_S:.0f} s", idle_s is not None)
    sec.check(
        "normal requests all 200 meanwhile", bool(normal) and normal == Counter({"200": normal.total()})
    )


# ---- 5. soak


def soak(sec: Section, plan: Plan, logs: Path) -> None:
    """Minutes of mixed traffic: nothing may 5xx, bad input must stay 4xx, and RSS must not climb."""
    sec.fig("duration s / concurrency", f"{plan.soak_s:.0f} / {plan.soak_concurrency}")
    with serve(None, log_dir=logs) as sp:
        run_async(_soak(sp, sec, plan), plan.soak_s + 120, "soak")
    log_figures(sec, sp)


HI: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
BAD_REQUESTS: tuple[tuple[str, str, dict[str, Any] | bytes], ...] = (
    ("malformed JSON", CHAT, b'{"messages": [{"role": "user", "content": "hi"}'),
    ("max_tokens 0", CHAT, {**HI, "max_tokens": 0}),
    ("temperature 9", COMPLETIONS, {"prompt": "hi", "temperature": 9}),
    ("top_logprobs without logprobs", CHAT, {**HI, "top_logprobs": 2}),
    ("steering strength 0.5", CHAT, {**HI, "steering": {"strength": 0.5}}),
    ("unknown steering key", COMPLETIONS, {"prompt": "hi", "steering": {"bogus": 1}}),
    ("n 0", COMPLETIONS, {"prompt": "hi", "n": 0}),
    ("no messages", CHAT, {"max_tokens": 4}),
)


def soak_request(rng: random.Random) -> tuple[str, str, dict[str, Any] | bytes, bool]:
    """(kind, path, body, valid): a random mix of the API surface, seeded so runs are comparable."""
    roll = rng.random()
    if roll < 0.12:
        kind, path, body = rng.choice(BAD_REQUESTS)
        return f"bad: {kind}", path, body, False
    common: dict[str, Any] = {
        "max_tokens": rng.randint(4, 24),
        "temperature": rng.choice([0, 0.7, 1.0]),
        "seed": rng.randint(0, 2**31),
        "n": rng.choice([1, 1, 2]),
        "stream": rng.random() < 0.5,
    }
    if rng.random() < 0.3:
        common["presence_penalty"] = round(rng.uniform(-1, 1), 2)
        common["frequency_penalty"] = round(rng.uniform(-1, 1), 2)
    if common["stream"] and rng.random() < 0.5:
        common["stream_options"] = {"include_usage": True}
    strength = rng.randint(1, 6)
    if roll < 0.56:
        body = {
            **common,
            "messages": [
                {"role": "system", "content": "Answer from the context only."},
                {"role": "user", "content": f"{CONTEXT}\nWhat colour is the lighthouse now?"},
            ],
            "steering": {"strength": strength},
        }
        if rng.random() < 0.3:
            body |= {"logprobs": True, "top_logprobs": rng.randint(0, 5)}
        return "chat" + (" stream" if common["stream"] else ""), CHAT, body, True
    start = rng.randrange(0, len(CONTEXT) - 20)
    span = CONTEXT[start : start + rng.randint(8, 20)]
    body = {
        **common,
        "prompt": f"{CONTEXT}\nQ: Who rows to the mainland?\nA:",
        "steering": {"spans": [span], "strength": strength},
    }
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 5)
    return "completion" + (" stream" if common["stream"] else ""), COMPLETIONS, body, True


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB/min."""
    if len(points) < 2:
        return None
    tm = statistics.fmean(t for t, _ in points)
    ym = statistics.fmean(y for _, y in points)
    den = sum((t - tm) ** 2 for t, _ in points)
    return None if den == 0 else 60 * sum((t - tm) * (y - ym) for t, y in points) / den


async def _soak(sp: ServerProcess, sec: Section, plan: Plan) -> None:
    rng = random.Random(20240601)
    statuses: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    bad_not_4xx: Counter[str] = Counter()
    good_not_200: Counter[str] = Counter()
    broken: Counter[str] = Counter()  # 200 answers that are wrong: missing choices, no [DONE], error frames
    rss: list[tuple[float, float]] = []
    t_start = time.monotonic()
    deadline = t_start + plan.soak_s

    async def sampler() -> None:
        while time.monotonic() < deadline:
            if (mb := rss_mb(sp.proc.pid)) is not None:
                rss.append((time.monotonic() - t_start, mb))
            await asyncio.sleep(5.0)

    async def one(c: httpx.AsyncClient) -> None:
        kind, path, body, valid = soak_request(rng)
        kinds[kind] += 1
        detail = ""
        if isinstance(body, dict) and body.get("stream"):
            res = await read_stream(c, path, body)
            code = res.status
            if code == 200 and (not res.done or res.errors or set(res.finish) != set(range(body["n"]))):
                broken[f"{kind}: done={res.done} errors={res.errors} finished={sorted(res.finish)}"] += 1
        else:
            kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = await c.post(path, headers={"content-type": "application/json"}, **kw)
            code, detail = r.status_code, r.text[:160]
            if (
                code == 200
                and isinstance(body, dict)
                and len(r.json().get("choices") or ()) != body.get("n", 1)
            ):
                broken[f"{kind}: wrong number of choices"] += 1
        statuses[str(code)] += 1
        if valid and code != 200:
            good_not_200[f"{kind} {code} {detail}".strip()] += 1
        if not valid and not 400 <= code < 500:
            bad_not_4xx[f"{kind} -> {code}"] += 1

    async def worker(c: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            try:
                await one(c)
            except httpx.HTTPError as e:
                statuses[f"transport {type(e).__name__}"] += 1
                await asyncio.sleep(0.1)
            except ValueError as e:  # a 200 whose body or SSE frame is not JSON
                broken[f"unparseable response: {e}"[:120]] += 1

    async with httpx.AsyncClient(base_url=sp.url, timeout=REQUEST_TIMEOUT) as c:
        await asyncio.gather(sampler(), *(worker(c) for _ in range(plan.soak_concurrency)))
    if (mb := rss_mb(sp.proc.pid)) is not None:
        rss.append((time.monotonic() - t_start, mb))
    half = [(t, y) for t, y in rss if t >= plan.soak_s / 2]
    slope = slope_per_min(half)
    n5 = count_5xx(statuses)
    transport = sum(n for k, n in statuses.items() if k.startswith("transport"))
    sec.server_5xx += n5
    sec.fig("requests sent", sum(statuses.values()))
    sec.fig("by status", statuses)
    sec.fig("by kind", kinds)
    sec.fig("5xx", n5)
    sec.fig("transport errors", transport)
    sec.fig("valid requests not 200", good_not_200 or 0)
    sec.fig("bad requests not 4xx", bad_not_4xx or 0)
    sec.fig("broken 200 answers", broken or 0)
    if rss:
        sec.fig(
            "RSS start / end / max MB", f"{rss[0][1]:.0f} / {rss[-1][1]:.0f} / {max(y for _, y in rss):.0f}"
        )
    sec.fig("RSS samples (every 5 s)", len(rss))
    sec.fig("RSS slope, second half, MB/min", "n/a" if slope is None else f"{slope:+.2f}")
    sec.check("server alive at the end", sp.proc.poll() is None)
    sec.check("valid requests all 200", not good_not_200)
    sec.check("bad requests all 4xx", not bad_not_4xx)
    sec.check("200 answers well-formed (choices, finish per choice, [DONE], no error frames)", not broken)
    sec.check("no transport errors", transport == 0)


# ---- report


# ---- 6. schemathesis


def schemathesis_run(sec: Section, plan: Plan, logs: Path) -> None:
    """schemathesis over the published document for minutes, every check but positive-data acceptance (see
    tests/test_fuzz.py for why): zero server errors and zero schema violations."""
    key = "sk-reliability"
    sec.fig("budget (s)", plan.schemathesis_s)
    # A short context bounds each generated request's work (the default max_tokens is the room left).
    with serve(None, "--api-key", key, "--max-model-len", "256", log_dir=logs) as sp:
        cmd = [
            str(Path(sys.executable).with_name("st")),
            "run",
            sp.url + "/openapi.json",
            "-H",
            f"Authorization: Bearer {key}",
            "--max-time",
            str(int(plan.schemathesis_s)),
            "--max-examples",
            "100000",
            "--exclude-checks",
            "positive_data_acceptance",
            "--request-timeout",
            "120",
            "--no-color",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=plan.schemathesis_s + 600)
        text = out.stdout + out.stderr
        cases = re.search(r"(\d+) generated, (.*)", text)
        sec.fig("test cases", cases.group(0) if cases else "n/a")
        sec.fig("st exit code", out.returncode)
        failures = re.findall(r"❌ (ST\d+ [^:]+): (\d+)", text)
        sec.fig("findings", ", ".join(f"{n} x {k}" for k, n in failures) or "none")
        server_errors = sum(int(n) for k, n in failures if "Server error" in k)
        schema = sum(int(n) for k, n in failures if "schema" in k.lower() or "conformance" in k.lower())
        sec.fig("server errors / schema violations", f"{server_errors} / {schema}")
        sec.server_5xx += server_errors
        sec.check("schemathesis found no issue", out.returncode == 0 and "No issues found" in text)
        sec.check("server ready after the run", httpx.get(sp.url + "/ready", timeout=10).status_code == 200)
    log_figures(sec, sp)


SECTIONS: dict[str, tuple[str, Callable[[Section, Plan, Path], None]]] = {
    "overload": ("1. Overload", overload),
    "cancel": ("2. Cancel storm", cancel_storm),
    "sigterm": ("3. SIGTERM under streams", sigterm),
    "slow": ("4. Slow clients", slow_clients),
    "soak": ("5. Soak", soak),
    "schemathesis": ("6. schemathesis over /openapi.json", schemathesis_run),
}


def machine() -> list[tuple[str, str]]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
    if git("status", "--porcelain", "--untracked-files=no").strip():
        commit += " (with uncommitted changes)"
    return [
        ("CPU", cpu),
        ("cores", f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)"),
        ("memory", _mem_total()),
        ("OS / Python", f"{platform.platform()} / {platform.python_version()}"),
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("git commit", commit),
        ("command", f"`{shlex.join(sys.orig_argv)}`"),
    ]


def _mem_total() -> str:
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return "unknown"
    return f"{kb / 1024 / 1024:.1f} GiB"


def render(env: list[tuple[str, str]], plan: Plan, done: list[Section], pending: list[str]) -> str:
    ok = all(s.ok for s in done)
    lines = [
        "# ctxsteer reliability run",
        "",
        "Produced by `make test-reliability` (`tests/reliability/long_run.py`): a real `ctxsteer serve` on "
        "the embedded SmolLM2-135M-Instruct, one fresh server per section, traffic from 127.0.0.1 only.",
        "",
        f"**Result: {'PASS' if ok and not pending else 'FAIL' if not ok else 'RUNNING'}**"
        f"{' (quick smoke run: scaled-down sizes)' if plan.quick else ''}",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in env),
        "",
        "| section | result | seconds | 5xx | failed checks |",
        "|---|---|---|---|---|",
    ]
    for s in done:
        failed = [n for n, good in s.checks if not good] + (["section error"] if s.error else [])
        lines.append(
            f"| {s.title} | {'ok' if s.ok else 'FAIL'} | {s.seconds:.0f} | {s.server_5xx} | "
            f"{'; '.join(failed) or '-'} |"
        )
    lines += [f"| {t} | pending | | | |" for t in pending]
    for s in done:
        lines += ["", f"## {s.title}", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in s.figures]
        if s.checks:
            lines += ["", "| invariant | holds |", "|---|---|"]
            lines += [f"| {k} | {'yes' if good else '**NO**'} |" for k, good in s.checks]
        if s.error:
            lines += ["", "Section error:", "", "```", s.error, "```"]
    return "\n".join(lines) + "\n"


def _cell(v: str) -> str:
    return v.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.reliability.long_run", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "reliability.md", help="markdown report path")
    ap.add_argument("--quick", action="store_true", help="scaled-down smoke run (about 5 minutes)")
    ap.add_argument("--soak-s", type=float, default=None, help="soak duration (default 600, quick 60)")
    ap.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := [n for n in names if n not in SECTIONS]:
        ap.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    plan = Plan.build(args.quick, args.soak_s)
    env = machine()
    logs = Path(tempfile.mkdtemp(prefix="ctxsteer-reliability-"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done: list[Section] = []
    for i, name in enumerate(names):
        title, fn = SECTIONS[name]
        sec = Section(title)
        print(f"[reliability] {title} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            fn(sec, plan, logs)
        except Exception as e:  # noqa: BLE001 - recorded in the report; the next section still runs
            tb = traceback.format_exception(e)
            sec.error = "".join(tb[-3:])[-3000:].strip()
        sec.seconds = time.monotonic() - t0
        done.append(sec)
        print(f"[reliability] {title}: {'ok' if sec.ok else 'FAIL'} in {sec.seconds:.0f} s", file=sys.stderr)
        args.out.write_text(render(env, plan, done, [SECTIONS[n][0] for n in names[i + 1 :]]))
    ok = all(s.ok for s in done)
    if ok:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"[reliability] FAIL; server logs kept in {logs}", file=sys.stderr)
    print(f"[reliability] report: {args.out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
