"""`ctxsteer eval {nih,qa,paper}`: argument parsing and reporting only; the work is in nih/qa/paper.

Exit status: 0 done (even with skipped cells, which are listed), 1 an evaluation error (server
unreachable, data not installed, results of other settings in --out), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ctxsteer.clients.eval.api import AUTO_STRENGTH, DEFAULT_TIMEOUT_S, EvalError
from ctxsteer.clients.eval.datasets import DEFAULT_LENGTHS, TASKS
from ctxsteer.clients.eval.haystack import DataMissing
from ctxsteer.clients.eval.needle import DEFAULT_NEEDLE, DEFAULT_QUESTION
from ctxsteer.steering.spec import METHODS

DEFAULT_URL = "http://127.0.0.1:8000"
STRENGTHS_HELP = (
    "steering strengths, 1 = off, alpha = 1/strength, auto = the server picks per request (default 1,1.5,2,4)"
)
OUT_HELP = "output directory; rerunning into it resumes (default eval-nih)"


def _numbers(kind: Callable[[str], Any], name: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name}: expected comma-separated numbers, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name}: empty list")
        return values

    return parse


def _strengths(text: str) -> list[float]:
    values = _numbers(lambda v: AUTO_STRENGTH if v.strip() == "auto" else float(v), "strengths")(text)
    if any(v < 1 and v != AUTO_STRENGTH for v in values):
        raise argparse.ArgumentTypeError("strengths must be >= 1 (1 = steering off; alpha = 1/strength)")
    return values


def _method_rows(text: str) -> list[str]:
    from ctxsteer.clients.eval.paper import check_methods

    try:
        return check_methods([t.strip() for t in text.split(",") if t.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _env(*names: str) -> str | None:
    return next((v for n in names if (v := os.environ.get(n, "").strip())), None)


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--url",
        default=_env("CTXSTEER_BASE_URL", "OPENAI_BASE_URL") or DEFAULT_URL,
        help="server URL, with or without /v1 (default: $CTXSTEER_BASE_URL, $OPENAI_BASE_URL or %(default)s)",
    )
    ap.add_argument("--model", help="model name to request (default: the server's first model)")
    ap.add_argument(
        "--api-key",
        default=_env("CTXSTEER_API_KEY", "OPENAI_API_KEY"),
        help="bearer key, if the server wants one (default: $CTXSTEER_API_KEY or $OPENAI_API_KEY)",
    )
    ap.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight, for server batching (default 8)"
    )
    ap.add_argument(
        "--tokenizer",
        help="local HF tokenizer dir/id for servers without /tokenize (default: ask the server)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds per request, queueing included; a request over it skips its cell (default %(default)g)",
    )
    ap.add_argument(
        "--context-indicator",
        choices=("on", "off", "auto"),
        help="send context_indicator on every request (models tuned with `ctxsteer finetune`; "
        "default: not sent, the server's default applies)",
    )
    ap.add_argument(
        "--method",
        choices=METHODS,
        help="ctxsteer steering.method; with CAD or AdaCAD the context is sent as the steered span, so the "
        "context-free twin keeps the question (default: not sent = attention)",
    )
    ap.add_argument("--cad-beta", type=float, help="steering.cad_beta (default: the server's, 0.5)")
    ap.add_argument(
        "--steering",
        type=_json_object,
        help='more steering fields for every request, as JSON: \'{"head_profile": "profiled"}\', '
        '\'{"spans": "auto"}\', \'{"layers": [10, 11]}\'',
    )
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ctxsteer eval",
        description="Measure context awareness with and without attention steering, against any "
        "OpenAI-compatible server (steering fields are ignored by servers without them).",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    nih = sub.add_parser("nih", help="needle in a haystack: recall over context length x needle depth")
    _common(nih)
    nih.add_argument(
        "--lengths",
        type=_numbers(int, "lengths"),
        default=[500, 1000, 2000, 4000],
        help="context lengths in the model's tokens (default 500,1000,2000,4000)",
    )
    nih.add_argument(
        "--depths",
        type=_numbers(float, "depths"),
        default=[0, 25, 50, 75, 100],
        help="needle depths, percent of the context (default 0,25,50,75,100)",
    )
    nih.add_argument("--strengths", type=_strengths, default=[1, 1.5, 2, 4], help=STRENGTHS_HELP)
    nih.add_argument(
        "--haystack", default="pg", help="pg (Paul Graham essays) | austen | a text file (default pg)"
    )
    nih.add_argument("--needle", default=DEFAULT_NEEDLE, help="needle sentence (default: the paper's)")
    nih.add_argument("--question", default=DEFAULT_QUESTION, help="question (default: the paper's)")
    nih.add_argument("--max-tokens", type=int, default=64, help="answer budget (default 64)")
    nih.add_argument("--out", type=Path, default=Path("eval-nih"), help=OUT_HELP)

    qa = sub.add_parser(
        "qa",
        help="SQuAD EM/F1, DROP F1, knowledge conflict (context vs memorised answers), general "
        "(ARC-Easy without context: accuracy), or SQuAD among distractor paragraphs: distractors, "
        "substitution (answer swapped: context vs memory), no-conflict (the harm check)",
    )
    _common(qa)
    qa.add_argument("--task", choices=TASKS, required=True)
    qa.add_argument("--limit", type=int, default=200, help="questions (a seeded subset; default 200)")
    qa.add_argument("--strengths", type=_strengths, default=[1, 1.5, 2, 4], help=STRENGTHS_HELP)
    qa.add_argument("--seed", type=int, default=0)
    qa.add_argument("--max-tokens", type=int, default=24, help="answer budget (default 24)")
    qa.add_argument(
        "--lengths",
        type=_numbers(int, "lengths"),
        default=list(DEFAULT_LENGTHS),
        help="distractors, substitution, no-conflict: context lengths in tokens, estimated at 4 characters "
        "per token; --limit questions at each (default 1000,2000,4000)",
    )
    qa.add_argument("--out", type=Path, help=OUT_HELP.replace("eval-nih", "eval-<task>"))

    paper = sub.add_parser(
        "paper", help="NIH + SQuAD + DROP + conflict at strengths 1, 1/0.9 and 2; one table"
    )
    _common(paper)
    paper.add_argument(
        "--quick", action="store_true", help="small sizes: < 15 min for SmolLM2 on 2 CPU cores"
    )
    paper.add_argument("--haystack", default="pg")
    paper.add_argument(
        "--methods",
        type=_method_rows,
        default=[],
        help="comma-separated rows beyond the paper's rule: cad, attention+cad, adacad, attention+adacad, "
        "profiled (the server needs --head-profiles with a 'profiled' profile), auto-spans",
    )
    paper.add_argument(
        "--intervals", action="store_true", help="each cell with its 95%% bootstrap interval over questions"
    )
    paper.add_argument("--out", type=Path, default=Path("eval-paper"), help=OUT_HELP.replace("nih", "paper"))

    chat = sub.add_parser(
        "chat-set",
        help="write a small chat data set (CoQA with context; GSM8K, NQ, Jeopardy! without) for "
        "`ctxsteer score` / `ctxsteer finetune`",
    )
    chat.add_argument("--out", type=Path, required=True, help="JSONL to write")
    chat.add_argument("--context", type=int, default=200, help="CoQA examples (default 200)")
    chat.add_argument("--plain", type=int, default=200, help="examples without context (default 200)")
    chat.add_argument("--seed", type=int, default=0)
    return ap


def _print_files(files: Sequence[Path]) -> None:
    for f in files:
        print(f"wrote {f}")


def _chat_set(ns: argparse.Namespace) -> int:
    from ctxsteer.clients.eval.chatset import write_chat_set

    counts = write_chat_set(ns.out, ns.context, ns.plain, ns.seed)
    print(", ".join(f"{n} {source}" for source, n in sorted(counts.items())))
    print(f"wrote {ns.out}")
    return 0


async def _run(ns: argparse.Namespace) -> int:
    from ctxsteer.clients.eval.runner import print_skipped

    common = {"url": ns.url, "model": ns.model, "concurrency": ns.concurrency, "api_key": ns.api_key}
    common |= {"tokenizer": ns.tokenizer, "progress": ns.progress, "timeout_s": ns.timeout}
    common |= {"context_indicator": ns.context_indicator, "method": ns.method, "cad_beta": ns.cad_beta}
    common["steering_extra"] = ns.steering
    if ns.command == "nih":
        from ctxsteer.clients.eval.nih import NIHConfig, run_nih, summary_table

        cfg = NIHConfig(
            out=ns.out,
            lengths=ns.lengths,
            depths=ns.depths,
            strengths=ns.strengths,
            haystack=ns.haystack,
            needle=ns.needle,
            question=ns.question,
            max_tokens=ns.max_tokens,
            **common,
        )
        nih = await run_nih(cfg)
        print(summary_table(nih))
        print(nih.report.line())
        print_skipped(nih.report, ("length", "depth", "strength"))
        _print_files(nih.files)
    elif ns.command == "qa":
        from ctxsteer.clients.eval.qa import QAConfig, run_qa
        from ctxsteer.clients.eval.qa import summary_table as qa_table

        out = ns.out or Path(f"eval-{ns.task}")
        res = await run_qa(
            QAConfig(
                task=ns.task,
                out=out,
                limit=ns.limit,
                strengths=ns.strengths,
                seed=ns.seed,
                max_tokens=ns.max_tokens,
                lengths=ns.lengths,
                **common,
            )
        )
        print(f"{res.task}: {res.source}")
        print(qa_table(res))
        print(res.report.line())
        print_skipped(res.report, ("id", "strength"))
        _print_files(res.files)
    else:
        from ctxsteer.clients.eval.paper import PaperConfig, run_paper

        cfg = PaperConfig(
            out=ns.out,
            quick=ns.quick,
            haystack=ns.haystack,
            methods=ns.methods,
            intervals=ns.intervals,
            **common,
        )
        result = await run_paper(cfg)
        print(result.table())
        print(f"wall time {result.seconds / 60:.1f} min")
        for rows in (result, *result.methods.values()):
            print_skipped(rows.nih.report, ("length", "depth", "strength"))
            for res in rows.qa.values():
                print_skipped(res.report, ("id", "strength"))
        print(f"wrote {ns.out / 'paper.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(ns, "concurrency", 1) < 1:
        print("ctxsteer eval: --concurrency must be >= 1", file=sys.stderr)
        return 2
    try:
        if ns.command == "chat-set":
            return _chat_set(ns)
        return asyncio.run(_run(ns))
    except (EvalError, DataMissing) as e:
        print(f"ctxsteer eval: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "ctxsteer eval: interrupted; finished cells are saved, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
