"""Scoring functions: needle recall, SQuAD EM/F1, DROP F1, knowledge-conflict outcome, answer extraction.

Pure functions on strings (no I/O), so each is unit-tested on known cases. SQuAD and DROP follow their
official evaluation scripts' normalisation, so numbers are comparable with published ones.
"""

from __future__ import annotations

import itertools
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

# Function words that carry no content: the needle's recall is measured over the other words.
STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for with from as into onto about is are was were be been
    being am do does did done it its this that these those there here what which who whom whose when where
    why how i you he she we they me him her us them my your his our their not no so than then too very
    can could should would will shall may might must""".split()
)
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def _fold(text: str) -> str:
    """Lower case without accents, so 'Café' and 'cafe' compare equal."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def words(text: str) -> list[str]:
    """Alphanumeric words, case- and accent-folded; punctuation and hyphens separate words."""
    return re.findall(r"[^\W_]+", _fold(text))


# ---------------------------------------------------------------- needle in a haystack


def needle_keywords(needle: str, question: str = "") -> list[str]:
    """The needle's content words that the question does not already give away.

    Why drop the question's words: an answer that merely repeats the question ("The best thing to do in
    San Francisco is...") must not score. Falls back to all content words if nothing would be left.
    """
    content = [w for w in dict.fromkeys(words(needle)) if w not in STOPWORDS]
    asked = set(words(question))
    novel = [w for w in content if w not in asked]
    return novel or content


def _word_found(word: str, answer_words: Sequence[str], squashed: str) -> bool:
    # Subword tolerance: "sandwiches" finds "sandwich", "sitting" finds "sit", and a long word glued to
    # its neighbour ("doloresPark") is still found in the answer with its spaces removed.
    for t in answer_words:
        if t == word or (len(word) >= 3 and t.startswith(word) and len(t) - len(word) <= 4):
            return True
    return len(word) >= 5 and word in squashed


def needle_recall(answer: str, needle: str, question: str = "") -> float:
    """Share of the needle's content words (see `needle_keywords`) present in the answer, in [0, 1]."""
    keys = needle_keywords(needle, question)
    if not keys:
        return 0.0
    answer_words = words(answer)
    squashed = "".join(answer_words)
    return sum(_word_found(w, answer_words, squashed) for w in keys) / len(keys)


# ---------------------------------------------------------------- SQuAD (official v1.1 script)


