set -u
R=$OUT/results; mkdir -p $R
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $R/nvidia_smi.csv
t0=$SECONDS
# phase 1: correctness only, two processes at once (no timing of interest in either)
timeout 110 python3 -m experiments.check_mosaic_softmax --out $R --quick > $R/check_mosaic_softmax.log 2>&1 &
timeout 110 python3 -m experiments.check_mosaic_delta --out $R/delta_small --no-xla-timing --cases 3 4 5 > $R/check_mosaic_delta_small.log 2>&1
wait; echo "phase1 $((SECONDS-t0))s"
# phase 2, 3: the anchors alone on the GPU (timed)
timeout 150 python3 -m experiments.check_mosaic_delta --out $R --no-xla-timing --cases 6 > $R/check_mosaic_delta.log 2>&1; echo "delta $? $((SECONDS-t0))s"
timeout 140 python3 -m experiments.check_mosaic_linear --out $R --no-xla-timing --cases 13 12 > $R/check_mosaic_linear.log 2>&1; echo "linear $? $((SECONDS-t0))s"
for f in $R/*.log; do echo "== $f"; grep "^{'B'\|^[0-9]* |" $f | cut -c1-1200 | tail -8; grep -h "Error" $f | sort | uniq -c | head -3; done
