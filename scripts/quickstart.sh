#!/usr/bin/env bash
# README command 1: set everything up, start a local 1 prefill + 1 decode cluster with
# `splitwise up` (its own redis-server, the built-in `small` model), send it a real chat request
# through the OpenAI API, print the answer, and shut the cluster down. Exits non-zero on failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup_env.sh
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"

LOG="$(mktemp -t splitwise-up.XXXXXX)"
echo "==> splitwise up --prefill 1 --decode 1 (log: $LOG)"
splitwise --log-level WARNING up --prefill 1 --decode 1 --port 0 >"$LOG" 2>&1 &
UP_PID=$!
cleanup() { kill -TERM "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; }
trap cleanup EXIT

BASE_URL=""
for _ in $(seq 1 900); do
  BASE_URL="$(sed -n 's/^OpenAI base URL: //p' "$LOG" | head -n1)"
  [ -n "$BASE_URL" ] && break
  if ! kill -0 "$UP_PID" 2>/dev/null; then cat "$LOG" >&2; echo "error: splitwise up exited" >&2; exit 1; fi
  sleep 1
done
[ -n "$BASE_URL" ] || { cat "$LOG" >&2; echo "error: the cluster did not come up" >&2; exit 1; }
cat "$LOG"

echo "==> POST $BASE_URL/chat/completions"
"$ROOT/.venv/bin/python" - "$BASE_URL" <<'PY'
import json, sys, urllib.request
base = sys.argv[1]
body = {"messages": [{"role": "user", "content": "Write one sentence about prefill and decode."}],
        "max_tokens": 32, "temperature": 0.7, "seed": 1}
req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=300) as resp:
    answer = json.load(resp)
print(json.dumps(answer, indent=2))
choice = answer["choices"][0]
assert choice["finish_reason"] in ("stop", "length"), choice
assert answer["usage"]["completion_tokens"] >= 1, answer["usage"]
print("\nassistant (random-weight demo model, so the text is gibberish):", repr(choice["message"]["content"]))
PY
echo "==> shutting the cluster down"
cleanup
trap - EXIT
echo "==> done"
