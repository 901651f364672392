"""The document-chat scenario of `ctxsteer bench server`: one long document, then follow-up questions.

Each conversation sends a ~`doc_tokens` document with a first question, then `len(QUESTIONS) - 1` more
questions, every turn resending the whole history as chat clients do (greedy, `max_tokens` per answer,
streamed). What users feel is the time to each turn's first token: the first turn prefills the document,
a follow-up only what is new when the server reuses the document's KV (prefix caching). Every conversation
gets its own document (a numbered header and section order), so no run reuses another run's KV.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import httpx

QUESTIONS = (
    "Which depot caused the shortfall in ice deliveries, according to the document?",
    "How much money did the Lisbon metro lose, and who refunded the riders?",
    "What did Greenfield Farms switch its grain dryers to?",
    "How often do trucks leave the Rotterdam warehouse now?",
    "Which hospital replaced its exit signs, and how many nurses were trained?",
)
_SECTIONS = (
    "In March the harbour board of Tromso found that ice deliveries to the fishing cooperatives fell short "
    "by forty tonnes; the clerk traced the gap to a miscounted shipment from the northern depot.",
    "The city council of Leeds approved a budget that moved two million pounds from road repairs to the "
    "public libraries, after a year of protests by parents and teachers.",
    "Nordvik Shipping opened a second warehouse in Rotterdam to cut the time containers wait at the port; "
    "trucks now leave every forty minutes instead of every two hours.",
    "After a fire drill showed that two exits were blocked, the safety office of Brightwater Hospital in "
    "Denver replaced the signs on every floor and trained three hundred nurses.",
    "The human resources team of Alder Bank in Zurich hired twelve analysts and introduced a mentoring "
    "scheme that pairs each newcomer with a senior colleague for six months.",
    "The Kenyan tea cooperative Mlima Growers reported that exports to Egypt doubled, while prices at the "
    "Mombasa auction dropped by eight percent over the same year.",
    "An audit of the Lisbon metro found that the ticket machines had lost ninety thousand euros in rounding "
    "errors; the operator refunded the riders the following spring.",
    "Greenfield Farms of Iowa switched its grain dryers to biogas, cutting its fuel bill by a third and its "
    "emissions by half, according to the company's annual report.",
)


def document(doc_tokens: int, index: int) -> str:
    """About `doc_tokens` tokens (4 characters per token) of numbered sections, in an order and under a
    header of its own per `index`."""
    parts = [f"Report {index}: minutes and notes collected by the regional office."]
    k, size = 0, len(parts[0])
    while size < doc_tokens * 4:
        section = _SECTIONS[(k * 5 + index) % len(_SECTIONS)]
        parts.append(f"Section {k + 1}. {section}")
        size += len(parts[-1]) + 1
        k += 1
    return "\n".join(parts)


@dataclass
class Turn:
    ttft_s: float
    total_s: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


async def _turn(client: httpx.AsyncClient, body: dict) -> tuple[Turn, str]:
    """One streamed turn: what the client saw, and the answer's text (the next turn's history)."""
    t0 = time.perf_counter()
    turn, text = Turn(float("nan"), float("nan")), []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            turn.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return turn, ""
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if usage := data.get("usage"):
                turn.prompt_tokens = usage["prompt_tokens"]
                turn.cached_tokens = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
            for choice in data.get("choices") or []:
                if piece := (choice.get("delta") or {}).get("content"):
                    if not text:
                        turn.ttft_s = time.perf_counter() - t0
                    text.append(piece)
    turn.total_s = time.perf_counter() - t0
    return turn, "".join(text)


async def conversation(
    client: httpx.AsyncClient, model: str, index: int, doc_tokens: int, max_tokens: int, steering: dict | None
) -> list[Turn]:
    """One document and its questions, each turn sending the whole history."""
    messages: list[dict] = []
    turns = []
    for i, question in enumerate(QUESTIONS):
        content = f"{document(doc_tokens, index)}\n\n{question}" if i == 0 else question
        messages.append({"role": "user", "content": content})
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        if steering is not None:
            body["steering"] = steering
        turn, answer = await _turn(client, body)
        turns.append(turn)
        if turn.error is not None:
            break
        messages.append({"role": "assistant", "content": answer})
    return turns


async def run_conversations(
    url: str,
    model: str,
    first_index: int,
    count: int,
    doc_tokens: int,
    max_tokens: int,
    steering: dict | None,
) -> dict:
    """`count` conversations at once (documents `first_index`...); their turns and timings."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0)) as client:
        t0 = time.perf_counter()
        convs = await asyncio.gather(
            *(
                conversation(client, model, first_index + i, doc_tokens, max_tokens, steering)
                for i in range(count)
            )
        )
        wall = time.perf_counter() - t0
    return summarize(convs, wall)


def summarize(convs: list[list[Turn]], wall_s: float) -> dict:
    errors = [t.error for c in convs for t in c if t.error]
    if errors:
        return {"error": errors[0], "errors": len(errors)}
    first = [c[0].ttft_s for c in convs]
    follow = [t for c in convs for t in c[1:]]
    prompt = sum(t.prompt_tokens for t in follow)
    return {
        "conversations": len(convs),
        "turns": len(convs[0]),
        "wall_s": wall_s,
        "first_ttft_s": statistics.median(first),
        "followup_ttft_s": statistics.median(t.ttft_s for t in follow),
        "followup_ttft_max_s": max(t.ttft_s for t in follow),
        "first_prompt_tokens": convs[0][0].prompt_tokens,
        "followup_cached_share": sum(t.cached_tokens for t in follow) / prompt if prompt else 0.0,
    }


