#!/usr/bin/env bash
# Session 16, third call (same warm machine, tree .carry/s16main): the per-chunk and exact GLA
# forms on a GPU. Forward at 4k with the bench's gates, strong gates (--gate-shift 0) and steep
# ones (-3), beside the auto choice and jla; check_mosaic_linear gk cases 10 and 12; then the
# forms' fwd+bwd at the bench's gates (about 90 s of compile + check each).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cp .carry/s16c.sh $OUT/run.sh; cp .carry/s16main/commit.txt $OUT/commit.txt
cd .carry/s16main && export PYTHONPATH=/tmp/site:$PWD
rm -rf /tmp/r3
b="python3 -m experiments.bench_linear --gates gk --T 4096"
G="attnlab mosaic_gpu_gk"
keep() { tar czf $OUT/json.tgz -C /tmp r3 2>/dev/null; }
timeout 80 $b --directions fwd --out /tmp/r3/weak --deadline-s 75 --impls "$G" "$G per_chunk" \
  "$G exact" "jla mosaic_gpu" > $OUT/weak.log 2>&1; echo "weak $?"; keep
timeout 60 $b --directions fwd --gate-shift 0 --out /tmp/r3/strong --deadline-s 55 \
  --impls "$G" "$G per_chunk" "jla mosaic_gpu" > $OUT/strong.log 2>&1; echo "strong $?"; keep
timeout 50 $b --directions fwd --gate-shift -3 --out /tmp/r3/steep --deadline-s 45 \
  --impls "$G" "$G exact" > $OUT/steep.log 2>&1; echo "steep $?"; keep
timeout 110 python3 -m experiments.check_mosaic_linear --cases 10 12 --no-xla-timing \
  --out /tmp/r3/chk > $OUT/check.log 2>&1; echo "check $?"; keep
timeout 190 $b --directions fwd+bwd --out /tmp/r3/weakb --deadline-s 185 \
  --impls "$G per_chunk" "$G exact" > $OUT/weakb.log 2>&1; echo "weakb $?"; keep
for f in weak strong steep weakb; do echo "== $f"; grep -E "^gk " $OUT/$f.log | cut -c1-110; done
grep -E "^\{'B'" $OUT/check.log | cut -c1-220
