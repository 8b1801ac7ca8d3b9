#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite on 8 virtual CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
exec .venv/bin/python -m pytest tests -q "$@"
