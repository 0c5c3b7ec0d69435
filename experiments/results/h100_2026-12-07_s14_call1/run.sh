#!/usr/bin/env bash
# Session 14: fla's Triton kernels for the rows it lacks:
# chunk_gla at 1k, 16k, 64k (one process: the first shape pays Triton's autotune compile,
# later shapes reuse its autotune results), then chunk_linear_attn / chunk_simple_gla at 1k and
# 64k; then the tree named in $1 (an export of branch merge-forms = main + tag s13-forms) times
# GLA at 1k / 16k / 64k beside jla.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
tree=${1:-s14mf}
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cp .carry/s14c.sh $OUT/run.sh; cp .carry/$tree/commit.txt $OUT/commit.txt
cd .carry/$tree && export PYTHONPATH=/tmp/site:$PWD
b="python3 -m experiments.bench_linear"
timeout 230 $b --T 1024 16384 65536 --gates gk --out /tmp/r/flagk --deadline-s 220 \
  --impls "fla triton" > $OUT/flagk.log 2>&1; echo "fla gk exit $?"; tar czf $OUT/json.tgz -C /tmp r
timeout 110 $b --T 1024 65536 --gates none g --out /tmp/r/flang --deadline-s 100 \
  --impls "fla triton" > $OUT/flang.log 2>&1; echo "fla none/g exit $?"; tar czf $OUT/json.tgz -C /tmp r
timeout 140 $b --T 1024 16384 65536 --gates gk --out /tmp/r/gk --deadline-s 120 \
  --impls "attnlab mosaic_gpu_gk" "jla mosaic_gpu" > $OUT/gk.log 2>&1; echo "gk exit $?"
tar czf $OUT/json.tgz -C /tmp r 2>/dev/null
grep -hE "^(gk|none|g) " $OUT/gk.log $OUT/fla*.log | cut -c1-110
