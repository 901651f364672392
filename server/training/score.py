"""`ctxsteer score DATA.jsonl --out scored.jsonl`: each chat example's user attention ratio (how much its
response's tokens attend to the user's messages), the paper's context-dependency score.

Input: one JSON object per line with `messages` (OpenAI chat format) whose last message is the assistant
response to score; other fields are kept. The conversation is rendered with the model's chat template
(no generation prompt); the ratio is measured in one forward (`steering.reliance`): attention mass of the
response's tokens on the user messages' content tokens, averaged over heads, response tokens and layers.

Output: the input lines plus `index` and `user_attention_ratio` (null with `skipped` when an example cannot
be scored), appended as they are scored, so an interrupted run resumes where it stopped. At the end every
line gets `context_dependent` (ratio above the threshold), and `OUT.summary.json` (percentiles, threshold
and how it was chosen) and `OUT.hist.png` are written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

PERCENTILES = (5, 10, 25, 50, 75, 90, 95)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: not JSON: {e}") from None
    return rows


def done_indices(out: Path) -> dict[int, dict[str, Any]]:
    """Lines already scored by an earlier run (a torn last line is dropped and scored again)."""
    if not out.exists():
        return {}
    done = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("index"), int):
            done[row["index"]] = row
    return done


Item = tuple[list[int], list[int], tuple[int, int]]  # token ids, user-content positions, response range


def prepare(tokenizer: Any, example: dict[str, Any], max_len: int) -> Item | str:
    """(token ids, user-content token positions, response token range) or why it cannot be scored."""
    from ctxsteer.steering.spans import render_chat
    from ctxsteer.steering.spec import SteeringError

    msgs = example.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs):
        return "needs `messages`: a list of at least two chat messages"
    if msgs[-1].get("role") != "assistant":
        return "the last message must be the assistant response to score"
    try:
        rendered = render_chat(tokenizer, msgs, add_generation_prompt=False)
    except (SteeringError, ValueError) as e:
        return f"cannot render: {e}"
    if len(rendered.ids) > max_len:
        return f"{len(rendered.ids)} tokens, more than the model's {max_len}"
    response = rendered.message_spans[-1]
    user = [j for m, (s, e) in zip(msgs, rendered.message_spans, strict=True) if m.get("role") == "user"
            for j in range(s, e)]  # fmt: skip
    if response[1] <= response[0]:
        return "empty response"
    if not user:
        return "no user content"
    return rendered.ids, user, response


def score_batch(model: Any, items: list[Item]) -> list[float]:
    import torch

    from ctxsteer.steering.generate import left_pad
    from ctxsteer.steering.reliance import attention_ratio

    ids, mask = left_pad([it[0] for it in items], pad_id=0)
    width = ids.shape[1]
    key_mask = torch.zeros(len(items), width)
    query_mask = torch.zeros(len(items), width)
    for b, (toks, user, (s, e)) in enumerate(items):
        off = width - len(toks)
        key_mask[b, [off + j for j in user]] = 1.0
        query_mask[b, off + s : off + e] = 1.0
    device = next(model.parameters()).device
    ratios = attention_ratio(
        model, ids.to(device), mask.to(device), key_mask.to(device), query_mask.to(device)
    )
    return [float(r) for r in ratios.cpu()]


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    ratios = [r["user_attention_ratio"] for r in rows if r.get("user_attention_ratio") is not None]
    if not ratios:
        raise SystemExit("no example could be scored")
    if args.threshold is not None:
        threshold, how = args.threshold, f"fixed: {args.threshold}"
    else:
        threshold, how = percentile(ratios, args.percentile), f"percentile {args.percentile:g} of the scores"
    return {
        "examples": len(rows),
        "scored": len(ratios),
        "skipped": len(rows) - len(ratios),
        "mean": sum(ratios) / len(ratios),
        "percentiles": {f"p{p}": percentile(ratios, p) for p in PERCENTILES},
        "threshold": threshold,
        "threshold_rule": how,
        "context_dependent": sum(r > threshold for r in ratios),
        "model": args.model or "default",
    }


def histogram(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [r["user_attention_ratio"] for r in rows if r.get("user_attention_ratio") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(ratios, bins=min(50, max(5, len(ratios) // 4)), color="#4c72b0")
    ax.axvline(
        summary["threshold"], color="#c44e52", linestyle="--", label=f"threshold {summary['threshold']:.3f}"
    )
    ax.set_xlabel("user attention ratio")
    ax.set_ylabel("examples")
    ax.set_title(f"{summary['scored']} examples, {summary['context_dependent']} context-dependent")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, checked: a bad value exits 2 with argparse's usage line before any model is loaded."""
    ap = argparse.ArgumentParser(
        prog="ctxsteer score",
        description="Score chat examples by how much their responses attend to the user's messages.",
        epilog="example: ctxsteer score data.jsonl --out scored.jsonl --percentile 50",
    )
    ap.add_argument("data", type=Path, help="chat-format JSONL; each line's last message is the response")
    ap.add_argument("--out", type=Path, required=True, help="scored JSONL (appended to: reruns resume)")
    ap.add_argument("--model", default=None, help="HF id, directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", help="float32 (default) keeps the scores comparable")
    pick = ap.add_mutually_exclusive_group()
    pick.add_argument("--threshold", type=float, help="examples above this ratio are context-dependent")
    pick.add_argument(
        "--percentile", type=float, default=50.0, help="threshold = this percentile (default 50)"
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or not 0 <= args.percentile <= 100:
        ap.error("--batch-size must be >= 1 and --percentile in [0, 100]")
    return args


def _score_pending(
    args: argparse.Namespace,
    examples: list[dict[str, Any]],
    pending: list[int],
    done: dict[int, dict[str, Any]],
) -> None:
    """Score the examples not in `done` yet, appending each batch's lines to --out as soon as it is
    scored (so an interrupted run loses at most one batch) and adding them to `done`."""
    from tqdm.auto import tqdm

    from ctxsteer.server.engine.loader import load_model
    from ctxsteer.steering.attention import ATTN_NAME, register

    register()
    model, tokenizer, info = load_model(args.model, device=args.device, dtype=args.dtype,
                                        attn_implementation=ATTN_NAME)  # fmt: skip
    bar = tqdm(total=len(pending), desc="scoring", unit="ex", disable=args.no_progress, file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prepared = {i: prepare(tokenizer, examples[i], info.max_model_len) for i in pending}
    # Batches of similar length pad little (rows are put back in file order at the end).
    pending = sorted(pending, key=lambda i: 0 if isinstance(prepared[i], str) else len(prepared[i][0]))
    with args.out.open("a", encoding="utf-8") as out:
        for start in range(0, len(pending), args.batch_size):
            chunk = pending[start : start + args.batch_size]
            ok = [i for i in chunk if not isinstance(prepared[i], str)]
            ratios = dict(zip(ok, score_batch(model, [prepared[i] for i in ok]), strict=True)) if ok else {}
            for i in chunk:
                row = {**examples[i], "index": i, "user_attention_ratio": ratios.get(i)}
                if isinstance(prepared[i], str):
                    row["skipped"] = prepared[i]
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[i] = row
            out.flush()
            bar.update(len(chunk))
    bar.close()


def _write_results(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    """Rewrite --out in file order with `context_dependent` (atomically: a crash leaves the resumable
    file), then OUT.summary.json and OUT.hist.png beside it."""
    threshold = summary["threshold"]
    for row in rows:
        ratio = row.get("user_attention_ratio")
        row["context_dependent"] = None if ratio is None else ratio > threshold
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    base = str(out.with_suffix(""))
    Path(base + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    histogram(rows, summary, Path(base + ".hist.png"))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    examples = read_jsonl(args.data)
    done = done_indices(args.out)
    pending = [i for i in range(len(examples)) if i not in done]
    if pending:
        _score_pending(args, examples, pending, done)
    rows = [done[i] for i in range(len(examples))]
    summary = summarize(rows, args)
    _write_results(rows, summary, args.out)
    threshold = summary["threshold"]
    pct = ", ".join(f"{k} {v:.3f}" for k, v in summary["percentiles"].items())
    print(f"{summary['scored']} scored, {summary['skipped']} skipped; {pct}; threshold {threshold:.3f} "
          f"({summary['threshold_rule']}): {summary['context_dependent']} context-dependent")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
