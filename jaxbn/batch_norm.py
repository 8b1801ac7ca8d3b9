"""Pure-function batch normalization with exact cross-device statistics.

Everything here is a plain function of arrays: statistics (`moments`), the
normalization itself (`normalize`) and one training/evaluation step of a
BatchNorm layer with its running averages (`batch_norm`). State goes in and comes
out explicitly; nothing is mutated.

Numerical invariants of the statistics (stronger than Flax's ``_compute_stats``):

* Statistics and running state are computed in float32 (or float64 for float64
  inputs), whatever the input dtype; outputs come back in the input dtype.
* The variance is computed in two passes on each device (``Σ (x - m_local)²``) and
  merged across devices with Chan et al.'s parallel rule, so there is no
  ``E[x²] - E[x]²`` cancellation: data with mean 1e4 and std 1 give the variance
  to float32 precision.
* Across a named axis the per-device triples ``(n_i, m_i, M2_i)`` are merged
  weighted by their counts ``n_i`` (number of unmasked entries), so uneven shards,
  masks and empty shards are exact.
* One collective in the forward pass (an all-reduce of the per-device triples) and
  one in the backward pass (an all-reduce of ``[Σdy, Σdy·(x-μ)]``).
* Under sharded ``jit`` (no named axis) the statistics (masked or not) are declared with
  ``custom_partitioning`` (``jaxbn/partitioning.py``): the same per-device triples
  and the same single all-reduce, instead of XLA's own split of the two passes.

On XLA:CPU the per-device sums (Σx and Σ(x - m)² forward, Σdy and Σdy·(x - μ)
backward) come from one-sweep C++ kernels when the feature axes are contiguous
(NHWC or NCHW) and a mask, if any, leaves out whole rows or slabs
(``jaxbn/cpu_kernel.py``); elsewhere from XLA reductions.
Both compute the same sums in float32 or better.

References:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
  Reducing Internal Covariate Shift", ICML 2015.
  Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for computing
  sample variances", 1979.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from jaxbn import cpu_kernel, partitioning

__all__ = [
    "BatchNormState",
    "Moments",
    "init_params",
    "init_state",
    "moments",
    "normalize",
    "batch_norm",
    "running_moments",
]

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


def _as_shape(num_features: Union[int, Sequence[int]], name: str) -> tuple[int, ...]:
    shape = (num_features,) if isinstance(num_features, numbers.Integral) else tuple(num_features)
    if not shape or any(not isinstance(d, numbers.Integral) or d < 1 for d in shape):
        raise ValueError(f"{name} must be a positive int or a tuple of positive ints, got {num_features!r}")
    return tuple(int(d) for d in shape)


def init_params(num_features: Union[int, Sequence[int]], *, dtype: Any = jnp.float32) -> dict:
    """Returns ``{'scale': ones, 'bias': zeros}`` of shape ``(num_features,)``."""
    shape = _as_shape(num_features, "num_features")
    return {"scale": jnp.ones(shape, dtype), "bias": jnp.zeros(shape, dtype)}


def init_state(num_features: Union[int, Sequence[int]]) -> BatchNormState:
    """Returns running statistics ``mean=0``, ``var=1``, ``count=0`` (float32)."""
    shape = _as_shape(num_features, "num_features")
    return BatchNormState(
        mean=jnp.zeros(shape, jnp.float32),
        var=jnp.ones(shape, jnp.float32),
        count=jnp.zeros((), jnp.int32),
    )


# ----------------------------------------------------------------------------
# Argument checking: every error names the argument, the expected and actual value.


def _check_x(x: ArrayLike) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype} (shape {x.shape})")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    return x


def _feature_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    if not axes:
        raise ValueError(f"axis must name at least one feature axis, got {axis!r}")
    out = []
    for a in axes:
        if not isinstance(a, numbers.Integral) or not -ndim <= a < ndim:
            raise ValueError(
                f"axis={axis!r} is out of range for x with {ndim} dimensions: each feature axis "
                f"must be an int in [{-ndim}, {ndim - 1}]"
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis={axis!r} names the same axis twice")
    return tuple(sorted(out))


class _Layout(NamedTuple):
    """How per-feature vectors line up with x."""

    feature_axes: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    bshape: tuple[int, ...]  # feature vectors reshaped to broadcast against x.

    def b(self, v: jax.Array) -> jax.Array:
        return jnp.reshape(v, self.bshape)


def _layout(x: jax.Array, axis: Axis) -> _Layout:
    feat = _feature_axes(x.ndim, axis)
    red = tuple(a for a in range(x.ndim) if a not in feat)
    fshape = tuple(x.shape[a] for a in feat)
    bshape = tuple(x.shape[a] if a in feat else 1 for a in range(x.ndim))
    return _Layout(feat, red, fshape, bshape)


def _check_vector(name: str, v: Optional[ArrayLike], lay: _Layout, x_shape) -> Optional[jax.Array]:
    if v is None:
        return None
    v = jnp.asarray(v)
    if v.shape != lay.feature_shape:
        raise ValueError(
            f"{name} has shape {v.shape}, expected {lay.feature_shape}: the size of the feature "
            f"axes {lay.feature_axes} of x with shape {tuple(x_shape)}"
        )
    return v


def _check_params(params: Optional[dict], lay: _Layout, x_shape):
    if params is None:
        return None, None
    if not hasattr(params, "keys"):
        raise TypeError(f"params must be a dict with optional keys 'scale' and 'bias' or None, got {type(params).__name__}")
    unknown = set(params.keys()) - {"scale", "bias"}
    if unknown:
        raise ValueError(f"params has unexpected keys {sorted(unknown)}, expected a subset of ['bias', 'scale']")
    return (
        _check_vector("params['scale']", params.get("scale"), lay, x_shape),
        _check_vector("params['bias']", params.get("bias"), lay, x_shape),
    )


def _check_mask(mask: Optional[ArrayLike], x: jax.Array) -> Optional[jax.Array]:
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    try:
        ok = jnp.broadcast_shapes(mask.shape, x.shape) == x.shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"mask with shape {mask.shape} does not broadcast to x's shape {x.shape}")
    return mask


def _concrete(v) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _check_hyper(momentum, epsilon):
    if momentum is not None:
        m = _concrete(momentum)
        if m is not None and not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (or None for a cumulative average), got {momentum!r}")
    e = _concrete(epsilon)
    if e is not None and not e >= 0.0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")


def _axis_names(axis_name: AxisName) -> Optional[tuple]:
    if axis_name is None:
        return None
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    if not names:
        return None
    return names


def _groups(axis_index_groups) -> Optional[tuple]:
    if axis_index_groups is None:
        return None
    return tuple(tuple(int(i) for i in g) for g in axis_index_groups)


def _axis_size(names: tuple) -> int:
    """Total size of the named axes; a clear error when one is not bound."""
    size = 1
    for n in names:
        try:
            size *= jax.lax.axis_size(n)
        except NameError as e:
            raise ValueError(
                f"axis_name={n!r} is not bound here: call this inside pmap, shard_map or vmap "
                f"with that axis name, or pass axis_name=None for per-device statistics ({e})"
            ) from None
    return size


def _varying(a) -> frozenset:
    """The named axes that `a` varies over under shard_map's type checks (else empty)."""
    aval = jax.typeof(a)
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", frozenset()) if mat is not None else frozenset()
    return frozenset(vma)


