#!/usr/bin/env bash
# Device call 3: serving through the daemons against transformers generate, per precision.
set -u
begin=$(date +%s)
left() { echo $(( 570 - ($(date +%s) - begin) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site
python3 benchmarks/random_model.py llama-3-8b /tmp/l8 --tokenizer > $OUT/random_model.log 2>&1
echo "model ready after $(( $(date +%s) - begin )) s"
run() {  # label, limit seconds, env..., -- args
  label=$1; limit=$2; shift 2
  t=$(left); [ "$t" -lt 60 ] && { echo "$label: skipped, ${t}s left"; return; }
  [ "$limit" -gt "$t" ] && limit=$t
  s=$(date +%s)
  env "$@" > $OUT/$label.log 2>&1
  echo "$label: rc=$? in $(( $(date +%s) - s )) s"
  pkill -TERM -f "hetserve (up|leader|join)"; sleep 2
}
run bf16 200 WORKERS=1 REQUESTS_PER_CLIENT=4 timeout 200 bash benchmarks/gpu_serving.sh /tmp/l8 $OUT/bf16 64
grep -h -A3 "requests  errors" $OUT/bf16/*.txt
run int8 240 PRECISION=int8 WORKERS=1 REQUESTS_PER_CLIENT=2 timeout 240 bash benchmarks/gpu_serving.sh /tmp/l8 $OUT/int8 16 64
grep -h -A3 "requests  errors" $OUT/int8/*.txt
run int4 200 PRECISION=int4 WORKERS=1 REQUESTS_PER_CLIENT=2 timeout $(left) bash benchmarks/gpu_serving.sh /tmp/l8 $OUT/int4 64
grep -h -A3 "requests  errors" $OUT/int4/*.txt
grep -h "round trip\|^0 " $OUT/*/stages*-c*.txt
