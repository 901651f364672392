"""Wait on a condition, not on the clock: under load (CI, shared CPUs) a test then waits longer instead of
failing for being slow, and the generous deadline still turns a condition that never comes true into a
failure that names it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE_S = 120.0  # far beyond any healthy wait here: reaching it means the condition is not coming


def wait_for(
    check: Callable[[], T],
    what: str | Callable[[], str],
    timeout_s: float = DEADLINE_S,
    every_s: float = 0.05,
) -> T:
    """Poll `check` until it returns something truthy and return that; past `timeout_s`, fail saying `what`
    (a callable is asked only then, e.g. for the last state seen)."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            what = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)
    return result