def _vary_like(outs: tuple, *ins) -> tuple:
    """`outs` typed as varying over every axis that one of `ins` varies over.

    A custom call's results carry no varying axes under shard_map's type checks;
    left so, per-device statistics would pass for replicated ones.
    """
    v = frozenset().union(*(_varying(a) for a in ins))
    if not v:
        return outs
    axes = tuple(sorted(v))
    pcast = getattr(jax.lax, "pcast", None)
    cast = (lambda o: pcast(o, axes, to="varying")) if pcast else (lambda o: jax.lax.pvary(o, axes))
    return tuple(cast(o) if _varying(o) != v else o for o in outs)


# ----------------------------------------------------------------------------
# Statistics.


def _stat_dtype(dtype) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _private(*arrays):
    """The arrays behind an optimization barrier: the same buffers, no run-time cost.

    XLA:CPU computes a reduction together with its elementwise producers (the
    conversion to float32, x - mean, its square, dy·(x - mean)) in one pass over
    memory only when no other expression uses that producer; a shared producer is
    written to memory in full and read back. The forward's Σx and Σ(x - mean)², and
    the backward's Σdy and Σdy·(x - mean), spell the same ``x.astype(float32)``,
    ``x - mean`` and ``dy.astype(float32)``, which common-subexpression elimination
    merges into one materialized array. Reading x (and dy) through a barrier of its
    own gives each reduction operands XLA cannot identify with the others, so each
    reduction streams the input in its own dtype. Float32 training then moves 40
    bytes per element instead of 48, bfloat16 about 20 instead of 42 (counted in the
    compiled HLO by ``benchmarks/bn_layer.py``). The arithmetic is unchanged.

    Only where JAX's default backend is the CPU, where it was measured: elsewhere the
    plain program, so that e.g. XLA:GPU stays free to fuse sibling reductions that
    read the same input into one kernel. (``lax.platform_dependent`` would decide at
    lowering time, but its branches must agree on shard_map's varying axes, which a
    barrier over several operands does not preserve.)
    """
    if jax.default_backend() != "cpu":
        return arrays
    return jax.lax.optimization_barrier(arrays)


