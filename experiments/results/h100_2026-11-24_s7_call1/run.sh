#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "pip failed"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
cd .carry/s7a && export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/d $OUT/b
timeout 200 python3 -m experiments.check_mosaic_delta --out $OUT/d --no-xla-timing --cases 0 2 3 4 5 6 7 > $OUT/d/delta.log 2>&1; echo "check exit $?"
timeout 300 python3 -m experiments.bench_delta --out $OUT/b --T 16384 65536 --cases gated deltanet --impls "attnlab mosaic_gpu" "jla mosaic_gpu" --deadline-s 260 > $OUT/b/bench.log 2>&1; echo "bench exit $?"
grep -v "^{" $OUT/d/delta.log | tail -9 | cut -c1-300
grep -E "ms \(|error|Error" $OUT/b/bench.log | cut -c1-140
