#!/usr/bin/env bash
# Run on the development machine before a session's GPU check: downloads into .whl/ (git-ignored
# through .git/info/exclude) the wheels that the device image lacks, at the versions of this venv.
# The device machine cannot reach any index; the `run` call carries .whl (see scripts/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PKGS="transformers fastapi starlette uvicorn pydantic pydantic_core annotated-types typing-inspection annotated-doc"
pins=$(.venv/bin/python -m pip freeze 2>/dev/null | grep -i -E "^($(echo "$PKGS" | tr ' ' '|'))==")
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
ls .whl && du -sh .whl