def _local_moments(x: jax.Array, mask: Optional[jax.Array], lay: _Layout, kernel: Optional[bool] = None,
                   sharded: Optional[bool] = None):
    """Per-device count, mean and M2 = Σ (x - mean)² in float32 (float64 for float64 x).

    `sharded`: whether the program may be split by XLA's SPMD partitioner (default:
    ``partitioning.active()``); the statistics then go through
    jaxbn/partitioning.py (one all-reduce, each device's rows computed here).
    """
    red, b = lay.reduce_axes, lay.b
    dt = _stat_dtype(x.dtype)
    if kernel is None:
        kernel = cpu_kernel.usable(x, lay.feature_axes)
    if sharded is None:
        sharded = partitioning.active()
    if mask is None:
        n = math.prod(x.shape[a] for a in red)
        if sharded and x.size:
            m, m2 = partitioning.moments(x, lay.feature_axes, kernel)
        elif kernel:  # one sweep over x instead of two (see jaxbn/cpu_kernel.py)
            m, m2 = _vary_like(cpu_kernel.moments(x, lay.feature_axes), x)
        else:
            (xa,) = _private(x)  # each reduction reads x through its own barrier (see _private)
            m = jnp.sum(xa.astype(dt), red) / max(n, 1)
            xb, mb = _private(x, m)
            m2 = jnp.sum(jnp.square(xb.astype(dt) - b(mb)), red)
        n = jnp.full(lay.feature_shape, n, dt)
    elif sharded and x.size:
        n, m, m2 = partitioning.masked_moments(x, mask, lay.feature_axes, kernel)
    else:
        # Reduced axes along which the mask is constant (e.g. H, W for a per-example
        # mask) are summed first, without the mask; the mask then selects among the
        # partial sums. XLA:CPU's reductions do not absorb a select, so masking x
        # itself would write a masked copy of x for each pass. Partial sums of
        # masked-out entries may be anything (even NaN): they are selected away.
        k = (1,) * (x.ndim - mask.ndim) + mask.shape
        inner = tuple(a for a in red if k[a] == 1)
        # The count from the mask's own entries, times the size of the axes it is
        # broadcast along: summing the mask broadcast to x's shape costs XLA:CPU more
        # than both passes over x (11–14 ms against 1 ms at 16×56×56×64 with a
        # per-example mask; benchmarks/layer_variants.py times it).
        n = jnp.sum(jnp.reshape(mask, k), tuple(a for a in red if k[a] != 1), dtype=dt, keepdims=True)
        n = n * math.prod(x.shape[a] for a in inner)
        n = jnp.broadcast_to(jnp.squeeze(n, red), lay.feature_shape)

        f0 = lay.feature_axes[0]
        if kernel and all(k[a] == 1 for a in range(f0, x.ndim)):
            # The mask leaves out whole rows (NHWC) or slabs (NCHW): one sweep over
            # the kept ones (see jaxbn/cpu_kernel.py), with a mask of x.shape[:f0].
            keep = jnp.broadcast_to(jnp.reshape(mask, k)[(...,) + (0,) * (x.ndim - f0)], x.shape[:f0])
            m, m2 = _vary_like(cpu_kernel.masked_moments(x, keep, lay.feature_axes), x, mask)
        else:

            def masked_sum(v, keep):
                if inner:
                    v = jnp.sum(v, inner, keepdims=True)
                return jnp.sum(jnp.where(keep, v, 0), red)

            xa, ka = _private(x, mask)
            m = masked_sum(xa.astype(dt), ka) / jnp.maximum(n, 1)
            xb, kb, mb = _private(x, mask, m)
            m2 = masked_sum(jnp.square(xb.astype(dt) - b(mb)), kb)
    return n, m, m2


