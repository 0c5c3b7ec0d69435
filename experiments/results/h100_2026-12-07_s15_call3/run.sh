#!/usr/bin/env bash
# Session 15, third call on the same warm H100 (its last two minutes of device time): GLA at
# the anchor (4k) on main 7d611d9, ours then jla. The fwd+bwd of each did not reach its timing
# before the timeouts (compile and check take longer than the 75 s / 40 s given).
set -u; export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site >/dev/null 2>&1
cp .carry/s15main/commit.txt $OUT/; cd .carry/s15main && export PYTHONPATH=/tmp/site:$PWD
b="python3 -m experiments.bench_linear --T 4096 --gates gk"
timeout 75 $b --out /tmp/r/gk4 --deadline-s 70 --impls "attnlab mosaic_gpu_gk" > $OUT/gk4.log 2>&1
echo "gk4 $?"; tar czf $OUT/json.tgz -C /tmp r
timeout 40 $b --out /tmp/r/jla4 --deadline-s 35 --impls "jla mosaic_gpu" > $OUT/jla4.log 2>&1
echo "jla4 $?"; tar czf $OUT/json.tgz -C /tmp r; grep -hE "^gk " $OUT/*.log | cut -c1-110
