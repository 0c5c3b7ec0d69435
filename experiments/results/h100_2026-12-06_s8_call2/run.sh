#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "pip failed"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
cd .carry/s8c && export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/g $OUT/l $OUT/b
cp ../s8c.sh $OUT/run.sh; cp commit.txt $OUT/
timeout 90 python3 -m experiments.check_mosaic_linear --out $OUT/g --no-xla-timing --cases 10 11 12 > $OUT/g/gla.log 2>&1; echo "gla exit $?"
timeout 100 python3 -m experiments.bench_linear --out $OUT/l --T 4096 --gates gk --impls "attnlab mosaic_gpu_gk" "jla mosaic_gpu" --deadline-s 90 > $OUT/l/bench.log 2>&1; echo "bench_linear exit $?"
timeout 280 python3 -m experiments.bench_delta --out $OUT/b --T 4096 --cases deltanet gated --impls "attnlab mosaic_gpu" "jla mosaic_gpu" "fla triton" --deadline-s 260 > $OUT/b/bench.log 2>&1; echo "bench exit $?"
grep -v "^{" $OUT/g/gla.log | tail -5 | cut -c1-400
grep -E "ms \(|error|Error" $OUT/l/bench.log | cut -c1-160
grep -E "ms \(|error|Error" $OUT/b/bench.log | cut -c1-200
