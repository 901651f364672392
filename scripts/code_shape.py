"""Size limits on the code that `make lint` enforces: longest function, the local engine class, largest
source file, README length. Exit status 1 when a measured value is over its limit.

Each limit starts at the larger of its goal and today's value, so the check holds the ground already won
while the code shrinks; lower a limit towards its goal whenever the code gets there.
Usage: python scripts/code_shape.py [ROOT]   (default: this checkout)
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# Limits (what fails lint now) and goals (where they go), in lines.
FUNCTION_LIMIT, FUNCTION_GOAL = 60, 60  # longest function or method under server/ and steering/
ENGINE_CLASS_LIMIT, ENGINE_CLASS_GOAL = 250, 250  # class LocalEngine, server/engine/local/engine.py
FILE_LIMIT, FILE_GOAL = 400, 400  # largest .py file under server/, steering/ and clients/
README_LIMIT, README_GOAL = 250, 250  # README.md

FUNCTION_DIRS = ("server", "steering")
SOURCE_DIRS = ("server", "steering", "clients")
ENGINE_FILE, ENGINE_CLASS = "server/engine/local/engine.py", "LocalEngine"


@dataclass(frozen=True, slots=True)
class Measure:
    name: str
    value: int
    limit: int
    goal: int
    where: str  # what was measured: the longest function's file:line and name, the largest file, ...

    @property
    def over(self) -> bool:
        return self.value > self.limit


def python_files(root: Path, dirs: tuple[str, ...]) -> list[Path]:
    """The .py files under `dirs` of `root`, in a stable order (caches and virtual envs left out)."""
    files = (p for d in dirs for p in (root / d).rglob("*.py"))
    return sorted(p for p in files if "__pycache__" not in p.parts and not p.name.startswith("."))


def span(node: ast.AST) -> int:
    """Lines of a def or class, from its first decorator to its last line (docstring included)."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return node.end_lineno - first + 1


def longest_function(root: Path, dirs: tuple[str, ...] = FUNCTION_DIRS) -> tuple[int, str]:
    """The longest function or method (nested ones counted on their own too) and where it is."""
    best, where = 0, ""
    for path in python_files(root, dirs):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and span(node) > best:
                best, where = span(node), f"{path.relative_to(root)}:{node.lineno} {node.name}"
    return best, where


def class_lines(path: Path, name: str) -> int:
    """Lines of top-level class `name` in `path` (0 when the file or class is gone)."""
    if not path.is_file():
        return 0
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return next((span(n) for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), 0)


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else 0


def largest_file(root: Path, dirs: tuple[str, ...] = SOURCE_DIRS) -> tuple[int, str]:
    sizes = [(line_count(p), str(p.relative_to(root))) for p in python_files(root, dirs)]
    return max(sizes, default=(0, ""))


def measure(root: Path) -> list[Measure]:
    fn, fn_where = longest_function(root)
    size, size_where = largest_file(root)
    return [
        Measure("longest function", fn, FUNCTION_LIMIT, FUNCTION_GOAL, fn_where),
        Measure(
            f"class {ENGINE_CLASS}",
            class_lines(root / ENGINE_FILE, ENGINE_CLASS),
            ENGINE_CLASS_LIMIT,
            ENGINE_CLASS_GOAL,
            ENGINE_FILE,
        ),
        Measure("largest source file", size, FILE_LIMIT, FILE_GOAL, size_where),
        Measure("README.md", line_count(root / "README.md"), README_LIMIT, README_GOAL, "README.md"),
    ]


def report(measures: list[Measure]) -> str:
    rows = [f"{'code shape (lines)':<22} {'value':>6} {'limit':>6} {'goal':>6}"]
    for m in measures:
        flag = "  OVER LIMIT" if m.over else ""
        rows.append(f"{m.name:<22} {m.value:>6} {m.limit:>6} {m.goal:>6}  {m.where}{flag}")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    root = Path(argv[0]).resolve() if argv else Path(__file__).resolve().parent.parent
    measures = measure(root)
    print(report(measures))
    return 1 if any(m.over for m in measures) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
