"""Structured outputs in `ctxsteer bench server`: what a JSON schema costs.

- `structured_throughput_ratio`: aggregate tok/s of concurrent streams constrained by a realistic
  extraction schema (response_format json_schema) over the very same requests unconstrained (same prompts,
  same max_tokens, greedy), side by side on one server in rotating rounds, with its per-round range. The
  load is sustained, as vLLM's `--max-concurrency`: each of the N streams sends its next request as soon
  as its previous one ends (`REQUESTS_PER_STREAM` a round), so the batch stays full; in waves of N that
  wait for the slowest, the constrained answers (shorter: they stop when the JSON is complete) would leave
  the batch half empty and the ratio would measure that, not the grammar;
- `grammar_compile_ms_*`: in-process, what a new schema costs before its first token: the grammar built
  and validated (`to_llguidance`, its cache cleared before each run) plus the matcher created against the
  served model's vocabulary table, as the local engine does for a new row.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx

from ctxsteer.server.bench.load import Contender, one_stream, ratio_range, side_by_side

STRUCTURED_MAX_TOKENS = 128  # above what the bounded extraction answer takes; the free answers are cut here
REQUESTS_PER_STREAM = 4  # a round's requests per stream (default of --structured-requests)
REQUESTS_HELP = (
    "requests per stream in each structured round: every stream sends its next one as soon as its previous "
    f"one ends (sustained load, as vLLM's --max-concurrency; default {REQUESTS_PER_STREAM})"
)

EXTRACTION_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "organization": {"type": "string", "maxLength": 40},
        "location": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "category": {"enum": ["finance", "logistics", "personnel", "safety", "other"]},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
    },
    "required": ["title", "organization", "location", "year", "category", "keywords"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "extraction", "schema": EXTRACTION_SCHEMA}}

DOCUMENTS = (
    "In March 2024 the Harbour Board of Tromso found that ice deliveries to the fishing cooperatives fell "
    "short by 40 tonnes; the clerk traced the gap to a miscounted shipment from the northern depot.",
    "The city council of Leeds approved a new budget in 2019 that moved two million pounds from road "
    "repairs to the public libraries, after a year of protests by parents and teachers.",
    "Nordvik Shipping opened a second warehouse in Rotterdam in 2021 to cut the time containers wait at "
    "the port; trucks now leave every forty minutes instead of every two hours.",
    "After a fire drill in 2022 showed that two exits were blocked, the safety office of Brightwater "
    "Hospital in Denver replaced the signs on every floor and trained 300 nurses.",
    "In 2020 the human resources team of Alder Bank in Zurich hired twelve analysts and introduced a "
    "mentoring scheme that pairs each newcomer with a senior colleague for six months.",
    "The Kenyan tea cooperative Mlima Growers reported in 2023 that exports to Egypt doubled, while prices "
    "at the Mombasa auction dropped by eight percent over the same year.",
    "A 2018 audit of the Lisbon metro found that the ticket machines had lost 90,000 euros in rounding "
    "errors; the operator, Metro Lisboa, refunded the riders the following spring.",
    "Greenfield Farms of Iowa switched its grain dryers to biogas in 2025, cutting its fuel bill by a "
    "third and its emissions by half, according to the company's annual report.",
)


def extraction_messages(prompt_tokens: int, i: int) -> list[dict]:
    """A short document (prompt_tokens is not used: the documents are short) and the request for its JSON."""
    fields = ", ".join(EXTRACTION_SCHEMA["properties"])
    return [
        {
            "role": "user",
            "content": f"Document:\n{DOCUMENTS[i % len(DOCUMENTS)]}\n\nExtract the facts of this document as "
            f"a JSON object with the fields {fields}. The category is one of finance, logistics, personnel, "
            "safety or other; keywords are at most 4 short words. Answer with the JSON only.",
        }
    ]


def structured_ratios(constrained: dict, free: dict) -> dict:
    """`structured_throughput_ratio` (aggregate tok/s constrained / free over all rounds) and its range
    from the per-round pairs."""
    return {
        "structured_throughput_ratio": constrained["aggregate_tok_s"] / free["aggregate_tok_s"],
        "structured_throughput_ratio_range": ratio_range(constrained, free),
    }


def check_sample(url: str, model: str) -> dict:
    """One constrained answer, not streamed: it must parse and keep to the schema's fields (a warm-up of
    the grammar path too). Returns the parsed answer."""
    body = {"model": model, "messages": extraction_messages(0, 0), "max_tokens": STRUCTURED_MAX_TOKENS,
            "temperature": 0, "response_format": RESPONSE_FORMAT}  # fmt: skip
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    answer = json.loads(choice["message"]["content"])
    if choice["finish_reason"] == "stop" and set(answer) != set(EXTRACTION_SCHEMA["required"]):
        raise RuntimeError(f"the constrained answer does not keep to the schema: {answer}")
    return answer


def warm_prompts(url: str, model: str) -> None:
    """Each distinct prompt once, one token each: with the server's prefix cache both kinds of request
    then find them cached alike, rather than round 0's first contender paying the cold prefills."""

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            prompts = [extraction_messages(0, i) for i in range(len(DOCUMENTS))]
            await asyncio.gather(*(one_stream(client, model, msgs, 1, None) for msgs in prompts))

    asyncio.run(main())


def run_structured(url: str, model: str, concurrency: int, args: argparse.Namespace) -> dict:
    """Constrained vs free at `concurrency` sustained streams on one server, `args.rounds` rotating rounds
    of `args.structured_requests` requests per stream."""
    per_stream = getattr(args, "structured_requests", REQUESTS_PER_STREAM)
    print(
        f"structured outputs: json_schema vs free, {concurrency} sustained streams, {args.rounds} rounds of "
        f"{per_stream} requests per stream",
        flush=True,
    )
    sample = check_sample(url, model)
    warm_prompts(url, model)
    common = {"messages": extraction_messages, "max_tokens": STRUCTURED_MAX_TOKENS}
    contenders = [
        Contender("structured", url, model, False, extra={"response_format": RESPONSE_FORMAT}, **common),
        Contender("free", url, model, False, **common),
    ]
    res = side_by_side(contenders, concurrency, args.rounds, args, sustained=per_stream)
    out = {"structured": res["structured"], "structured_free": res["free"], "structured_sample": sample}
    out |= {"structured_max_tokens": STRUCTURED_MAX_TOKENS, "structured_schema": EXTRACTION_SCHEMA}
    out |= {"structured_load": f"sustained: {concurrency} streams x {per_stream} requests a round"}
    return out | structured_ratios(res["structured"], res["free"])
