#!/usr/bin/env bash
# The HTTP API with curl (start the leader or `hetserve up` with --http 127.0.0.1:8000).
URL=${URL:-http://127.0.0.1:8000}

curl -s "$URL/v1/models"; echo

curl -s "$URL/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'; echo

# Streaming: server-sent events, one `data: {...}` per piece, then `data: [DONE]`.
curl -sN "$URL/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32, "stream": true}'

curl -s "$URL/metrics" | grep -v '^#'
