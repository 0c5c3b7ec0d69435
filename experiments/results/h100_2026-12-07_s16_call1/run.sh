#!/usr/bin/env bash
# Prepared in session 15. Re-export first, from /work/main:
#   d=.carry/s16main; rm -rf $d; mkdir -p $d; git archive main -- . ':!experiments/results' |
#   tar -x -C $d; git rev-parse main > $d/commit.txt
# What issue 4 still lacks: GLA's fwd+bwd on main (bounded form: the bench's gates) at 4k, 16k,
# 64k beside jla (session 15: each first compile + check of a GLA fwd+bwd took > 50 s; about 90 s
# a shape is given), then fla chunk_linear_attn fwd+bwd and chunk_simple_gla forward at 64k
# (ours beside fla in each, so the ratio holds on whichever card runs it; fla autotunes for minutes on a fresh machine). --directions skips what is already timed.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps .whl/*.whl --target /tmp/site > /dev/null 2>&1
cp .carry/s16a.sh $OUT/run.sh; cp .carry/s16main/commit.txt $OUT/commit.txt
cd .carry/s16main && export PYTHONPATH=/tmp/site:$PWD
b="python3 -m experiments.bench_linear"
keep() { tar czf $OUT/json.tgz -C /tmp r 2>/dev/null; }
timeout 330 $b --T 4096 16384 65536 --gates gk --directions fwd+bwd --out /tmp/r/gk \
  --deadline-s 300 --impls "attnlab mosaic_gpu_gk" "jla mosaic_gpu" > $OUT/gk.log 2>&1
echo "gk $?"; keep
timeout 130 $b --T 65536 --gates none --directions fwd+bwd --out /tmp/r/flan --deadline-s 120 \
  --impls "attnlab mosaic_gpu" "fla triton" > $OUT/flan.log 2>&1; echo "fla none $?"; keep
timeout 90 $b --T 65536 --gates g --directions fwd --out /tmp/r/flag --deadline-s 80 \
  --impls "attnlab mosaic_gpu" "fla triton" > $OUT/flag.log 2>&1; echo "fla g $?"; keep
grep -hE "^(gk|none|g) " $OUT/*.log | cut -c1-110
