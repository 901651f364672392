"""`ctxsteer eval` end to end against a real `ctxsteer serve` of the tiny model (512-token context)."""

from __future__ import annotations

import asyncio
import csv
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_process import ServerProcess, free_port, serve
from test_eval_data import DROP_DOCS, SQUAD_DOCS, _olmo, article_docs
from tiny import save_tiny_model

from ctxsteer.clients.eval.api import ContextTooLong, EvalAPI, RequestFailed, ServerUnreachable, _error
from ctxsteer.clients.eval.paper import PaperConfig, Plan, run_paper
from ctxsteer.server.cli import main as ctxsteer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-eval", "llama")
    with serve(str(model), log_dir=tmp_path_factory.mktemp("logs")) as sp:
        yield sp


@pytest.fixture
def haystack_file(tmp_path: Path) -> Path:
    rng = random.Random(0)
    words = "the tiny model reads a long text about rivers and stones and gardens".split()
    sentences = [" ".join(rng.choice(words) for _ in range(10)).capitalize() + "." for _ in range(300)]
    path = tmp_path / "hay.txt"
    path.write_text(" ".join(sentences), encoding="utf-8")
    return path


def _nih(server: ServerProcess, hay: Path, out: Path, lengths: str) -> list[str]:
    return [
        "eval", "nih", "--url", server.url + "/v1", "--lengths", lengths, "--depths", "0,100",
        "--strengths", "1,2", "--haystack", str(hay), "--out", str(out), "--max-tokens", "6", "--no-progress",
    ]  # fmt: skip


