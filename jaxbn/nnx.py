"""Flax NNX adapter: a drop-in replacement for `flax.nnx.BatchNorm`.

Same constructor, the same `nnx.Param` (``scale``, ``bias``) and `nnx.BatchStat`
(``mean``, ``var``) variables, ``model.train()`` / ``model.eval()`` and
``nnx.view(model, use_running_average=...)``. Statistics come from
`jaxbn.batch_norm`; the module only owns variables.
"""

from __future__ import annotations

import typing as tp
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn._adapter import apply_batch_norm
from jaxbn._checks import as_shape
from jaxbn._types import BatchNormState

__all__ = ["BatchNorm"]


class BatchNorm(nnx.Module):
    """Batch normalization with exact cross-device statistics (Flax NNX).

    The math is `jaxbn.batch_norm`'s:

        y = (x - μ) / sqrt(σ² + ε) · scale + bias
        mean ← momentum · mean + (1 - momentum) · μ_B   (same for var)

    with μ, σ² the batch moments (every device of `axis_name`, unmasked entries)
    in training and the `BatchStat` running averages in evaluation.

    Arguments are `flax.nnx.BatchNorm`'s; `use_fast_variance` and
    `promote_dtype` are accepted for compatibility (statistics are always the exact
    two-pass float32 ones). jaxbn extras: ``momentum=None`` (cumulative average,
    adds a ``count`` BatchStat), `update_stats`, `unbiased_running_var` and
    `trainable_params` (see `jaxbn.linen.BatchNorm`).
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: tp.Optional[bool] = False,
        axis: int = -1,
        momentum: tp.Optional[float] = 0.99,
        epsilon: float = 1e-5,
        dtype: tp.Any = None,
        param_dtype: tp.Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: tp.Callable = nnx.initializers.zeros_init(),
        scale_init: tp.Callable = nnx.initializers.ones_init(),
        axis_name: tp.Optional[str] = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: tp.Any = None,
        rngs: nnx.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        update_stats: tp.Optional[bool] = None,
        unbiased_running_var: bool = False,
        trainable_params: bool = True,
    ):
        shape = as_shape(num_features)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32)) if momentum is None else nnx.data(None)
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata) if use_scale else nnx.data(None)
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata) if use_bias else nnx.data(None)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.update_stats = update_stats
        self.unbiased_running_var = unbiased_running_var
        self.trainable_params = trainable_params

    def __call__(self, x, use_running_average: tp.Optional[bool] = None, *, mask: tp.Optional[jax.Array] = None):
        """Normalizes `x`; statistics are updated in place of the BatchStat variables."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                "use_running_average is None: pass it to BatchNorm(...), to __call__, or use model.train()/model.eval()"
            )
        params = {}
        if self.scale is not None:
            params["scale"] = self.scale[...]
        if self.bias is not None:
            params["bias"] = self.bias[...]
        state = BatchNormState(
            mean=self.mean[...],
            var=self.var[...],
            count=self.count[...] if self.count is not None else jnp.zeros((), jnp.int32),
        )
        y, new = apply_batch_norm(
            self, jnp.asarray(x), params, state, use_running_average=use_running_average,
            axis_name=self.axis_name, mask=mask,
        )
        if new is not None:
            self.mean[...] = new.mean
            self.var[...] = new.var
            if self.count is not None:
                self.count[...] = new.count
        return y

    def set_view(self, use_running_average: tp.Optional[bool] = None):
        """Used by `nnx.view` (and `model.train()` / `model.eval()`)."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