@dataclass(frozen=True, slots=True)
class ChatSide:
    """A server in the document-chat rotation and the steering it is sent."""

    name: str
    url: str
    model: str
    steering: dict | None


DOC_CHAT_STRENGTH = {"strength": 2}  # the scenario: the paper's rule at strength 2


def run_doc_chat(
    sides: list[ChatSide], rounds: int, conversations: int, doc_tokens: int, max_tokens: int
) -> dict[str, list[dict]]:
    """Each side's conversations, round by round in rotating order (as the other side-by-side runs), every
    run on documents of its own."""
    runs: dict[str, list[dict]] = {s.name: [] for s in sides}
    index = 0
    for rnd in range(rounds):
        k = rnd % len(sides)
        for side in sides[k:] + sides[:k]:
            res = asyncio.run(
                run_conversations(
                    side.url, side.model, index, conversations, doc_tokens, max_tokens, side.steering
                )
            )
            index += conversations
            runs[side.name].append(res)
            print(f"  doc chat x{conversations} {side.name}: {_line(res)}", flush=True)
    return runs


def _line(res: dict) -> str:
    if "error" in res:
        return f"error {res['error']}"
    return (
        f"first TTFT {res['first_ttft_s']:.2f}s, follow-up TTFT {res['followup_ttft_s']:.2f}s, "
        f"wall {res['wall_s']:.1f}s, cached {res['followup_cached_share']:.0%}"
    )


def _median_range(values: list[float]) -> tuple[float, list[float]]:
    return statistics.median(values), [min(values), max(values)]


def doc_chat_keys(runs: dict[str, list[dict]], conversations: int, peer: str | None = None) -> dict:
    """The bench keys of one concurrency (`doc_chat_` at 1 conversation, `doc_chat_<n>_` at n): ctxsteer's
    follow-up TTFT over its first-turn TTFT, the cached share, and with `peer` (the plain vLLM side) the
    conversation-time and first-TTFT ratios peer / ctxsteer, each a median over rounds with its range."""
    tag = "doc_chat_" if conversations == 1 else f"doc_chat_{conversations}_"
    ours = runs["ctxsteer"]
    if any("error" in r for rs in runs.values() for r in rs):
        return {tag + "error": next(r["error"] for rs in runs.values() for r in rs if "error" in r)}
    out: dict = {}
    ratio, rng = _median_range([r["followup_ttft_s"] / r["first_ttft_s"] for r in ours])
    out[tag + "followup_ttft_ratio"], out[tag + "followup_ttft_ratio_range"] = ratio, rng
    out[tag + "cached_share"] = statistics.median(r["followup_cached_share"] for r in ours)
    out[tag + "first_prompt_tokens"] = ours[0]["first_prompt_tokens"]
    if peer is not None and peer in runs:
        pairs = list(zip(runs[peer], ours, strict=True))
        ratio, rng = _median_range([p["wall_s"] / o["wall_s"] for p, o in pairs])
        out[tag + "vs_vllm"], out[tag + "vs_vllm_range"] = ratio, rng
        ratio, rng = _median_range([p["first_ttft_s"] / o["first_ttft_s"] for p, o in pairs])
        out[tag + "first_ttft_vs_vllm"], out[tag + "first_ttft_vs_vllm_range"] = ratio, rng
    return out


def add_doc_chat_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--doc-chat",
        choices=("on", "off", "only"),
        default="on",
        help="local engine: the document-chat scenario (a long document, then follow-up questions, every "
        "turn resending the history; steered at strength 2), 1 and 4 conversations at once, beside plain "
        "vLLM when it runs (only: nothing else is measured)",
    )
    ap.add_argument("--doc-tokens", type=int, default=4000, help="document-chat document size (tokens)")
    ap.add_argument("--doc-rounds", type=int, default=3, help="document-chat conversations per side and size")
    ap.add_argument("--doc-answer-tokens", type=int, default=32, help="document-chat max_tokens per answer")
    ap.add_argument(
        "--vllm-peer",
        choices=("auto", "on", "off"),
        default="auto",
        help="local engine: also run plain `vllm serve` (the project's vLLM environment, ctxsteer's dtype) "
        "in the throughput rotation (vs_vllm_<c>) and the document chat (auto: where a vLLM environment "
        "exists)",
    )


def run_doc_chat_suite(url: str, args: argparse.Namespace, vllm: tuple[str, str] | None) -> dict:
    """The document chat at 1 and 4 conversations (each side in rotating rounds), with its bench keys."""
    sides = [ChatSide("ctxsteer", url, args.model, DOC_CHAT_STRENGTH)]
    if vllm is not None:
        sides.append(ChatSide("vllm", vllm[0], vllm[1], None))
    out: dict = {"doc_chat": {}}
    for count in (1, 4):
        runs = run_doc_chat(sides, args.doc_rounds, count, args.doc_tokens, args.doc_answer_tokens)
        out["doc_chat"][str(count)] = runs
        out |= doc_chat_keys(runs, count, peer="vllm" if vllm is not None else None)
    return out
