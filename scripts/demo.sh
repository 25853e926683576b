#!/usr/bin/env bash
# Demo: start the reference agent SIMULATOR on loopback, run the multi-dataset workflow of
# examples/mix.yaml on the bundled datasets (three collections with their own temperature and
# repeats, then a 60/30/10 mix), print the summary and the output paths, stop the agent.
# Rerun it to see resume: every chunk and the mix come back from the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p out

# A server your shell points at shows the demo in its UI; one that does not answer is skipped.
if [ -n "${PREFECT_API_URL:-}" ] && ! "$BIN/python" -c 'import httpx, sys
httpx.get(sys.argv[1].rstrip("/") + "/health", timeout=3)' "$PREFECT_API_URL" 2>/dev/null; then
  echo "note: no Prefect server answers at PREFECT_API_URL=$PREFECT_API_URL; using a temporary one"
  unset PREFECT_API_URL
fi

log=$(mktemp)
"$BIN/rollouts" serve-agent --port 0 --latency-ms 20 >"$log" 2>&1 &
agent_pid=$!
trap 'kill $agent_pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
  grep -q "listening on" "$log" && break
  sleep 0.1
done
url=$(grep -o 'http://[^ ]*' "$log")
echo "reference agent (simulator) at $url"

ROLLOUTS_AGENTS="{\"reference\": \"$url\"}" "$BIN/rollouts" multi --config examples/mix.yaml

echo
echo "Run it again (make demo): every chunk and the mix come back from the cache, nothing is sent."
echo "To watch runs in the Prefect UI, see \"Run it from Prefect\" in README.md (make server)."
