"""One OpenMP worker pool per process: torch's CPU kernels in one thread only.

torch's CPU build parallelises with libgomp, which gives every thread that opens a parallel region its
own pool of worker threads, kept for the thread's life. Once the pools together hold more threads than
there are cores, libgomp stops spinning at its barriers and sleeps on a futex at every one, and a forward
pass opens hundreds of regions. The server loads the model in the main thread and decodes in the engine
thread: two pools on 2 cores made every forward about 2x slower (SmolLM2 bf16, one row, one token: 30 ms
alone, 59 ms with a second pool; fp32 alike; GOMP_SPINCOUNT does not help, OMP_WAIT_POLICY=passive makes
both slow). So the work that builds the engine (loading, prepacking, allocating the KV cache) runs in a
short-lived thread, whose pool goes when it ends, and the engine thread is the only one that keeps one.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def in_fresh_thread(fn: Callable[..., T], *args: object, name: str = "ctxsteer-build") -> T:
    """`fn(*args)` in a new thread that has ended when this returns (the executor joins it on exit), so its
    OpenMP pool has ended too. Returns fn's result or raises its exception; the calling thread opens no
    parallel region."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as pool:
        return pool.submit(fn, *args).result()
