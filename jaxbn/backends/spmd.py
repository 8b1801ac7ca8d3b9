"""Statistics under sharded ``jit``: one collective, declared with custom_partitioning.

Under ``jax.jit`` with sharded inputs and no named axis, XLA's SPMD partitioner
splits the core's reductions by itself. For the exact two-pass statistics that is
an all-reduce of Σx, then a second one of Σ(x - mean)² (the second pass needs the
global mean): two collectives in the forward. And it cannot see into the CPU
kernels' custom calls at all: it would all-gather their operands onto every device.

`Spmd(local)` wraps a local backend it is given (never importing the core): each
device computes its own rows' (n, mean, M2) with `local`, and the same single
all-reduce and Chan merge that ``batch_norm(axis_name=...)`` uses under
``shard_map`` combine them — the result is what one device would compute on the
whole array. With a mask, each device counts its unmasked entries (n may be 0: an
empty shard adds nothing); the mask is sharded like x along the axes it shares with
x and broadcast along its size-1 axes. Feature axes may be sharded too (each device
then holds its features' statistics); no operand is gathered. The backward's sums
(Σdy, Σdy·(x - mean)) are linear: XLA partitions plain reductions itself, so they
are declared only for an opaque local backend (each device sums its rows, one
all-reduce adds them up).

``custom_partitioning`` has neither a batching nor a differentiation rule: under
``vmap`` the local function is batched instead (same values), and JVP rules in
``jnp`` (which XLA partitions itself) keep both functions differentiable. On one
device JAX inlines the function (no partitioning happens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn._checks import Layout, layout
from jaxbn._stats import count, dy_sums_tangents, mask_shape, merge_over_axes, moments_tangents, real_dtype
from jaxbn.backends.base import Reductions

__all__ = ["Spmd"]


def _spec(sharding, ndim: int) -> tuple:
    spec = tuple(getattr(sharding, "spec", ()))
    return spec + (None,) * (ndim - len(spec))


def _mesh_axes(entries) -> tuple:
    names = []
    for e in entries:
        if e is not None:
            names.extend(e if isinstance(e, tuple) else (e,))
    return tuple(names)


def _shardings(mesh, x, feature_axes: tuple):
    """x's partition spec (one entry per axis) and the sharding of its feature vectors."""
    spec = _spec(x.sharding, len(x.shape))
    return spec, NamedSharding(mesh, P(*(spec[a] for a in feature_axes)))


def _rule(ndim: int, feature_axes: tuple, operands: tuple, n_results: int) -> tuple[str, tuple]:
    """Shardy's einsum-like rule. `operands`: per operand, "x" (x-shaped), "f" (a feature
    vector) or a tuple of booleans (an x-rank array whose axis a is x's where True, of size
    1 where False: a broadcast mask). Results: `n_results` feature vectors."""
    f = [f"d{a}" for a in range(ndim)]
    feat = " ".join(f[a] for a in feature_axes)
    ops, extra = [], []
    for i, o in enumerate(operands):
        if o == "x":
            ops.append(" ".join(f))
        elif o == "f":
            ops.append(feat)
        else:
            own = [f"o{i}_{a}" for a in range(ndim) if not o[a]]
            extra += own
            ops.append(" ".join(f[a] if o[a] else f"o{i}_{a}" for a in range(ndim)))
    reduced = tuple(f[a] for a in range(ndim) if a not in feature_axes) + tuple(extra)
    return f"{', '.join(ops)} -> {', '.join([feat] * n_results)}", reduced


def _vmappable(fun, plain, n_results: int):
    """`fun`, batched under vmap as `plain` (custom_partitioning has no batching rule)."""
    wrapped = jax.custom_batching.custom_vmap(fun)

    @wrapped.def_vmap
    def _batch_rule(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, b in zip(args, in_batched)]
        return jax.vmap(plain)(*args), (True,) * n_results

    return wrapped


def _declare(local, lower, ndim: int, feature_axes: tuple, operands: tuple, n_results: int):
    """`local` as a custom_partitioning op whose results are feature vectors sharded like
    x's feature axes. `lower(names)` gives the per-device function, `names` being the
    mesh axes that the reduced axes are sharded over; `operands` as in `_rule`, and
    each x-shaped operand is sharded like x, each feature vector like the results."""
    red = tuple(a for a in range(ndim) if a not in feature_axes)

    def infer(mesh, arg_shapes, result_shape):
        return (_shardings(mesh, arg_shapes[0], feature_axes)[1],) * n_results

    def partition(mesh, arg_shapes, result_shape):
        spec, vec = _shardings(mesh, arg_shapes[0], feature_axes)
        names = _mesh_axes(spec[a] for a in red) or None
        shard = {"x": NamedSharding(mesh, P(*spec)), "f": vec}
        args = tuple(
            shard[o] if isinstance(o, str) else NamedSharding(mesh, P(*(spec[a] if o[a] else None for a in range(ndim))))
            for o in operands
        )
        return mesh, lower(names), (vec,) * n_results, args

    op = custom_partitioning(local)
    rule, reduced = _rule(ndim, feature_axes, operands, n_results)
    op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule, reduction_factors=reduced)
    return _vmappable(op, local, n_results)


