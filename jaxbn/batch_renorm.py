"""Batch Renormalization (Ioffe 2017): batch normalization corrected towards the running
statistics, exact across devices like `jaxbn.batch_norm`.

In training, with μ_B, σ_B² the global batch moments (every device of `axis_name`,
unmasked entries: exactly `batch_norm`'s, in the same single all-reduce),
σ_B = sqrt(σ_B² + ε), and μ, σ = sqrt(var + ε) from the running state:

    r = stop_gradient(clip(σ_B / σ, 1/r_max, r_max))
    d = stop_gradient(clip((μ_B - μ) / σ, -d_max, d_max))
    y = ((x - μ_B) / σ_B · r + d) · scale + bias

and the running averages are updated from μ_B, σ_B² exactly as `batch_norm` does.
In evaluation it is `batch_norm`. ``r_max = 1, d_max = 0`` is `batch_norm`; the state
is a `BatchNormState`, so a trained BatchNorm converts to Batch Renorm and back with
no change of variables. `renorm_limits` is the paper's relaxation schedule as a pure
function of the update count.

References:
  Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
  Batch-Normalized Models", NeurIPS 2017 (arXiv 1702.03275).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxbn import _checks as checks
from jaxbn._types import ArrayLike, Axis, AxisName, BatchNormState

__all__ = ["batch_renorm", "renorm_limits"]

_core = importlib.import_module("jaxbn.batch_norm")  # the module (its name is shadowed by the function)


def _check_limit(name: str, v, low: float):
    if isinstance(v, (bool, str)) or not (isinstance(v, (int, float)) or hasattr(v, "dtype")):
        raise TypeError(f"{name} must be a number >= {low:g}, got {v!r} ({type(v).__name__})")
    c = checks.concrete(v)
    if c is not None and not c >= low:
        raise ValueError(f"{name} must be >= {low:g}, got {v!r}")


def batch_renorm(
    x: ArrayLike,
    params: Optional[dict],
    state: BatchNormState,
    *,
    training: bool,
    r_max: ArrayLike,
    d_max: ArrayLike,
    axis: Axis = -1,
    momentum: Optional[float] = 0.99,
    epsilon: float = 1e-5,
    axis_name: AxisName = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    mask: Optional[ArrayLike] = None,
    update_stats: Optional[bool] = None,
    unbiased_running_var: bool = False,
    dtype: Any = None,
    virtual_batch_size: Optional[int] = None,
) -> tuple[jax.Array, BatchNormState]:
    """One Batch Renormalization layer: see the module docstring for the math.

    Args are `jaxbn.batch_norm`'s, plus:
      r_max: >= 1, the limit of the scale correction r (may be traced, e.g. a schedule).
      d_max: >= 0, the limit of the shift correction d (may be traced).

    Returns:
      ``(y, new_state)`` as `batch_norm`. Gradients with respect to x, scale and bias
      treat r and d as constants; one all-reduce forward, one backward.

    Example:
      >>> import jax, jaxbn
      >>> x = jax.random.normal(jax.random.key(0), (8, 4))
      >>> params, state = jaxbn.init_params(4), jaxbn.init_state(4)
      >>> r_max, d_max = jaxbn.renorm_limits(state.count)
      >>> y, state = jaxbn.batch_renorm(x, params, state, training=True, r_max=r_max, d_max=d_max)
    """
    _check_limit("r_max", r_max, 1.0)
    _check_limit("d_max", d_max, 0.0)
    return _core._layer(x, params, state, training=training, axis=axis, momentum=momentum, epsilon=epsilon,
                        axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask,
                        update_stats=update_stats, unbiased_running_var=unbiased_running_var, dtype=dtype,
                        renorm_limits=(r_max, d_max), virtual_batch_size=virtual_batch_size)


def renorm_limits(
    count: ArrayLike,
    *,
    warmup_steps: int = 5000,
    r_max: float = 3.0,
    r_max_steps: int = 40000,
    d_max: float = 5.0,
    d_max_steps: int = 25000,
) -> tuple[jax.Array, jax.Array]:
    """The paper's relaxation: ``(r_max, d_max)`` after `count` updates (``state.count``).

    Plain batch normalization (1, 0) for the first `warmup_steps`; then r_max grows
    linearly to `r_max` at `r_max_steps` and d_max to `d_max` at `d_max_steps`, and
    both stay there. Defaults: the paper's (BN alone for 5k steps, r_max = 3 at 40k,
    d_max = 5 at 25k). A pure function of the count: jit-, vmap- and grad-safe.
    """
    for name, steps in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
        if not steps > warmup_steps >= 0:
            raise ValueError(f"{name} must be > warmup_steps >= 0, got {name}={steps}, warmup_steps={warmup_steps}")
    _check_limit("r_max", r_max, 1.0)
    _check_limit("d_max", d_max, 0.0)
    c = jnp.asarray(count, jnp.float32)

    def ramp(end):
        return jnp.clip((c - warmup_steps) / (end - warmup_steps), 0.0, 1.0)

    return 1.0 + (r_max - 1.0) * ramp(r_max_steps), d_max * ramp(d_max_steps)
