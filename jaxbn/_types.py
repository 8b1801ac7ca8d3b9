"""The core's data types: a layer's running state, batch statistics, and how axes are named.

Both state types are NamedTuples, hence pytrees: they pass through `jit`, `vmap`,
`shard_map` and checkpointing as they are. Per-feature fields have the shape of
the feature axes, ``(C,)`` for the usual channel axis.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import jax

Axis = Union[int, Sequence[int]]
AxisName = Union[None, str, Sequence[str]]
ArrayLike = jax.typing.ArrayLike


class BatchNormState(NamedTuple):
    """Running statistics of a BatchNorm layer (a pytree)."""

    mean: jax.Array  # (*features,) float32, running mean.
    var: jax.Array  # (*features,) float32, running variance (biased unless configured).
    count: jax.Array  # () int32, updates applied so far (PyTorch's num_batches_tracked).


class Moments(NamedTuple):
    """Batch statistics over every reduced axis and every device of the named axis."""

    mean: jax.Array  # (*features,) float32.
    var: jax.Array  # (*features,) float32, biased (divided by `count`).
    count: jax.Array  # (*features,) float32, number of valid entries per feature.