def _bshape(x, feature_axes, v):
    """A feature vector broadcastable against x."""
    return jnp.reshape(v, tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim)))


@functools.lru_cache(maxsize=None)
def _moments_op(local: Reductions, ndim: int, feature_axes: tuple, mask_axes):
    """(x[, mask]) -> (mean, M2), and n first with a mask, over the non-feature axes of
    the whole (sharded) x. `mask_axes`: None (no mask: the count is a constant, left to
    the caller) or, per axis of the x-rank mask, whether it is x's (sharded like x's) or
    of size 1 (broadcast)."""
    red = tuple(a for a in range(ndim) if a not in feature_axes)
    lay = lambda x: layout(x, feature_axes)  # noqa: E731
    skip = 1 if mask_axes is None else 0  # results start after the count without a mask

    if mask_axes is None:
        def per_device(x):
            return local.moments(x, None, lay(x))[skip:]

        def lower(names):
            return lambda x: merge_over_axes(*local.moments(x, None, lay(x)), names, None)[skip:]

        operands = ("x",)
    else:
        def per_device(x, mask):
            return local.moments(x, mask, lay(x))

        def lower(names):
            return lambda x, mask: merge_over_axes(*per_device(x, mask), names, None)

        operands = ("x", mask_axes)

    op = _declare(per_device, lower, ndim, feature_axes, operands, 3 - skip)

    @jax.custom_jvp
    def f(*args):
        return op(*args)

    @f.defjvp
    def _jvp(primals, tangents):
        # The count has no tangent; the mean and M2 as every backend's (jaxbn._stats).
        out = f(*primals)
        x, t = primals[0], tangents[0]
        if mask_axes is None:
            dm, dm2 = moments_tangents(x, _bshape(x, feature_axes, out[0]), t, red)
            return out, (dm, dm2)
        n, mean, _ = out
        dm, dm2 = moments_tangents(x, _bshape(x, feature_axes, mean), t, red, keep=primals[1], n=n)
        return out, (jnp.zeros_like(n), dm, dm2)

    return f


@functools.lru_cache(maxsize=None)
def _dy_sums_op(local: Reductions, ndim: int, feature_axes: tuple):
    """(x, dy, mean) -> (Σdy, Σdy·(x - mean)) over the non-feature axes of the whole x."""
    red = tuple(a for a in range(ndim) if a not in feature_axes)

    def per_device(x, dy, mean):
        return local.dy_sums(x, dy, mean, layout(x, feature_axes))

    def lower(names):
        def fn(x, dy, mean):
            s = jnp.stack(per_device(x, dy, mean))
            if names:
                s = jax.lax.psum(s, names)
            return s[0], s[1]

        return fn

    op = _declare(per_device, lower, ndim, feature_axes, ("x", "x", "f"), 2)

    @jax.custom_jvp
    def f(x, dy, mean):
        return op(x, dy, mean)

    @f.defjvp
    def _jvp(primals, tangents):
        (x, dy, mean), (tx, tdy, tm) = primals, tangents
        s1, s2 = f(x, dy, mean)
        return (s1, s2), dy_sums_tangents(x, dy, _bshape(x, feature_axes, mean), s1, tx, tdy, tm, red)

    return f


class Spmd(Reductions):
    """`local`'s statistics of the whole sharded x, one all-reduce, under XLA's SPMD partitioner."""

    def __init__(self, local: Reductions):
        self.local = local
        self.name = f"spmd({local.name})"

    def __eq__(self, other):
        return isinstance(other, Spmd) and other.local is self.local

    def __hash__(self):
        return hash(("spmd", id(self.local)))

    def moments(self, x, mask, lay: Layout):
        if not x.size:
            return self.local.moments(x, mask, lay)
        if mask is None:
            m, m2 = _moments_op(self.local, x.ndim, lay.feature_axes, None)(x)
            return count(x.shape, None, lay, real_dtype(m.dtype)), m, m2
        mask = jnp.reshape(mask, mask_shape(mask, x.ndim))
        mask_axes = tuple(mask.shape[a] == x.shape[a] for a in range(x.ndim))  # else of size 1
        return _moments_op(self.local, x.ndim, lay.feature_axes, mask_axes)(x, mask)

    def dy_sums(self, x, dy, mean, lay: Layout):
        if not self.local.opaque or not x.size:
            return self.local.dy_sums(x, dy, mean, lay)  # plain reductions: XLA partitions them
        return _dy_sums_op(self.local, x.ndim, lay.feature_axes)(x, dy, mean)
