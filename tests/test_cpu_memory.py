"""jaxbn.cpu_memory.keep_heap: glibc keeps freed memory, so a jitted function's large outputs
stop page-faulting in on every call (each setting measured in a process of its own)."""

import json
import os
import subprocess
import sys

import pytest

_CHILD = r"""
import json, resource, sys
import jax, jax.numpy as jnp
if sys.argv[1] == "keep":
    import jaxbn.cpu_memory
    kept = jaxbn.cpu_memory.keep_heap()
    assert jaxbn.cpu_memory.keep_heap() == kept  # idempotent
else:
    kept = None
f = jax.jit(lambda x: x * 2.0)
x = jnp.ones((8 * 2**20,), jnp.float32)  # a 32 MiB output per call
faults = []
for _ in range(30):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))  # the output is freed at once
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _run(mode):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["XLA_FLAGS"] = ""  # one device is enough
    r = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_heap_stops_page_faults_of_large_outputs():
    default, kept = _run("default"), _run("keep")
    assert default["kept"] is None and kept["kept"]["applied"] is True, kept
    # glibc's defaults: every call maps its output anew and faults it in (8,192 pages of 4 KiB,
    # fewer with transparent huge pages); kept: once the heap has grown to the working set
    # (a few calls), it serves every output without a fault.
    assert min(default["faults"][10:]) > 100, default
    assert sum(kept["faults"][10:]) < 0.1 * sum(default["faults"][10:]), (default, kept)


def test_keep_heap_reports_instead_of_raising_without_glibc(monkeypatch):
    import jaxbn.cpu_memory as cm

    monkeypatch.setattr(cm.sys, "platform", "darwin")
    out = cm.keep_heap()
    assert out["applied"] is False and "darwin" in out["reason"]
