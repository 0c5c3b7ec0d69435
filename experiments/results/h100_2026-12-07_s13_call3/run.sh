#!/usr/bin/env bash
# Session 13, call 3: why the exact GLA form inside the per-chunk lax.cond is slow (prepass
# 1.29 vs main's 0.67 ms at 4k). Tree s13diag = s12-bounded + prepass.PLAN switch: "exact" /
# "bounded" (static, no branch), "exact_when" (exact inside a one-sided always-true branch).
# 1) weak gates (shift 4, the bench's) 4k: per_chunk, exact, exact_when, bounded, jla;
# 2) strong gates (shift 0: ~all chunks exact) 4k: per_chunk, exact, jla; 3) 64k per_chunk + jla.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cp .carry/s13d.sh $OUT/run.sh; cp .carry/s13diag/commit.txt $OUT/commit.txt
cd .carry/s13diag && export PYTHONPATH=/tmp/site:$PWD
b="python3 -m experiments.bench_linear --gates gk"
G="attnlab mosaic_gpu_gk"
timeout 250 $b --T 4096 --out /tmp/r/weak --deadline-s 240 --impls "$G" "$G exact" \
  "$G exact_when" "$G bounded" "jla mosaic_gpu" > $OUT/weak.log 2>&1; echo "weak exit $?"
timeout 150 $b --T 4096 --gate-shift 0 --out /tmp/r/strong --deadline-s 140 --impls "$G" \
  "$G exact" "jla mosaic_gpu" > $OUT/strong.log 2>&1; echo "strong exit $?"
timeout 110 $b --T 65536 --out /tmp/r/gk64 --deadline-s 100 --impls "$G" "jla mosaic_gpu" \
  > $OUT/gk64.log 2>&1; echo "gk64 exit $?"
tar czf $OUT/json.tgz -C /tmp r 2>/dev/null
for f in weak strong gk64; do grep -E "^gk " $OUT/$f.log | cut -c1-110; done
