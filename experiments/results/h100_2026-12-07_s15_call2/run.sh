#!/usr/bin/env bash
# Session 15, second call on the warm H100 after s15b (its steps hit their timeouts): fla
# chunk_gla at 16k and 64k (forward autotune cached from s15b), then fla none / g at 1k and
# 64k, then jla GLA at 64k. JSON tarred after each step.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cp .carry/s15c.sh $OUT/run.sh; cp .carry/s15main/commit.txt $OUT/commit.txt
cd .carry/s15main && export PYTHONPATH=/tmp/site:$PWD
b="python3 -m experiments.bench_linear"
keep() { tar czf $OUT/json.tgz -C /tmp r 2>/dev/null; }
timeout 230 $b --T 16384 65536 --gates gk --out /tmp/r/flagk --deadline-s 225 \
  --impls "fla triton" > $OUT/flagk.log 2>&1; echo "fla gk $?"; keep
timeout 150 $b --T 1024 65536 --gates g none --out /tmp/r/flang --deadline-s 145 \
  --impls "fla triton" > $OUT/flang.log 2>&1; echo "fla none/g $?"; keep
timeout 60 $b --T 65536 --gates gk --out /tmp/r/jla64 --deadline-s 55 \
  --impls "jla mosaic_gpu" > $OUT/jla64.log 2>&1; echo "jla64 $?"; keep
grep -hE "^(gk|none|g) " $OUT/*.log | cut -c1-110
