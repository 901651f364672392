"""`ctxsteer chat`, `ctxsteer models`, `ctxsteer health`: the client side of the command line.

Exit codes: 0 ok; 1 the server failed or answered with an error (one line on stderr, no traceback);
2 usage error (bad flags, unreadable --context file, invalid strength); 130 Ctrl-C in one-shot mode.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx

from ctxsteer.clients.client import Client
from ctxsteer.clients.config import DEFAULT_BASE_URL
from ctxsteer.clients.errors import ClientError
from ctxsteer.clients.steering import Steering, SteeringError

__all__ = ["main"]

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_CHAT_EPILOG = """\
examples:
  ctxsteer chat "Say hello in French."
  ctxsteer chat --strength 2 --context report.txt "What does the report conclude?"
  cat report.txt | ctxsteer chat --strength 2 --context - "Summarise this."
  ctxsteer chat --url http://gpu-box:8000/v1 --model SmolLM2-135M-Instruct   # interactive

With PROMPT (or a prompt piped on stdin) it answers once; otherwise it starts an interactive chat:
/strength S, /context FILE, /reset, /help, /quit. Ctrl-C stops the current answer, Ctrl-D leaves.
Context documents go first in the user message, then the prompt; the user turn is what is steered.
The answer goes to stdout; usage and the applied steering go to stderr (silence them with -q).
Environment: CTXSTEER_BASE_URL / CTXSTEER_API_KEY (else OPENAI_BASE_URL / OPENAI_API_KEY).
Exit codes: 0 ok, 1 server or API error, 2 usage error, 130 interrupted."""

_MODELS_EPILOG = """\
examples:
  ctxsteer models
  ctxsteer models --url http://127.0.0.1:8000/v1 --json

Prints one model id per line (with its context length when the server says). Exit codes: 0 ok, 1 server
or API error, 2 usage error."""

_HEALTH_EPILOG = """\
examples:
  ctxsteer health
  ctxsteer health --url http://127.0.0.1:8000/v1 --json && echo up

