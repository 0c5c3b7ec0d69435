#!/usr/bin/env bash
# Run the benchmark scripts on the GPU machine in one go and pack the results into $OUT/results.tgz.
# Usage (repo root, wheels in .whl/):  bash experiments/run_gpu.sh [linear_s delta_s softmax_s]
# Each script gets a soft deadline (cases that would start later are recorded as skipped) and a
# hard timeout 40 s beyond it; the JSON/CSV are rewritten after every case, so partial runs survive.
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
R=$OUT/results; mkdir -p "$R"
LIN=${1:-220}; DEL=${2:-100}; SOFT=${3:-130}
shift $(( $# < 3 ? $# : 3 ))
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > "$R/nvidia_smi.csv"
run() {  # name soft_deadline_s args...
  local name=$1 soft=$2; shift 2
  timeout $((soft + 40)) python3 -m experiments.$name --out "$R" --deadline-s "$soft" "$@" > "$R/$name.log" 2>&1
  echo "$name exit $?" >> "$R/exit_codes.txt"
}
[ "$LIN" -gt 0 ] && run bench_linear "$LIN" "$@"
[ "$DEL" -gt 0 ] && run bench_delta "$DEL"
[ "$SOFT" -gt 0 ] && run bench_softmax "$SOFT"
(cd "$OUT" && tar czf results.tgz results && cp results/*.json . )
cat "$R/exit_codes.txt"
for f in "$R"/*_summary.txt; do cat "$f"; done
grep -h "Error\|error" "$R"/*.log | sort | uniq -c | sort -rn | head -20
