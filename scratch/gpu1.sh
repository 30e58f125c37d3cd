#!/usr/bin/env bash
# Device call 1: the unrun code on the GPU, the int8 tile sweep, decode steps with fused rotary.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
(python3 benchmarks/random_model.py llama-3-8b /tmp/l8 --tokenizer > $OUT/random_model.log 2>&1; echo done >> $OUT/random_model.log) &
timeout 200 python3 -m pytest -q -x tests/test_gpu_decode.py > $OUT/pytest.txt 2>&1; echo "pytest rc=$?" >> $OUT/pytest.txt
tail -3 $OUT/pytest.txt
cd benchmarks
timeout 100 python3 weight_only_sweep.py --bits 8 --rows 1,16,64,128,256,512,2048 --json $OUT/sweep_rows.json > $OUT/sweep_rows.txt 2>&1
cat $OUT/sweep_rows.txt
timeout 160 python3 weight_only_sweep.py --bits 8 --rows 16,64 --sweep swap --json $OUT/sweep_swap.json > $OUT/sweep_swap.txt 2>&1
cat $OUT/sweep_swap.txt
cd ..
wait
tail -2 $OUT/random_model.log
timeout 150 python3 benchmarks/gpu_decode.py /tmp/l8 --graph-only --kernel-table 12 --precisions native,int8 --batches 1,16,64 --prefill "" --steps 12 --json $OUT/decode.json > $OUT/decode.txt 2>&1
cat $OUT/decode.txt | tail -60
