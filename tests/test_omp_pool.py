"""The engine thread owns the process's only OpenMP pool (server/engine/local/omp.py): the local engine is
built (model loaded, weights prepacked, KV cache allocated) in a thread that has ended when
`build_engine` returns, never in the calling thread, whose pool would stay for the process's life.

The effect itself (a second libgomp pool made every forward ~2x slower on 2 cores) is a timing and is
measured by `ctxsteer bench server`; these tests pin the mechanism.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ctxsteer.server import main as server_main
from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.local.engine import LocalEngine
from ctxsteer.server.engine.local.omp import in_fresh_thread


def test_in_fresh_thread_returns_raises_and_ends() -> None:
    seen: list[threading.Thread] = []

    def work(x: int) -> int:
        seen.append(threading.current_thread())
        return x + 1

    assert in_fresh_thread(work, 41) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(ValueError, match="boom"):
        in_fresh_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_build_engine_loads_and_allocates_off_the_calling_thread(tiny_model_dir: Path, monkeypatch) -> None:
    where: dict[str, threading.Thread] = {}
    real_load, real_init = server_main.load_model, LocalEngine.__init__

    def load(*args, **kwargs):
        where["load"] = threading.current_thread()
        return real_load(*args, **kwargs)

    def init(self, *args, **kwargs):
        where["engine"] = threading.current_thread()  # the KV cache and runner tensors are made here
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(server_main, "load_model", load)
    monkeypatch.setattr(LocalEngine, "__init__", init)
    engine = server_main.build_engine(ServerConfig(model=str(tiny_model_dir), dtype="float32"))
    assert isinstance(engine, LocalEngine)
    assert where["load"] is where["engine"]
    assert where["load"] is not threading.current_thread() and not where["load"].is_alive()
