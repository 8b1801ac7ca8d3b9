"""The statistics algebra, each rule written once: counts, Chan's merge, the BN affine
map, and the tangents of the per-device sums that every backend computes.

A device's statistics of the entries it holds are a triple ``(n, mean, M2)`` with
``M2 = Σ (x - mean)²``: exact to combine across devices (`merge_rows`), never a
difference of large sums.

References:
  Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for computing
  sample variances", 1979.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._checks import Layout, axis_size, check_groups


def stat_dtype(dtype) -> Any:
    """The dtype of statistics for inputs of `dtype`: float32, or float64 for float64
    (complex64/complex128 for complex inputs: their means are complex)."""
    return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype) -> Any:
    """The real dtype of counts and variances for statistics of `dtype`."""
    return jnp.finfo(dtype).dtype


def abs_sq(d):
    """|d|², real: the square for real arrays, re² + im² for complex ones (Flax's convention)."""
    if jnp.iscomplexobj(d):
        return d.real * d.real + d.imag * d.imag
    return d * d


def real_dot(a, b):
    """Re(conj(a)·b), elementwise: the derivative of |a|²/2 along b."""
    if jnp.iscomplexobj(a) or jnp.iscomplexobj(b):
        return (a.conj() * b).real
    return a * b


def count(x_shape, mask: Optional[jax.Array], lay: Layout, dtype) -> jax.Array:
    """Number of entries per feature that the mask keeps (all when None), feature-shaped.

    Counted from the mask's own entries, times the sizes of the axes along which it
    is broadcast: summing the mask widened to x's shape would read as many entries
    as x has, for nothing (``benchmarks/layer_variants.py`` times the difference).
    """
    red = lay.reduce_axes
    if mask is None:
        return jnp.full(lay.feature_shape, math.prod(x_shape[a] for a in red), dtype)
    k = mask_shape(mask, len(x_shape))
    n = jnp.sum(jnp.reshape(mask, k), tuple(a for a in red if k[a] != 1), dtype=dtype, keepdims=True)
    n = n * math.prod(x_shape[a] for a in red if k[a] == 1)
    return jnp.broadcast_to(jnp.squeeze(n, red), lay.feature_shape)


def mask_shape(mask: jax.Array, ndim: int) -> tuple:
    """The mask's shape with leading ones up to x's rank."""
    return (1,) * (ndim - mask.ndim) + mask.shape


def merge_rows(ns, means, m2s, xp=jnp):
    """Chan's merge of triples stacked along axis 0 (`xp`: jax.numpy, or numpy for
    float64 accumulation on the host):

        N = Σ n_i,   mean = Σ n_i mean_i / N,   M2 = Σ M2_i + Σ n_i (mean_i - mean)²

    Rows with n_i = 0 add nothing; with N = 0 the result is (0, 0, 0).
    """
    n = ns.sum(0)
    mean = (ns * means).sum(0) / xp.maximum(n, 1)
    return n, mean, m2s.sum(0) + (ns * abs_sq(means - mean[None])).sum(0)


def _rows(v, names: tuple, size: int):
    """Every device's `v`, stacked: ``(devices, *v.shape)`` on every device, one all-reduce
    (each device writes its own row of a buffer of zeros, and the buffer is summed)."""
    idx = jax.lax.axis_index(names)
    onehot = (jnp.arange(size) == idx).reshape((size,) + (1,) * v.ndim)
    return jax.lax.psum(jnp.where(onehot, v[None], jnp.zeros((), v.dtype)), names)


def _members(names: tuple, groups: tuple, size: int) -> jax.Array:
    """``(devices,)`` booleans: which devices are in this device's group."""
    gid = np.zeros(size, np.int32)
    for i, g in enumerate(groups):
        gid[list(g)] = i
    gid = jnp.asarray(gid)
    return gid == gid[jax.lax.axis_index(names)]


def group_sum(v, names: Optional[tuple], groups: Optional[tuple], whole: bool = False):
    """Σ of `v` over the devices of `names` (over this device's group when `groups` are
    given), one all-reduce; with `whole`, ``(that sum, the sum over every device)``.
    Groups are served by a buffer of every device's row, from which each device adds
    up its group's rows: the same one collective under ``shard_map`` (where
    ``psum(axis_index_groups=...)`` is not implemented) and pmap."""
    if names is None or groups is None:
        total = v if names is None else jax.lax.psum(v, names)
        return (total, total) if whole else total
    size = axis_size(names)
    check_groups(groups, size)
    rows = _rows(v, names, size)
    keep = _members(names, groups, size).reshape((size,) + (1,) * v.ndim)
    group = jnp.sum(jnp.where(keep, rows, jnp.zeros((), v.dtype)), 0)
    return (group, jnp.sum(rows, 0)) if whole else group


def merge_over_axes(n, mean, m2, names: Optional[tuple], groups: Optional[tuple], batched: tuple = (),
                    whole: bool = False):
    """Merges per-device (n, mean, M2) over the named axes in one all-reduce.

    Each device writes its triple into its own row of a ``(devices, 3, *F)`` buffer
    of zeros and the buffer is summed across devices (an all-gather expressed as a
    psum, so the result is replicated: ``shard_map(..., out_specs=P())`` accepts it),
    then `merge_rows` combines the rows — with `groups`, only the rows of this
    device's group. Rows of empty shards have n_i = 0 and add nothing. A single psum
    of ``[Σx, Σx²]`` would be cheaper but cancels catastrophically; a psum of shifted
    sums needs the shift first (a second collective). This is exact and costs one
    collective of ``3·devices·C`` floats. With `whole`, returns ``(group triple, whole
    triple)``: the merge of every device's rows, from the same buffer.

    Names in `batched` are ``vmap`` axes (not devices): there every "device" is one
    example and a psum is a local sum, so they are merged first by exact sums
    (count, count-weighted mean, then ``Σ M2_i + n_i·|mean_i - mean|²``), and only the
    remaining names by the rows buffer — otherwise that buffer would have a row per
    example of the whole batch, for every example.
    """
    out = ((n, mean, m2),) * 2 if names is None else _merge_named(n, mean, m2, names, groups, batched)
    return out if whole else out[0]


def _merge_named(n, mean, m2, names, groups, batched):
    size = axis_size(names)
    check_groups(groups, size)
    batched = tuple(a for a in names if a in batched) if groups is None else ()
    if batched:
        total = jax.lax.psum(n, batched)
        merged = jax.lax.psum(n * mean, batched) / jnp.maximum(total, 1)
        n, mean, m2 = total, merged, jax.lax.psum(m2 + n * abs_sq(mean - merged), batched)
        names = tuple(a for a in names if a not in batched)
        if not names:
            return (n, mean, m2), (n, mean, m2)
        size = axis_size(names)
    cplx = jnp.iscomplexobj(mean)  # a complex mean travels as its real and imaginary parts
    buf = _rows(jnp.stack([n, mean.real, mean.imag, m2] if cplx else [n, mean, m2]), names, size)
    ns, means, m2s = buf[:, 0], jax.lax.complex(buf[:, 1], buf[:, 2]) if cplx else buf[:, 1], buf[:, -1]
    everyone = merge_rows(ns, means, m2s)
    if groups is None:
        return everyone, everyone
    keep = _members(names, groups, size).reshape((size,) + (1,) * n.ndim)
    zero = jnp.zeros((), ns.dtype)
    return merge_rows(jnp.where(keep, ns, zero), means, jnp.where(keep, m2s, zero)), everyone


def affine(mean, var, scale, bias, epsilon, dtype):
    """BN as ``(x - mean)·a + b``: returns (mean, a = scale/sqrt(var + ε), b) in `dtype`.

    b is a zero scalar when there is no bias.
    """
    inv = jax.lax.rsqrt(var.astype(real_dtype(dtype)) + epsilon)
    a = inv if scale is None else inv * scale.astype(dtype)
    b = jnp.zeros((), dtype) if bias is None else bias.astype(dtype)
    return mean.astype(dtype), a, b


# Tangents of the per-device sums. They are linear in the tangents, so reverse mode
# transposes them: every backend's statistics stay differentiable (jaxbn.moments,
# and the training layer's backward for grad of grad).


def moments_tangents(x, mean, t, red, keep=None, n=None):
    """Tangents of (mean, M2) over axes `red` (`mean` broadcastable against x):

        d mean = Σ_K t / n,   d M2 = 2·Σ_K Re(conj(x - mean)·t)      (as Σ_K (x - mean) = 0)

    over the entries K that `keep` (broadcastable against x) keeps, all if None;
    `n` is their count (feature-shaped or a number; by default the size of `red`).
    """
    dt = mean.dtype
    t = t.astype(dt)
    xc = x.astype(dt) - mean
    if keep is not None:
        t, xc = jnp.where(keep, t, 0), jnp.where(keep, xc, 0)
    if n is None:
        n = max(math.prod(x.shape[a] for a in red), 1)
    else:
        n = jnp.maximum(n, 1)
    return jnp.sum(t, red) / n, 2 * jnp.sum(real_dot(xc, t), red)


def dy_sums_tangents(x, dy, mean, s1, tx, tdy, tm, red):
    """Tangents of (S1, S2) = (Σdy, Σdy·(x - μ)) over axes `red` (`mean` broadcastable
    against x; `tm`, its tangent, and `s1` feature-shaped):

        dS1 = Σd(dy),   dS2 = Σd(dy)·(x - μ) + Σdy·dx - dμ·S1
    """
    f32 = jnp.float32
    tdy = tdy.astype(f32)
    ds1 = jnp.sum(tdy, red)
    ds2 = jnp.sum(tdy * (x.astype(f32) - mean), red) + jnp.sum(dy.astype(f32) * tx.astype(f32), red) - tm * s1
    return ds1, ds2
