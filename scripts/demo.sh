#!/usr/bin/env bash
# `make demo`: three daemons on this machine run the default model together; show the
# cluster's status, answer a question through the third one, then stop them.
set -uo pipefail
bin=${1:-.venv/bin}
base=${RINGINFER_DEMO_PORT:-7711}
api=${RINGINFER_DEMO_API_PORT:-7700}
dir=$(mktemp -d)
pids=()
"$bin/ringinfer" secret "$dir/cluster.key" 2>/dev/null  # a throwaway cluster secret
export RINGINFER_SECRET_FILE="$dir/cluster.key"        # daemons and clients both take it
cleanup() {
  kill -TERM "${pids[@]}" 2>/dev/null
  wait "${pids[@]}" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT

# On one machine: found by --peer, not mDNS (which would advertise on the LAN), and planned
# for throughput: for one request at a time the planner would rightly keep the model on
# one node, since three daemons here share the same cores. Each takes a third of them:
# stages computing at once (several requests in flight) would otherwise fight for them.
threads=$(( ($(nproc) + 2) / 3 ))
for i in 1 2 3; do
  "$bin/ringinfer" daemon --host 127.0.0.1 --port $((base + i - 1)) --name "node$i" \
    --data-dir "$dir/node$i" --peer "127.0.0.1:$base" --no-mdns --objective throughput \
    --threads "$threads" \
    --api "127.0.0.1:$((api + i - 1))" \
    >"$dir/node$i.log" 2>&1 &
  pids+=($!)
done
echo "started node1..node3 on 127.0.0.1:$base-$((base + 2)), their APIs and pages on" \
  "http://127.0.0.1:$api/ .. http://127.0.0.1:$((api + 2))/; waiting for their plan"

third="127.0.0.1:$((base + 2))"
for _ in $(seq 300); do
  for i in 1 2 3; do
    if ! kill -0 "${pids[$((i - 1))]}" 2>/dev/null; then
      echo "node$i exited:" >&2
      tail -n 5 "$dir/node$i.log" >&2
      exit 1
    fi
  done
  if "$bin/ringinfer" status --node "$third" --wait 1 >/dev/null 2>&1; then
    break
  fi
done

"$bin/ringinfer" status --node "$third" --wait 5 || exit 1
echo
echo '$ ringinfer generate --node' "$third" '--chat "What is the capital of France?"'
"$bin/ringinfer" generate --node "$third" --chat --max-tokens 48 "What is the capital of France?"

echo
echo "\$ curl http://127.0.0.1:$api/v1/chat/completions -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Name three colours.\"}], \"max_tokens\": 32, \"temperature\": 0}'"
curl -sS "http://127.0.0.1:$api/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 32, "temperature": 0}' |
  "$bin/python" -m json.tool
if [ -t 0 ]; then
  echo
  echo "The cluster keeps running: open http://127.0.0.1:$api/ for its page and a chat."
  echo "Press Ctrl-C to stop it."
  wait "${pids[@]}"
fi
