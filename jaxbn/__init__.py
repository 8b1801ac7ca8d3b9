"""jaxbn: batch normalization for JAX with exact cross-device statistics.

`import jaxbn` imports only JAX and NumPy (`jaxbn.cpu_kernel`, imported by the core,
holds the CPU kernels' switch). The Flax adapters live in
`jaxbn.linen` and `jaxbn.nnx` and are imported on demand.
"""

from jaxbn.batch_norm import (
    BatchNormState,
    Moments,
    batch_norm,
    init_params,
    init_state,
    moments,
    normalize,
    running_moments,
)

__version__ = "0.1.0"

_LAZY = {"check_sync_bn": "jaxbn.sync_check", "assert_sync_bn": "jaxbn.sync_check"}


def __getattr__(name):
    # Flax-dependent helpers load on first use, so `import jaxbn` needs only JAX.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")

__all__ = [
    "BatchNormState",
    "Moments",
    "batch_norm",
    "init_params",
    "init_state",
    "moments",
    "normalize",
    "running_moments",
]
