"""jaxbn: batch normalization for JAX with exact cross-device statistics.

`import jaxbn` imports only JAX and NumPy. The Flax adapters live in
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
