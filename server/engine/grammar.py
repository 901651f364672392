"""Structured outputs, the shared part: a request's `Grammar` as an llguidance grammar, validated.

llguidance (the Rust library vLLM also ships; no dependencies, torch-free) was chosen over xgrammar for
the local engine because it compiles lazily (no up-front automaton: a new JSON schema costs a fraction of
a millisecond, so no compilation cache or thread is needed to keep the engine responsive, and its parser
limits bound every step), installs as one small wheel (xgrammar pulls triton, about 1 GB, into the venv)
and imports without torch, so the HTTP side validates a schema before any engine sees it. Measured on
SmolLM2's 49k-token vocabulary: tokenizer table 0.3 s once, a matcher 0.3 ms, a token mask ~0.1 ms.

Bounds (docs/structured-outputs.md, "Bounds"): what a request may make the compiler do is bounded before
any engine sees it, each excess a GrammarError (the 400 `invalid_grammar` naming the field).
- Nesting: llguidance compiles a JSON schema, and the rules of a Lark grammar, by recursion, one native
  stack frame per level; a `$ref` chain a few thousand levels deep (a 100 kB body; the body's own JSON
  nesting is capped at 64 levels, `$ref`s are not) overflows the stack and kills the server process. So a
  schema may nest at most MAX_SCHEMA_DEPTH levels counting every `$ref` followed, and a Lark grammar may
  define at most MAX_LARK_RULES rules and terminals (its `%json` schemas count as schemas).
- Size: PARSER_LIMITS, llguidance's limits spelled out (its defaults), checked while validating.
- Time: `check_grammar` waits at most COMPILE_TIMEOUT_S for the validation (a schema under the 4 MiB body
  limit can take seconds: a 150k-way alternation, thousands of `format`ted strings). The compile goes on in
  its own thread until llguidance's limits stop it, and the same grammar is refused at once next time.
  The local engine builds each row's matcher from the same grammar, at about the validation's cost.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

import llguidance

from ctxsteer.server.engine.request import Grammar

MAX_SCHEMA_DEPTH = 128  # JSON levels, `$ref`s followed; real schemas nest < 30, a crash needs > 1000
MAX_LARK_RULES = 500  # rule + terminal definitions; a chain of ~2000 rules overflows the stack
COMPILE_TIMEOUT_S = 1.0  # real schemas compile in about a millisecond (grammar_compile_ms_p50 0.61)
PARSER_LIMITS = llguidance.LLParserLimits(
    max_items_in_row=2000,  # branching of one grammar row
    initial_lexer_fuel=1_000_000,  # building the lexer's regexes (~50k/ms)
    step_lexer_fuel=200_000,  # one token mask's lexer work (~14k/ms)
    step_max_items=50_000,  # Earley items in one token mask (~20k/ms)
    max_lexer_states=250_000,  # ~1-2 kB each
    max_grammar_size=500_000,  # symbols in the grammar's productions
)
_LARK_DEFINITION = re.compile(r"^[ \t]*[?!]?[A-Za-z_]\w*(?:\.-?\d+)?[ \t]*:", re.MULTILINE)
_LARK_JSON = re.compile(r"%json\s*")
_TOO_SLOW_KEPT = 256  # grammars remembered as out of time (by content), refused without a new compile
_too_slow: OrderedDict[tuple[str, str], float] = OrderedDict()
_too_slow_lock = threading.Lock()


class GrammarError(ValueError):
    """The grammar cannot be used; `param` is the request field it came from, `reason` llguidance's."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param, self.reason = param, reason


def to_llguidance(grammar: Grammar) -> str:
    """The llguidance grammar (its JSON top-level format) of `grammar`; GrammarError if it is invalid."""
    return _compiled(grammar.kind, grammar.source, grammar.param)


def check_grammar(grammar: Grammar, timeout_s: float = COMPILE_TIMEOUT_S) -> str:
    """`to_llguidance` within `timeout_s` seconds of wall time (GrammarError past it), for the HTTP side.
    The compile runs in a thread of its own (llguidance drops the GIL), so a slow one never holds up
    another request's; a grammar that ran out of this much time once is refused at once afterwards."""
    key = (grammar.kind, grammar.source)
    if (spent := _too_slow.get(key)) is not None and spent >= timeout_s:
        raise GrammarError(grammar.param, _too_slow_reason(timeout_s))
    done: Future[str] = Future()

    def run() -> None:
        try:
            done.set_result(to_llguidance(grammar))
        except BaseException as e:  # noqa: BLE001 - raised in the waiting thread
            done.set_exception(e)

    threading.Thread(target=run, name="grammar-compile", daemon=True).start()
    try:
        return done.result(timeout=timeout_s)
    except TimeoutError:
        with _too_slow_lock:
            _too_slow[key] = max(timeout_s, _too_slow.get(key, 0.0))
            while len(_too_slow) > _TOO_SLOW_KEPT:
                _too_slow.popitem(last=False)
        raise GrammarError(grammar.param, _too_slow_reason(timeout_s)) from None


