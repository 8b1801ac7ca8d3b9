"""Statistics backends behind one interface (``base.Reductions``), chosen by `select`.

* ``xla.py``: the XLA formulation, on every platform.
* ``cpu_ffi.py``: one-sweep C++ kernels on the CPU (``build.py`` compiles them).
* ``spmd.py``: under sharded ``jit``, wraps a local backend in a declared
  partitioning (one all-reduce).
* ``context.py``: the one place that inspects how the traced program is split.

`select` is called once per BatchNorm call and its choice is kept for the forward
and the backward pass. A new backend (e.g. a GPU kernel) is one file and one line here.
"""

from __future__ import annotations

import jax

from jaxbn._checks import Layout
from jaxbn.backends.base import Reductions
from jaxbn.backends.context import custom_partitioning, kind, partitioning_enabled
from jaxbn.backends.cpu_ffi import CPU, can_run
from jaxbn.backends.spmd import Spmd
from jaxbn.backends.xla import XLA

__all__ = ["Reductions", "select", "custom_partitioning", "XLA", "CPU"]

_SPMD = {XLA: Spmd(XLA), CPU: Spmd(CPU)}


def select(x: jax.Array, lay: Layout) -> Reductions:
    """The backend for x's statistics in the current context."""
    local = CPU if can_run(x, lay.feature_axes) else XLA
    if kind() == "spmd" and partitioning_enabled():
        return _SPMD[local]
    return local
