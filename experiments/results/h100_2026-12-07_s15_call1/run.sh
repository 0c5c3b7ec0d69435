#!/usr/bin/env bash
# Prepared in session 14, after s15a (same export, .carry/s15main): GLA at 64k on main beside
# jla; then fla's rows still missing: chunk_gla at 16k and 64k (one process: the first shape
# pays about three minutes of autotuning, the next reuses it), chunk_linear_attn and
# chunk_simple_gla at 64k and chunk_simple_gla at 1k. JSON tarred after each step.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cp .carry/s15b.sh $OUT/run.sh; cp .carry/s15main/commit.txt $OUT/commit.txt
cd .carry/s15main && export PYTHONPATH=/tmp/site:$PWD
b="python3 -m experiments.bench_linear"
keep() { tar czf $OUT/json.tgz -C /tmp r 2>/dev/null; }
timeout 100 $b --T 65536 --gates gk --out /tmp/r/gk64 --deadline-s 90 \
  --impls "attnlab mosaic_gpu_gk" "jla mosaic_gpu" > $OUT/gk64.log 2>&1; echo "gk64 $?"; keep
timeout 280 $b --T 16384 65536 --gates gk --out /tmp/r/flagk --deadline-s 270 \
  --impls "fla triton" > $OUT/flagk.log 2>&1; echo "fla gk $?"; keep
timeout 150 $b --T 65536 1024 --gates none g --out /tmp/r/flang --deadline-s 140 \
  --impls "fla triton" > $OUT/flang.log 2>&1; echo "fla none/g $?"; keep
grep -hE "^(gk|none|g) " $OUT/*.log | cut -c1-110
