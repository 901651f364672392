#!/usr/bin/env bash
# Raw HTTP with curl. Run `make serve` first, then: bash clients/examples/curl.sh
set -euo pipefail
BASE="${CTXSTEER_BASE_URL:-http://127.0.0.1:8000/v1}"
AUTH=(-H "Authorization: Bearer ${CTXSTEER_API_KEY:-none}")  # ignored unless the server has --api-key
MODEL=$(curl -sf "${AUTH[@]}" "$BASE/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
ROOT="${BASE%/v1}"

echo "# chat, steered (the response has a top-level \"steering\" report)"
curl -sf "${AUTH[@]}" "$BASE/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "'"$MODEL"'",
  "messages": [{"role": "user", "content": "Memo: the bridge is green.\n\nWhat colour is the bridge?"}],
  "max_tokens": 30, "temperature": 0,
  "steering": {"strength": 2}
}'
echo

echo "# the same, streamed (server-sent events; the steering report rides on the last chunk)"
curl -sfN "${AUTH[@]}" "$BASE/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "'"$MODEL"'",
  "messages": [{"role": "user", "content": "Memo: the bridge is green.\n\nWhat colour is the bridge?"}],
  "max_tokens": 10, "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
  "steering_strength": 2
}'

echo "# which prompt tokens a steering request steers (no generation)"
curl -sf "${AUTH[@]}" "$ROOT/tokenize" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "Memo: the bridge is green.\n\nWhat colour is the bridge?"}],
  "steering": {"spans": ["Memo: the bridge is green."]}
}'
echo