def _merge_moments(n, m, m2, names: Optional[tuple], groups):
    """Merges per-device (n, mean, M2) over the named axes in one all-reduce.

    Each device writes its triple into its own row of a ``(devices, 3, *F)`` buffer
    of zeros and the buffer is summed across devices (an all-gather expressed as a
    psum, so the result is replicated: ``shard_map(..., out_specs=P())`` accepts it).
    Then, with ``N = Σ n_i``:

        mean = Σ n_i m_i / N,      M2 = Σ M2_i + Σ n_i (m_i - mean)²

    Rows of empty shards and of devices outside the group have n_i = 0 and add
    nothing. A single psum of ``[Σx, Σx²]`` would be cheaper but cancels
    catastrophically; a psum of shifted sums needs the shift first (a second
    collective). This is exact and costs one collective of ``3·devices·C`` floats.
    """
    if names is None:
        return n, m, m2
    size = _axis_size(names)
    idx = jax.lax.axis_index(names)
    rows = jnp.stack([n, m, m2])
    onehot = (jnp.arange(size) == idx).reshape((size,) + (1,) * rows.ndim)
    buf = jnp.where(onehot, rows[None], jnp.zeros((), rows.dtype))
    buf = jax.lax.psum(buf, names, axis_index_groups=groups)
    ns, ms, m2s = buf[:, 0], buf[:, 1], buf[:, 2]
    n = jnp.sum(ns, 0)
    mean = jnp.sum(ns * ms, 0) / jnp.maximum(n, 1)
    m2 = jnp.sum(m2s, 0) + jnp.sum(ns * jnp.square(ms - mean), 0)
    return n, mean, m2


def _global_moments(x, mask, lay, names, groups, kernel=None) -> Moments:
    n, m, m2 = _merge_moments(*_local_moments(x, mask, lay, kernel), names, groups)
    return Moments(mean=m, var=m2 / jnp.maximum(n, 1), count=n)


def moments(
    x: ArrayLike,
    *,
    axis: Axis = -1,
    axis_name: AxisName = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    mask: Optional[ArrayLike] = None,
) -> Moments:
    """Mean, biased variance and count of `x` over all but the feature axes.

    With ``R`` the reduced axes, ``M`` the mask (all true if None) and the sums
    also taken over every device of `axis_name`:

        count = Σ_R M,   mean = Σ_R M·x / count,   var = Σ_R M·(x - mean)² / count

    Computed in float32 (float64 for float64 x), two-pass per device and merged
    exactly across devices in one collective. Features with ``count == 0`` get
    mean 0 and var 0 (never NaN).

    Args:
      x: floating array, e.g. ``(N, H, W, C)``.
      axis: the feature axis or axes (Flax's convention); every other axis is reduced.
      axis_name: a named axis (or tuple of them) of pmap/shard_map/vmap to reduce over.
      axis_index_groups: device groups of pmap's `axis_name` (statistics per group).
      mask: boolean array broadcastable to x; False entries are left out.

    Returns:
      ``Moments(mean, var, count)``, each of shape ``(x.shape[a] for a in axis)``.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> jaxbn.moments(jnp.array([[1.0], [3.0]])).var
      Array([1.], dtype=float32)
    """
    x = _check_x(x)
    lay = _layout(x, axis)
    mask = _check_mask(mask, x)
    return _global_moments(x, mask, lay, _axis_names(axis_name), _groups(axis_index_groups))


