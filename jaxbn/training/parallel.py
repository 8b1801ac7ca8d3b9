"""The parallel modes: how a step runs over the ``('batch',)`` mesh of all devices.

Each mode is one object with the few things that differ between them; the
training code asks the mode (``MODES[config.parallel]``) instead of comparing
mode names. All three give the same mathematics:

* ``SHARD_MAP`` (``'shard_map'``, the default): ``jit(shard_map(step))``. Each
  device holds its slice of the batch, BatchNorm synchronizes with
  ``axis_name='batch'`` and the loss is ``psum(local sum) / global count``, so
  ``jax.value_and_grad`` inside the body (with shard_map's type checks) returns
  the exact, replicated gradient of the global loss. This is JAX's recommended
  explicit-collectives API (``pmap`` is now built on it).
* ``PMAP`` (``'pmap'``): the legacy API. The gradient of each device's *local*
  mean loss is averaged with ``lax.pmean`` (the gradient of a psum'd loss would
  be N times too large under pmap). Its arrays carry a leading device axis on
  each process, so it also converts states and batches to and from that layout.
* ``JIT`` (``'jit'``): plain ``jit`` on a batch sharded with ``NamedSharding(mesh,
  P('batch'))``. The step sees the whole batch, XLA makes every reduction global,
  and BatchNorm gets ``axis_name=None`` (jaxbn/backends/spmd.py merges its
  statistics in one all-reduce).

Inside a step, ``local`` is the number of examples the step body sees.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

__all__ = ["AXIS", "ParallelMode", "SHARD_MAP", "PMAP", "JIT", "MODES", "PARALLEL_MODES", "get_mode",
           "make_mesh", "local_value"]

AXIS = "batch"


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D ``('batch',)`` mesh over all devices (of all processes), Auto axis type."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def local_value(x) -> np.ndarray:
    """This process's first shard of `x` as NumPy: the whole value of a replicated
    array, or the first device's row ``(1, ...)`` of a pmap-stacked one."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


class ParallelMode:
    """A mode whose step body runs once per device, with collectives over ``'batch'``.

    Subclasses override what differs. States are replicated global arrays and
    batches are sharded over ``'batch'``, unless a mode says otherwise.
    """

    name: str = ""
    bn_axis_name: Optional[str] = AXIS  # the BatchNorm layers' axis_name under this mode

    def __repr__(self):
        return f"<parallel mode {self.name!r}>"

    # In the step body.

    def mean_loss(self, loss_sum: jax.Array, local: int) -> jax.Array:
        """The loss to differentiate, from the sum of the per-example losses the body sees."""
        return jax.lax.psum(loss_sum, AXIS) / (local * jax.lax.axis_size(AXIS))

    def reduce_grads(self, grads, loss):
        """``(grads, loss)`` of the global mean loss, from those of `mean_loss`."""
        return grads, loss

    def global_sum(self, tree):
        """Sums of `tree` over the whole global batch."""
        return jax.lax.psum(tree, AXIS)

    def global_size(self, local: int) -> int:
        """The number of examples in the global batch."""
        return local * jax.lax.axis_size(AXIS)

    def device_mean(self, tree):
        """The mean over the devices of per-device values, as one replicated value: what makes
        per-device running statistics (``config.bn_sync=False``) a state again. Integer leaves
        (update counts, equal on every device) keep their value and dtype."""
        return jax.tree.map(lambda x: jax.lax.pmean(x, AXIS) if jnp.issubdtype(x.dtype, jnp.inexact)
                            else jax.lax.pmax(x, AXIS), tree)

    # Around the step.

    def wrap(self, step_fn: Callable, mesh: jax.sharding.Mesh, *, donate_state: bool = False) -> Callable:
        """`step_fn` ``(state, batch) -> outputs`` compiled for this mode; outputs are replicated."""
        body = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P())
        return jax.jit(body, donate_argnums=0 if donate_state else ())

    def put_batch(self, batch: Dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> Dict[str, jax.Array]:
        """This process's share of a global batch -> device arrays."""
        sharding = NamedSharding(mesh, P(AXIS))
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    def to_device(self, state, mesh: jax.sharding.Mesh):
        """Replicated global state (as checkpointed) -> the layout the wrapped step takes."""
        return state

    def from_device(self, state, mesh: jax.sharding.Mesh):
        """The layout the wrapped step returns -> replicated global state."""
        return state

    def fetch(self, tree):
        """Replicated device values -> NumPy on the host (any process)."""
        return jax.tree.map(local_value, tree)


class ShardMap(ParallelMode):
    """``jit(shard_map(step))`` with the loss psum'd before autodiff."""

    name = "shard_map"


class Pmap(ParallelMode):
    """``pmap(step)``: local mean loss, gradients averaged with ``pmean``; stacked states."""

    name = "pmap"

    def mean_loss(self, loss_sum, local):
        return loss_sum / local

    def reduce_grads(self, grads, loss):
        # Gradient of the local mean loss, averaged: the global mean loss's gradient.
        return jax.lax.pmean((grads, loss), AXIS)

    def wrap(self, step_fn, mesh, *, donate_state=False):
        return jax.pmap(step_fn, axis_name=AXIS, donate_argnums=0 if donate_state else ())

    def put_batch(self, batch, mesh):
        n = jax.local_device_count()
        sharding = NamedSharding(_local_mesh(), P(AXIS))
        return {k: jax.device_put(v.reshape((n, -1) + v.shape[1:]), sharding) for k, v in batch.items()}

    def to_device(self, state, mesh):
        n = jax.local_device_count()
        sharding = NamedSharding(_local_mesh(), P(AXIS))
        return jax.tree.map(lambda x: jax.device_put(np.stack([local_value(x)] * n), sharding), state)

    def from_device(self, state, mesh):
        replicated = NamedSharding(mesh, P())
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(replicated, local_value(x)[0]), state)

    def fetch(self, tree):
        return jax.tree.map(lambda x: local_value(x)[0], tree)


class Jit(ParallelMode):
    """Sharded ``jit(step)``: the body sees the global batch; XLA inserts the collectives."""

    name = "jit"
    bn_axis_name = None

    def mean_loss(self, loss_sum, local):
        return loss_sum / local

    def global_sum(self, tree):
        return tree

    def global_size(self, local):
        return local

    def device_mean(self, tree):
        return tree  # nothing is per-device: the body sees the global batch

    def wrap(self, step_fn, mesh, *, donate_state=False):
        repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
        return jax.jit(step_fn, in_shardings=(repl, data), out_shardings=repl,
                       donate_argnums=0 if donate_state else ())


def _local_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))


SHARD_MAP, PMAP, JIT = ShardMap(), Pmap(), Jit()
MODES: Dict[str, ParallelMode] = {m.name: m for m in (SHARD_MAP, PMAP, JIT)}
PARALLEL_MODES = tuple(MODES)


def get_mode(parallel) -> ParallelMode:
    """The mode named `parallel` (a key of `MODES`), or `parallel` itself if it is a mode."""
    return parallel if isinstance(parallel, ParallelMode) else MODES[parallel]
