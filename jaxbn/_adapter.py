"""The one call from the Flax adapters (`jaxbn.linen`, `jaxbn.nnx`) into the core.

Both modules carry the same option names; this maps them onto `batch_norm`, so
the adapters differ only in how they store variables.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from jaxbn._types import BatchNormState
from jaxbn.batch_norm import batch_norm


def apply_batch_norm(m, x, params: dict, state: BatchNormState, *, use_running_average: bool, axis_name, mask,
                     allow_update: bool = True) -> tuple[jax.Array, Optional[BatchNormState]]:
    """Runs the core with module `m`'s options; returns (y, new state or None if not updated).

    Output dtype as Flax: `m.dtype`, else x's and the parameters' dtypes promoted.
    """
    if not m.trainable_params:
        params = jax.lax.stop_gradient(params)
    dtype = m.dtype if m.dtype is not None else jnp.result_type(x, *params.values())
    training = not use_running_average
    update = (training if m.update_stats is None else m.update_stats) and allow_update
    y, new = batch_norm(
        x,
        params or None,
        state,
        training=training,
        axis=m.axis,
        momentum=m.momentum,
        epsilon=m.epsilon,
        axis_name=axis_name,
        axis_index_groups=m.axis_index_groups,
        mask=mask,
        update_stats=update,
        unbiased_running_var=m.unbiased_running_var,
        dtype=dtype,
    )
    return y, (new if update else None)
