#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "pip failed"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
cd .carry/s9a && export PYTHONPATH=/tmp/site:$PWD
R=$OUT; OUT=/tmp/res; mkdir -p $OUT
cp ../s9a.sh $OUT/run.sh; cp commit.txt $OUT/
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
timeout 130 python3 -m experiments.check_mosaic_linear --no-xla-timing --gk-pullback kernel --cases 10 11 12 13 > $OUT/gla_kernel.log 2>&1; echo "gla kernel exit $?"
timeout 50 python3 -m experiments.check_mosaic_linear --no-xla-timing --gk-pullback xla --cases 13 > $OUT/gla_xla.log 2>&1; echo "gla xla exit $?"
timeout 70 python3 -m experiments.profile_kernels --bench linear --case gk --impl "attnlab mosaic_gpu_gk pullback" --T 4096 --out /tmp/prof > $OUT/profile_gk.log 2>&1; echo "profile exit $?"
timeout 170 python3 -m experiments.bench_linear --out $OUT/bl --T 4096 1024 16384 --gates gk --impls "attnlab mosaic_gpu_gk pullback" "jla mosaic_gpu" "attnlab mosaic_gpu_gk" --deadline-s 150 > $OUT/bench_linear.log 2>&1; echo "bench_linear exit $?"
tar czf $R/s9a.tgz -C $OUT .
for f in gla_kernel gla_xla; do echo "== $f"; grep -v "^{" $OUT/$f.log | tail -8 | cut -c1-300; done
echo "== profile"; grep -E "^==|ms  " $OUT/profile_gk.log | head -40 | cut -c1-120
echo "== bench_linear"; grep -E "ms \(|rror" $OUT/bench_linear.log | cut -c1-200
