#!/usr/bin/env bash
# Prepared in session 12 (~8 min). Re-export first, from /work/main:
#   for x in main:s13main s12-bounded:s13bnd; do c=${x%%:*}; d=.carry/${x##*:}; rm -rf $d;
#     mkdir -p $d; git archive $c | tar -x -C $d; git rev-parse $c > $d/commit.txt; done
# s13main: main; s13bnd: tag s12-bounded (GLA prepass and pullback take one anchor per 32-row
# block in bounded chunks). 1) gk checks on s13bnd; 2) gk at 4k: main, bounded, bounded with
# the bounded form off ("bisect"), bounded at 64 channels per pullback CTA ("w64", now reaching
# the backward), jla; 3) none and g at 4k on main beside jla (the row not re-timed since the
# hi + lo walks); 4) the bounded tree's per-kernel profile with ptxas, and at T = 1k (GLA's
# fwd+bwd is 1.18x jla there, 1.02x at 4k). Few files under $OUT.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cp .carry/s13a.sh $OUT/run.sh; cat .carry/s13main/commit.txt .carry/s13bnd/commit.txt > $OUT/commit.txt
run() { (cd .carry/$1 && shift && PYTHONPATH=/tmp/site:$PWD "$@"); }
run s13bnd timeout 120 python3 -m experiments.check_mosaic_linear --cases 10 11 12 \
  --no-xla-timing --out /tmp/r/chk > $OUT/check_bnd.log 2>&1; echo "check exit $?"
run s13main timeout 60 python3 -m experiments.bench_linear --T 4096 --gates gk --out /tmp/r/main \
  --impls "attnlab mosaic_gpu_gk" > $OUT/bench_main.log 2>&1; echo "bench main exit $?"
run s13bnd timeout 150 python3 -m experiments.bench_linear --T 4096 --gates gk --out /tmp/r/bnd \
  --impls "attnlab mosaic_gpu_gk" "attnlab mosaic_gpu_gk bisect" "attnlab mosaic_gpu_gk w64" \
  "jla mosaic_gpu" > $OUT/bench_bnd.log 2>&1; echo "bench bnd exit $?"
run s13main timeout 110 python3 -m experiments.bench_linear --T 4096 --gates none g --out /tmp/r/gn \
  --impls "attnlab mosaic_gpu" "jla mosaic_gpu" > $OUT/gn4k.log 2>&1; echo "gn4k exit $?"
run s13bnd env MOSAIC_GPU_DUMP_PTXAS=1 timeout 60 python3 -m experiments.profile_kernels --case gk \
  --impl "attnlab mosaic_gpu_gk" --T 4096 --out /tmp/prof > $OUT/profile_bnd.log 2>&1
echo "profile exit $?"
run s13bnd timeout 50 python3 -m experiments.profile_kernels --case gk --impl "attnlab mosaic_gpu_gk" \
  --T 1024 --out /tmp/prof1k > $OUT/profile_bnd_1k.log 2>&1; echo "profile 1k exit $?"
tar czf $OUT/json.tgz -C /tmp r 2>/dev/null
tail -4 $OUT/check_bnd.log | cut -c1-150
for f in bench_main bench_bnd gn4k; do grep -A16 "== bench_linear" $OUT/$f.log | cut -c1-110; done
grep -iE "spill stores|Used [0-9]+ reg" $OUT/profile_bnd.log | cut -c1-120 | head -8
grep -E "ms  " $OUT/profile_bnd.log | head -14 | cut -c1-100
grep -E "ms  |GPU busy" $OUT/profile_bnd_1k.log | head -14 | cut -c1-100
