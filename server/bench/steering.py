"""`ctxsteer bench steering`: cost of steering on the fast path vs unsteered, and vs the paper's method.

Measured side by side in one process on the same model, dtype and threads, variants interleaved per
repetition, medians reported:
- unsteered: stock SDPA;
- steered:   ctxsteer attention (fold at prefill, biased mask at decode), strength 2 on the user turn;
- eager:     the paper's code path: eager attention with log(alpha) added to the 4D float attention
             mask by a forward pre-hook on every attention module (prefill only: it is the baseline);
- ratio:     unsteered, measuring the user attention ratio: at prefill over every prompt query (the
             `ctxsteer score` path: one extra value column), at decode the live per-token measure
             (`report.context_attention`: one explicit softmax of the new query per layer).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from ctxsteer.server.engine.loader import load_model
from ctxsteer.steering.attention import ATTN_NAME, STEER_KWARG, register
from ctxsteer.steering.bias import build_steer_batch
from ctxsteer.steering.reliance import MEASURE_KWARG, WATCH_KWARG, AttentionMass, ContextWatch, context_mask
from ctxsteer.steering.rows import SteerRow
from ctxsteer.steering.spans import render_chat, steered_ranges
from ctxsteer.steering.spec import SteeringSpec, strength_to_alpha

STRENGTH = 2.0
EAGER_MAX = 2048
_TEXT = (
    "The committee met on a grey morning to review the harbour accounts. Ledgers from three seasons were "
    "compared line by line, and the clerk noted every discrepancy in a separate book. "
)


class PeakRSS:
    """Samples this process's resident set size in a thread; `peak_mb` is the max seen while active."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self) -> PeakRSS:
        self.peak = self.rss()
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def build_prompt(tokenizer: Any, length: int) -> tuple[list[int], SteerRow]:
    """A chat whose user turn is a document + question, cut so the whole prompt has ~`length` tokens."""
    unit = len(tokenizer(_TEXT, add_special_tokens=False)["input_ids"])
    doc = _TEXT * max(1, length // unit + 2)
    lo, hi = 0, len(doc)
    while lo < hi:  # longest prefix of the document that keeps the prompt within `length` tokens
        mid = (lo + hi + 1) // 2
        msgs = [{"role": "user", "content": doc[:mid] + "\nWhat did the clerk do?"}]
        if len(render_chat(tokenizer, msgs).ids) <= length:
            lo = mid
        else:
            hi = mid - 1
    msgs = [{"role": "user", "content": doc[:lo] + "\nWhat did the clerk do?"}]
    rendered = render_chat(tokenizer, msgs)
    spec = SteeringSpec(alpha=strength_to_alpha(STRENGTH))
    return rendered.ids, SteerRow(spec.alpha, steered_ranges(rendered, msgs, spec))


def _mask_hook(bias: torch.Tensor) -> Callable:
    """The paper's approach: add the steering to the 4D float mask that eager attention receives."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 2:
            raise RuntimeError("unexpected eager attention call signature")
        k = mask.shape[-1]
        kwargs["attention_mask"] = mask + bias[:, None, None, :k].to(mask.dtype)
        return args, kwargs

    return hook


@torch.inference_mode()
def run_once(
    model: Any, ids: torch.Tensor, new_tokens: int, kwargs: Callable[[bool], dict]
) -> tuple[float, float]:
    """Prefill seconds and median decode ms/token of one greedy generation; `kwargs(prefill)` gives the
    forward's extra arguments (made inside the timed region: per-forward state is part of the cost)."""
    cache = DynamicCache()
    t0 = time.perf_counter()
    out = model(input_ids=ids, cache=cache, logits_to_keep=1, **kwargs(True))
    prefill = time.perf_counter() - t0
    steps = []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, cache=cache, **kwargs(False))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - t0)
    return prefill, 1000 * statistics.median(steps) if steps else math.nan


@torch.inference_mode()
def eager_prefill(model: Any, ids: torch.Tensor, bias: torch.Tensor) -> float:
    handles = [
        m.register_forward_pre_hook(_mask_hook(bias), with_kwargs=True)
        for name, m in model.named_modules()
        if name.endswith("self_attn")
    ]
    try:
        t0 = time.perf_counter()
        model(input_ids=ids, cache=DynamicCache(), logits_to_keep=1)
        return time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()


def _variant_kwargs(steer: Any, context: torch.Tensor, prompt_len: int) -> dict[str, Callable[[bool], dict]]:
    """What each variant passes the model (prefill or decode step): nothing, the steering batch, or the
    context-attention measurement."""
    all_queries = torch.ones(1, prompt_len, device=context.device)
    first_row = torch.zeros(1, dtype=torch.long, device=context.device)

    def ratio(prefill: bool) -> dict:
        if prefill:
            return {MEASURE_KWARG: AttentionMass(context[:, :prompt_len], all_queries)}
        return {WATCH_KWARG: ContextWatch(first_row, context)}

    return {"unsteered": lambda prefill: {}, "steered": lambda prefill: {STEER_KWARG: steer}, "ratio": ratio}


