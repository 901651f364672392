"""The layering contracts of pyproject.toml ([tool.importlinter]) hold: steering knows no server or
clients, clients know no server, engines know no HTTP layer. `make lint` runs the same script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "lint_imports.py"


def lint(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(config)], capture_output=True, text=True, timeout=300
    )


def test_the_project_keeps_its_import_contracts() -> None:
    r = lint(ROOT / "pyproject.toml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 kept, 0 broken" in r.stdout


def test_a_broken_contract_is_reported(tmp_path: Path) -> None:
    """The checker sees real imports: the HTTP layer does use the engine interface."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "ctxsteer"\n\n'
        '[[tool.importlinter.contracts]]\nname = "api without engine"\ntype = "forbidden"\n'
        'source_modules = ["ctxsteer.server.api"]\nforbidden_modules = ["ctxsteer.server.engine"]\n'
    )
    r = lint(config)
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout + r.stderr
