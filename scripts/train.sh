#!/usr/bin/env bash
# The README's training command: sets up (scripts/setup.sh: .venv, jaxbn with its
# training extras, Debian's Fashion-MNIST), then runs train.py with the given flags.
#   bash scripts/train.sh                                   # configs/default.py
#   bash scripts/train.sh --config configs/resnet.py --workdir runs/resnet
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python train.py "$@"
