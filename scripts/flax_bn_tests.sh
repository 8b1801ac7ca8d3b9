#!/bin/bash
# Flax's own BatchNorm tests with jaxbn's classes swapped in (issue 14). Fetches nothing.
#
#   scripts/flax_bn_tests.sh FLAX_SRC [WORKDIR]
#
# FLAX_SRC: a google/flax source tree at the installed Flax's version (its tests/ and
# pyproject.toml are used; its flax/ package is not: the installed one is). WORKDIR (default
# a fresh mktemp dir) receives a copy of the tests and the logs; nothing is written to FLAX_SRC
# or to this repository. Needs the test requirements of those files in the Python environment
# (cloudpickle for tests/nnx/module_test.py; set EXTRA_PYTHONPATH for a --target install).
# FLAX_BN_FILES (space-separated test files) narrows the run.
#
# 1. Runs each file below with Flax's own classes; a conftest records every test that builds a
#    flax.linen.BatchNorm or flax.nnx.BatchNorm (out/flax/used.txt: "nodeid outcome").
# 2. Runs exactly those tests again with flax.linen.BatchNorm, flax.linen.normalization.BatchNorm,
#    flax.nnx.BatchNorm and flax.nnx.nn.normalization.BatchNorm replaced by jaxbn's (the
#    conftest patches the attributes before any test module is imported; bodies unchanged).
# 3. Prints pass/fail counts of both runs and the failures of the jaxbn run.
set -euo pipefail
SRC=$(cd "$1" && pwd)
WORK=${2:-$(mktemp -d /tmp/flax_bn_tests.XXXXXX)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
case "$WORK" in "$REPO"*) echo "WORKDIR must be outside the repository" >&2; exit 2;; esac
mkdir -p "$WORK"
rm -rf "$WORK/tests" && cp -r "$SRC/tests" "$WORK/tests" && cp "$SRC/pyproject.toml" "$WORK/"

cat > "$WORK/tests/conftest.py" <<'EOF'
"""Flax's tests with jaxbn's BatchNorm swapped in (JAXBN_SWAP=1) or not (0); records BN users."""
import os

import flax.linen as _linen
import flax.linen.normalization as _linen_norm
import flax.nnx as _nnx
import flax.nnx.nn.normalization as _nnx_norm
import pytest

_USED = [False]
if os.environ.get("JAXBN_SWAP", "1") == "1":
    import jaxbn.linen
    import jaxbn.nnx

    LINEN_BN, NNX_BN = jaxbn.linen.BatchNorm, jaxbn.nnx.BatchNorm
    _linen.BatchNorm = _linen_norm.BatchNorm = LINEN_BN
    _nnx.BatchNorm = _nnx_norm.BatchNorm = NNX_BN
else:
    LINEN_BN, NNX_BN = _linen_norm.BatchNorm, _nnx_norm.BatchNorm


def _mark(cls, name):  # flag every construction (Linen: __post_init__, NNX: __init__)
    orig = cls.__dict__.get(name) or getattr(cls, name)

    def wrapped(self, *a, **k):
        _USED[0] = True
        return orig(self, *a, **k)

    setattr(cls, name, wrapped)


_mark(LINEN_BN, "__post_init__")
_mark(NNX_BN, "__init__")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _USED[0] = False
    yield
    if _USED[0] and os.environ.get("BN_USED_FILE"):
        with open(os.environ["BN_USED_FILE"], "a") as f:
            f.write(f"{item.nodeid} {getattr(item, '_bn_outcome', 'unknown')}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    if rep.failed:
        item._bn_outcome = "failed"
    elif rep.skipped and not hasattr(item, "_bn_outcome"):
        item._bn_outcome = "skipped"
    elif rep.when == "call" and not hasattr(item, "_bn_outcome"):
        item._bn_outcome = "passed"
EOF

FILES=${FLAX_BN_FILES:-"tests/checkpoints_test.py tests/linen/linen_module_test.py tests/linen/linen_test.py
tests/linen/linen_transforms_test.py tests/linen/summary_test.py tests/nnx/bridge/wrappers_test.py
tests/nnx/graph_utils_test.py tests/nnx/helpers_test.py tests/nnx/integration_test.py
tests/nnx/module_test.py tests/nnx/nn/linear_test.py tests/nnx/nn/normalization_test.py
tests/nnx/summary_test.py tests/nnx/transforms_test.py"}

run() {  # run LABEL SWAP: per file, all tests (flax) or the recorded BatchNorm tests (jaxbn)
  local label=$1 swap=$2 out="$WORK/out/$1"
  rm -rf "$out" && mkdir -p "$out" && cd "$WORK"
  for f in $FILES; do
    if [ "$label" = flax ]; then ids=$f
    else ids=$(awk '{print $1}' out/flax/used.txt | grep "^$f::" | tr '\n' ' ' || true); [ -z "$ids" ] && continue
    fi
    PYTHONPATH=${EXTRA_PYTHONPATH:-} JAXBN_SWAP=$swap BN_USED_FILE="$out/used.txt" \
      XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      "$PY" -m pytest -q -p no:cacheprovider $ids > "$out/$(echo "$f" | tr / _).log" 2>&1 || true
    echo "$label $f: $(tail -1 "$out/$(echo "$f" | tr / _).log")"
  done
}

run flax 0
run jaxbn 1
for label in flax jaxbn; do
  echo "$label: $(awk '{print $2}' "$WORK/out/$label/used.txt" | sort | uniq -c | tr '\n' ' ')"
done
echo "jaxbn failures:"; grep -h "^FAILED" "$WORK"/out/jaxbn/*.log || true
echo "logs: $WORK/out"
