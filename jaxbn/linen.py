"""Flax Linen adapter: a drop-in replacement for `flax.linen.BatchNorm`.

Same constructor fields, same call signature and the same variable tree
(``params/{scale,bias}``, ``batch_stats/{mean,var}``), so changing one import
keeps existing checkpoints and ``mutable=['batch_stats']`` code::

    -from flax.linen import BatchNorm
    +from jaxbn.linen import BatchNorm

The module only owns variables; all statistics come from `jaxbn.batch_norm`, so
they are exact across devices (count-weighted, masks, empty shards), two-pass
stable and float32 for low-precision inputs, where Flax's are not.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as _dtypes
from flax.linen.normalization import BatchNorm as _FlaxBatchNorm

from jaxbn._adapter import UnboundAxisNameError, apply_batch_norm, as_stat, floating, stored
from jaxbn._checks import check_x, is_bound, layout
from jaxbn._types import BatchNormState

__all__ = ["BatchNorm", "BatchRenorm", "UnboundAxisNameError"]


class BatchNorm(_FlaxBatchNorm):
    """Batch normalization with exact cross-device statistics (Flax Linen).

    Training (``use_running_average=False``), with μ_B, σ²_B the moments over
    every non-feature axis and every device of `axis_name` (unmasked entries):

        y = (x - μ_B) / sqrt(σ²_B + ε) · scale + bias
        batch_stats.mean ← momentum · mean + (1 - momentum) · μ_B   (same for var)

    Evaluation (``use_running_average=True``) normalizes with ``batch_stats``.

    A subclass of `flax.linen.BatchNorm` (``isinstance(m, nn.BatchNorm)`` holds,
    so code that finds BatchNorm layers by class finds these too) with the same
    fields, call signature, variables, dtypes and output dtype. Differences:
      use_fast_variance: accepted for compatibility; jaxbn always uses the exact
        two-pass variance (it costs no extra collective).
      force_float32_reductions: accepted; statistics are always computed in
        float32 (False only stores ``batch_stats`` in `param_dtype`, as Flax).
      momentum: may also be None for PyTorch's cumulative average, which adds a
        ``batch_stats/count`` variable (absent otherwise, to keep Flax's tree).
      update_stats: jaxbn extra; False normalizes with batch statistics without
        touching ``batch_stats`` (so it need not be mutable).
      unbiased_running_var: jaxbn extra; store the running variance with
        Bessel's correction, as PyTorch does.
      trainable_params: jaxbn extra; False stops gradients to scale and bias
        (frozen BN for fine-tuning, together with ``use_running_average=True``).
      virtual_batch_size: jaxbn extra; in training, each group of this many
        consecutive examples of the global batch is normalized with its own
        statistics (see `jaxbn.batch_norm`).

    During ``init`` the running statistics are not updated and an `axis_name`
    that is not bound is not required (flax#1250), as in Flax. Outside ``init``
    an unbound `axis_name` raises `UnboundAxisNameError`, a
    `NameError` (as Flax's) and a `ValueError`.
    """

    use_running_average: Optional[bool] = None
    axis: Union[int, Sequence[int]] = -1
    momentum: Optional[float] = 0.99
    epsilon: float = 1e-5
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = nn.initializers.zeros
    scale_init: Callable = nn.initializers.ones
    axis_name: Optional[Union[str, Sequence[str]]] = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    update_stats: Optional[bool] = None
    unbiased_running_var: bool = False
    trainable_params: bool = True
    virtual_batch_size: Optional[int] = None

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None, *, mask: Optional[jax.Array] = None):
        """Normalizes `x`; see the class docstring.

        Args:
          x: the input: any floating dtype, or an integer or boolean one (promoted
            with float32, as Flax).
          use_running_average: overrides the attribute of the same name.
          mask: boolean, broadcastable to x; False entries do not count towards
            the statistics.

        Returns:
          The normalized input, in `dtype` (default: x's and the params' dtypes
          promoted, as Flax).
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        x_in = jnp.asarray(x)
        x = check_x(floating(x_in))
        fshape = layout(x, self.axis).feature_shape
        stat_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype), fshape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stat_dtype), fshape)
        count = None
        if self.momentum is None or self._counts_updates():
            count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, fshape, self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, fshape, self.param_dtype)
        initializing = self.is_initializing()
        axis_name = self.axis_name
        if initializing and axis_name is not None and not is_bound(axis_name):
            axis_name = None
        state = BatchNormState(
            mean=as_stat(ra_mean.value),
            var=as_stat(ra_var.value),
            count=count.value if count is not None else jnp.zeros((), jnp.int32),
        )
        # Flax's output dtype: `dtype`, else x's and the parameters' promoted (inexact).
        dtype = _dtypes.canonicalize_dtype(x_in, *params.values(), dtype=self.dtype)
        y, new = apply_batch_norm(
            self, x, params, state, use_running_average=use_running_average, axis_name=axis_name, mask=mask,
            dtype=dtype, allow_update=not initializing, renorm_limits=self._renorm_limits(state.count),
        )
        if new is not None:
            ra_mean.value = stored(new.mean, ra_mean.value)
            ra_var.value = stored(new.var, ra_var.value)
            if count is not None:
                count.value = new.count
        return y

    @nn.nowrap  # helpers, not module methods: no row of their own in nn.tabulate, no scope
    def _counts_updates(self) -> bool:  # whether a batch_stats/count variable is needed
        return False

    @nn.nowrap
    def _renorm_limits(self, count):  # (r_max, d_max) for Batch Renormalization, else None
        return None


class BatchRenorm(BatchNorm):
    """Batch Renormalization (`jaxbn.batch_renorm`; Ioffe 2017), a Linen module.

    `BatchNorm`'s fields and variables, plus the limits of the corrections r and d:
    ``r_max``/``d_max`` numbers, or ``schedule(count) -> (r_max, d_max)``, a function
    of the number of updates so far (e.g. `jaxbn.renorm_limits`, the paper's
    relaxation), which adds a ``batch_stats/count`` variable. In evaluation it is
    `BatchNorm`. ``r_max=1, d_max=0`` is `BatchNorm`.
    """

    r_max: float = 3.0
    d_max: float = 5.0
    schedule: Optional[Callable] = None

    @nn.nowrap
    def _counts_updates(self) -> bool:
        return self.schedule is not None

    @nn.nowrap
    def _renorm_limits(self, count):
        return (self.r_max, self.d_max) if self.schedule is None else self.schedule(count)
