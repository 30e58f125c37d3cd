#!/usr/bin/env bash
# Serving on one GPU through the real daemons and the line protocol, against transformers
# `generate` on the same GPU with the same requests in the same run (hetserve bench --baseline hf).
# 1 stage, then 2 stage processes sharing the one GPU (a pipeline of two, not two GPUs).
#
#   python benchmarks/random_model.py llama-3-8b /tmp/llama-3-8b --tokenizer
#   bash benchmarks/gpu_serving.sh /tmp/llama-3-8b OUT_DIR [CONCURRENCY...]
set -euo pipefail
model=$1
out=$2
shift 2
levels=("${@:-1 16 64}")
mkdir -p "$out"
hetserve() { python3 -m hetserve "$@"; }
for workers in 1 2; do
  hetserve up --workers "$workers" --device cuda --dtype bfloat16 --model "$model" --listen 127.0.0.1:5565 \
    --serve 127.0.0.1:5566 --max-seqs 64 --decode-seqs 64 --prefill-seqs 8 --prefill-tokens 1024 \
    --max-context 1024 --log-level warning &
  server=$!
  for c in ${levels[*]}; do
    extra=()
    [ "$workers" = 1 ] && extra=(--baseline hf --device cuda --dtype bfloat16)
    hetserve bench --server 127.0.0.1:5566 --model "$model" -c "$c" --requests $((c * 2)) --prompt-tokens 128 \
      --output-tokens 128 --wait 600 --no-progress "${extra[@]}" --json "$out/stages$workers-c$c.json" \
      | tee "$out/stages$workers-c$c.txt"
    hetserve status --server 127.0.0.1:5566 | tee -a "$out/stages$workers-c$c.txt"  # sizes and stage times
  done
  kill -INT "$server"
  wait "$server" || true
done
