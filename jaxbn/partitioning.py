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
whole array. Feature axes may be sharded too (each device then holds its
features' statistics); no operand is gathered. The backward's sums
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

__all__ = ["active", "moments", "dy_sums"]


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


def _rule(ndim: int, feature_axes: tuple, n_like_x: int, n_vectors: int) -> tuple[str, tuple]:
    """Shardy's einsum-like rule: x-shaped operands, feature vectors, two feature-shaped results."""
    f = [f"d{a}" for a in range(ndim)]
    feat = " ".join(f[a] for a in feature_axes)
    ops = [" ".join(f)] * n_like_x + [feat] * n_vectors
    return f"{', '.join(ops)} -> {feat}, {feat}", tuple(f[a] for a in range(ndim) if a not in feature_axes)


def _vmappable(fun, plain):
    """`fun`, batched under vmap as `plain` (custom_partitioning has no batching rule)."""
    wrapped = jax.custom_batching.custom_vmap(fun)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, b in zip(args, in_batched)]
        return jax.vmap(plain)(*args), (True, True)

    return wrapped


def _declare(fun, partition, ndim: int, feature_axes: tuple, n_like_x: int, n_vectors: int):
    """`fun` as a custom_partitioning op whose two results are feature vectors sharded
    like x's feature axes (batched under vmap as plain `fun`)."""

    def infer(mesh, arg_shapes, result_shape):
        out = _shardings(mesh, arg_shapes[0], feature_axes)[1]
        return out, out

    op = custom_partitioning(fun)
    rule, reduced = _rule(ndim, feature_axes, n_like_x, n_vectors)
    op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                     reduction_factors=reduced)
    return _vmappable(op, fun)


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

    op = _declare(plain, partition, ndim, feature_axes, 1, 0)

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
def _dy_sums_op(ndim: int, nf: int):
    """(x, dy, mean) -> (Σdy, Σdy·(x - mean)) over all but the trailing `nf` axes of the
    whole x, with the CPU kernel on each device's rows."""
    from jaxbn import cpu_kernel

    feature_axes = tuple(range(ndim - nf, ndim))

    def local(x, dy, mean):
        return cpu_kernel.dy_sums(x, dy, mean, nf)

    def partition(mesh, arg_shapes, result_shape):
        spec, vec = _shardings(mesh, arg_shapes[0], feature_axes)
        names = _mesh_axes(spec[: ndim - nf])
        xs = NamedSharding(mesh, P(*spec))

        def lower_fn(x, dy, mean):
            s = jnp.stack(local(x, dy, mean))
            if names:
                s = jax.lax.psum(s, names)
            return s[0], s[1]

        return mesh, lower_fn, (vec, vec), (xs, xs, vec)

    op = _declare(local, partition, ndim, feature_axes, 2, 1)
    red = tuple(range(ndim - nf))

    @jax.custom_jvp
    def f(x, dy, mean):
        return op(x, dy, mean)

    @f.defjvp
    def _jvp(primals, tangents):
        (x, dy, mean), (tx, tdy, tm) = primals, tangents
        s1, s2 = f(x, dy, mean)
        return (s1, s2), cpu_kernel.dy_sums_tangents(x, dy, mean, s1, tx, tdy, tm, red)

    return f


def moments(x: jax.Array, feature_axes: tuple, kernel: bool):
    """(mean, M2) in float32 over the non-feature axes of the whole x: each device's
    rows by the core's local two-pass (the CPU kernel if `kernel`), one all-reduce."""
    return _moments_op(x.ndim, tuple(feature_axes), bool(kernel))(x)


def dy_sums(x: jax.Array, dy: jax.Array, mean: jax.Array, nf: int):
    """(Σdy, Σdy·(x - mean)) of the whole x by the CPU kernel per device, one all-reduce."""
    return _dy_sums_op(x.ndim, int(nf))(x, dy, mean)
