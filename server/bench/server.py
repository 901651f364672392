"""`ctxsteer bench server`: throughput and latency of a running server over HTTP, in one run.

Measures (streaming chat completions, same prompts for every case):
- one stream: tok/s (completion tokens / wall, prefill included) and TTFT;
- N concurrent streams: aggregate tok/s, TTFT p50, inter-token latency p50;
- at the largest concurrency, all requests steered with mixed strengths vs none steered;
- the local engine's own run: the same load against `transformers serve --continuous-batching` on the same
  model (the converted HF directory of the default model) and, on one stream, against ctxsteer without
  n-gram speculation, all up at once and measured wave by wave in rotating order (ratios with their
  per-round range); then, alone: RSS after warm-up and, with nothing running, after 4 concurrent
  ~5,000-token prompts; ITL p50/p99 of 4 running streams while new 512-token requests keep arriving, with
  whole prefill chunks (the default) and on a second server with `--prefill-stall-share 0.75`;
- structured outputs (`--structured`, local engine): json_schema-constrained vs free requests at the top
  concurrency (sustained: each stream sends its next request as soon as its previous one ends) on the
  same server in rotating rounds, and the grammar compile time in-process
  (server/bench/structured.py, server/bench/grammar_compile.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from subprocess import CalledProcessError

import httpx

from ctxsteer.server.bench.doc_chat import add_doc_chat_args, run_doc_chat_suite
from ctxsteer.server.bench.launch import free_port, started
from ctxsteer.server.bench.load import (
    Contender,
    load,
    ratio_range,
    rss_mb,
    run_arrivals,
    run_memory_load,
    side_by_side,
    warmup,
)
from ctxsteer.server.bench.peers import PEER_SERVER, PLAIN_VLLM, peer_server, plain_vllm
from ctxsteer.server.bench.structured import REQUESTS_HELP, REQUESTS_PER_STREAM, run_structured


def _rounds(concurrency: int, args: argparse.Namespace) -> int:
    """Waves of requests per case: a single stream gets at least 4 (its waves are short; one request is
    too few to time)."""
    return args.rounds if concurrency > 1 else max(args.rounds, 4)


def run_suite(url: str, model: str, args: argparse.Namespace, peer: bool = False) -> dict:
    warmup(url, model)
    top = max(args.concurrency)
    out: dict = {"concurrent": []}
    for c in args.concurrency:
        rounds = _rounds(c, args)
        steered = not peer and c == top  # the headline number: every request steered
        res = asyncio.run(load(url, model, c, rounds, args.prompt_tokens, args.max_tokens, steered))
        out["concurrent"].append(res)
        tag = "peer " if peer else ""
        print(
            f"  {tag}c={c:<3} steered={steered!s:<5} {res['aggregate_tok_s']:7.1f} tok/s  "
            f"ttft_p50 {res['ttft_p50_s']:.2f}s  itl_p50 {res['itl_p50_s'] or 0:.3f}s",
            flush=True,
        )
    if not peer and top > 1:
        res = asyncio.run(load(url, model, top, args.rounds, args.prompt_tokens, args.max_tokens, False))
        out["unsteered_at_top"] = res
        print(f"  c={top:<3} steered=False {res['aggregate_tok_s']:7.1f} tok/s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ctxsteer bench server",
        description="Throughput/latency of ctxsteer (and optionally transformers serve) over HTTP.",
        epilog="example: ctxsteer bench server --json bench-server.json --concurrency 1,8; "
        "ctxsteer bench server --engine vllm --json out.json (vLLM backend vs local engine vs plain vLLM)",
    )
    ap.add_argument("--json", metavar="PATH", help="write results as JSON here")
    ap.add_argument("--url", help="a running server (default: start `ctxsteer serve` on the default model)")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct", help="model name to send")
    ap.add_argument("--concurrency", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="waves of concurrent requests per case")
    ap.add_argument(
        "--peer",
        choices=("transformers", "none"),
        default="transformers",
        help="also measure `transformers serve --continuous-batching` (only without --url; local engine)",
    )
    ap.add_argument(
        "--engine",
        choices=("local", "vllm"),
        default="local",
        help="vllm: ctxsteer --engine vllm, then the local engine and plain `vllm serve` on the same model",
    )
    ap.add_argument(
        "--dtype", default=None, help="server --dtype (default: auto; float32 with --engine vllm)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the servers started here")
    ap.add_argument(
        "--structured",
        choices=("on", "off", "only"),
        default="on",
        help="local engine: json_schema-constrained vs free throughput at the top concurrency, side by side "
        "on the same server, and grammar compile time in-process (only: nothing else is measured)",
    )
    ap.add_argument("--structured-requests", type=int, default=REQUESTS_PER_STREAM, help=REQUESTS_HELP)
    add_doc_chat_args(ap)
    args = ap.parse_args(argv)
    top = max(args.concurrency)
    doc: dict = {"model": args.model, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens}
    if args.url:
        doc["device"] = "remote"
        doc |= run_suite(args.url.rstrip("/").removesuffix("/v1"), args.model, args)
    elif args.engine == "vllm":
        doc |= run_vllm_comparison(args, top)
    else:
        doc |= run_local_engine(args, top)
    if "only" in (args.structured, args.doc_chat) and not args.url and args.engine == "local":
        return _report(doc, args)
    by_c = add_ratios(doc, top)

    if args.engine == "vllm" and not args.url:
        steered = by_c[top]["aggregate_tok_s"]
        doc["vllm_steered_throughput_ratio"] = doc.pop("steered_throughput_ratio", None)
        doc[f"vllm_vs_local_{top}"] = steered / _top_tok_s(doc["local"], top)
        doc[f"vllm_vs_plain_vllm_{top}"] = steered / _top_tok_s(doc["plain_vllm"], top)
    return _report(doc, args)


def _report(doc: dict, args: argparse.Namespace) -> int:
    summary = {k: v for k, v in doc.items() if not isinstance(v, dict | list) or k.endswith("_range")}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


def run_local_engine(args: argparse.Namespace, top: int) -> dict:
    """The local engine's run: the grammar compile time first (in-process, on a quiet machine) unless
    --structured off, then everything (`run_local`) or, with --structured only, the structured throughput
    alone on one server."""
    doc: dict = {}
    if args.structured != "off" and args.doc_chat != "only":
        from ctxsteer.server.bench.grammar_compile import grammar_compile_timing

        doc |= grammar_compile_timing()
    if "only" not in (args.structured, args.doc_chat):
        return doc | run_local(args, top)
    with ExitStack() as stack:
        url, _ = stack.enter_context(serving(args, top))
        version = httpx.get(url + "/version").json()
        doc["device"], doc["dtype"] = version.get("device", "unknown"), version.get("dtype")
        if args.structured == "only":
            doc |= run_structured(url, args.model, top, args)
        if args.doc_chat == "only":
            doc |= run_doc_chat_suite(url, args, _start_vllm(stack, args, top, doc))
    return doc


def add_ratios(doc: dict, top: int) -> dict[int, dict]:
    """The ratio keys from the runs in `doc` (aggregate tok/s over all rounds): batch speed-up, steered vs
    unsteered, vs the peer (`_same_dtype`: vs the peer run in ctxsteer's dtype). Returns the runs by
    concurrency."""
    by_c = {r["concurrency"]: r for r in doc["concurrent"]}
    single = by_c.get(1, {}).get("aggregate_tok_s")
    doc["single_tok_s"] = single
    doc["single_ttft_s"] = by_c.get(1, {}).get("ttft_p50_s")
    if single and top in by_c:
        doc[f"batch_speedup_{top}"] = by_c[top]["aggregate_tok_s"] / single
    if "unsteered_at_top" in doc:
        doc["steered_throughput_ratio"] = (
            by_c[top]["aggregate_tok_s"] / doc["unsteered_at_top"]["aggregate_tok_s"]
        )
    for key, suffix in (("peer", ""), ("peer_same_dtype", "_same_dtype")):
        if not (doc.get(key) and "concurrent" in doc[key]):
            continue
        peer_by_c = {r["concurrency"]: r for r in doc[key]["concurrent"]}
        if peer_top := peer_by_c.get(top):
            ratio = by_c[top]["aggregate_tok_s"] / peer_top["aggregate_tok_s"]
            doc[f"vs_transformers_serve_{top}{suffix}"] = ratio
        peer_1 = peer_by_c.get(1)
        if peer_1 and single:
            doc[f"vs_transformers_serve_1{suffix}"] = single / peer_1["aggregate_tok_s"]
            if "single_no_speculation" in doc:
                plain = doc["single_no_speculation"]["aggregate_tok_s"]
                doc[f"vs_transformers_serve_1_no_speculation{suffix}"] = plain / peer_1["aggregate_tok_s"]
    return by_c


def _top_tok_s(suite: dict, top: int) -> float:
    return {r["concurrency"]: r for r in suite["concurrent"]}[top]["aggregate_tok_s"]


def _serve_cmd(args: argparse.Namespace, top: int, port: int, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "ctxsteer.server.cli", "serve", "--port", str(port),
           "--max-num-seqs", str(top), "--log-level", "warning", *extra]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    return cmd


@contextmanager
def serving(
    args: argparse.Namespace, top: int, *extra: str, label: str = "ctxsteer"
) -> Iterator[tuple[str, int]]:
    """`ctxsteer serve` (with `extra` flags) on the default model, warm; yields its URL and pid."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"starting {label} {' '.join(extra)} on {url}", flush=True)
    with started(_serve_cmd(args, top, port, *extra), url, "/ready", timeout_s=1200) as proc:
        warmup(url, args.model)
        yield url, proc.pid


def run_ctxsteer(args: argparse.Namespace, top: int, *extra: str, label: str = "ctxsteer") -> dict:
    """Start `ctxsteer serve` (with `extra` flags) and run the suite against it (the vLLM comparison)."""
    with serving(args, top, *extra, label=label) as (url, _):
        device = httpx.get(url + "/version").json().get("device", "unknown")
        return {"device": device} | run_suite(url, args.model, args)


def run_local(args: argparse.Namespace, top: int) -> dict:
    """The local engine's own benchmark: throughput side by side (`run_side_by_side`), then, alone: RSS
    after warm-up and after a long-prompt load, ITL of running streams while newcomers arrive (whole
    prefill chunks, then on a server with `--prefill-stall-share`)."""
    doc = run_side_by_side(args, top)
    with serving(args, top) as (url, pid):  # alone from here: memory and latency figures
        doc["rss_mb_after_warmup"] = rss_mb(pid)
        whole = run_arrivals(url, args.model)  # the default: whole prefill chunks beside decoding rows
        doc |= {f"{k}_whole_chunks": v for k, v in whole.items()}
        doc |= run_memory_load(url, args.model, pid)
    # the same arrivals on a server that sizes prefill chunks to a share of a decode step
    share = "0.75"
    with serving(args, top, "--prefill-stall-share", share) as (url, _):
        doc |= run_arrivals(url, args.model) | {"prefill_stall_share_with_arrivals": float(share)}
    return doc


def run_side_by_side(args: argparse.Namespace, top: int) -> dict:
    """Throughput in rotating rounds, all servers up at once and one serving at a time: at the top
    concurrency steered vs unsteered vs the peer, on one stream with vs without n-gram speculation vs the
    peer."""
    doc: dict = {"concurrent": []}
    with ExitStack() as stack:
        url, _ = stack.enter_context(serving(args, top))
        version = httpx.get(url + "/version").json()
        doc["device"], doc["dtype"] = version.get("device", "unknown"), version.get("dtype")
        peer = stack.enter_context(peer_server(args)) if args.peer == "transformers" else None
        if isinstance(peer, dict):  # it did not start
            doc["peer"], peer = peer, None
        # ctxsteer's `--dtype auto` is bf16 on CPUs with native bf16, the peer's stays the checkpoint's
        # float32: then the peer also runs in ctxsteer's dtype, for a same-dtype ratio beside the default one.
        twin = None
        if peer is not None and doc["dtype"] not in (None, "float32"):
            twin = stack.enter_context(peer_server(args, doc["dtype"]))
            if isinstance(twin, dict):
                doc["peer_same_dtype"], twin = twin, None
        vllm = _start_vllm(stack, args, top, doc)
        plain = None
        if 1 in args.concurrency:  # one stream without n-gram speculation (on by default)
            plain, _ = stack.enter_context(serving(args, top, "--speculative-config", "off"))
        runs: dict[str, list[dict]] = {"peer": [], "peer_same_dtype": []}
        for c in args.concurrency:
            contenders = _contenders(args.model, c, top, url, plain, peer, twin, vllm)
            _record_round(doc, side_by_side(contenders, c, _rounds(c, args), args), c, runs)
        if args.structured == "on":  # on the same server, its peers idle
            doc |= run_structured(url, args.model, top, args)
        if args.doc_chat == "on":
            doc |= run_doc_chat_suite(url, args, vllm)
        if peer is not None:
            doc["peer"] = {"server": PEER_SERVER, "dtype": "float32", "concurrent": runs["peer"]}
        if twin is not None:
            twin_runs = runs["peer_same_dtype"]
            doc["peer_same_dtype"] = {"server": PEER_SERVER, "dtype": doc["dtype"], "concurrent": twin_runs}
    return doc


Server = tuple[str, str]  # a started server's URL and served model name


def _contenders(model: str, c: int, top: int, url: str, plain: str | None, peer: Server | None,
                twin: Server | None, vllm: Server | None = None) -> list[Contender]:  # fmt: skip
    """Who runs at concurrency `c`: ctxsteer (steered at the top), unsteered at the top, without
    speculation on one stream, and the peers that started (with plain vLLM: ctxsteer steered at every
    concurrency, for the vs_vllm keys)."""
    contenders = [Contender("ctxsteer", url, model, steered=c == top)]
    if vllm is not None:
        contenders.append(Contender("vllm", vllm[0], vllm[1], steered=False))
        if c != top:
            contenders.append(Contender("steered", url, model, steered=True))
    if c == top and top > 1:
        contenders.append(Contender("unsteered", url, model, steered=False))
    if c == 1 and plain:
        contenders.append(Contender("no_speculation", plain, model, steered=False))
    if peer is not None:
        contenders.append(Contender("peer", peer[0], peer[1], steered=False))
    if twin is not None:
        contenders.append(Contender("peer_same_dtype", twin[0], twin[1], steered=False))
    return contenders


def _record_round(doc: dict, res: dict[str, dict], c: int, runs: dict[str, list[dict]]) -> None:
    """Into `doc`: ctxsteer's run at concurrency `c` and its ratios (with per-round range) to the others."""
    doc["concurrent"].append(res["ctxsteer"])
    if "unsteered" in res:
        doc["unsteered_at_top"] = res["unsteered"]
        doc["steered_throughput_ratio_range"] = ratio_range(res["ctxsteer"], res["unsteered"])
    if "no_speculation" in res:
        doc["single_no_speculation"] = res["no_speculation"]
    if "peer" in res:
        runs["peer"].append(res["peer"])
        doc[f"vs_transformers_serve_{c}_range"] = ratio_range(res["ctxsteer"], res["peer"])
        if "no_speculation" in res:
            plain = ratio_range(res["no_speculation"], res["peer"])
            doc["vs_transformers_serve_1_no_speculation_range"] = plain
    if "peer_same_dtype" in res:
        runs["peer_same_dtype"].append(res["peer_same_dtype"])
        same = ratio_range(res["ctxsteer"], res["peer_same_dtype"])
        doc[f"vs_transformers_serve_{c}_same_dtype_range"] = same
    if "vllm" in res:  # ctxsteer steered with mixed strengths vs plain vLLM unsteered
        vs = ratio_range(res.get("steered", res["ctxsteer"]), res["vllm"])
        doc[f"vs_vllm_{c}"], doc[f"vs_vllm_{c}_range"] = vs["median"], vs
        doc.setdefault("plain_vllm_peer", {"server": PLAIN_VLLM, "concurrent": []})["concurrent"].append(
            res["vllm"]
        )


def _start_vllm(stack: ExitStack, args: argparse.Namespace, top: int, doc: dict) -> tuple[str, str] | None:
    """Plain vLLM in ctxsteer's dtype (--vllm-peer on, or auto where a vLLM environment exists)."""
    from ctxsteer.server.engine.loader import LoadError

    if args.vllm_peer == "off":
        return None
    try:
        return stack.enter_context(plain_vllm(args, top, doc.get("dtype")))
    except (LoadError, RuntimeError, OSError, CalledProcessError) as e:
        if args.vllm_peer == "on":
            raise
        doc["plain_vllm_peer"] = {"error": str(e)[:300]}
        return None


def run_plain_vllm(args: argparse.Namespace, top: int) -> dict:
    """`vllm serve` on the directory ctxsteer's vLLM backend loads (no plugin effect: nothing steered)."""
    with plain_vllm(args, top) as (url, model):
        out = run_suite(url, model, args, peer=True)
    return out | {"server": "vllm serve (unsteered)"}


def run_vllm_comparison(args: argparse.Namespace, top: int) -> dict:
    """ctxsteer --engine vllm (steered and unsteered), then the local engine, then plain `vllm serve`,
    one after the other on the same model, dtype and prompts (the machine runs one server at a time)."""
    args.dtype = args.dtype or "float32"
    from ctxsteer.server.engine.vllm.cpu_env import apply_cpu_defaults

    apply_cpu_defaults(os.environ)  # both vLLM servers under the same CPU settings
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    doc = run_ctxsteer(args, top, "--engine", "vllm", label="ctxsteer --engine vllm")
    doc["engine"] = "vllm"
    doc["local"] = run_ctxsteer(args, top, label="ctxsteer (local engine)")
    doc["plain_vllm"] = run_plain_vllm(args, top)
    return doc
