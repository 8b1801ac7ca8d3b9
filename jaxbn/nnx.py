"""Flax NNX adapter: a drop-in replacement for `flax.nnx.BatchNorm`.

Same constructor, the same `nnx.Param` (``scale``, ``bias``) and `nnx.BatchStat`
(``mean``, ``var``) variables, the same output dtype (`promote_dtype`),
``model.train()`` / ``model.eval()``, ``nnx.view(model, use_running_average=...)``
and ``nnx.view_info``. Statistics come from `jaxbn.batch_norm`; the module only
owns variables.
"""

import typing as tp
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as _dtypes
from flax.nnx.nn.normalization import BatchNorm as _FlaxBatchNorm

from jaxbn._adapter import UnboundAxisNameError, apply_batch_norm, as_stat, floating
from jaxbn._checks import as_shape
from jaxbn._types import BatchNormState

__all__ = ["BatchNorm", "BatchRenorm", "UnboundAxisNameError"]


class BatchNorm(_FlaxBatchNorm):
    """Batch normalization with exact cross-device statistics (Flax NNX).

    The math is `jaxbn.batch_norm`'s:

        y = (x - μ) / sqrt(σ² + ε) · scale + bias
        mean ← momentum · mean + (1 - momentum) · μ_B   (same for var)

    with μ, σ² the batch moments (every device of `axis_name`, unmasked entries)
    in training and the `BatchStat` running averages in evaluation.

    A subclass of `flax.nnx.BatchNorm` (``isinstance(m, nnx.BatchNorm)`` holds,
    so code that finds BatchNorm layers by class finds these too). Arguments are
    Flax's. As in Flax, `promote_dtype` is applied to ``(x, mean, var, scale,
    bias)`` with ``dtype=dtype``: the promoted x, scale and bias are normalized
    and set the output dtype (so bf16 x with bf16 params and ``dtype=None``
    gives float32, promoted with the float32 statistics). Unlike Flax, the
    statistics themselves stay float32 (computed from the promoted x, stored and
    used unrounded) and the variance is always the exact two-pass one
    (`use_fast_variance` is accepted for compatibility). jaxbn extras:
    ``momentum=None`` (cumulative average, adds a ``count`` BatchStat),
    `update_stats`, `unbiased_running_var` and `trainable_params` (see
    `jaxbn.linen.BatchNorm`). An unbound `axis_name` in training raises
    `UnboundAxisNameError`, a `NameError` (as Flax's) and a
    `ValueError`.
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
        promote_dtype: tp.Callable = _dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        update_stats: tp.Optional[bool] = None,
        unbiased_running_var: bool = False,
        trainable_params: bool = True,
        virtual_batch_size: tp.Optional[int] = None,
    ):
        shape = as_shape(num_features)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        counts = momentum is None or self._counts_updates()
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32)) if counts else nnx.data(None)
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
        self.promote_dtype = _dtypes.promote_dtype if promote_dtype is None else promote_dtype
        self.update_stats = update_stats
        self.unbiased_running_var = unbiased_running_var
        self.trainable_params = trainable_params
        self.virtual_batch_size = virtual_batch_size

    def __call__(self, x, use_running_average: tp.Optional[bool] = None, *, mask: tp.Optional[jax.Array] = None):
        """Normalizes `x`; in training the BatchStat variables are updated in place.

        Args:
          x: the input (an integer or boolean one is promoted as Flax does).
          use_running_average: overrides the attribute of the same name.
          mask: boolean, broadcastable to x; False entries do not count towards
            the statistics.

        Returns:
          The normalized input, in Flax NNX's output dtype.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                "use_running_average is None: pass it to BatchNorm(...), to __call__, or use model.train()/model.eval()"
            )
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        mean, var = self.mean[...], self.var[...]
        # Flax's promotion of the input and every variable; its result sets the output
        # dtype. The statistics jaxbn normalizes with stay the float32 variables.
        x, _, _, scale, bias = self.promote_dtype((x, mean, var, scale, bias), dtype=self.dtype)
        dtype = _dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
        state = BatchNormState(
            mean=as_stat(mean),
            var=as_stat(var),
            count=self.count[...] if self.count is not None else jnp.zeros((), jnp.int32),
        )
        y, new = apply_batch_norm(
            self, floating(x), params, state, use_running_average=use_running_average,
            axis_name=self.axis_name, mask=mask, dtype=dtype, renorm_limits=self._renorm_limits(state.count),
        )
        if new is not None:  # carries no gradient (stop_gradient), as Flax writes it
            self.mean[...] = new.mean
            self.var[...] = new.var
            if self.count is not None:
                self.count[...] = new.count
        return y

    def _counts_updates(self) -> bool:  # whether a `count` BatchStat is needed
        return False

    def _renorm_limits(self, count):  # (r_max, d_max) for Batch Renormalization, else None
        return None

    def set_view(self, use_running_average: bool | None = None):
        """Class method used by ``nnx.view`` (and ``model.train()`` / ``model.eval()``).

        Args:
          use_running_average: if True, the stored batch statistics will be
            used instead of computing the batch statistics on the input.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
    """Batch Renormalization (`jaxbn.batch_renorm`; Ioffe 2017), an NNX module.

    `BatchNorm`'s arguments and variables, plus the limits of the corrections r and d:
    ``r_max``/``d_max`` numbers, or ``schedule(count) -> (r_max, d_max)``, a function
    of the number of updates so far (e.g. `jaxbn.renorm_limits`, the paper's
    relaxation), which adds a ``count`` BatchStat. In evaluation it is `BatchNorm`.
    """

    def __init__(self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0,
                 schedule: tp.Optional[tp.Callable] = None, **kwargs):
        self.r_max, self.d_max, self.schedule = r_max, d_max, schedule
        super().__init__(num_features, **kwargs)

    def _counts_updates(self) -> bool:
        return self.schedule is not None

    def _renorm_limits(self, count):
        return (self.r_max, self.d_max) if self.schedule is None else self.schedule(count)
