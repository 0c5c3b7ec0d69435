#!/usr/bin/env bash
# Session 13, call 2: gk check case 12 (packed documents) on the bounded tree; per-kernel
# profiles at 4k of main and of the bounded tree with the bounded form off (bisect was 1.130 /
# 5.248 ms against main's 0.922 fwd in call 1: which kernel pays); gk over T, bounded vs jla.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cp .carry/s13c.sh $OUT/run.sh; cat .carry/s13main/commit.txt .carry/s13bnd/commit.txt > $OUT/commit.txt
run() { (cd .carry/$1 && shift && PYTHONPATH=/tmp/site:$PWD "$@"); }
run s13bnd timeout 100 python3 -m experiments.check_mosaic_linear --cases 12 \
  --no-xla-timing --out /tmp/r/chk > $OUT/check_bnd12.log 2>&1; echo "check exit $?"
run s13main timeout 70 python3 -m experiments.profile_kernels --case gk \
  --impl "attnlab mosaic_gpu_gk" --T 4096 --out /tmp/prof > $OUT/profile_main.log 2>&1
echo "profile main exit $?"
run s13bnd timeout 70 python3 -m experiments.profile_kernels --case gk \
  --impl "attnlab mosaic_gpu_gk bisect" --T 4096 --out /tmp/prof2 > $OUT/profile_bisect.log 2>&1
echo "profile bisect exit $?"
run s13bnd timeout 200 python3 -m experiments.bench_linear --T 1024 16384 65536 --gates gk \
  --out /tmp/r/gk --deadline-s 180 --impls "attnlab mosaic_gpu_gk" "jla mosaic_gpu" \
  > $OUT/gk.log 2>&1; echo "gk exit $?"
tar czf $OUT/json.tgz -C /tmp r 2>/dev/null
tail -1 $OUT/check_bnd12.log | cut -c1-400
grep -E "ms  |GPU busy" $OUT/profile_main.log | head -14 | cut -c1-100
grep -E "ms  |GPU busy" $OUT/profile_bisect.log | head -14 | cut -c1-100
grep -A30 "== bench_linear" $OUT/gk.log | cut -c1-110
