"""Statistics under sharded ``jit``: one collective, declared with custom_partitioning.

Under ``jax.jit`` with sharded inputs and no named axis, XLA's SPMD partitioner
splits the core's reductions by itself. For the exact two-pass statistics that
is an all-reduce of Σx, then a second one of Σ(x - mean)² (the second pass needs
the global mean): two collectives in the forward. And it cannot see into the CPU
kernels' custom calls at all: it would all-gather their operands onto every
device.

Here the per-device work is declared with
``jax.experimental.custom_partitioning``: each device computes its own rows'
(n, mean, M2), with the one-sweep CPU kernel where usable, and the same single
all-reduce and Chan merge that ``batch_norm(axis_name=...)`` uses under
``shard_map`` combine them — the result is what one device would compute on the
whole array. With a mask, each device counts its unmasked entries (n may be 0:
an empty shard adds nothing); the mask is sharded like x along the axes it
shares with x and broadcast along its size-1 axes. Feature axes may be sharded
too (each device then holds its features' statistics); no operand is gathered. The backward's sums
(Σdy, Σdy·(x - mean)) are linear, so there each device sums its rows and one
all-reduce adds them up.

``active()`` decides where this applies: several devices and no manual axes in
the current abstract mesh (plain or sharded ``jit``, eager calls). Inside
``shard_map``/``pmap`` the core merges over the named axes itself; under a
partially manual ``shard_map`` the plain XLA formulation is used. On one device
JAX inlines the function (no partitioning happens). ``custom_partitioning``
has neither a batching nor a differentiation rule: under ``vmap`` the
unpartitioned function is batched instead (same values), and JVP rules in
``jnp`` (which XLA partitions itself) keep both functions differentiable.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["active", "moments", "masked_moments", "dy_sums"]


def active() -> bool:
    """Whether XLA's SPMD partitioner may split the program being traced."""
    if jax.device_count() == 1:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return not any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)


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
    def _rule(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, b in zip(args, in_batched)]
        return jax.vmap(plain)(*args), (True,) * n_results

    return wrapped


def _declare(fun, partition, ndim: int, feature_axes: tuple, operands: tuple, n_results: int = 2):
    """`fun` as a custom_partitioning op whose results are feature vectors sharded like
    x's feature axes (batched under vmap as plain `fun`); `operands` as in `_rule`."""

    def infer(mesh, arg_shapes, result_shape):
        return (_shardings(mesh, arg_shapes[0], feature_axes)[1],) * n_results

    op = custom_partitioning(fun)
    rule, reduced = _rule(ndim, feature_axes, operands, n_results)
    op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                     reduction_factors=reduced)
    return _vmappable(op, fun, n_results)


@functools.lru_cache(maxsize=None)
def _moments_op(ndim: int, feature_axes: tuple, kernel: bool):
    """x -> (mean, M2) over the non-feature axes of the whole (sharded) x."""
    bn = importlib.import_module("jaxbn.batch_norm")  # the core imports this module
    from jaxbn import cpu_kernel

    red = tuple(a for a in range(ndim) if a not in feature_axes)

    def local(x):  # this device's rows: (n, mean, M2)
        return bn._local_moments(x, None, bn._layout(x, feature_axes), kernel, sharded=False)

    def plain(x):
        return local(x)[1:]

    def partition(mesh, arg_shapes, result_shape):
        spec, out = _shardings(mesh, arg_shapes[0], feature_axes)
        names = _mesh_axes(spec[a] for a in red) or None

        def lower_fn(x):
            _, m, m2 = bn._merge_moments(*local(x), names, None)
            return m, m2

        return mesh, lower_fn, (out, out), (NamedSharding(mesh, P(*spec)),)

    op = _declare(plain, partition, ndim, feature_axes, ("x",))

    # custom_partitioning has no differentiation rule: the JVP in jnp (XLA partitions it).
    @jax.custom_jvp
    def f(x):
        return op(x)

    @f.defjvp
    def _jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        mean, m2 = f(x)
        bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(ndim))
        return (mean, m2), cpu_kernel.moments_tangents(x, mean.reshape(bshape), t, red)

    return f


