"""scripts/code_shape.py (run by `make lint`) measures what it claims: on a small made-up tree, the long
function, the engine class, the largest file and the README are found and counted, and going over a limit
fails."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("code_shape", REPO / "scripts" / "code_shape.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


code_shape = _load_script()


def _function(name: str, body_lines: int, decorated: bool = False) -> str:
    head = "@staticmethod\n" if decorated else ""
    return head + f"def {name}():\n" + '    """Doc."""\n' + "    x = 1\n" * (body_lines - 1)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "server" / "engine" / "local").mkdir(parents=True)
    (tmp_path / "steering").mkdir()
    (tmp_path / "clients").mkdir()
    # 1 decorator + def + docstring + 69 statements = 72 lines, in steering/
    core = _function("short", 5) + "\n\n" + _function("long", 70, decorated=True)
    (tmp_path / "steering" / "core.py").write_text(core)
    engine = "import os\n\n\nclass LocalEngine:\n" + "    a = 1\n" * 30 + "\n\nclass Other:\n    b = 2\n"
    (tmp_path / "server" / "engine" / "local" / "engine.py").write_text(engine)
    (tmp_path / "server" / "__pycache__").mkdir()
    (tmp_path / "server" / "__pycache__" / "big.py").write_text("x = 1\n" * 900)  # not source
    # clients/ counts for file size only: a long function there is not measured
    (tmp_path / "clients" / "big.py").write_text(_function("huge", 120) + "y = 2\n" * 380)
    (tmp_path / "README.md").write_text("line\n" * 42)
    return tmp_path


def test_measures_find_the_longest_function_class_file_and_readme(tree: Path) -> None:
    assert code_shape.longest_function(tree) == (72, "steering/core.py:10 long")
    assert code_shape.class_lines(tree / code_shape.ENGINE_FILE, "LocalEngine") == 31
    assert code_shape.class_lines(tree / code_shape.ENGINE_FILE, "Missing") == 0
    assert code_shape.largest_file(tree) == (501, "clients/big.py")
    values = {m.name: m.value for m in code_shape.measure(tree)}
    assert values == {
        "longest function": 72,
        "class LocalEngine": 31,
        "largest source file": 501,
        "README.md": 42,
    }


def test_over_a_limit_fails_and_within_passes(
    tree: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(code_shape, "FUNCTION_LIMIT", 72)
    monkeypatch.setattr(code_shape, "ENGINE_CLASS_LIMIT", 31)
    monkeypatch.setattr(code_shape, "FILE_LIMIT", 501)
    monkeypatch.setattr(code_shape, "README_LIMIT", 42)
    assert code_shape.main([str(tree)]) == 0
    assert "OVER" not in capsys.readouterr().out

    monkeypatch.setattr(code_shape, "FUNCTION_LIMIT", 71)  # the long function is one line too long
    assert code_shape.main([str(tree)]) == 1
    out = capsys.readouterr().out
    assert "steering/core.py:10 long  OVER LIMIT" in out
    assert out.count("OVER LIMIT") == 1

    monkeypatch.setattr(code_shape, "FUNCTION_LIMIT", 72)
    monkeypatch.setattr(code_shape, "FILE_LIMIT", 400)
    assert code_shape.main([str(tree)]) == 1
    assert "clients/big.py  OVER LIMIT" in capsys.readouterr().out


def test_limits_never_sit_below_their_goals() -> None:
    """A limit is where the code is now or its goal, whichever is larger: never stricter than the goal."""
    pairs = [
        (code_shape.FUNCTION_LIMIT, code_shape.FUNCTION_GOAL),
        (code_shape.ENGINE_CLASS_LIMIT, code_shape.ENGINE_CLASS_GOAL),
        (code_shape.FILE_LIMIT, code_shape.FILE_GOAL),
        (code_shape.README_LIMIT, code_shape.README_GOAL),
    ]
    assert all(limit >= goal for limit, goal in pairs)
