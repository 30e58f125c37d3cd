#!/usr/bin/env bash
# Device call 2: GPU tests, decode steps (fused rotary, transposed int8 tiles) and prefill per precision.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site
(python3 benchmarks/random_model.py llama-3-8b /tmp/l8 --tokenizer > $OUT/random_model.log 2>&1; echo done >> $OUT/random_model.log) &
timeout 230 python3 -m pytest -q tests/test_gpu_decode.py > $OUT/pytest.txt 2>&1; echo "pytest rc=$?" >> $OUT/pytest.txt
grep -E "passed|failed|FAILED|Error" $OUT/pytest.txt | head -20
wait
timeout 300 python3 benchmarks/gpu_decode.py /tmp/l8 --graph-only --kernel-table 12 --precisions native,int8,int4 --batches 1,16,64 --prefill 512,2048 --steps 12 --json $OUT/decode.json > $OUT/decode.txt 2>&1
grep -v "^ " $OUT/decode.txt | tail -40
