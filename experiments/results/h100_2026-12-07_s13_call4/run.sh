#!/usr/bin/env bash
# Session 13, call 4: tree s13disp (branch gk-dispatch) = bounded prepass (per-chunk branch)
# + the pullback's form chosen once per call in XLA (lax.cond on the forward's block minima).
# gk 4k with the bench's mild gates (bounded pullback) and strong ones (shift 0: bisection),
# each beside jla; the bench checks each row against the reference first.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cp .carry/s13e.sh $OUT/run.sh; cp .carry/s13disp/commit.txt $OUT/commit.txt
cd .carry/s13disp && export PYTHONPATH=/tmp/site:$PWD
b="python3 -m experiments.bench_linear --gates gk --T 4096"
timeout 110 $b --out /tmp/r/weak --deadline-s 100 --impls "attnlab mosaic_gpu_gk" \
  "jla mosaic_gpu" > $OUT/weak.log 2>&1; echo "weak exit $?"
timeout 110 $b --gate-shift 0 --out /tmp/r/strong --deadline-s 100 --impls \
  "attnlab mosaic_gpu_gk" "jla mosaic_gpu" > $OUT/strong.log 2>&1; echo "strong exit $?"
tar czf $OUT/json.tgz -C /tmp r 2>/dev/null
for f in weak strong; do grep -E "^gk " $OUT/$f.log | cut -c1-110; done
