#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "pip failed"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
cd .carry/s9c && export PYTHONPATH=/tmp/site:$PWD
R=$OUT; OUT=/tmp/res; mkdir -p $OUT
cp ../s9c.sh $OUT/run.sh; cp commit.txt $OUT/
timeout 100 python3 -m experiments.check_mosaic_linear --out $OUT/c --no-xla-timing --cases 10 11 12 > $OUT/gla_check.log 2>&1; echo "gla check exit $?"
timeout 60 python3 -m experiments.profile_kernels --bench linear --case gk --impl "attnlab mosaic_gpu_gk" --T 4096 --out /tmp/prof > $OUT/profile_gk.log 2>&1; echo "profile exit $?"
timeout 140 python3 -m experiments.bench_linear --out $OUT/bl --T 4096 16384 --gates gk --impls "attnlab mosaic_gpu_gk" "jla mosaic_gpu" --deadline-s 100 > $OUT/bench_linear.log 2>&1; echo "bench_linear exit $?"
tar czf $R/s9c.tgz -C $OUT .
echo "== gla_check"; grep -v "^{" $OUT/gla_check.log | tail -6 | cut -c1-400
echo "== profile"; grep -E "^==|ms  " $OUT/profile_gk.log | head -34 | cut -c1-100
echo "== bench_linear"; grep -E "ms \(|rror" $OUT/bench_linear.log | cut -c1-200