@functools.lru_cache(maxsize=None)
def _masked_moments_op(ndim: int, feature_axes: tuple, mask_axes: tuple, kernel: bool):
    """(x, mask) -> (n, mean, M2) over the non-feature axes of the whole x, counting
    only entries where the mask is true. The mask has x's rank; `mask_axes[a]` says
    whether its axis a is x's (sharded like x's) or of size 1 (broadcast)."""
    bn = importlib.import_module("jaxbn.batch_norm")

    red = tuple(a for a in range(ndim) if a not in feature_axes)

    def local(x, mask):  # this device's rows: (n, mean, M2) of its unmasked entries
        return bn._local_moments(x, mask, bn._layout(x, feature_axes), kernel, sharded=False)

    def partition(mesh, arg_shapes, result_shape):
        spec, out = _shardings(mesh, arg_shapes[0], feature_axes)
        names = _mesh_axes(spec[a] for a in red) or None
        mspec = P(*(spec[a] if mask_axes[a] else None for a in range(ndim)))

        def lower_fn(x, mask):
            return bn._merge_moments(*local(x, mask), names, None)

        return mesh, lower_fn, (out,) * 3, (NamedSharding(mesh, P(*spec)), NamedSharding(mesh, mspec))

    op = _declare(local, partition, ndim, feature_axes, ("x", mask_axes), 3)

    @jax.custom_jvp
    def f(x, mask):
        return op(x, mask)

    @f.defjvp
    def _jvp(primals, tangents):
        # d mean = Σ_M t / n,  d M2 = 2·Σ_M (x - mean)·t;  the count has no tangent.
        (x, mask), (t, _) = primals, tangents
        n, mean, m2 = f(x, mask)
        bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(ndim))
        dt = mean.dtype
        t = jnp.where(mask, t.astype(dt), 0)
        xc = jnp.where(mask, x.astype(dt) - mean.reshape(bshape), 0)
        return (n, mean, m2), (jnp.zeros_like(n), jnp.sum(t, red) / jnp.maximum(n, 1), 2 * jnp.sum(xc * t, red))

    return f


@functools.lru_cache(maxsize=None)
def _dy_sums_op(ndim: int, feature_axes: tuple):
    """(x, dy, mean) -> (Σdy, Σdy·(x - mean)) over the non-feature axes of the whole
    x, with the CPU kernel on each device's part."""
    from jaxbn import cpu_kernel

    red = tuple(a for a in range(ndim) if a not in feature_axes)

    def local(x, dy, mean):
        return cpu_kernel.dy_sums(x, dy, mean, feature_axes)

    def partition(mesh, arg_shapes, result_shape):
        spec, vec = _shardings(mesh, arg_shapes[0], feature_axes)
        names = _mesh_axes(spec[a] for a in red)
        xs = NamedSharding(mesh, P(*spec))

        def lower_fn(x, dy, mean):
            s = jnp.stack(local(x, dy, mean))
            if names:
                s = jax.lax.psum(s, names)
            return s[0], s[1]

        return mesh, lower_fn, (vec, vec), (xs, xs, vec)

    op = _declare(local, partition, ndim, feature_axes, ("x", "x", "f"))

    @jax.custom_jvp
    def f(x, dy, mean):
        return op(x, dy, mean)

    @f.defjvp
    def _jvp(primals, tangents):
        (x, dy, mean), (tx, tdy, tm) = primals, tangents
        s1, s2 = f(x, dy, mean)
        bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(ndim))
        return (s1, s2), cpu_kernel.dy_sums_tangents(x, dy, mean.reshape(bshape), s1, tx, tdy, tm, red)

    return f


def moments(x: jax.Array, feature_axes: tuple, kernel: bool):
    """(mean, M2) in float32 over the non-feature axes of the whole x: each device's
    rows by the core's local two-pass (the CPU kernel if `kernel`), one all-reduce."""
    return _moments_op(x.ndim, tuple(feature_axes), bool(kernel))(x)


def masked_moments(x: jax.Array, mask: jax.Array, feature_axes: tuple, kernel: bool):
    """(n, mean, M2) in float32 of the unmasked entries of the whole x (`mask` boolean,
    broadcastable to x): each device's rows by the core's masked two-pass (the CPU
    kernel if `kernel` and the mask leaves out whole rows), one all-reduce."""
    mask = jnp.reshape(mask, (1,) * (x.ndim - mask.ndim) + mask.shape)
    mask_axes = tuple(mask.shape[a] == x.shape[a] for a in range(x.ndim))  # else of size 1
    return _masked_moments_op(x.ndim, tuple(feature_axes), mask_axes, bool(kernel))(x, mask)


def dy_sums(x: jax.Array, dy: jax.Array, mean: jax.Array, feature_axes: tuple):
    """(Σdy, Σdy·(x - mean)) of the whole x by the CPU kernel per device, one all-reduce."""
    return _dy_sums_op(x.ndim, tuple(a % x.ndim for a in feature_axes))(x, dy, mean)
