#!/usr/bin/env bash
# session 10's prepared GPU run (see experiments/results/README.md, session 10): re-export
# .carry/s11a from HEAD first if the code changed.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cd .carry/s11a && export PYTHONPATH=/tmp/site:$PWD
cp ../s11a.sh $OUT/run.sh; cp commit.txt $OUT/
timeout 200 python3 -m experiments.check_mosaic_linear --cases 10 11 12 --no-xla-timing --out /tmp/chk > $OUT/gla_check.log 2>&1; echo "check exit $?"
timeout 150 python3 -m experiments.bench_linear --T 4096 --gates gk --out /tmp/bench \
  --impls "attnlab mosaic_gpu_gk" "attnlab mosaic_gpu_gk w64" "jla mosaic_gpu" > $OUT/bench.log 2>&1; echo "bench exit $?"
MOSAIC_GPU_DUMP_PTXAS=1 timeout 60 python3 -m experiments.profile_kernels --case gk --impl "attnlab mosaic_gpu_gk" --T 4096 --out /tmp/prof > $OUT/profile_gk.log 2>&1; echo "profile exit $?"
(cd ../abl && PYTHONPATH=/tmp/site:$OLDPWD timeout 220 python3 ablate.py) > $OUT/ablate.log 2>&1; echo "ablate exit $?"
tar czf $OUT/res.tgz -C /tmp chk bench 2>/dev/null
tail -8 $OUT/gla_check.log | cut -c1-200
grep -iE "spill stores|Used [0-9]+ reg" $OUT/profile_gk.log | cut -c1-120 | head
grep -E "ms  " $OUT/profile_gk.log | head -16 | cut -c1-100
tail -8 $OUT/bench.log | cut -c1-150
cut -c1-120 $OUT/ablate.log | tail -12
