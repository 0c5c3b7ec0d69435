#!/usr/bin/env bash
# Run check and benchmark scripts on the GPU machine in one go; results land in $OUT/results
# (also packed as $OUT/results.tgz), a short summary is printed last.
# Usage (repo root, wheels in .whl/):  bash experiments/run_gpu.sh STEP[:SECONDS] ... [-- ARGS]
#   STEP: a module of experiments/ (check_mosaic_linear, check_mosaic_delta, check_mosaic_softmax,
#   bench_linear, bench_delta, bench_softmax); SECONDS: its soft deadline (benchmarks skip the
#   cases that would start later; default 120) — every step is killed 40 s past it.
#   ARGS after "--" go to every bench_* step (e.g. -- --T 4096 --impls "attnlab mosaic_gpu").
# Example (one device call, about 9 minutes):
#   bash experiments/run_gpu.sh check_mosaic_linear:100 check_mosaic_delta:100 bench_linear:200
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
R=$OUT/results; mkdir -p "$R"
steps=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do steps+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the "--"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > "$R/nvidia_smi.csv"
for step in "${steps[@]}"; do
  name=${step%%:*}; soft=${step#*:}; [ "$soft" = "$step" ] && soft=120
  if [ ! -f "experiments/$name.py" ]; then echo "$name: no such script" >> "$R/exit_codes.txt"; continue; fi
  case $name in
    bench_*) extra=(--deadline-s "$soft" "$@") ;;
    *) extra=() ;;
  esac
  timeout $((soft + 40)) python3 -m "experiments.$name" --out "$R" "${extra[@]}" > "$R/$name.log" 2>&1
  echo "$name exit $?" >> "$R/exit_codes.txt"
done
(cd "$OUT" && tar czf results.tgz results)
cat "$R/exit_codes.txt"
for f in "$R"/*_summary.txt; do [ -f "$f" ] && cat "$f"; done
for name in "${steps[@]}"; do  # each check script prints its table last
  name=${name%%:*}; case $name in check_*) echo "== $name"; tail -12 "$R/$name.log" ;; esac
done
grep -h "Error\|error" "$R"/*.log | sort | uniq -c | sort -rn | head -20