def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    scale: Optional[ArrayLike] = None,
    bias: Optional[ArrayLike] = None,
    *,
    axis: Axis = -1,
    epsilon: float = 1e-5,
) -> jax.Array:
    """``y = (x - mean) / sqrt(var + epsilon) * scale + bias``, per feature.

    Computed in float32 (float64 for float64 x) and returned in x's dtype. `mean`,
    `var`, `scale` and `bias` have the feature shape.
    """
    x = _check_x(x)
    lay = _layout(x, axis)
    _check_hyper(None, epsilon)
    mean = _check_vector("mean", mean, lay, x.shape)
    var = _check_vector("var", var, lay, x.shape)
    scale = _check_vector("scale", scale, lay, x.shape)
    bias = _check_vector("bias", bias, lay, x.shape)
    return _normalize(x, mean, var, scale, bias, lay, epsilon)


def _affine(mean, var, scale, bias, epsilon, dtype):
    """Per-feature (mean, multiplier a = scale/sqrt(var+eps), bias), in `dtype`."""
    inv = jax.lax.rsqrt(var.astype(dtype) + epsilon)
    a = inv if scale is None else inv * scale.astype(dtype)
    b = jnp.zeros((), dtype) if bias is None else bias.astype(dtype)
    return mean.astype(dtype), a, b


def _normalize(x, mean, var, scale, bias, lay, epsilon, out_dtype=None):
    dt = _stat_dtype(x.dtype)
    mean, a, b = _affine(mean, var, scale, bias, epsilon, dt)
    # (x - mean) * a + b, not x * a + (b - mean * a): the subtraction is exact when
    # x is near mean, which keeps float32 precision at large means.
    y = (x.astype(dt) - lay.b(mean)) * lay.b(a) + (b if jnp.ndim(b) == 0 else lay.b(b))
    return y.astype(x.dtype if out_dtype is None else out_dtype)


# ----------------------------------------------------------------------------
# Training-mode normalization with a one-collective custom backward.


class _Config(NamedTuple):
    lay: _Layout
    names: Optional[tuple]
    groups: Optional[tuple]
    epsilon: float
    dtype: Any  # output dtype
    kernel: bool  # one-sweep CPU reductions (jaxbn/cpu_kernel.py), decided once for fwd and bwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train_normalize(cfg: _Config, x, scale, bias, mask):
    return _train_fwd(cfg, x, scale, bias, mask)[0]


def _train_fwd(cfg: _Config, x, scale, bias, mask):
    stats = _global_moments(x, mask, cfg.lay, cfg.names, cfg.groups, cfg.kernel)
    y = _normalize(x, stats.mean, stats.var, scale, bias, cfg.lay, cfg.epsilon, cfg.dtype)
    out = (y, jax.lax.stop_gradient(stats))
    return out, (x, scale, bias, mask, stats.mean, stats.var, stats.count)


