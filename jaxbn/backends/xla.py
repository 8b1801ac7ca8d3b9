"""The XLA formulation of the statistics: plain reductions, on every platform.

Two passes over x for the moments (mean, then ``Σ (x - mean)²``), two sums over
x and dy for the backward. With a mask, the reduced axes along which the mask is
constant (e.g. H, W for a per-example mask) are summed first without it, and the
mask then selects among the partial sums: XLA:CPU's reductions do not absorb a
select, so masking x itself would write a masked copy of x for each pass. Partial
sums of masked-out entries may be anything (even NaN): they are selected away.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxbn._checks import Layout
from jaxbn._stats import abs_sq, count, mask_shape, real_dtype, stat_dtype
from jaxbn.backends.base import Reductions
from jaxbn.backends.context import platform

__all__ = ["XLA", "private"]


def private(*arrays):
    """The arrays behind an optimization barrier: the same buffers, no run-time cost.

    XLA:CPU computes a reduction together with its elementwise producers (the
    conversion to float32, x - mean, its square, dy·(x - mean)) in one pass over
    memory only when no other expression uses that producer; a shared producer is
    written to memory in full and read back. The forward's Σx and Σ(x - mean)², and
    the backward's Σdy and Σdy·(x - mean), spell the same ``x.astype(float32)``,
    ``x - mean`` and ``dy.astype(float32)``, which common-subexpression elimination
    merges into one materialized array. Reading x (and dy) through a barrier of its
    own gives each reduction operands XLA cannot identify with the others, so each
    reduction streams the input in its own dtype (the bytes moved are counted in the
    compiled HLO by ``benchmarks/bn_layer.py``). The arithmetic is unchanged.

    Only on the CPU, where it was measured: elsewhere the plain program, so that e.g.
    XLA:GPU stays free to fuse sibling reductions that read the same input into one
    kernel. (``lax.platform_dependent`` would decide at lowering time, but its
    branches must agree on shard_map's varying axes, which a barrier over several
    operands does not preserve.)
    """
    if platform() != "cpu":
        return arrays
    return jax.lax.optimization_barrier(arrays)


class _Xla(Reductions):
    name = "xla"

    def moments(self, x, mask, lay: Layout):
        red, b = lay.reduce_axes, lay.b
        dt = stat_dtype(x.dtype)
        n = count(x.shape, mask, lay, real_dtype(dt))
        if mask is None:
            (xa,) = private(x)  # each reduction reads x through its own barrier
            m = jnp.sum(xa.astype(dt), red) / max(math.prod(x.shape[a] for a in red), 1)
            xb, mb = private(x, m)
            return n, m, jnp.sum(abs_sq(xb.astype(dt) - b(mb)), red)
        k = mask_shape(mask, x.ndim)
        inner = tuple(a for a in red if k[a] == 1)

        def masked_sum(v, keep):
            if inner:
                v = jnp.sum(v, inner, keepdims=True)
            return jnp.sum(jnp.where(keep, v, 0), red)

        xa, ka = private(x, mask)
        m = masked_sum(xa.astype(dt), ka) / jnp.maximum(n, 1)
        xb, kb, mb = private(x, mask, m)
        return n, m, masked_sum(abs_sq(xb.astype(dt) - b(mb)), kb)

    def dy_sums(self, x, dy, mean, lay: Layout):
        red, dt = lay.reduce_axes, mean.dtype
        (dya,) = private(dy)  # each reduction reads x and dy through its own barrier
        xp, dyp, mp = private(x, dy, mean)
        return jnp.sum(dya.astype(dt), red), jnp.sum(dyp.astype(dt) * (xp.astype(dt) - lay.b(mp)), red)


XLA = _Xla()
