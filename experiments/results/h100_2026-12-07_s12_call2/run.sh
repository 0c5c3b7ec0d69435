#!/usr/bin/env bash
# Session 12, call 2 (~9 min): no gate and scalar g at T = 1k, 16k, 64k (B*T = 32k) with the
# scalar-gate kernel (two warpgroups per CTA, and one: "1wg") beside jla; then fla's Triton
# kernels (chunk_gla at 4k fwd+bwd first, then the other gate kinds at 1k and 64k) until the
# deadline (fla autotunes for minutes).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cd .carry/s12main && export PYTHONPATH=/tmp/site:$PWD
cp ../s12d.sh $OUT/run.sh; cp commit.txt $OUT/
timeout 260 python3 -m experiments.bench_linear --T 1024 16384 65536 --gates none g --out $OUT/gn \
  --deadline-s 230 --impls "attnlab mosaic_gpu" "attnlab mosaic_gpu 1wg" "jla mosaic_gpu" \
  > $OUT/gn.log 2>&1; echo "g/none exit $?"
timeout 150 python3 -m experiments.bench_linear --T 4096 --gates gk --out $OUT/fla \
  --impls "fla triton" > $OUT/fla.log 2>&1; echo "fla exit $?"
timeout 90 python3 -m experiments.bench_linear --T 1024 65536 --gates none g --out $OUT/fla2 \
  --deadline-s 70 --impls "fla triton" > $OUT/fla2.log 2>&1; echo "fla2 exit $?"
(cd ../s12da && timeout 70 python3 -m experiments.bench_linear --T 65536 --gates gk --out $OUT/gk64 \
  --impls "jla mosaic_gpu" > $OUT/gk64.log 2>&1; echo "gk64 jla exit $?")
cd $OUT && tar czf res.tgz gn fla fla2 gk64 2>/dev/null && rm -rf gn fla fla2 gk64
for f in gn fla fla2 gk64; do grep -A40 "== bench_linear" $OUT/$f.log | cut -c1-110; done