def _too_slow_reason(timeout_s: float) -> str:
    return f"the grammar took longer than {timeout_s:g} s to compile; make it smaller or simpler"


@lru_cache(maxsize=256)
def _compiled(kind: str, source: str, param: str) -> str:
    """Built and validated once per distinct grammar (an LRU by content; validation walks the schema)."""
    try:
        if kind == "json_schema":
            check_schema_depth(json.loads(source), param)
            text = llguidance.LLMatcher.grammar_from_json_schema(source)
        elif kind == "json_object":
            text = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
        elif kind == "regex":
            text = llguidance.LLMatcher.grammar_from_regex(source)
        elif kind == "choice":
            pattern = "|".join(_regex_literal(c) for c in json.loads(source))
            text = llguidance.LLMatcher.grammar_from_regex(pattern)
        else:
            _check_lark(source, param)
            text = llguidance.LLMatcher.grammar_from_lark(source)
    except GrammarError:
        raise
    except RecursionError:  # JSON text nested deeper than Python parses (structured_outputs.json, %json)
        raise GrammarError(param, f"nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except (ValueError, TypeError) as e:
        raise GrammarError(param, str(e)) from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, limits=PARSER_LIMITS)
    if failed:
        raise GrammarError(param, "; ".join(m.strip() for m in messages)[:1000] or "invalid grammar")
    return text


def check_schema_depth(schema: Any, param: str) -> None:
    """GrammarError when `schema` nests deeper than MAX_SCHEMA_DEPTH levels of JSON objects and arrays,
    following each local `$ref` into its target. Each node's height is computed once (a `$ref` back into
    a node being walked, i.e. a recursive schema, adds nothing: llguidance compiles it lazily), so the
    walk is linear in the schema and exact for schemas without cycles."""
    too_deep = GrammarError(
        param,
        f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels (objects and arrays, each $ref followed)",
    )
    heights: dict[int, int] = {}
    walking: set[int] = set()

    def height(node: Any, depth: int) -> int:
        """Levels from `node` down (0: a scalar); `depth` is its own level (the root's is 1)."""
        if not isinstance(node, dict | list) or id(node) in walking:
            return 0
        key = id(node)
        if key not in heights:
            if depth > MAX_SCHEMA_DEPTH:
                raise too_deep
            walking.add(key)
            children = list(node.values() if isinstance(node, dict) else node)
            ref = node.get("$ref") if isinstance(node, dict) else None
            if isinstance(ref, str) and ref.startswith("#"):
                children.append(_pointer(schema, ref))
            heights[key] = 1 + max((height(c, depth + 1) for c in children), default=0)
            walking.discard(key)
        if depth - 1 + heights[key] > MAX_SCHEMA_DEPTH:
            raise too_deep
        return heights[key]

    height(schema, 1)


def _pointer(schema: Any, ref: str) -> Any:
    """The node a local `$ref` ("#/$defs/a") points at; None where it points nowhere (llguidance says so)."""
    node = schema
    for part in filter(None, unquote(ref[1:]).split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _check_lark(source: str, param: str) -> None:
    """A Lark grammar's bounds: at most MAX_LARK_RULES definitions, and its `%json` schemas' depth."""
    rules = len(_LARK_DEFINITION.findall(source))
    if rules > MAX_LARK_RULES:
        raise GrammarError(
            param, f"the grammar defines {rules} rules and terminals (at most {MAX_LARK_RULES})"
        )
    decoder = json.JSONDecoder()
    for m in _LARK_JSON.finditer(source):
        try:
            schema, _ = decoder.raw_decode(source, m.end())
        except ValueError:
            continue  # not JSON: llguidance says what is wrong
        check_schema_depth(schema, param)


def _regex_literal(text: str) -> str:
    """`text` as a regex matching exactly it (llguidance's regex syntax: escape every non-alphanumeric)."""
    return "".join(c if c.isalnum() or c == " " else "\\" + c if c.isascii() else c for c in text)
