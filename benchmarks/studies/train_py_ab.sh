#!/usr/bin/env bash
# Whole `python train.py` wall time of two revisions, alternating A, B, A, B, ... (issue 15's
# before/after: 41ec42c, before jaxbn.max_pool, against HEAD).
#
#   bash benchmarks/studies/train_py_ab.sh [REV_A] [REV_B] [ROUNDS] [STEPS] [API]
#   (defaults: 41ec42c HEAD 3 300 linen; STEPS=full: the whole default run, 10 epochs, every test
#    image; API=nnx: --config.api=nnx, for revisions that have the NNX path)
#
# Each revision is checked out in a temporary git worktree and run with this checkout's
# .venv (train.py puts its own directory first on sys.path, so each imports its own jaxbn):
# the default config for STEPS steps, evaluated on 2000 test images, in a fresh workdir.
# Prints one line per run (wall time, final accuracy, images/s) and writes the lines to
# benchmarks/results/studies/train_py_ab.md (train_py_ab_<STEPS>_<API>.md for other STEPS or API).
# The worktrees are removed at exit.
# Defaults: 3 rounds.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
A=${1:-41ec42c}; B=${2:-HEAD}; ROUNDS=${3:-3}; STEPS=${4:-300}; API=${5:-linen}
RUN_ARGS=(--config.num_train_steps="$STEPS" --config.test_examples=2000)
[ "$STEPS" != full ] || RUN_ARGS=()
[ "$API" = linen ] || RUN_ARGS+=(--config.api="$API")
PY=${PYTHON:-$REPO/.venv/bin/python}
TMP=$(mktemp -d /tmp/train_py_ab.XXXXXX)
cleanup() { git worktree remove --force "$TMP/a" 2>/dev/null || true; git worktree remove --force "$TMP/b" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
git worktree add -q --detach "$TMP/a" "$A"
git worktree add -q --detach "$TMP/b" "$B"
OUT=benchmarks/results/studies/train_py_ab.md
[ "$STEPS" = 300 ] && [ "$API" = linen ] || OUT=benchmarks/results/studies/train_py_ab_${STEPS}_${API}.md
{
  echo "Command: \`bash benchmarks/studies/train_py_ab.sh $A $B $ROUNDS $STEPS $API\`; $(date -u +%Y-%m-%dT%H:%M:%SZ);"
  echo "A = $(git rev-parse --short "$A"), B = $(git rev-parse --short "$B"); load $(cut -d' ' -f1-3 /proc/loadavg) at start."
  echo
} > "$OUT"
# One untimed run of each side first: it builds that revision's CPU kernels (cached by source
# hash in ~/.cache/jaxbn) and warms the file cache, which would otherwise load the first round.
for side in a b; do
  (cd "$TMP/$side" && "$PY" train.py --config configs/smoke.py --workdir "$TMP/warm_$side" > "$TMP/warm_$side.log" 2>&1) \
    || { echo "train_py_ab.sh: error: the warm-up run of $side failed, see $TMP/warm_$side.log" >&2; exit 1; }
done
for r in $(seq "$ROUNDS"); do
  for side in a b; do
    wd="$TMP/wd_${side}_$r"
    log="$TMP/${side}_$r.log"
    s=$(date +%s.%N)
    (cd "$TMP/$side" && "$PY" train.py --config configs/default.py "${RUN_ARGS[@]}" \
       --config.progress_bar=False --workdir "$wd" > "$log" 2>&1) \
      || { echo "train_py_ab.sh: error: run $side/$r failed, see $log" >&2; tail -5 "$log" >&2; exit 1; }
    e=$(date +%s.%N)
    rev=$([ "$side" = a ] && echo "$A" || echo "$B")
    line="- $rev, round $r: $(printf '%.1f' "$(echo "$e - $s" | bc)") s; $(grep -o 'Final test accuracy[^;]*' "$log" | tail -1); $(grep -o '[0-9]* images/s' "$log" | tail -1)"
    echo "$line" | tee -a "$OUT"
  done
done
echo "load $(cut -d' ' -f1-3 /proc/loadavg) at end." >> "$OUT"
