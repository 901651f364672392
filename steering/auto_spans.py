"""`steering.spans: "auto"` (AutoPASTA-style, arXiv 2409.10790): the model first quotes the sentences of the
context that answer the question; those sentences, located in the user's messages, become the steered spans.
Text only here (the prompt that asks, and locating the quotes); the server runs the extra generation.

Locating: each quoted sentence must be a sentence of the user's messages. An exact occurrence is taken as
is; otherwise the user sentence with the highest word overlap (Jaccard >= 0.6) stands in for it, so a small
model's near-quotes still point at real text. At most `MAX_AUTO_SPANS` spans, in the order quoted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MAX_AUTO_SPANS = 4
QUOTE_MAX_TOKENS = 64  # the extra generation's budget: its cost is one prefill of the prompt + this
MIN_OVERLAP = 0.6
QUOTE_SYSTEM = (
    "You find evidence. Copy, word for word, the one or two sentences of the text that answer the "
    "question. Write nothing else."
)
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|$)")
_WORD = re.compile(r"\w+")


def quote_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The prompt of the quoting generation: the request's user messages, joined, under QUOTE_SYSTEM."""
    text = "\n\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "user")
    return [{"role": "system", "content": QUOTE_SYSTEM}, {"role": "user", "content": text}]


def sentences(text: str) -> list[str]:
    """Sentences (and lines) of `text`, stripped, as they occur in it."""
    return [s.strip() for s in _SENTENCE.findall(text) if len(s.strip()) > 1]


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


def locate_quotes(quoted: str, sources: Iterable[str]) -> list[str]:
    """The spans to steer: substrings of `sources` (the user messages' contents) that the quote names."""
    sources = [s for s in sources if s]
    pool = [s for src in sources for s in sentences(src)]
    found: list[str] = []
    for q in sentences(quoted):
        q = q.strip(" \"'`*-")
        if len(q) < 8:
            continue
        if any(q in src for src in sources):
            best = q
        else:
            qw = _words(q)
            scored = [(len(qw & _words(s)) / len(qw | _words(s)), s) for s in pool if qw | _words(s)]
            if not scored:
                continue
            overlap, best = max(scored, key=lambda x: x[0])
            if overlap < MIN_OVERLAP:
                continue
        if best not in found:
            found.append(best)
        if len(found) == MAX_AUTO_SPANS:
            break
    return found
