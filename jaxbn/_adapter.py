"""The one call from the Flax adapters (`jaxbn.linen`, `jaxbn.nnx`) into the core.

Both modules carry the same option names; this maps them onto `batch_norm`, so
the adapters differ only in how they store variables and pick the output dtype.
The core is strict about its inputs; what Flax's modules accept beyond that is
accepted here: integer and boolean inputs (promoted to a floating dtype as Flax
does), and an unbound `axis_name` raises `UnboundAxisNameError`, which is a
`NameError` (what Flax and JAX raise) as well as the core's `ValueError`. An
epsilon may be an array; traced, only in evaluation (the core's training path
needs a concrete one).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxbn import _checks as checks
from jaxbn._checks import UnboundAxisNameError
from jaxbn._types import BatchNormState
from jaxbn.batch_norm import batch_norm
from jaxbn.batch_renorm import batch_renorm

__all__ = ["UnboundAxisNameError", "apply_batch_norm", "as_stat", "floating", "stored"]


def floating(x) -> jax.Array:
    """`x` as an array of an inexact dtype: integers and booleans promoted with float32
    (``jnp.promote_types(dtype, float32)``), as Flax's statistics promote them."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x


def as_stat(v) -> jax.Array:
    """A running statistic as the core takes it: at least float32 (complex kept complex)."""
    v = jnp.asarray(v)
    return v.astype(jnp.promote_types(v.dtype, jnp.float32))


def stored(new: jax.Array, old: jax.Array) -> jax.Array:
    """A new running statistic in its variable's dtype (`param_dtype` in Linen with
    ``force_float32_reductions=False``), promoted as Flax's update promotes it when the
    batch statistic is complex."""
    dtype = jnp.promote_types(old.dtype, new.dtype) if jnp.iscomplexobj(new) else old.dtype
    return new.astype(dtype)


def check_bound(axis_name) -> None:
    """Raises `UnboundAxisNameError` (the core's message) if `axis_name` is not bound."""
    checks.axis_size(checks.axis_names(axis_name) or ())


def apply_batch_norm(m, x, params: dict, state: BatchNormState, *, use_running_average: bool, axis_name, mask,
                     dtype, allow_update: bool = True, renorm_limits=None) -> tuple[jax.Array, Optional[BatchNormState]]:
    """Runs the core with module `m`'s options; returns (y, new state or None if not updated).

    With ``renorm_limits = (r_max, d_max)``, Batch Renormalization (`jaxbn.batch_renorm`).

    `dtype` is the output dtype, chosen by the module by its Flax counterpart's rule.
    The new state carries no gradient (it is written to variables, which in NNX may be
    mutable arrays that must not receive one).
    """
    if not m.trainable_params:
        params = jax.lax.stop_gradient(params)
    x = floating(x)
    training = not use_running_average
    update = (training if m.update_stats is None else m.update_stats) and allow_update
    if axis_name is not None and (training or update):
        check_bound(axis_name)
    layer = batch_norm if renorm_limits is None else functools.partial(
        batch_renorm, r_max=renorm_limits[0], d_max=renorm_limits[1])
    y, new = layer(
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
        virtual_batch_size=m.virtual_batch_size,
    )
    return y, (jax.lax.stop_gradient(new) if update else None)
