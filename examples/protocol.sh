#!/usr/bin/env bash
# The line protocol by hand, with nc (netcat): one JSON object per line each way.
SERVER_HOST=${1:-127.0.0.1}
SERVER_PORT=${2:-5556}
{
  echo '{"id": "s", "cmd": "status"}'
  echo '{"id": "r1", "prompt": "The capital of France is", "max_tokens": 8}'
  echo '{"id": "r2", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 16, "stream": false}'
  echo '{"id": "bad", "prompt": 42}'
  sleep 5
} | nc -q 10 "$SERVER_HOST" "$SERVER_PORT"
