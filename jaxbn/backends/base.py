"""The interface every statistics backend implements: two per-device reductions.

A backend computes, over the entries of x that its program holds (one device's
shard inside ``shard_map``/``pmap``; the whole array under ``jit``), the sums the
core needs, in float32 (float64 for float64 x):

* ``moments(x, mask, lay) -> (n, mean, M2)``: count, mean and ``M2 = Σ (x - mean)²``
  of the entries the mask keeps (all if None), feature-shaped.
* ``dy_sums(x, dy, mean, lay) -> (S1, S2)``: ``Σ dy`` and ``Σ dy·(x - mean)`` over all
  entries.

Both must be differentiable (the layer's backward is differentiated again for
grad of grad) and batchable under ``vmap``. The core merges the results across
named axes itself (`jaxbn._stats.merge_over_axes`); a backend never imports the core.
"""

from __future__ import annotations

import jax

from jaxbn._checks import Layout


class Reductions:
    """Base class of the statistics backends (see the module docstring)."""

    name: str = "?"
    opaque: bool = False  # its results come from custom calls that XLA's partitioner cannot split

    def moments(self, x: jax.Array, mask, lay: Layout) -> tuple[jax.Array, jax.Array, jax.Array]:
        raise NotImplementedError

    def dy_sums(self, x: jax.Array, dy: jax.Array, mean: jax.Array, lay: Layout) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def __repr__(self):
        return f"<jaxbn reductions {self.name}>"
