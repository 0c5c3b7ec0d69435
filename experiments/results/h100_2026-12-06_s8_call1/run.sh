#!/usr/bin/env bash
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "pip failed"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p $OUT/d $OUT/b $OUT/g
cp .carry/s8b.sh $OUT/run.sh; cp .carry/s8b/commit.txt $OUT/
(cd .carry/s8b && export PYTHONPATH=/tmp/site:$PWD
timeout 170 python3 -m experiments.check_mosaic_delta --out $OUT/d --no-xla-timing --cases 8 10 9 3 > $OUT/d/delta.log 2>&1; echo "check exit $?"
timeout 260 python3 -m experiments.bench_delta --out $OUT/b --T 65536 16384 --cases gated deltanet --impls "attnlab mosaic_gpu" "jla mosaic_gpu" --deadline-s 240 > $OUT/b/bench.log 2>&1; echo "bench exit $?")
(cd .carry/gla1 && export PYTHONPATH=/tmp/site:$PWD
timeout 130 python3 -m experiments.check_mosaic_linear --out $OUT/g --no-xla-timing --cases 13 > $OUT/g/gla.log 2>&1; echo "gla exit $?")
grep -v "^{" $OUT/d/delta.log | tail -6 | cut -c1-300
grep -E "ms \(|error|Error" $OUT/b/bench.log | cut -c1-140
grep -v "^{" $OUT/g/gla.log | tail -4 | cut -c1-400
