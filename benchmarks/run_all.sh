#!/usr/bin/env bash
# Runs the benchmarks that make the tables of benchmarks/README.md, then rebuilds
# the README's results section. About 13 minutes on 2 CPU cores; studies/cpu_settings.py
# (another ~25 minutes) only with --settings.
#
#   bash benchmarks/run_all.sh              # bn_layer, train_step, sync (8 and 2 devices), sharded_jit, layer_variants, report
#   bash benchmarks/run_all.sh --settings   # also the CPU-settings study and train.py timings
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" benchmarks/bn_layer.py
"$PY" benchmarks/train_step.py
"$PY" benchmarks/sync.py --rounds 21
"$PY" benchmarks/sync.py --devices 2 --rounds 41 --budget 90
"$PY" benchmarks/studies/sharded_jit.py
"$PY" benchmarks/layer_variants.py --rounds 21
if [ "${1:-}" = "--settings" ]; then
  "$PY" benchmarks/studies/cpu_settings.py --quick --train-py
fi
"$PY" benchmarks/report.py
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
