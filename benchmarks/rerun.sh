#!/usr/bin/env bash
# Re-run the benchmarks behind the published tables, each writing its canonical JSON under
# benchmarks/results/, then regenerate BENCHMARKS.md and the docs' table blocks.
# Run on a quiet machine (nothing else running): speed figures are only as good as the machine's quiet.
#
#   bash benchmarks/rerun.sh speed     # the speed-sensitive tables (runtime, quant, adaptive, kv, prune, costmodel, export, memory)
#   bash benchmarks/rerun.sh quality   # the tables whose figures do not depend on load (tasks)
#   bash benchmarks/rerun.sh all
# THREADS (default 2) sets the threads of every speed run; a JSON records them.
set -euo pipefail
cd "$(dirname "$0")/.."
export LEANLM_DATA=${LEANLM_DATA:-../shared/data}
T=${THREADS:-2}
PY=${PYTHON:-python3}
what=${1:-all}

speed() {
  "$PY" benchmarks/bench_runtime.py --model smollm2-135m --threads "$T"
  "$PY" benchmarks/bench_runtime.py --model gemma3-270m --threads "$T"
  "$PY" benchmarks/bench_quant.py --threads "$T"
  "$PY" benchmarks/bench_adaptive.py --dtype bfloat16 --threads "$T"
  "$PY" benchmarks/bench_kv.py --threads "$T"
  "$PY" benchmarks/bench_prune.py --fresh --threads "$T"
  "$PY" benchmarks/bench_costmodel.py --threads "$T"
  "$PY" benchmarks/bench_export.py --threads "$T"
  "$PY" benchmarks/bench_memory.py
}

quality() {
  "$PY" benchmarks/bench_tasks.py --limit 500 --threads "$T"
}

case "$what" in
  speed) speed ;;
  quality) quality ;;
  all) speed; quality ;;
  *) echo "usage: bash benchmarks/rerun.sh [speed|quality|all]" >&2; exit 2 ;;
esac
"$PY" benchmarks/tables.py
