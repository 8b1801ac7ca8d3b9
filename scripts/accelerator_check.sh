#!/usr/bin/env bash
# One command that proves jaxbn on whatever accelerator JAX finds (GPU, TPU, or the CPU):
# correctness (built-in oracle check and the core's tests), one BN layer against Flax/NNX/Equinox
# (and PyTorch's cuDNN BatchNorm on a GPU), train-step images/s, a short train.py run; results in
# benchmarks/results/<device-kind>/accelerator_check[_quick].{json,md} and a summary at the end.
#
#   bash scripts/accelerator_check.sh            # full: <= 8 min on one GPU, <= 15 min on a 2-core CPU
#   bash scripts/accelerator_check.sh --quick    # about 3 min on the CPU
#   bash scripts/accelerator_check.sh --out DIR  # results elsewhere; --help for the rest
#
# Installs nothing: uses .venv/bin/python when the checkout has one, else $PYTHON or python3 (the
# machine's own JAX), and imports jaxbn from this working tree.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python)"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
exec "$PY" "$ROOT/benchmarks/accelerator/check.py" "$@"
