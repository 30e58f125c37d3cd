#!/usr/bin/env bash
# Device call 4: int8 serving after the autograd fix (stage outputs held their autograd graphs).
set -u
begin=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site
python3 benchmarks/random_model.py llama-3-8b /tmp/l8 --tokenizer > $OUT/random_model.log 2>&1
echo "model ready after $(( $(date +%s) - begin )) s"
PRECISION=int8 WORKERS=1 REQUESTS_PER_CLIENT=2 timeout 200 bash benchmarks/gpu_serving.sh /tmp/l8 $OUT/int8 64 > $OUT/int8.log 2>&1
echo "int8 rc=$? at $(( $(date +%s) - begin )) s"
pkill -TERM -f "hetserve (up|leader|join)"; sleep 2
grep -v "^ \|^\s*$" $OUT/int8.log | grep -i "error\|warn" | head -5
grep -h -A3 "requests  errors" $OUT/int8/*.txt
grep -h "round trip\|^0 " $OUT/int8/stages*-c*.txt
