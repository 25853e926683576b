#!/usr/bin/env bash
# Demo: start the reference agent SIMULATOR on loopback, collect the bundled sample with it,
# print the summary and the output paths, stop the agent. Rerun it to see resume: every chunk
# comes back from the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p out

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

"$BIN/rollouts" collect \
  +agent_name=reference +agent_url="$url" \
  +input_jsonl_fpath=data/sample_arithmetic.jsonl \
  +output_jsonl_fpath=out/sample_rollouts.jsonl \
  +num_repeats=4 \
  +num_samples_in_parallel=32 \
  +chunk_size=50 \
  +responses_create_params.temperature=0.4
