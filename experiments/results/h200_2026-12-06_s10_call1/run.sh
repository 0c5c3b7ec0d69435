#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cd .carry/s10a && export PYTHONPATH=/tmp/site:$PWD
R=$OUT; OUT=/tmp/res; mkdir -p $OUT
cp ../s10a.sh $OUT/run.sh; cp commit.txt $OUT/
for w in "" " w32"; do
  MOSAIC_GPU_DUMP_PTXAS=1 timeout 120 python3 -m experiments.profile_kernels --bench linear --case gk \
    --impl "attnlab mosaic_gpu_gk$w" --T 4096 --out /tmp/prof$w > "$OUT/profile_gk$w.log" 2>&1
  echo "profile$w exit $?"
done
timeout 200 python3 -m experiments.bench_linear --T 4096 --gates gk --out $OUT/bench \
  --impls "attnlab mosaic_gpu_gk" "attnlab mosaic_gpu_gk w32" "jla mosaic_gpu" > $OUT/bench.log 2>&1
echo "bench exit $?"
tar czf $R/s10a.tgz -C $OUT .
for w in "" " w32"; do
  echo "== profile$w"; grep -E "ms  " "$OUT/profile_gk$w.log" | head -14 | cut -c1-100
  grep -iE "spill|registers|ptxas info.*Compiling|Function properties for" "$OUT/profile_gk$w.log" | head -24 | cut -c1-140
done
tail -15 $OUT/bench.log | cut -c1-150
