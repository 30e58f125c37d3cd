#!/usr/bin/env bash
# The demo: a local cluster (a leader and 2 hosts, each running half of SmolLM2's layers),
# one streamed chat completion, then a clean shutdown.
set -euo pipefail
BIN=${BIN:-.venv/bin}
SERVE=${SERVE:-127.0.0.1:5556}
LISTEN=${LISTEN:-127.0.0.1:5555}

"$BIN/hetserve" up --workers 2 --listen "$LISTEN" --serve "$SERVE" --log-level warning &
UP=$!
# SIGTERM, not SIGINT: a background job of a script ignores SIGINT.
trap 'kill -TERM $UP 2>/dev/null || true; wait $UP' EXIT

echo "starting a leader and 2 hosts on this machine..." >&2
"$BIN/hetserve" generate --server "$SERVE" --wait 300 --max-tokens 96 \
  "In three sentences, explain why a pipeline of unequal machines needs a planner."
"$BIN/hetserve" status --server "$SERVE"
