#!/usr/bin/env bash
# The one prepared GPU check for a session that is lent a device machine. Here first:
#   bash scripts/gpu_wheels.sh
# then one device call:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Results land in $OUT: gpu.txt, pytest-cuda.txt, bench-steering-cuda.json, bench-server-cuda.json.
# Not covered here: the vLLM backend's CUDA path (--engine vllm, FLASH_ATTN). vLLM's CUDA wheel and the
# torch 2.13 it pins are gigabytes; the device image has torch 2.11 and the run carries at most 64 MiB.
# With a package index, `make venv-vllm VLLM_FLAVOR=cuda` builds it; tests/test_vllm_backend.py compares in fp32,
# which FlashAttention lacks: a bf16 variant with a looser tolerance is still to be written.
# A dry run of everything after the install, on this machine's CPU:
#   SKIP_INSTALL=1 DEVICE=cpu PY=.venv/bin/python QUICK=1 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${SKIP_INSTALL:-}" ]; then
  # The device image has torch, tokenizers, httpx, prometheus-client...; the rest travels as wheels.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site
fi
if [ -n "${QUICK:-}" ]; then LENGTHS=256; CONC=1,4; LAYERS=2; else LENGTHS=2000,8000; CONC=1,8,32; LAYERS=30; fi
DTYPE=bfloat16; [ "$DEVICE" = cpu ] && DTYPE=float32

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"; } | tee "$OUT/gpu.txt"

echo "== 1. CUDA correctness (tests/test_cuda.py)"
$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest-cuda.txt" | tail -15

echo "== 2. a random-weight model shaped like SmolLM2-135M (the GGUF is too big to carry; speed ignores weights)"
MODEL=/tmp/smollm2-shape
$PY - "$MODEL" "$LAYERS" <<'PYEOF' || exit 1
import sys
sys.path.insert(0, "tests")
from tiny import save_tiny_model
from transformers import AutoTokenizer
path = save_tiny_model(sys.argv[1], "llama", hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=int(sys.argv[2]), num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, max_position_embeddings=8192, vocab_size=49152)
# Every id the random model can emit must decode to text, or streams carry no content (no TTFT/ITL).
tok = AutoTokenizer.from_pretrained(path)
tok.add_tokens([f"<x{i}>" for i in range(len(tok), 49152)])
tok.model_max_length = 8192
tok.save_pretrained(path)
PYEOF

echo "== 3. steering cost ($DEVICE, $DTYPE)"
timeout 240 $PY -m ctxsteer.server.cli bench steering --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
  --lengths "$LENGTHS" --json "$OUT/bench-steering-cuda.json" 2>&1 | grep -v "Loading weights" | tail -6

echo "== 4. serving throughput over HTTP ($CONC streams)"
$PY -m ctxsteer.server.cli serve "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --port 8123 --max-num-seqs 32 \
  --log-level warning > "$OUT/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 180); do curl -sf http://127.0.0.1:8123/ready > /dev/null && break; sleep 1; done
timeout 240 $PY -m ctxsteer.server.cli bench server --url http://127.0.0.1:8123 --model smollm2-shape \
  --concurrency "$CONC" --json "$OUT/bench-server-cuda.json" 2>&1 | tail -14
kill "$SERVER" 2> /dev/null; wait "$SERVER" 2> /dev/null
tail -3 "$OUT/serve.log"
