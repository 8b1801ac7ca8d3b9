#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite on 8 virtual CPU devices.
# Without arguments, the core's oracle tests then run a second time with jaxbn's CPU
# kernels forced on (JAXBN_CPU_KERNEL=1): by default they are used only where XLA
# will not partition the program (one device, shard_map, pmap), so on 8 devices the
# first run covers them only inside shard_map/pmap.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
.venv/bin/python -m pytest tests -q "$@"
if [ $# -eq 0 ]; then
  JAXBN_CPU_KERNEL=1 .venv/bin/python -m pytest tests/test_batch_norm.py tests/test_sync.py -q
fi
