"""The bounds server/engine/grammar.py puts on what a grammar may make llguidance do (in process; the
served 400s, and the deep schemas that used to kill the server, are in tests/test_structured_http.py)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from structured_data import ref_chain

from ctxsteer.server.engine.grammar import (
    MAX_LARK_RULES,
    MAX_SCHEMA_DEPTH,
    GrammarError,
    check_grammar,
    to_llguidance,
)
from ctxsteer.server.engine.request import Grammar


def schema(s: dict[str, Any]) -> Grammar:
    return Grammar("json_schema", json.dumps(s))


def test_depth_counts_every_ref_followed_up_to_the_bound() -> None:
    assert 3 * 41 + 3 <= MAX_SCHEMA_DEPTH < 3 * 42 + 3
    to_llguidance(schema(ref_chain(41)))
    with pytest.raises(GrammarError, match=f"deeper than {MAX_SCHEMA_DEPTH}") as e:
        to_llguidance(schema(ref_chain(42)))
    assert e.value.param == "response_format"
    reversed_refs = ref_chain(1500)  # entered at its far end first: the chain is still measured whole
    reversed_refs["anyOf"] = [{"$ref": f"#/$defs/d{i}"} for i in reversed(range(1500))]
    with pytest.raises(GrammarError, match="deeper than"):
        to_llguidance(schema(reversed_refs))


def test_recursive_and_shared_schemas_are_not_deep() -> None:
    """A `$ref` back into an enclosing node (a tree) compiles lazily; a DAG with 2^40 paths is measured
    once per node."""
    node = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
    to_llguidance(schema({"$defs": {"node": node}, "$ref": "#/$defs/node"}))
    to_llguidance(schema({"type": "object", "properties": {"next": {"$ref": "#"}}}))
    both = {f"d{i}": {"type": "object", "properties": {k: {"$ref": f"#/$defs/d{i + 1}"} for k in "ab"}}
            for i in range(40)}  # fmt: skip
    start = time.perf_counter()
    to_llguidance(schema({"$defs": {**both, "d40": {"type": "integer"}}, "$ref": "#/$defs/d0"}))
    assert time.perf_counter() - start < 2


def test_lark_rules_and_its_json_are_bounded() -> None:
    def chain(n: int) -> str:  # n + 2 definitions
        return "start: r0\n" + "".join(f'r{i}: "x" r{i + 1}\n' for i in range(n)) + f'r{n}: "y"\n'

    to_llguidance(Grammar("grammar", chain(MAX_LARK_RULES - 2), "structured_outputs"))
    with pytest.raises(GrammarError, match=f"{MAX_LARK_RULES + 1} rules and terminals") as e:
        to_llguidance(Grammar("grammar", chain(MAX_LARK_RULES - 1), "structured_outputs"))
    assert e.value.param == "structured_outputs"
    with pytest.raises(GrammarError, match="deeper than"):
        to_llguidance(Grammar("grammar", "start: %json " + json.dumps(ref_chain(42)), "structured_outputs"))
    with pytest.raises(GrammarError, match="deeper than"):  # JSON text nested past what Python parses
        to_llguidance(Grammar("json_schema", "[" * 100_000 + "]" * 100_000, "structured_outputs"))


def test_a_compile_out_of_time_is_refused_and_remembered() -> None:
    """~50 ms of compile against a 1 ms budget: refused; refused again under that budget once the grammar
    is compiled and cached (remembered, not recompiled), while the default budget accepts it."""
    grammar = schema({"enum": [f"{uuid.uuid4().hex}-{i}" for i in range(20_000)]})
    with pytest.raises(GrammarError, match="longer than 0.001 s") as e:
        check_grammar(grammar, timeout_s=0.001)
    assert e.value.param == "response_format"
    text = to_llguidance(grammar)  # compiled and cached now
    with pytest.raises(GrammarError, match="longer than 0.001 s"):
        check_grammar(grammar, timeout_s=0.001)
    assert check_grammar(grammar) == text