def _train_bwd(cfg: _Config, res, cts):
    """Gradient of y = (x - μ)·a + b, a = γ/σ, with μ, σ² the global masked moments.

    With S1 = Σ dy and S2 = Σ dy·(x - μ) over every entry of every device (masked
    entries too: their outputs use μ and σ as well) and N the valid count:

        dx = a·dy - M·(a·S1/N + (x - μ)·a·S2/(σ²N)),  dγ = S2/σ,  dβ = S1

    One all-reduce of [S1, S2]. Parameter cotangents follow JAX's autodiff
    convention for the context: global sums when shard_map checks varying types
    and the parameter is replicated (what the implicit pvary's transpose would
    give), the device's own sums otherwise (pmap, vmap, check_vma=False), where the
    caller reduces parameter gradients itself. The statistics outputs carry no
    gradient (they feed the running averages).
    """
    x, scale, bias, mask, mean, var, count = res
    dy = cts[0]
    lay = cfg.lay
    dt = mean.dtype
    x32, dy32 = x.astype(dt), dy.astype(dt)
    xc = x32 - lay.b(mean)
    red = lay.reduce_axes
    if cfg.kernel and dy.dtype == x.dtype and partitioning.active():  # sharded jit (see jaxbn/partitioning.py)
        s = jnp.stack(partitioning.dy_sums(x, dy, mean, lay.feature_axes))
    elif cfg.kernel and dy.dtype == x.dtype:  # one sweep over x and dy (see jaxbn/cpu_kernel.py)
        s = jnp.stack(_vary_like(cpu_kernel.dy_sums(x, dy, mean, lay.feature_axes), x, dy, mean))
    else:
        # Each reduction reads x and dy through its own barrier (see _private).
        (dya,) = _private(dy)
        xp, dyp, mp = _private(x, dy, mean)
        s = jnp.stack([jnp.sum(dya.astype(dt), red), jnp.sum(dyp.astype(dt) * (xp.astype(dt) - lay.b(mp)), red)])
    s_global = s if cfg.names is None else jax.lax.psum(s, cfg.names, axis_index_groups=cfg.groups)
    s1, s2 = s_global[0], s_global[1]
    inv = jax.lax.rsqrt(var + cfg.epsilon)
    a = inv if scale is None else inv * scale.astype(dt)
    r = 1.0 / jnp.maximum(count, 1)
    c1, c2 = a * s1 * r, a * inv * inv * s2 * r
    corr = lay.b(c1) + xc * lay.b(c2)
    if mask is not None:
        corr = jnp.where(mask, corr, 0)
    dx = (dy32 * lay.b(a) - corr).astype(x.dtype)

    # Under shard_map's type checks a parameter's cotangent must vary over exactly
    # the axes the parameter varies over; autodiff of the same math would sum the
    # per-device contributions over the others (the transpose of the implicit
    # pvary). The sums over `names` are already global; any other axis x varies
    # over but the parameter does not (e.g. axis_name=None inside shard_map) is
    # summed here. Outside such checks (pmap, vmap, check_vma=False) the varying
    # sets are empty and the device's own sums are returned.
    vx = _varying(x)
    synced = cfg.names is not None and set(cfg.names) <= vx

    def param_ct(p, local, glob):
        if p is None:
            return None
        vp = _varying(p)
        g, have = (glob, vx - set(cfg.names)) if synced and not set(cfg.names) <= vp else (local, vx)
        extra = tuple(sorted(have - vp))
        if extra:
            g = jax.lax.psum(g, extra)
        return g.astype(p.dtype)

    dscale = param_ct(scale, s[1] * inv, s2 * inv)
    dbias = param_ct(bias, s[0], s1)
    return dx, dscale, dbias, None


_train_normalize.defvjp(_train_fwd, _train_bwd)


# ----------------------------------------------------------------------------
# Running averages and the layer.


def running_moments(
    state: BatchNormState,
    batch: Moments,
    *,
    momentum: Optional[float] = 0.99,
    unbiased_running_var: bool = False,
) -> BatchNormState:
    """Folds batch statistics into running averages.

        new = momentum · old + (1 - momentum) · batch          (momentum given)
        new = old + (batch - old) / (count + 1)                 (momentum=None)

    The variance folded in is the biased batch variance, or ``var · N/(N-1)`` with
    `unbiased_running_var` (PyTorch's convention, N the global count). A feature
    keeps its old value when its batch has no valid entry (fewer than 2 with
    `unbiased_running_var`) or non-finite statistics: no NaN is ever written. The
    update count increases when any feature was updated.
    """
    n = batch.count
    bvar = batch.var
    enough = n > 0
    if unbiased_running_var:
        bvar = bvar * n / jnp.maximum(n - 1, 1)
        enough = n > 1
    ok = enough & jnp.isfinite(batch.mean) & jnp.isfinite(bvar)
    if momentum is None:
        w = 1.0 / (state.count.astype(jnp.float32) + 1.0)
    else:
        w = 1.0 - jnp.asarray(momentum, jnp.float32)
    sd = state.mean.dtype

    def ema(old, new):
        upd = (1.0 - w) * old.astype(jnp.float32) + w * new.astype(jnp.float32)
        return jnp.where(ok, upd, old.astype(jnp.float32)).astype(old.dtype)

    return BatchNormState(
        mean=ema(state.mean, batch.mean).astype(sd),
        var=ema(state.var, bvar),
        count=state.count + jnp.any(ok).astype(state.count.dtype),
    )