def bench_length(model: Any, tokenizer: Any, length: int, new_tokens: int, reps: int, eager: bool) -> dict:
    prompt, row = build_prompt(tokenizer, length)
    ids = torch.tensor([prompt], device=model.device)
    cfg = model.config.get_text_config()
    width = len(prompt) + new_tokens + 1
    steer = build_steer_batch(
        [row],
        [len(prompt)],
        width=width,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        device=model.device,
    )
    kwargs_of = _variant_kwargs(steer, context_mask([row], width, model.device), len(prompt))
    samples: dict[str, list] = {"unsteered": [], "steered": [], "ratio": [], "eager": []}
    rss = {"unsteered": 0.0, "steered": 0.0, "ratio": 0.0}
    for rep in range(reps + 1):  # rep 0 warms up kernels and allocator, and is dropped
        for variant in ("unsteered", "steered", "ratio"):
            model.set_attn_implementation("sdpa" if variant == "unsteered" else ATTN_NAME)
            kwargs = kwargs_of[variant]
            with PeakRSS() as peak:
                result = run_once(model, ids, new_tokens, kwargs)
            rss[variant] = max(rss[variant], peak.peak_mb)
            if rep:
                samples[variant].append(result)
        if eager and rep:
            model.set_attn_implementation("eager")
            samples["eager"].append(eager_prefill(model, ids, steer.key_bias))
    model.set_attn_implementation(ATTN_NAME)
    med = {k: statistics.median(p for p, _ in v) for k, v in samples.items() if k != "eager"}
    dec = {k: statistics.median(d for _, d in v) for k, v in samples.items() if k != "eager"}
    return {
        "length": len(prompt),
        "prefill_s_unsteered": med["unsteered"],
        "prefill_s_steered": med["steered"],
        "decode_ms_unsteered": dec["unsteered"],
        "decode_ms_steered": dec["steered"],
        "prefill_ratio": med["steered"] / med["unsteered"],
        "decode_ratio": dec["steered"] / dec["unsteered"],
        "ratio_prefill_ratio": med["ratio"] / med["unsteered"],
        "ratio_decode_ratio": dec["ratio"] / dec["unsteered"],
        "eager_prefill_ratio": statistics.median(samples["eager"]) / med["steered"] if eager else None,
        "prefill_s_eager": statistics.median(samples["eager"]) if eager else None,
        "peak_rss_mb_steered": round(rss["steered"], 1),
        "peak_rss_mb_unsteered": round(rss["unsteered"], 1),
        "steered_tokens": row.steered_count(len(prompt)),
    }


def long_prompt_keys(results: list[dict]) -> dict:
    """`steered_prefill_ratio_4k`, `_8k`: steered / unsteered prefill of the long prompts users meet, in
    the served dtype (goal <= 1.05 each)."""
    return {f"steered_prefill_ratio_{round(r['length'] / 1000)}k": r["prefill_ratio"] for r in results
            if r["length"] >= 3500}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ctxsteer bench steering", description=__doc__.split("\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write results as JSON here")
    ap.add_argument("--model", default=None, help="model (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument(
        "--lengths", default="512,2000,4000,8000", help="prompt lengths in tokens, comma-separated"
    )
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (median)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager (paper) baseline")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register()
    model, tokenizer, info = load_model(
        args.model, device=args.device, dtype=args.dtype, attn_implementation=ATTN_NAME
    )
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    results = []
    header = (
        f"{'length':>7} {'prefill x':>9} {'decode x':>8} {'eager/fast':>10} {'prefill s':>9} {'decode ms':>9}"
        f" {'ratio prefill x':>15} {'ratio decode x':>14}"
    )
    print(f"device={info.device} dtype={info.dtype} threads={torch.get_num_threads()} model={info.source}")
    print(header)
    for length in lengths:
        # the eager baseline materialises a [heads, L, L] float mask per layer: only up to EAGER_MAX tokens
        eager = not args.no_eager and length <= EAGER_MAX
        r = bench_length(model, tokenizer, length, args.new_tokens, args.reps, eager)
        results.append(r)
        eager = f"{r['eager_prefill_ratio']:.2f}" if r["eager_prefill_ratio"] is not None else "-"
        print(
            f"{r['length']:>7} {r['prefill_ratio']:>9.3f} {r['decode_ratio']:>8.3f} {eager:>10} "
            f"{r['prefill_s_steered']:>9.3f} {r['decode_ms_steered']:>9.1f} "
            f"{r['ratio_prefill_ratio']:>15.3f} {r['ratio_decode_ratio']:>14.3f}",
            flush=True,
        )
    doc = {
        "device": info.device,
        "dtype": info.dtype,
        "threads": torch.get_num_threads(),
        "model": info.source,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        # the cost of measuring the user attention ratio vs unsteered, worst over the lengths (goal <= 1.10)
        "ratio_prefill_ratio": max(r["ratio_prefill_ratio"] for r in results),
        "ratio_decode_ratio": max(r["ratio_decode_ratio"] for r in results),
        "results": results,
    }
    doc |= long_prompt_keys(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
