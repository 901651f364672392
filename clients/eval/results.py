"""`results.json` (+ CSV): every finished cell, every skipped one, and the settings that produced them.

It is also the resume state: a cell whose key is already stored is not run again. Settings that change
what a cell means (model, prompt, needle, ...) are checked on resume, so results of different runs are
never silently mixed.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ctxsteer.clients.eval.api import EvalError

Key = tuple[Any, ...]
SAVE_EVERY_S = 2.0


def key_value(v: Any) -> Any:
    """Floats are rounded so 1 and 1.0, or 1/0.9 written and read back, are the same key."""
    return round(float(v), 6) if isinstance(v, int | float) and not isinstance(v, bool) else v


class ResultStore:
    """Cells keyed by `key_fields`; `meta` must match the stored one to resume."""

    def __init__(self, out_dir: Path, task: str, meta: dict[str, Any], key_fields: Sequence[str]) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "results.json"
        self.task = task
        self.meta = meta
        self.key_fields = tuple(key_fields)
        self.cells: dict[Key, dict[str, Any]] = {}
        self.skipped: dict[Key, dict[str, Any]] = {}
        self._saved_at = 0.0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = json.loads(self.path.read_text(encoding="utf-8"))
        if data.get("task") != self.task:
            raise EvalError(
                f"{self.path} holds {data.get('task')!r} results, not {self.task!r}; use another --out"
            )
        old = data.get("meta", {})
        changed = sorted(k for k in self.meta if k in old and old[k] != self.meta[k])
        if changed:
            raise EvalError(
                f"{self.path} was made with other settings ({', '.join(changed)}); "
                "use another --out (or delete it) instead of mixing results"
            )
        for cell in data.get("cells", []):
            self.cells[self.key(cell)] = cell
        for cell in data.get("skipped", []):
            self.skipped[self.key(cell)] = cell

    def key(self, cell: dict[str, Any]) -> Key:
        return tuple(key_value(cell[f]) for f in self.key_fields)

    def done(self, key: Key) -> bool:
        return key in self.cells

    def add(self, cell: dict[str, Any]) -> None:
        k = self.key(cell)
        self.skipped.pop(k, None)
        self.cells[k] = cell

    def skip(self, cell: dict[str, Any], reason: str) -> None:
        self.skipped[self.key(cell)] = {**cell, "reason": reason}

    def save(self, *, force: bool = True) -> None:
        """Atomic write; with force=False at most every SAVE_EVERY_S (cells finish faster than that)."""
        now = time.monotonic()
        if not force and now - self._saved_at < SAVE_EVERY_S:
            return
        self._saved_at = now
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "task": self.task,
            "meta": self.meta,
            "cells": sorted(self.cells.values(), key=self.key),
            "skipped": sorted(self.skipped.values(), key=self.key),
        }
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.path)

    def write_csv(self, path: Path, columns: Sequence[str]) -> None:
        write_csv(path, self.cells.values(), columns)


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(row)
