"""Run evaluation cells concurrently with a progress bar, storing each as it finishes.

Concurrency is what lets the server batch: with N requests in flight its scheduler decodes them together.
A cell that cannot fit the context, or that the server refuses, is skipped and reported; an unreachable
server stops the run (after saving what finished, so a rerun resumes).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ctxsteer.clients.eval.api import ContextTooLong, RequestFailed
from ctxsteer.clients.eval.results import Key, ResultStore


@dataclass(frozen=True, slots=True)
class Job:
    """One cell: `fields` identify it (and hold its key), `run()` returns its result fields."""

    fields: dict[str, Any]
    run: Callable[[], Awaitable[dict[str, Any]]]


@dataclass(slots=True)
class RunReport:
    total: int = 0
    resumed: int = 0  # already in results.json
    ran: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def line(self) -> str:
        done = f"{self.ran} run, {self.resumed} already done"
        return f"{done}, {len(self.skipped)} skipped (of {self.total} cells)"


async def run_jobs(
    jobs: Sequence[Job], store: ResultStore, *, concurrency: int, desc: str, progress: bool = True
) -> RunReport:
    """Run the jobs not already in `store`, at most `concurrency` at a time; save as they finish."""
    report = RunReport(total=len(jobs))
    pending: list[Job] = []
    seen: set[Key] = set()
    for job in jobs:
        k = store.key(job.fields)
        if store.done(k):
            report.resumed += 1
        elif k not in seen:
            seen.add(k)
            pending.append(job)
    sem = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(pending), desc=desc, unit="cell", disable=not progress, file=sys.stderr, leave=True)

    async def one(job: Job) -> None:
        async with sem:
            try:
                result = await job.run()
            except ContextTooLong as e:
                store.skip(job.fields, f"context too long: {e}")
                report.skipped.append(store.skipped[store.key(job.fields)])
            except RequestFailed as e:
                store.skip(job.fields, f"request failed: {e}")
                report.skipped.append(store.skipped[store.key(job.fields)])
            else:
                store.add({**job.fields, **result})
                report.ran += 1
            store.save(force=False)
            bar.update(1)

    tasks = [asyncio.ensure_future(one(job)) for job in pending]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        store.save()
    return report


def print_skipped(report: RunReport, fields: Sequence[str], out: Any = None) -> None:
    """One line per skipped cell, naming it and why (the issue asks for skips to be reported)."""
    out = out or sys.stderr
    for cell in report.skipped:
        name = ", ".join(f"{f}={cell.get(f)}" for f in fields)
        print(f"skipped {name}: {cell['reason']}", file=out)
