"""docs/architecture.md's source listing matches the tree: every file it names exists, and every source file
is named (or lies in a folder the listing describes as a whole, e.g. `examples/`). A new or moved module
fails this test until the page says what it is for."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("steering", "server", "clients")
_ENTRY = re.compile(r"^( *)([\w.-]+/?)(?:\s|$)")


def listing(text: str) -> tuple[set[str], set[str]]:
    """(files, whole folders) named by the listing block: the fenced block that starts with `steering/`."""
    block = text.split("```\nsteering/", 1)[1].split("```", 1)[0]
    files: set[str] = set()
    folders: dict[str, bool] = {}  # folder -> has children listed
    stack: list[str] = []
    for line in ("steering/" + block).splitlines():
        m = _ENTRY.match(line)
        if m is None or (not m.group(2).endswith((".py", "/"))):
            continue
        depth = len(m.group(1)) // 2
        if depth == 0 and m.group(2).rstrip("/") not in TOP:
            break  # scripts/, tests/ ...: described, not listed file by file
        del stack[depth:]
        path = "/".join([*stack, m.group(2).rstrip("/")])
        if stack:
            folders["/".join(stack)] = True
        if m.group(2).endswith("/"):
            folders.setdefault(path, False)
            stack.append(m.group(2).rstrip("/"))
        else:
            files.add(path)
    return files, {f for f, has_children in folders.items() if not has_children}


def tree_sources() -> set[str]:
    out = set()
    for top in TOP:
        for p in (ROOT / top).rglob("*.py"):
            rel = p.relative_to(ROOT).as_posix()
            if "__pycache__" in p.parts or (p.name == "__init__.py" and rel != "clients/__init__.py"):
                continue
            out.add(rel)
    return out


def test_the_architecture_listing_matches_the_tree() -> None:
    files, whole = listing((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    assert len(files) > 50  # the parser found the listing
    tree = tree_sources()
    unlisted = {f for f in tree - files if not any(f.startswith(w + "/") for w in whole)}
    assert not unlisted, f"source files missing from docs/architecture.md: {sorted(unlisted)}"
    stale = files - tree
    assert not stale, f"docs/architecture.md lists files that do not exist: {sorted(stale)}"


def test_the_parser_sees_a_missing_and_a_stale_entry() -> None:
    text = "x\n```\nsteering/   core\n  spec.py   spec\n  gone.py   old\nserver/\n  api/   routes\n```\n"
    files, whole = listing(text)
    assert files == {"steering/spec.py", "steering/gone.py"} and whole == {"server/api"}
