#!/usr/bin/env bash
# Session 16, second call on the same warm machine: fla chunk_linear_attn fwd+bwd at 64k beside
# ours (the first call's 130 s ran out inside fla's autotuning; its cache stays on the machine).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cp .carry/s16b.sh $OUT/run.sh; cp .carry/s16main/commit.txt $OUT/commit.txt
cd .carry/s16main && export PYTHONPATH=/tmp/site:$PWD
rm -rf /tmp/r2
timeout 400 python3 -m experiments.bench_linear --T 65536 --gates none --directions fwd+bwd \
  --out /tmp/r2/flan --deadline-s 390 --impls "attnlab mosaic_gpu" "fla triton" \
  > $OUT/flan.log 2>&1; echo "fla none $?"
tar czf $OUT/json.tgz -C /tmp r2 2>/dev/null
grep -hE "^(none) " $OUT/*.log | cut -c1-110
