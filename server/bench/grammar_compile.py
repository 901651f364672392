"""`grammar_compile_ms_*` of `ctxsteer bench server`: what a new JSON schema costs before its first token,
in-process (CPU work, no HTTP): the grammar built and validated (`to_llguidance`, its LRU cache cleared
before every run so each schema is a first compile) plus the `LLMatcher` created against the served
model's vocabulary table, as the local engine does for each new constrained row."""

from __future__ import annotations

import json
import math
import statistics
import time
from typing import Any

import llguidance

from ctxsteer.server.bench.structured import EXTRACTION_SCHEMA
from ctxsteer.server.engine.grammar import _compiled, to_llguidance
from ctxsteer.server.engine.request import Grammar


def _obj(required: list[str] | None = None, **props: Any) -> dict:
    return {"type": "object", "properties": props, "required": required or list(props),
            "additionalProperties": False}  # fmt: skip


_S = {"type": "string"}
_DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}

SCHEMAS: tuple[dict, ...] = (  # ten schemas of the kinds applications send
    EXTRACTION_SCHEMA,
    _obj(
        name={"type": "string", "maxLength": 60},
        email={"type": "string", "format": "email"},
        phone={"type": "string", "pattern": r"^\+?[0-9 ()-]{7,20}$"},
        company=_S,
    ),
    _obj(
        invoice_number=_S,
        date=_DATE,
        currency={"enum": ["EUR", "USD", "GBP", "CHF"]},
        lines={
            "type": "array",
            "maxItems": 20,
            "items": _obj(
                description=_S,
                quantity={"type": "integer", "minimum": 1},
                unit_price={"type": "number", "minimum": 0},
            ),
        },
        total={"type": "number"},
    ),
    _obj(
        ["title", "start"],
        title={"type": "string", "maxLength": 80},
        start={"type": "string", "format": "date-time"},
        duration_minutes={"type": "integer", "minimum": 5, "maximum": 480},
        attendees={"type": "array", "items": {"type": "string", "format": "email"}},
    ),
    _obj(
        label={"enum": ["positive", "negative", "neutral", "mixed"]},
        confidence={"type": "number", "minimum": 0, "maximum": 1},
        reason={"type": "string", "maxLength": 200},
    ),
    _obj(
        ["location"],
        location={"type": "string", "description": "city and country"},
        unit={"enum": ["celsius", "fahrenheit"]},
        days={"type": "integer", "minimum": 1, "maximum": 14},
    ),
    _obj(
        name=_S,
        servings={"type": "integer"},
        ingredients={"type": "array", "items": _obj(item=_S, amount=_S)},
        steps={"type": "array", "items": _S, "minItems": 1},
    ),
    _obj(
        ["priority", "summary"],
        priority={"enum": ["low", "medium", "high", "urgent"]},
        summary={"type": "string", "maxLength": 120},
        component={"type": ["string", "null"]},
        tags={"type": "array", "items": _S, "maxItems": 5},
    ),
    {
        "type": "object",
        "$defs": {
            "address": _obj(
                street=_S,
                city=_S,
                postcode={"type": "string", "pattern": r"^[0-9A-Z -]{3,10}$"},
                country={"type": "string", "minLength": 2, "maxLength": 2},
            )
        },
        "properties": {
            "customer": _S,
            "billing": {"$ref": "#/$defs/address"},
            "shipping": {"anyOf": [{"$ref": "#/$defs/address"}, {"type": "null"}]},
        },
        "required": ["customer", "billing", "shipping"],
        "additionalProperties": False,
    },
    _obj(
        answer={"type": "string"},
        citations={
            "type": "array",
            "maxItems": 3,
            "items": _obj(
                source={"type": "string", "format": "uri"}, quote={"type": "string", "maxLength": 300}
            ),
        },
        follow_up={"type": "boolean"},
    ),
)


def served_table(source: str | None = None) -> tuple[llguidance.LLTokenizer, float]:
    """The served model's vocabulary as llguidance sees it (the engine builds it once at start) and the
    milliseconds that took (the tokenizer's own loading not counted)."""
    import llguidance.hf

    from ctxsteer.server.engine.loader import prepare_checkpoint

    _, tokenizer, config = prepare_checkpoint(source)
    text = config.get_text_config()
    eos = {tokenizer.eos_token_id} if isinstance(tokenizer.eos_token_id, int) else set()
    eos |= {text.eos_token_id} if isinstance(text.eos_token_id, int) else set(text.eos_token_id or ())
    t0 = time.perf_counter()
    table = llguidance.hf.from_tokenizer(tokenizer, int(text.vocab_size or len(tokenizer)), sorted(eos))
    return table, (time.perf_counter() - t0) * 1000


def compile_times_ms(schemas: tuple[dict, ...] | list[dict], table: llguidance.LLTokenizer,
                     runs: int = 5) -> list[tuple[float, float, float]]:  # fmt: skip
    """(grammar built and validated, matcher created, its first token mask) in ms for every schema in
    every run; the grammar cache is cleared before each run, so every compile is a first one. llguidance
    compiles lazily: part of the work lands in the first mask, reported apart (it is a decode step's)."""
    out: list[tuple[float, float, float]] = []
    for _ in range(runs):
        _compiled.cache_clear()
        for schema in schemas:
            grammar = Grammar("json_schema", json.dumps(schema))
            t0 = time.perf_counter()
            text = to_llguidance(grammar)
            t1 = time.perf_counter()
            matcher = llguidance.LLMatcher(table, text)
            t2 = time.perf_counter()
            matcher.compute_bitmask()
            t3 = time.perf_counter()
            if matcher.is_error():
                raise RuntimeError(f"schema {schema} fails against the vocabulary: {matcher.get_error()}")
            out.append(((t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000))
    _compiled.cache_clear()
    return out


def _p90(xs: list[float]) -> float:
    return sorted(xs)[math.ceil(0.9 * len(xs)) - 1]  # nearest rank


def compile_stats(times: list[tuple[float, float, float]]) -> dict:
    """`grammar_compile_ms_p50/_p90/_max` over build + matcher, each part's p50 and the first mask's."""
    total = [b + m for b, m, _ in times]
    return {
        "grammar_compile_ms_p50": statistics.median(total),
        "grammar_compile_ms_p90": _p90(total),
        "grammar_compile_ms_max": max(total),
        "grammar_build_ms_p50": statistics.median(b for b, _, _ in times),
        "grammar_matcher_ms_p50": statistics.median(m for _, m, _ in times),
        "grammar_first_mask_ms_p50": statistics.median(f for _, _, f in times),
        "grammar_compile_samples": len(times),
    }


def grammar_compile_timing(runs: int = 5) -> dict:
    """The compile figures for `SCHEMAS` against the default model's vocabulary."""
    table, table_ms = served_table()
    stats = compile_stats(compile_times_ms(SCHEMAS, table, runs))
    stats |= {"grammar_tokenizer_table_ms": table_ms, "grammar_compile_schemas": len(SCHEMAS)}
    print(
        f"grammar compile ({len(SCHEMAS)} schemas x {runs}): p50 {stats['grammar_compile_ms_p50']:.2f} ms, "
        f"p90 {stats['grammar_compile_ms_p90']:.2f}, max {stats['grammar_compile_ms_max']:.2f} "
        f"(vocabulary table {table_ms:.0f} ms, once)",
        flush=True,
    )
    return stats
