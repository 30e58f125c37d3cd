#!/usr/bin/env bash
# Serving on one GPU through the real daemons and the line protocol, against transformers
# `generate` on the same GPU with the same requests in the same run (hetserve bench --baseline hf).
# 1 stage, then 2 stages: on a machine of 2 GPUs each on its own (`hetserve up --device cuda`
# spreads hosts over the GPUs), on one GPU 2 stage processes sharing it.
#
#   python benchmarks/random_model.py llama-3-8b /tmp/llama-3-8b --tokenizer
#   bash benchmarks/gpu_serving.sh /tmp/llama-3-8b OUT_DIR [CONCURRENCY...]
#
# WORKERS="1 2" (default) picks the pipeline depths; BASELINE=none skips transformers; DEVICE and
# DTYPE (cuda, bfloat16) allow a CPU dry run; REQUESTS_PER_CLIENT (2) sets each level's length;
# UP_ARGS adds options to `hetserve up` (e.g. '--decode-ahead off') and LABEL prefixes the output
# files, so that two settings can be run side by side into one OUT_DIR.
# PRECISION=int8 (or int4) serves every decoder layer at that precision (through a plan file of
# the same limits, layers split evenly) and quantizes the transformers baseline's layers the same way.
# With PYSPY_SECONDS=N and py-spy installed, each level also samples the leader and the first
# host for N seconds (2 s into the level) into OUT_DIR/*.pyspy (collapsed stacks: where their
# per-step time goes); py-spy takes a few seconds to attach there, so make the levels long, and
# it needs ptrace rights (on the GPU machine we use it wrote nothing).
set -euo pipefail
model=$1
out=$2
shift 2
levels=("${@:-1 16 64}")
mkdir -p "$out"
hetserve() { python3 -m hetserve "$@"; }
precision=${PRECISION:-native}
uniform_plan() {  # $1 hosts -> a plan file: every layer at $precision, the same limits as below
  python3 "$(dirname "$0")/uniform_plan.py" "$model" "$1" "$precision" "$out/plan-$precision-$1.json" \
    --dtype "${DTYPE:-bfloat16}" --prompt 896 --output 128 --batch 64 --prefill-microbatch 8 --decode-microbatch 64 \
    --writer benchmarks/gpu_serving.sh
}
for workers in ${WORKERS:-1 2}; do
  plan=()
  [ "$precision" != native ] && plan=(--plan "$(uniform_plan "$workers")")
  # python3 itself in the background, not the shell function: $! must be the process that TERM stops (a background job ignores INT).
  python3 -m hetserve up --workers "$workers" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --model "$model" --listen 127.0.0.1:5565 \
    --serve 127.0.0.1:5566 --max-seqs 64 --decode-seqs 64 --prefill-seqs 8 --prefill-tokens 1024 \
    --max-context 1024 --log-level warning "${plan[@]}" ${UP_ARGS:-} &
  server=$!
  trap 'kill -TERM "$server" 2>/dev/null || true' EXIT  # never leave a cluster behind
  # Wait for the cluster to serve (one short request), so that every level starts on a ready one.
  hetserve bench --server 127.0.0.1:5566 --model "$model" -c 1 --requests 1 --prompt-tokens 8 --output-tokens 4 \
    --wait 600 --no-progress > "$out/${LABEL:-}stages$workers-ready.txt"
  for c in ${levels[*]}; do
    extra=()
    [ "$workers" = 1 ] && [ "${BASELINE:-hf}" != none ] && extra=(--baseline hf --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --baseline-precision "$precision")
    if [ -n "${PYSPY_SECONDS:-}" ]; then
      for role in leader join; do  # 2 s in: past bench's warm-up, within its measured load
        (sleep 2; pid=$(pgrep -f "hetserve $role" | head -1) &&
          timeout $((PYSPY_SECONDS + 30)) py-spy record --pid "$pid" --duration "$PYSPY_SECONDS" --format raw \
            --nonblocking -o "$out/${LABEL:-}stages$workers-c$c-$role.pyspy" || true) </dev/null >/dev/null 2>&1 &
      done
    fi
    hetserve bench --server 127.0.0.1:5566 --model "$model" -c "$c" --requests $((c * ${REQUESTS_PER_CLIENT:-2})) --prompt-tokens 128 \
      --output-tokens 128 --wait 600 --no-progress "${extra[@]}" --json "$out/${LABEL:-}stages$workers-c$c.json" \
      | tee "$out/${LABEL:-}stages$workers-c$c.txt"
    hetserve status --server 127.0.0.1:5566 | tee -a "$out/${LABEL:-}stages$workers-c$c.txt"  # sizes and stage times
  done
  kill -TERM "$server"
  wait "$server" || true
done