def normalize_squad(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace (the official SQuAD normalisation)."""
    text = "".join(c for c in text.lower() if c not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_em(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_squad(prediction)
    return float(any(pred == normalize_squad(g) for g in golds))


def _token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_squad(prediction).split()
    return max((_token_f1(pred, normalize_squad(g).split()) for g in golds), default=0.0)


# ---------------------------------------------------------------- DROP (official drop_eval.py)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _drop_normalize(text: str) -> str:
    parts = []
    for token in re.split(" |-", text):
        token = token.lower()
        if not _is_number(token):
            token = "".join(c for c in token if c not in _PUNCT)
        else:
            token = str(float(token))
        token = " ".join(_ARTICLES.sub(" ", token).split())
        if token.strip():
            parts.append(token)
    return " ".join(parts).strip()


def _bags(spans: Sequence[str]) -> tuple[list[str], list[set[str]]]:
    normalized = [_drop_normalize(s) for s in spans]
    return normalized, [set(n.split()) for n in normalized]


def _bag_f1(pred: set[str], gold: set[str]) -> float:
    same = len(gold & pred)
    precision = same / len(pred) if pred else 1.0
    recall = same / len(gold) if gold else 1.0
    if precision == 0.0 and recall == 0.0:
        return 0.0
    f1 = 2 * precision * recall / (precision + recall)
    # DROP: a number in the gold answer must be matched for any credit
    gold_numbers = {w for w in gold if _is_number(w)}
    if gold_numbers and not gold_numbers & {w for w in pred if _is_number(w)}:
        return 0.0
    return f1


def _align(pred: list[set[str]], gold: list[set[str]]) -> float:
    """Mean F1 of the best one-to-one matching of predicted and gold spans (the official alignment)."""
    n = max(len(pred), len(gold))
    scores = [[_bag_f1(p, g) for g in gold] for p in pred]
    if len(pred) <= len(gold):
        perms = itertools.permutations(range(len(gold)), len(pred))
        best = max(sum(scores[i][j] for i, j in enumerate(perm)) for perm in perms)
    else:
        perms = itertools.permutations(range(len(pred)), len(gold))
        best = max(sum(scores[i][j] for j, i in enumerate(perm)) for perm in perms)
    return best / n


def drop_scores(prediction: str, answers: Sequence[Sequence[str]]) -> tuple[float, float]:
    """(EM, F1) of one predicted string against DROP answers (each a list of spans), max over answers."""
    pred_norm, pred_bags = _bags([prediction])
    best_em, best_f1 = 0.0, 0.0
    for spans in answers:
        if not spans:
            continue
        gold_norm, gold_bags = _bags(list(spans)[:6])  # the alignment is exhaustive: cap its size
        em = float(sorted(pred_norm) == sorted(gold_norm))
        best_em = max(best_em, em)
        best_f1 = max(best_f1, round(_align(pred_bags, gold_bags), 2))
    return best_em, best_f1


def drop_f1(prediction: str, answers: Sequence[Sequence[str]]) -> float:
    return drop_scores(prediction, answers)[1]


# ---------------------------------------------------------------- knowledge conflict


def _contains(haystack: str, phrase: str) -> bool:
    return phrase_in(normalize_squad(haystack), normalize_squad(phrase))


def phrase_in(normalized: str, normalized_phrase: str) -> bool:
    """Both already normalised (e.g. by `normalize_squad`, once for a long document asked about many
    phrases): the phrase occurs in the text as whole words."""
    return bool(normalized_phrase) and f" {normalized_phrase} " in f" {normalized} "


def answer_in_reply(reply: str, answers: Sequence[str | Sequence[str]]) -> float:
    """1.0 if any gold answer (for DROP: all spans of one answer) occurs in the whole reply, normalised.

    Why: EM/F1 on an extracted span punish a correct answer wrapped in a sentence; "the answer occurs in
    the reply" is the lenient accuracy used for chat models (e.g. Liu et al., "Lost in the Middle").
    """
    for gold in answers:
        spans = [gold] if isinstance(gold, str) else list(gold)
        if spans and all(_contains(reply, s) for s in spans):
            return 1.0
    return 0.0


def conflict_outcome(answer: str, context_answer: str, memory_answer: str | Sequence[str]) -> str:
    """'context' if the answer names the context's (edited) entity, 'memory' if it names the original,
    memorised one instead (any of them, given several), else 'other'. Naming both counts as 'context':
    the context was used."""
    if _contains(answer, context_answer):
        return "context"
    memory = [memory_answer] if isinstance(memory_answer, str) else memory_answer
    if any(_contains(answer, m) for m in memory):
        return "memory"
    return "other"


# ---------------------------------------------------------------- short answers

_PREFIX = re.compile(
    r"^\s*(?:(?:the\s+)?(?:final\s+|short\s+)?answer(?:\s+is)?\s*[:\-]?|a\s*:|answer\s*:)\s*", re.IGNORECASE
)


def short_answer(text: str) -> str:
    """The answer part of a chatty reply: first non-empty line, an 'Answer:' prefix and a final period
    removed. Why: instruct models often wrap a correct span in a sentence; EM should not punish that."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line, count=1).strip()
    line = line.strip("*\"'` ")
    return line.removesuffix(".").strip()


def choice_correct(reply: str, letter: str, option: str) -> float:
    """Multiple choice: the reply names the gold option by its letter ("B", "B.", "(B) text", "B: text")
    or gives its text (normalised exact match). A bare "A cellular telephone" is text, not option A."""
    answer = short_answer(reply)
    m = re.match(r"^\(?([A-Za-z])(?:$|[).:])", answer)
    if m:
        return float(m.group(1).upper() == letter.upper())
    return float(normalize_squad(answer) == normalize_squad(option))
