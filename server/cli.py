"""The `ctxsteer` command: subcommands dispatch to their modules, imported lazily (fast --help)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def _threads_env() -> None:
    # Before torch is imported. OpenMP keeps libgomp's default wait policy (spin briefly, then sleep):
    # with the engine thread as the process's only OpenMP pool (server/engine/local/omp.py) PASSIVE, which
    # sleeps on a futex at every barrier, made each forward ~2x slower. Tokenizers stay single-threaded.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _serve(argv: list[str]) -> int:
    from ctxsteer.server.config import ServerConfig

    ap = argparse.ArgumentParser(
        prog="ctxsteer serve",
        description="Serve an OpenAI-compatible API with per-request attention steering.",
        epilog="example: ctxsteer serve --port 8000 --default-steering-strength 1.5",
    )
    ap.add_argument(
        "model_pos", nargs="?", metavar="MODEL", help="HF id, local dir or .gguf (default: SmolLM2)"
    )
    ServerConfig.add_arguments(ap)
    ns = ap.parse_args(argv)
    if ns.model_pos is not None:
        if ns.model is not None and ns.model != ns.model_pos:
            ap.error("give MODEL either positionally or with --model, not both")
        ns.model = ns.model_pos
    try:
        config = ServerConfig.from_args(ns)
    except ValueError as e:
        ap.error(str(e))
    from ctxsteer.server.main import run

    return run(config)


def _bench(argv: list[str]) -> int:
    kinds = {"steering": "ctxsteer.server.bench.steering", "server": "ctxsteer.server.bench.server"}
    if not argv or argv[0] not in kinds:
        print(f"usage: ctxsteer bench {{{','.join(kinds)}}} [--help]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(kinds[argv[0]]).main(argv[1:])


def _eval(argv: list[str]) -> int:
    from ctxsteer.clients.eval.cli import main as eval_main  # torch-free, like the client commands

    return eval_main(argv)


def _profile(argv: list[str]) -> int:
    from ctxsteer.clients.eval.profile import main as profile_main  # torch-free: talks to a server

    return profile_main(argv)


def _score(argv: list[str]) -> int:
    from ctxsteer.server.training.score import main as score_main

    return score_main(argv)


def _finetune(argv: list[str]) -> int:
    from ctxsteer.server.training.finetune import main as finetune_main

    return finetune_main(argv)


def _client_command(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from ctxsteer.clients.cli import main as client_main  # torch-free: starts fast

        return client_main(name, argv)

    return run


COMMANDS = {
    "serve": (_serve, "serve the OpenAI-compatible API (default model: embedded SmolLM2-135M-Instruct)"),
    "bench": (_bench, "benchmarks: `bench steering` (attention cost), `bench server` (throughput)"),
    "chat": (
        _client_command("chat"),
        "chat with a server, one-shot or interactive, with --strength/--context",
    ),
    "models": (_client_command("models"), "list the models a server serves"),
    "health": (_client_command("health"), "check that a server is up and its model loaded"),
    "eval": (_eval, "evaluate context awareness with/without steering: `eval nih|qa|paper`"),
    "profile": (_profile, "find the layers/heads whose steering helps a task; write --head-profiles JSON"),
    "score": (_score, "score chat examples by their responses' attention to the user (`score DATA --out F`)"),
    "finetune": (_finetune, "conditional fine-tuning with the [IND] indicator (`finetune SCORED --out DIR`)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ctxsteer <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<8} {help_}")
        print("\nexample: ctxsteer serve --port 8000")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"ctxsteer: unknown command {argv[0]!r}; try ctxsteer --help", file=sys.stderr)
        return 2
    _threads_env()
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
