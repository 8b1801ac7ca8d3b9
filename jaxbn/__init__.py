"""jaxbn: batch normalization for JAX with exact cross-device statistics.

The public face: the core's functions and types (``jaxbn/batch_norm.py``).
`import jaxbn` imports only JAX and NumPy; `jaxbn.cpu_kernel` holds the CPU
kernels' switch. The Flax adapters (`jaxbn.linen`, `jaxbn.nnx`), the tools
(`jaxbn.sync_check`, `jaxbn.folding`, `jaxbn.inference`, `jaxbn.torch_convert`),
the models and the training code (`jaxbn.training`) are imported on demand.
"""

from jaxbn import cpu_kernel
from jaxbn._types import BatchNormState, Moments
from jaxbn.batch_norm import (
    batch_norm,
    init_params,
    init_state,
    moments,
    normalize,
    running_moments,
)
from jaxbn.batch_renorm import batch_renorm, renorm_limits

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
    "batch_renorm",
    "init_params",
    "init_state",
    "moments",
    "normalize",
    "renorm_limits",
    "running_moments",
]
