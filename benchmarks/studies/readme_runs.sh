#!/usr/bin/env bash
# The full `python train.py` runs behind README.md's results table, one after the other, each in a
# fresh workdir under runs/; their config.json, metrics.jsonl and metrics.png are copied to
# results/<name>/ (committed), and one line per run (wall time, test accuracy, images/s) is printed.
#
#   bash benchmarks/studies/readme_runs.sh [NAME ...]
#   (default: default_jaxbn default_flax default_nnx constant_lr_jaxbn constant_lr_flax; ~2-3 min each
#    on the project's 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
declare -A ARGS=(
  [default_jaxbn]=""
  [default_flax]="--config.norm=flax"
  [default_nnx]="--config.api=nnx"
  [constant_lr_jaxbn]="--config.lr_schedule=constant"
  [constant_lr_flax]="--config.lr_schedule=constant --config.norm=flax"
)
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(default_jaxbn default_flax default_nnx constant_lr_jaxbn constant_lr_flax)
for name in "${NAMES[@]}"; do
  [ -n "${ARGS[$name]+x}" ] || { echo "readme_runs.sh: error: unknown run '$name' (known: ${!ARGS[*]})" >&2; exit 2; }
  wd="runs/$name"
  rm -rf "$wd"
  # shellcheck disable=SC2086
  "$PY" train.py ${ARGS[$name]} --config.progress_bar=False --workdir "$wd" > "runs/$name.log" 2>&1 \
    || { echo "readme_runs.sh: error: run $name failed, see runs/$name.log" >&2; tail -5 "runs/$name.log" >&2; exit 1; }
  mkdir -p "results/$name"
  cp "$wd/config.json" "$wd/metrics.jsonl" "$wd/metrics.png" "results/$name/"
  "$PY" - "$name" "results/$name/metrics.jsonl" <<'PY'
import json, sys
final = [json.loads(l) for l in open(sys.argv[2]) if '"final"' in l][-1]
print(f"{sys.argv[1]}: test accuracy {100 * final['test_accuracy']:.2f} %, wall {final['wall_time_s']:.0f} s, "
      f"train {final['images_per_sec']:.0f} images/s ({final['api'] if 'api' in final else 'linen'})")
PY
done
