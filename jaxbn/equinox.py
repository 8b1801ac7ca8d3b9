"""Equinox adapter: a per-example BatchNorm layer with exact batch statistics.

`BatchNorm` follows `equinox.nn.BatchNorm`'s conventions: an `eqx.nn.StatefulLayer`
made with `eqx.nn.make_with_state`, called on one example ``x`` of shape
``(C, *spatial)`` inside ``jax.vmap(..., axis_name=...)``, returning
``(y, state)``, switched to the running statistics by `eqx.nn.inference_mode`::

    bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(64, "batch")
    y, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

The layer owns its parameters and a state slot; every statistic comes from
`jaxbn.batch_norm`, called on the single example with ``axis=0`` (the channels):
each example's spatial sums are merged across the vmap axis, and any other named
axis (nested vmaps, `shard_map`, `pmap`), in one collective, weighted by counts.
So, unlike `eqx.nn.BatchNorm`, the statistics are those of the whole batch with
masks and uneven shards, the variance is two-pass and float32 for bf16/fp16
inputs, the running variance starts at 1 and is used as it is in inference
(equinox#955), and `axis_name` is a static field (equinox#1074).

Several devices: vmap inside ``jax.shard_map(..., check_vma=False)`` or `jax.pmap`
with ``axis_name=(device_axis, vmap_axis)`` (jax 0.10.2 cannot psum over a vmap
axis inside a shard_map with check_vma=True: the layer says so), or the global
batch vmapped under a sharded `jit` with the vmap's name only.

Cost: the vmap axis is merged by local sums (a psum over a vmap axis moves nothing)
and only device axes by the core's one collective, whose buffer has a row per device.
Under sharded jit with the CPU kernels on (the default on CPU) XLA all-gathers x
(``JAXBN_CPU_KERNEL=0`` avoids it).

`import jaxbn` does not import Equinox; ``import jaxbn.equinox`` does.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._checks import check_epsilon, check_momentum
from jaxbn._types import BatchNormState
from jaxbn.batch_norm import batch_norm, init_state

__all__ = ["BatchNorm"]


def _axis_names(axis_name) -> Union[str, tuple]:
    """`axis_name` as a str or a non-empty tuple of str (hashable, for a static field)."""
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, (tuple, list)) or not names or any(not isinstance(n, str) for n in names):
        raise TypeError(
            "axis_name must be a str or a non-empty tuple of str naming the vmap axis over examples "
            f"(and any shard_map/pmap axes), got {axis_name!r} ({type(axis_name).__name__})"
        )
    return axis_name if isinstance(axis_name, str) else tuple(names)


def _vmap_names_under_checked_shard_map(x, axis_name) -> tuple:
    """The names of `axis_name` that are not mesh axes (vmap axes), when x is typed as
    varying over a mesh axis (a shard_map with check_vma=True); else ()."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older: aval.vma
    if not (getattr(aval, "vma", None) or getattr(mat, "varying", None)):
        return ()
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    mesh_axes = set(jax.sharding.get_abstract_mesh().axis_names)
    return tuple(n for n in names if n not in mesh_axes)


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization of one example ``(C, *spatial)`` with the global batch's statistics.

    Training (``inference=False``), with μ_B, σ²_B the mean and biased variance per
    channel over the spatial axes of every example of every named axis (examples
    whose `mask` is False left out):

        y = (x - μ_B) / sqrt(σ²_B + eps) · weight + bias
        mean ← momentum · mean + (1 - momentum) · μ_B        (var likewise with σ²_B)

    Inference (``inference=True``): ``y = (x - mean) / sqrt(var + eps) · weight + bias``
    with the running statistics, and the state comes back unchanged.

    Fields as `eqx.nn.BatchNorm`'s (``weight``, ``bias``, ``inference``, ``axis_name``,
    ``input_size``, ``eps``, ``channelwise_affine``, ``momentum``); the running
    statistics are one `eqx.nn.StateIndex` holding a `jaxbn.BatchNormState`
    (``mean`` 0 and ``var`` 1 at first, float32, and ``count``, the updates so far).
    """

    weight: Optional[jax.Array]
    bias: Optional[jax.Array]
    state_index: eqx.nn.StateIndex
    inference: bool
    axis_name: Union[str, tuple] = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: Optional[float] = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Union[str, Sequence[str]],
        *,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: Optional[float] = 0.99,
        inference: bool = False,
        dtype=None,
        mode: str = "batch",
    ):
        """**Arguments:**

        - `input_size`: the number of channels C (x's first axis).
        - `axis_name`: the name of the `vmap` axis over examples, or a tuple of names
          to take the statistics over several named axes (nested vmaps, or a vmap
          inside `shard_map`/`pmap`: e.g. ``("devices", "batch")``). Required: without
          it each example would be normalized on its own.
        - `eps`: added to the variance.
        - `channelwise_affine`: learnable ``weight`` (ones) and ``bias`` (zeros) of shape (C,).
        - `momentum`: weight of the old running value (Flax's and Equinox's convention;
          PyTorch's 0.1 is 0.9 here), in [0, 1]; None for a cumulative average.
        - `inference`: use the running statistics (True) or the batch's (False, and
          update the running ones). Toggled by `eqx.nn.inference_mode`, overridden by
          the call's `inference`.
        - `dtype`: dtype of ``weight`` and ``bias`` (default: Equinox's default floating
          dtype). The running statistics are float32 whatever it is.
        - `mode`: accepted for compatibility with ``eqx.nn.BatchNorm(..., mode="batch")``,
          the only mode (batch statistics in training, running ones in inference).
        """
        if mode != "batch":
            raise ValueError(
                f"mode must be 'batch' (batch statistics in training, running averages in inference), got {mode!r}: "
                "Equinox's 'ema' mode normalizes training batches with the running averages (equinox#659)"
            )
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"input_size must be a positive int, got {input_size!r}")
        check_momentum(momentum)
        check_epsilon(eps)
        if not isinstance(channelwise_affine, bool):
            raise TypeError(f"channelwise_affine must be a bool, got {channelwise_affine!r}")
        if dtype is None:
            dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        if channelwise_affine:
            self.weight = jnp.ones((input_size,), dtype)
            self.bias = jnp.zeros((input_size,), dtype)
        else:
            self.weight = None
            self.bias = None
        self.state_index = eqx.nn.StateIndex(init_state(input_size))
        self.inference = inference
        self.axis_name = _axis_names(axis_name)
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum

    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State,
        *,
        key=None,
        inference: Optional[bool] = None,
        mask: Optional[jax.Array] = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """**Arguments:**

        - `x`: one example, of shape ``(input_size, *spatial)`` (any number of spatial
          axes, none included), called inside ``jax.vmap(..., axis_name=...)``.
        - `state`: the `eqx.nn.State` holding the running statistics.
        - `key`: ignored (Equinox's layer signature).
        - `inference`: overrides ``self.inference`` when not None.
        - `mask`: boolean, broadcastable to x: a scalar per example (False: the
          example is left out of the statistics, but normalized like the others), or
          e.g. ``(1, *spatial)`` per position. Uneven valid counts across examples and
          devices are exact.

        **Returns:** ``(y, state)``: y in x's shape, in the dtype of x promoted with
        ``weight`` and ``bias``; the state with the running statistics updated in
        training (unchanged in inference). The new state is the same for every
        example, so ``out_axes=(0, None)`` returns it once.
        """
        del key
        if inference is None:
            inference = self.inference
        if isinstance(inference, jax.core.Tracer):
            raise TypeError(
                "inference must be a Python bool, got a traced value: jit the model with eqx.filter_jit "
                "(which keeps bools static), or mark the layer's `inference` static"
            )
        if not isinstance(inference, (bool, np.bool_)):
            raise TypeError(f"inference must be a bool or None, got {inference!r} ({type(inference).__name__})")
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] != self.input_size:
            raise ValueError(
                f"x must be one example of shape (input_size={self.input_size}, *spatial), got shape {x.shape}: "
                "call the layer inside jax.vmap over the batch axis"
            )
        params = None
        dtype = x.dtype
        if self.channelwise_affine:
            params = {"scale": self.weight, "bias": self.bias}
            dtype = jnp.result_type(x, self.weight, self.bias)
        running: BatchNormState = state.get(self.state_index)
        try:
            y, new = batch_norm(
                x,
                params,
                running,
                training=not bool(inference),
                axis=0,
                momentum=self.momentum,
                epsilon=self.eps,
                axis_name=self.axis_name,
                mask=mask,
                dtype=dtype,
            )
        except (AssertionError, ValueError) as e:
            vmap_names = _vmap_names_under_checked_shard_map(x, self.axis_name)
            if not vmap_names or isinstance(e, ValueError) and "psum" not in str(e):
                raise
            raise ValueError(
                f"jaxbn.equinox.BatchNorm: JAX cannot psum over the vmap axis {vmap_names} inside a shard_map "
                "with check_vma=True (jax 0.10.2 fails in its psum). Pass check_vma=False to jax.shard_map "
                "(then take gradients of the local loss and psum the parameter gradients, as under pmap), "
                "use jax.pmap, or vmap over the global batch under a sharded jit with axis_name the vmap's only"
            ) from e
        if not inference:
            state = state.set(self.state_index, new)
        return y, state