def batch_norm(
    x: ArrayLike,
    params: Optional[dict],
    state: BatchNormState,
    *,
    training: bool,
    axis: Axis = -1,
    momentum: Optional[float] = 0.99,
    epsilon: float = 1e-5,
    axis_name: AxisName = None,
    axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
    mask: Optional[ArrayLike] = None,
    update_stats: Optional[bool] = None,
    unbiased_running_var: bool = False,
    dtype: Any = None,
) -> tuple[jax.Array, BatchNormState]:
    """One BatchNorm layer: normalize `x` and advance the running statistics.

    Training (``training=True``), with μ_B, σ²_B the `moments` of the global batch
    (every device of `axis_name`, unmasked entries only):

        y = (x - μ_B) / sqrt(σ²_B + ε) · scale + bias
        mean ← momentum · mean + (1 - momentum) · μ_B
        var  ← momentum · var  + (1 - momentum) · σ²_B   (· N/(N-1) if unbiased_running_var)

    Evaluation (``training=False``): ``y = (x - mean) / sqrt(var + ε) · scale + bias``
    with the running statistics, and the state comes back unchanged.

    Conventions: `momentum` is Flax's, Haiku's and Keras's (weight of the old
    value). PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here
    (``momentum = 1 - momentum_pt``); PyTorch's ``momentum=None`` (cumulative
    average) is ``momentum=None``; PyTorch stores the unbiased running variance:
    use ``unbiased_running_var=True`` to match it. Keras's default epsilon is 1e-3
    (here 1e-5, as Flax and PyTorch).

    Args:
      x: floating array (bf16/fp16 are normalized with float32 statistics).
      params: ``{'scale': (*F,), 'bias': (*F,)}``, either key optional, or None.
      state: `BatchNormState` of shape ``(*F,)`` with F the feature axes' sizes.
      training: use batch statistics (True) or the running ones (False).
      axis: feature axis or axes; every other axis is reduced.
      momentum: in [0, 1], or None for a cumulative average.
      epsilon: added to the variance, >= 0.
      axis_name: named axis (or tuple) of pmap/shard_map/vmap to synchronize over.
      axis_index_groups: pmap device groups that keep separate statistics.
      mask: boolean, broadcastable to x; masked entries are normalized but do not
        count towards the statistics.
      update_stats: whether to update the running statistics; defaults to
        `training`. ``training=True, update_stats=False`` normalizes with batch
        statistics and leaves the state alone; ``training=False, update_stats=True``
        normalizes with the running statistics while folding the batch in.
      unbiased_running_var: store the running variance with Bessel's correction
        over the global count (PyTorch's convention).
      dtype: dtype of y (default: x's dtype). The arithmetic is float32 either way.

    Returns:
      ``(y, new_state)``: y in x's shape and `dtype`; `new_state` like `state`
      (replicated across `axis_name`). The state carries no gradient.

    Raises:
      TypeError: x not floating point, mask not boolean.
      ValueError: axis out of range, params/state/mask shapes, momentum outside
        [0, 1], negative epsilon, `axis_name` not bound.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> x = jax.random.normal(jax.random.key(0), (8, 4))
      >>> params, state = jaxbn.init_params(4), jaxbn.init_state(4)
      >>> y, state = jaxbn.batch_norm(x, params, state, training=True)
      >>> int(state.count)
      1
    """
    x = _check_x(x)
    lay = _layout(x, axis)
    _check_hyper(momentum, epsilon)
    scale, bias = _check_params(params, lay, x.shape)
    if not isinstance(state, BatchNormState):
        raise TypeError(f"state must be a jaxbn.BatchNormState (see jaxbn.init_state), got {type(state).__name__}")
    _check_vector("state.mean", state.mean, lay, x.shape)
    _check_vector("state.var", state.var, lay, x.shape)
    mask = _check_mask(mask, x)
    names, groups = _axis_names(axis_name), _groups(axis_index_groups)
    if update_stats is None:
        update_stats = training
    out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)

    batch = None
    if training:
        eps = _concrete(epsilon)
        if eps is None:
            raise TypeError(f"epsilon must be a concrete number in training mode, got {epsilon!r}")
        cfg = _Config(lay, names, groups, eps, out_dtype, cpu_kernel.usable(x, lay.feature_axes))
        y, batch = _train_normalize(cfg, x, scale, bias, mask)
    else:
        y = _normalize(x, state.mean, state.var, scale, bias, lay, epsilon, out_dtype)
        if update_stats:
            batch = jax.lax.stop_gradient(_global_moments(x, mask, lay, names, groups))
    if update_stats:
        state = running_moments(
            state, batch, momentum=momentum, unbiased_running_var=unbiased_running_var
        )
    return y, state