def test_nih_grid_writes_json_csv_and_pngs_then_resumes(
    server: ServerProcess, haystack_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nih"
    assert ctxsteer(_nih(server, haystack_file, out, "100,200")) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["task"] == "nih" and data["meta"]["model"] == "tiny-eval"
    assert data["meta"]["token_counter"] == "server /tokenize"
    cells = data["cells"]
    assert {(c["length"], c["depth"], c["strength"]) for c in cells} == {
        (n, d, s) for n in (100, 200) for d in (0.0, 100.0) for s in (1.0, 2.0)
    }
    for c in cells:
        assert 0.0 <= c["score"] <= 1.0 and isinstance(c["answer"], str)
        assert abs(c["context_tokens"] - c["length"]) <= max(1, c["length"] // 100)
        assert c["alpha"] == pytest.approx(1 / c["strength"])  # the server applied the strength
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 8 and {"length", "depth", "strength", "score", "answer"} <= set(rows[0])
    for name in ("heatmap_strength_1.png", "heatmap_strength_2.png", "strengths.png"):
        png = (out / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and 5_000 < len(png) < 200_000
    from PIL import Image

    with Image.open(out / "heatmap_strength_2.png") as im:
        im.verify()
    capsys.readouterr()

    # Resume: the 8 cells are not rerun; the new 600-token cells cannot fit 512 tokens: skipped, reported.
    assert ctxsteer(_nih(server, haystack_file, out, "100,200,600")) == 0
    printed = capsys.readouterr()
    assert "0 run, 8 already done, 4 skipped (of 12 cells)" in printed.out
    assert "skipped length=600, depth=0.0, strength=1.0: context too long" in printed.err
    again = json.loads((out / "results.json").read_text())
    assert again["cells"] == cells
    assert len(again["skipped"]) == 4 and all(s["length"] == 600 for s in again["skipped"])

    # A cell lost from results.json is the only one run again.
    again["cells"] = cells[1:]
    (out / "results.json").write_text(json.dumps(again))
    assert ctxsteer(_nih(server, haystack_file, out, "100,200")) == 0
    assert "1 run, 7 already done" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["cells"] == cells  # deterministic (greedy)


def test_resume_refuses_other_settings(
    server: ServerProcess, haystack_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nih"
    assert ctxsteer(_nih(server, haystack_file, out, "100")) == 0
    assert ctxsteer([*_nih(server, haystack_file, out, "100"), "--needle", "Another needle."]) == 1
    assert "other settings (keywords, needle)" in capsys.readouterr().err


def test_qa_conflict_end_to_end(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "conflict"
    argv = ["eval", "qa", "--task", "conflict", "--limit", "3", "--strengths", "1,4", "--url", server.url]
    assert ctxsteer([*argv, "--out", str(out), "--max-tokens", "4", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert (
        "| strength | n | context | memory | other |" in printed.out and "| 4 (α=0.25) | 2 |" in printed.out
    )
    # the third item's passage needs more than the tiny model's 512 tokens: skipped and reported
    assert "4 run, 0 already done, 2 skipped (of 6 cells)" in printed.out
    assert re.search(
        r"skipped id=cpkc-14068, strength=4.0: context too long: \d+ prompt \+ 4 answer tokens > 512",
        printed.err,
    )
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert len(cells) == 4
    for c in cells:
        assert c["context"] + c["memory"] + c["other"] == 1.0
        assert len(c["gold"]) == 2


def test_unreachable_server_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["eval", "qa", "--task", "conflict", "--limit", "1", "--url", url, "--out", str(tmp_path / "x")]
    assert ctxsteer(argv) == 1
    err = capsys.readouterr().err
    assert f"cannot reach {url}" in err and "is the server running?" in err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        ctxsteer(["eval", "nih", "--strengths", "0.5"])
    assert e.value.code == 2
    assert "strengths must be >= 1" in capsys.readouterr().err


def test_server_errors_are_typed() -> None:
    too_long = httpx.Response(400, json={"error": {"message": "too long", "code": "context_length_exceeded"}})
    assert isinstance(_error(too_long), ContextTooLong)
    other = httpx.Response(400, json={"error": {"message": "bad seed", "code": None}})
    assert isinstance(_error(other), RequestFailed) and "bad seed" in str(_error(other))


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ReadTimeout("slow"), RequestFailed),  # this cell only
        (httpx.ConnectError("refused"), ServerUnreachable),  # stop the run
        (httpx.RemoteProtocolError("gone"), ServerUnreachable),
    ],
)
def test_transport_failures_are_typed(exc: Exception, expected: type[Exception]) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc

    async def go() -> None:
        async with EvalAPI("http://test/v1") as api:
            await api._http.aclose()
            api._http = httpx.AsyncClient(base_url=api.url, transport=httpx.MockTransport(fail))
            await api.chat([{"role": "user", "content": "hi"}], strength=1, max_tokens=1)

    with pytest.raises(expected):
        asyncio.run(go())


def test_paper_table_from_a_tiny_plan(
    server: ServerProcess, haystack_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    _olmo(site, "squad", SQUAD_DOCS)
    _olmo(site, "drop", DROP_DOCS)
    plan = Plan(lengths=(100,), depths=(0, 100), qa_limit=2, conflict_limit=2)
    cfg = PaperConfig(
        url=server.url, out=tmp_path / "paper", haystack=str(haystack_file), plan=plan, progress=False
    )
    result = asyncio.run(run_paper(cfg))
    table = result.table().splitlines()
    assert table[0].startswith(
        "| Model | Steering strength | NIH recall | SQuAD EM | SQuAD F1 | SQuAD contains | DROP F1 |"
    )
    assert table[2].startswith("| tiny-eval | 1 (off) |")
    assert table[3].startswith("| + steering (paper) | 1.11 (α=0.9) |")
    assert table[4].startswith("| + steering | 2 (α=0.5) |")
    assert "–" not in "".join(table[2:])  # every task produced a number for every strength
    for task in ("nih", "squad", "drop", "conflict"):
        assert (tmp_path / "paper" / task / "results.json").exists()
    report = (tmp_path / "paper" / "paper.md").read_text()
    assert result.table() in report and "](nih/heatmap_strength_1_11.png)" in report

    # `--methods cad,auto-spans --intervals`: the base rows resume, each method adds a row of its own run
    import dataclasses

    more = asyncio.run(run_paper(dataclasses.replace(cfg, methods=("cad", "auto-spans"), intervals=True)))
    rows = more.table().splitlines()
    assert len(rows) == 7 and rows[2].startswith("| tiny-eval | 1 (off) |")
    assert rows[5].startswith("| + CAD (β=1) | 1 (off) |") and rows[6].startswith(
        "| + auto spans | 2 (α=0.5) |"
    )
    assert all(cell.strip().count("[") == 1 for cell in rows[5].split("|")[3:-1])  # mean [lo, hi]
    for method in ("cad", "auto-spans"):
        for task in ("nih", "squad", "drop", "conflict"):
            stored = json.loads((tmp_path / "paper" / method / task / "results.json").read_text())
            assert stored["cells"] and len({c["strength"] for c in stored["cells"]}) == 1  # its one setting
    cad_meta = json.loads((tmp_path / "paper" / "cad" / "conflict" / "results.json").read_text())["meta"]
    assert cad_meta["method"] == "cad" and cad_meta["cad_beta"] == 1.0


def test_document_tasks_end_to_end(
    server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """substitution (with AdaCAD), then no-conflict and distractors over the same documents: per-length
    tables with intervals, cells carrying their layout, resumable."""
    from ctxsteer.clients.eval.qa import QAConfig, run_qa

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    _olmo(site, "squad", article_docs(titles=4, per_title=4, filler=1))
    out = tmp_path / "substitution"
    argv = [
        "eval", "qa", "--task", "substitution", "--limit", "2", "--lengths", "35,65", "--strengths", "1",
        "--method", "adacad", "--url", server.url, "--out", str(out), "--max-tokens", "3", "--no-progress",
    ]  # fmt: skip
    assert ctxsteer(argv) == 0
    printed = capsys.readouterr().out
    assert "| strength | length | n | context | memory | other |" in printed
    for row in ("| 1 (off) | 35 | 2 | ", "| 1 (off) | 65 | 2 | ", "| 1 (off) | all | 4 | "):
        line = next(x for x in printed.splitlines() if x.startswith(row))
        assert all(cell.count("[") == 1 for cell in line.split("|")[4:-1])  # mean [lo, hi] per metric
    assert "4 run, 0 already done, 0 skipped (of 4 cells)" in printed
    stored = json.loads((out / "results.json").read_text())
    assert stored["meta"]["method"] == "adacad" and "chars/token" in stored["meta"]["layout"]
    cells = stored["cells"]
    assert sorted(c["length"] for c in cells) == [35, 35, 65, 65]
    for c in cells:
        assert c["context"] + c["memory"] + c["other"] == 1.0 and c["paragraphs"] >= 1
        assert {"depth", "answer_type", "context_tokens_est"} <= set(c) and len(c["gold"]) == 2
    assert ctxsteer(argv) == 0
    assert "0 run, 4 already done" in capsys.readouterr().out
    for task in ("no-conflict", "distractors"):
        cfg = QAConfig(
            url=server.url, task=task, out=tmp_path / task, limit=2, strengths=[1], max_tokens=3,
            progress=False, lengths=(35, 65),
        )  # fmt: skip
        res = asyncio.run(run_qa(cfg))
        assert len(res.cells) == 4 and not res.report.skipped
        assert all({"em", "f1", "contains", "length", "depth"} <= set(c) for c in res.cells)
        if task == "no-conflict":  # the questions of substitution, over the same layouts
            assert {c["id"] for c in res.cells} == {c["id"] for c in cells}
            assert {(c["id"], c["depth"]) for c in res.cells} == {(c["id"], c["depth"]) for c in cells}
