"""Needle-in-a-haystack contexts, following Kamradt's original test as the paper's protocol describes it.

The haystack is cut to the target length in the model's tokens, the needle sentence is inserted at the
depth percentage (of the haystack's tokens) on the sentence boundary at or before it, and the question
follows the haystack in the user turn. Counting goes through a `TokenCounter`, so the same code works with
the server's `/tokenize`, a local tokenizer or an estimate; the searches are binary searches over word or
sentence boundaries (a dozen counts per cell, memoised).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from ctxsteer.clients.eval.tokens import TokenCounter

DEFAULT_NEEDLE = (
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
)
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
# The prompt of Kamradt's original test (LLMTest_NeedleInAHaystack).
SYSTEM_PROMPT = (
    "You are a helpful AI bot that answers questions for a user. Keep your response short and direct."
)
QUESTION_SUFFIX = " Don't give information outside the document or repeat your findings."

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_ENDS_SENTENCE = re.compile(r"[.!?][\"')\]]*$")


def sentence_starts(text: str) -> list[int]:
    """Offsets where a sentence starts (0 included): after ., ! or ? (+ closing quotes) and a space."""
    return [0, *(m.end() for m in _SENTENCE_END.finditer(text) if m.end() < len(text))]


def _finish(prefix: str) -> str:
    """End a cut-off haystack with a full stop, so that a needle after it sits on a sentence boundary."""
    prefix = prefix.rstrip()
    if not prefix or _ENDS_SENTENCE.search(prefix):
        return prefix
    return prefix.rstrip(",;:-") + "."


async def _last_fitting(n: int, fits: Callable[[int], Awaitable[bool]]) -> int:
    """Largest i in [0, n) with fits(i), assuming fits is monotone (True then False); -1 if none."""
    lo, hi = 0, n - 1
    best = -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if await fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


async def cut_to_tokens(text: str, n_tokens: int, counter: TokenCounter) -> str:
    """The longest prefix of `text` cut at a word boundary (and ended with a full stop) of at most
    `n_tokens` tokens. A text too short is repeated, as the original test does with its essays."""
    if n_tokens <= 0:
        return ""
    source = text
    size = max(64, n_tokens * 6)
    while True:  # a window just past the target, so the search tokenizes little
        while len(source) < size:
            source = f"{source} {text}"
        window = source[:size]
        if await counter.count(window) > n_tokens:
            break
        size *= 2
    cuts = [m.start() for m in re.finditer(" ", window)]

    async def fits(i: int) -> bool:
        return await counter.count(_finish(window[: cuts[i]])) <= n_tokens

    best = await _last_fitting(len(cuts), fits)
    return _finish(window[: cuts[best]]) if best >= 0 else ""


async def place_needle(haystack: str, needle: str, depth: float, counter: TokenCounter) -> str:
    """`haystack` with `needle` inserted at `depth` percent of its tokens, on a sentence start."""
    if depth <= 0:
        return f"{needle} {haystack}".strip()
    if depth >= 100:
        return f"{haystack} {needle}".strip()
    target = await counter.count(haystack) * depth / 100
    starts = sentence_starts(haystack)

    async def fits(i: int) -> bool:
        return await counter.count(haystack[: starts[i]].rstrip()) <= target

    at = starts[max(await _last_fitting(len(starts), fits), 0)]
    return f"{haystack[:at]}{needle} {haystack[at:]}".strip()


async def build_context(
    haystack: str, needle: str, length: int, depth: float, counter: TokenCounter
) -> tuple[str, int]:
    """(context of `length` tokens, haystack + needle, with the needle at `depth`%; its actual count).

    Up to two correction passes absorb the tokens that joining text at the seams adds or saves; the
    closest attempt wins (a cut moves by whole words, so the exact length may be out of reach).
    """
    budget = length - await counter.count(needle)
    best, best_n = "", -1
    for _ in range(3):
        context = await place_needle(await cut_to_tokens(haystack, budget, counter), needle, depth, counter)
        n = await counter.count(context)
        if best_n < 0 or abs(n - length) < abs(best_n - length):
            best, best_n = context, n
        if n == length:
            break
        budget += length - n
    return best, best_n


def nih_messages(context: str, question: str, system: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """System prompt outside, haystack then question inside the (steered) user turn."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"{context}\n\n{question}{QUESTION_SUFFIX}"},
    ]
