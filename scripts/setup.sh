#!/usr/bin/env bash
# Sets up everything jaxbn needs on a fresh machine, offline apart from the package
# registries: a virtualenv in .venv with jaxbn and its training/test dependencies
# (versions from constraints.txt), PyTorch's CPU build when it lies on local disk
# (optional: PyTorch-parity tests skip without it), and Debian's Fashion-MNIST.
# Idempotent: a second run only checks. Each step says what it does and roughly how
# long it takes before starting (pip runs quietly), and how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup: $*"; }
took() { say "  done in $((SECONDS - $1)) s"; }
say "setting up jaxbn in $(pwd)/.venv (first run: about 2-4 minutes, mostly downloads; later runs: seconds)"

PY=${PYTHON:-python3}
# pip, without its warnings about configured package locations that do not exist on this
# machine (a pip.conf's extra index or find-links directory); every other line passes.
pip_quiet() {
  .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if [ ! -x .venv/bin/python ]; then
  say "creating the virtualenv .venv with $PY (a few seconds)"
  t=$SECONDS; "$PY" -m venv .venv; took $t
fi
stamp=.venv/.jaxbn-installed
want="$(cat pyproject.toml constraints.txt | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing jaxbn (editable) and the versions in constraints.txt:"
  say "  $(grep -v '^#' constraints.txt | tr '\n' ' ')"
  say "  (a few hundred MB, jaxlib the largest; about 1-3 minutes)"
  t=$SECONDS
  pip_quiet install -q --upgrade pip
  pip_quiet install -q -c constraints.txt -e ".[test]"
  took $t
  # The CPU build of PyTorch ships on this kind of machine's disk; never download
  # the multi-GB CUDA build just for the optional parity tests.
  if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    say "installing PyTorch's CPU build (optional, for the PyTorch-parity tests; about 1 minute)"
    t=$SECONDS
    pip_quiet install -q torch==2.13.0 || say "optional torch not installed"
    took $t
  fi
  echo "$want" > "$stamp"
else
  say ".venv is up to date with pyproject.toml and constraints.txt"
fi

# jaxbn compiles its one-sweep CPU kernels (jaxbn/csrc) with the system's C++
# compiler on first use and falls back to XLA without one; build them now, so that
# neither the tests nor train.py pay for it later.
if ! command -v c++ >/dev/null && [ "$(id -u)" = 0 ]; then
  say "installing g++ with apt-get, for jaxbn's CPU kernels (about 1 minute)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; } ||
    echo "setup: could not install g++; jaxbn will use its XLA formulation" >&2
fi
say "building jaxbn's CPU kernels (a few seconds the first time, cached in ~/.cache/jaxbn)"
t=$SECONDS
JAXBN_CPU_KERNEL=1 .venv/bin/python -c "import jaxbn.cpu_kernel as k; k.available() or print('setup:', k.build_error())"
took $t

data=/usr/share/datasets/fashion-mnist
if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
  # Not fatal: the tests that need the real data skip, and train.py says what to install.
  say "Fashion-MNIST is not in $data: installing Debian's dataset-fashion-mnist (about 30 s)"
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
say "ready (setup took $SECONDS s)"