Checks /health (process alive), /ready (model loaded) and /version, without retries. Exit codes: 0 alive
and ready, 1 unreachable, erroring or not ready yet, 2 usage error."""


def _parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=f"ctxsteer {prog}",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--url",
        metavar="URL",
        help=f"server base URL (default: $CTXSTEER_BASE_URL, $OPENAI_BASE_URL or {DEFAULT_BASE_URL})",
    )
    ap.add_argument(
        "--api-key", metavar="KEY", help="bearer key (default: $CTXSTEER_API_KEY, $OPENAI_API_KEY)"
    )
    ap.add_argument("--timeout", type=float, default=600.0, metavar="S", help="request timeout (default 600)")
    return ap


def _strength(text: str) -> float:
    try:
        value = float(text)
        Steering(strength=value)
    except SteeringError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return value


def _param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw  # a bare string


def chat_parser() -> argparse.ArgumentParser:
    ap = _parser(
        "chat", "Chat with a ctxsteer (or any OpenAI-compatible) server, steering attention.", _CHAT_EPILOG
    )
    ap.add_argument("prompt", nargs="?", metavar="PROMPT", help="answer this once and exit")
    ap.add_argument("--model", help="model id (default: the first one the server lists)")
    ap.add_argument(
        "--strength", type=_strength, metavar="S", help="steering strength >= 1, 1 = off (default: server's)"
    )
    ap.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="FILE",
        help="document to put before the prompt and steer; repeatable; - reads stdin",
    )
    ap.add_argument(
        "--focus",
        choices=("turn", "context"),
        default="turn",
        help="steer the whole user turn (default, as in the paper) or only the --context text",
    )
    ap.add_argument("--system", metavar="TEXT", help="system prompt (not steered)")
    ap.add_argument("--max-tokens", type=int, metavar="N", help="cap on answer tokens")
    ap.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (0 = greedy)")
    ap.add_argument(
        "--param",
        action="append",
        type=_param,
        default=[],
        metavar="KEY=VALUE",
        help="any other request field, VALUE as JSON (e.g. seed=1, top_p=0.9); repeatable",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the answer (no usage line)")
    return ap


def _client(ns: argparse.Namespace, ap: argparse.ArgumentParser, **kwargs: Any) -> Client:
    try:
        timeout = httpx.Timeout(ns.timeout, connect=min(10.0, ns.timeout))
        return Client(ns.url, api_key=ns.api_key, timeout=timeout, **kwargs)
    except ValueError as exc:
        ap.error(str(exc))


def _read_contexts(names: list[str], ap: argparse.ArgumentParser) -> list[tuple[str, str]]:
    if names.count("-") > 1:
        ap.error("--context - (stdin) can be given only once")
    docs = []
    for name in names:
        try:
            text = (
                sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8", errors="replace")
            )
        except OSError as exc:
            ap.error(f"cannot read --context {name}: {exc.strerror or exc}")
        docs.append(("<stdin>" if name == "-" else name, text))
    return docs


def _chat(argv: list[str]) -> int:
    from ctxsteer.clients.repl import run_repl
    from ctxsteer.clients.session import ChatSession, describe

    ap = chat_parser()
    ns = ap.parse_args(argv)
    params: dict[str, Any] = dict(ns.param)
    if ns.max_tokens is not None:
        params["max_tokens"] = ns.max_tokens
    if ns.temperature is not None:
        params["temperature"] = ns.temperature
    docs = _read_contexts(ns.context, ap)
    prompt = ns.prompt
    if prompt is None and not sys.stdin.isatty():
        if "-" in ns.context:
            ap.error("stdin is the --context document; give PROMPT as an argument")
        prompt = sys.stdin.read()
    if prompt is not None and not prompt.strip():
        ap.error("the prompt is empty")
    client = _client(ns, ap, model=ns.model)
    with client:
        session = ChatSession(client, strength=ns.strength, system=ns.system, focus=ns.focus, params=params)
        for name, text in docs:
            session.add_context(name, text)
        if prompt is None:
            model = client.resolve_model()
            s = "server default" if ns.strength is None else f"{ns.strength:g}"
            banner = f"ctxsteer chat: {model} at {client.base_url}, strength {s}. /help for commands."
            return run_repl(session, banner)
        try:
            stream = session.answer(prompt, sys.stdout)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        if not ns.quiet:
            print(describe(stream), file=sys.stderr)
    return EXIT_OK


def _models(argv: list[str]) -> int:
    ap = _parser("models", "List the models a server serves.", _MODELS_EPILOG)
    ap.add_argument("--json", action="store_true", help="print the raw model objects as JSON")
    ns = ap.parse_args(argv)
    with _client(ns, ap) as client:
        models = client.models()
    if ns.json:
        print(json.dumps([m.model_dump() for m in models], indent=2))
        return EXIT_OK
    for m in models:
        print(m.id if m.max_model_len is None else f"{m.id}\t(max_model_len {m.max_model_len})")
    return EXIT_OK


def _health(argv: list[str]) -> int:
    ap = _parser("health", "Check that a server is up and its model loaded.", _HEALTH_EPILOG)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ns = ap.parse_args(argv)
    with _client(ns, ap, max_retries=0) as client:
        health = client.health()
    if ns.json:
        print(json.dumps(health.model_dump()))
    else:
        state = "ready" if health.ready else "not ready (still loading?)"
        extra = "".join(f", {k} {v}" for k, v in (("model", health.model), ("version", health.version)) if v)
        print(f"{health.status}, {state}{extra} at {client.base_url}")
    return EXIT_OK if health.ok else EXIT_API


COMMANDS = {"chat": _chat, "models": _models, "health": _health}


def main(command: str, argv: list[str]) -> int:
    """Run one client subcommand; server and connection failures become exit code 1 and one stderr line."""
    # A shell that starts us in the background without job control (`ctxsteer chat ... &` in a script, CI)
    # hands SIGINT down as ignored, and Python then keeps it ignored: Ctrl-C could neither stop an answer
    # nor exit 130. Ctrl-C is this client's documented way to stop, so take the default handler back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return COMMANDS[command](argv)
    except ClientError as exc:
        print(f"ctxsteer {command}: error: {exc}", file=sys.stderr)
        return EXIT_API
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `ctxsteer models | head -1`: not an error; keep exit-time flush quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
