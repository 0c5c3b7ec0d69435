#!/usr/bin/env bash
# Session 12, call 1 (~8 min): gk checks on the two pullback-da tags, gk 4k bench of main / da /
# dsm / jla, then the gk T sweep (1k, 16k, 64k) with whichever passing variant was fastest.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cp .carry/s12c.sh $OUT/run.sh
for v in s12dsm s12da; do
  (cd .carry/$v && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 -m experiments.check_mosaic_linear \
    --cases 10 11 12 --no-xla-timing --out $OUT/chk_$v) > $OUT/check_$v.log 2>&1; echo "check $v exit $?"
done
for v in s12main s12da s12dsm; do
  (cd .carry/$v && PYTHONPATH=/tmp/site:$PWD timeout 60 python3 -m experiments.bench_linear \
    --T 4096 --gates gk --out $OUT/bench_$v --impls "attnlab mosaic_gpu_gk") > $OUT/bench_$v.log 2>&1
  echo "bench $v exit $?"
done
best=$(python3 .carry/pick.py $OUT); echo "best: $best" | tee $OUT/best.txt
cp .carry/$best/commit.txt $OUT/sweep_commit.txt
(cd .carry/$best && PYTHONPATH=/tmp/site:$PWD timeout 230 python3 -m experiments.bench_linear \
  --T 4096 1024 16384 65536 --gates gk --out $OUT/sweep --deadline-s 200 \
  --impls "attnlab mosaic_gpu_gk" "jla mosaic_gpu") > $OUT/sweep.log 2>&1; echo "sweep exit $?"
for v in s12dsm s12da; do echo "== $v"; tail -3 $OUT/check_$v.log | cut -c1-120; done
for v in s12main s12da s12dsm; do echo "== $v"; grep "ok  " $OUT/bench_$v.log | head -2 | cut -c1-100; done
grep -A40 "== bench_linear" $OUT/sweep.log | cut -c1-110
