"""What `--dtype auto` should pick on this CPU: one forward of the embedded SmolLM2 in float32 and bfloat16,
stock torch and oneDNN-prepacked (as served), at the shapes a server runs: a one-row and an 8-row decode
step, 8 rows x 4 tokens (verifying n-gram guesses) and a 290-token prefill (the bench prompt).

    python scripts/dtype_bench.py [--reps 7] [--json docs/bench/dtype.json]

Prints the median ms per forward (min-max over the repetitions) and the CPU's bf16 capability. Run it
on a quiet machine: the variants run one after the other.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from ctxsteer.server.engine.cpu_prepack import native_cpu_bf16, prepack_linears
from ctxsteer.server.engine.loader import load_model, resolve_dtype

SHAPES = [(1, 1), (8, 1), (8, 4), (1, 290)]  # (rows, tokens per row)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def time_forward(model, rows: int, tokens: int, reps: int) -> dict:
    ids = torch.randint(100, 20000, (rows, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids)  # warm-up: oneDNN picks and caches its kernels on first use
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model(ids)
            times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    doc = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "native_bf16": native_cpu_bf16(),
        "auto_picks": str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch."),
        "results": [],
    }
    print(f"{doc['cpu']}, {doc['threads']} threads", flush=True)
    print(f"native bf16: {doc['native_bf16']}, --dtype auto picks {doc['auto_picks']}", flush=True)
    for dtype in ("float32", "bfloat16"):
        model, _, _ = load_model(None, device="cpu", dtype=dtype)
        for packed in (False, True):
            if packed and not prepack_linears(model):
                print(f"{dtype} prepacked: not supported on this CPU")
                continue
            for rows, tokens in SHAPES:
                res = time_forward(model, rows, tokens, args.reps)
                shape = {"dtype": dtype, "prepacked": packed, "rows": rows, "tokens": tokens}
                doc["results"].append(shape | res)
                print(
                    f"{dtype:<9} {'prepacked' if packed else 'stock':<9} {rows} x {tokens:<4} "
                    f"{res['median_ms']:7.1f} ms ({res['min_ms']:.1f}-{res['max_ms']:.1f})",
                    flush=True,
                )
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
