#!/usr/bin/env bash
# Sets up everything jaxbn needs on a fresh machine, offline apart from the package
# registries: a virtualenv in .venv with jaxbn and its training/test dependencies
# (versions from constraints.txt), PyTorch's CPU build when it lies on local disk
# (optional: PyTorch-parity tests skip without it), and Debian's Fashion-MNIST.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.jaxbn-installed
want="$(cat pyproject.toml constraints.txt | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
  # The CPU build of PyTorch ships on this kind of machine's disk; never download
  # the multi-GB CUDA build just for the optional parity tests.
  if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q torch==2.13.0 || echo "setup: optional torch not installed"
  fi
  echo "$want" > "$stamp"
fi

# jaxbn compiles its one-sweep CPU kernels (jaxbn/csrc) with the system's C++
# compiler on first use and falls back to XLA without one; build them now, so that
# neither the tests nor train.py pay for it later.
if ! command -v c++ >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; } ||
    echo "setup: could not install g++; jaxbn will use its XLA formulation" >&2
fi
JAXBN_CPU_KERNEL=1 .venv/bin/python -c "import jaxbn.cpu_kernel as k; k.available() or print('setup:', k.build_error())"

data=/usr/share/datasets/fashion-mnist
if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
  # Not fatal: the tests that need the real data skip, and train.py says what to install.
  if [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; } ||
      echo "setup: could not install dataset-fashion-mnist with apt-get" >&2
  elif command -v sudo >/dev/null; then
    { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; } ||
      echo "setup: could not install dataset-fashion-mnist with sudo apt-get" >&2
  else
    echo "setup: Fashion-MNIST missing; install it with: apt-get install dataset-fashion-mnist" >&2
  fi
fi
