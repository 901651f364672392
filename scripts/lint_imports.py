"""Check the import contracts of pyproject.toml ([tool.importlinter]) with import-linter.

ctxsteer's packages live in top-level folders mapped onto `ctxsteer.*` (pyproject's package-dir), which
import-linter cannot walk through the editable install's import hook. So the check runs on a shim: a
temporary `ctxsteer/` whose subpackages are symlinks to those folders, first on sys.path.
Usage: python scripts/lint_imports.py [CONFIG]   (default: pyproject.toml); exit status 0 = all kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"steering": "steering", "server": "server", "clients": "clients"}


def main(argv: list[str]) -> int:
    config = Path(argv[0]).resolve() if argv else ROOT / "pyproject.toml"
    with tempfile.TemporaryDirectory(prefix="ctxsteer-imports-") as tmp:
        pkg = Path(tmp, "ctxsteer")
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        for name, folder in PACKAGES.items():
            (pkg / name).symlink_to(ROOT / folder, target_is_directory=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]))
        exe = Path(sys.executable).with_name("lint-imports")
        cmd = [str(exe), str(config), "--no-cache", "--no-logo"]
        return subprocess.run(cmd, env=env, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
