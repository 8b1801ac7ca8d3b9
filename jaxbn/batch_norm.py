"""Pure-function batch normalization with exact cross-device statistics.

Everything here is a plain function of arrays: statistics (`moments`), the
normalization itself (`normalize`), the running-average rule (`running_moments`)
and one training/evaluation step of a BatchNorm layer (`batch_norm`). State goes
in and comes out explicitly; nothing is mutated. The file reads as the math:
statistics, normalization, the training layer's custom derivative, the running
averages, the layer.

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

Where the per-device sums come from is the statistics backends' business
(``jaxbn/backends``): the XLA formulation, one-sweep CPU kernels, or, under sharded
``jit``, either of them wrapped in a declared partitioning with the same single
all-reduce. `select` picks one per call; the math below never asks which.

References:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
  Reducing Internal Covariate Shift", ICML 2015.
  Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for computing
  sample variances", 1979.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.interpreters import ad

from jaxbn import _checks as checks
from jaxbn._linear_op import linear_op
from jaxbn._stats import affine, group_sum, merge_over_axes, merge_rows, stat_dtype
from jaxbn._types import ArrayLike, Axis, AxisName, BatchNormState, Moments
from jaxbn.backends import Reductions, select
from jaxbn.backends.context import param_cotangent, vmap_axes

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


def init_params(num_features: Union[int, Sequence[int]], *, dtype: Any = jnp.float32) -> dict:
    """Returns ``{'scale': ones, 'bias': zeros}`` of shape ``(num_features,)``."""
    shape = checks.as_shape(num_features)
    return {"scale": jnp.ones(shape, dtype), "bias": jnp.zeros(shape, dtype)}


def init_state(num_features: Union[int, Sequence[int]]) -> BatchNormState:
    """Returns running statistics ``mean=0``, ``var=1``, ``count=0`` (float32)."""
    shape = checks.as_shape(num_features)
    return BatchNormState(
        mean=jnp.zeros(shape, jnp.float32),
        var=jnp.ones(shape, jnp.float32),
        count=jnp.zeros((), jnp.int32),
    )


# ----------------------------------------------------------------------------
# Statistics.


def _global_moments(x, mask, lay: checks.Layout, names, groups, reductions: Reductions) -> Moments:
    """Each device's (n, mean, M2) from the backend, merged over the named axes in one all-reduce."""
    n, m, m2 = merge_over_axes(*reductions.moments(x, mask, lay), names, groups, vmap_axes(names))
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
    x = checks.check_x(x)
    lay = checks.layout(x, axis)
    mask = checks.check_mask(mask, x)
    names, groups = checks.axis_names(axis_name), checks.groups(axis_index_groups)
    return _global_moments(x, mask, lay, names, groups, select(x, lay))


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
    x = checks.check_x(x)
    lay = checks.layout(x, axis)
    checks.check_epsilon(epsilon)
    mean = checks.check_vector("mean", mean, lay, x.shape)
    var = checks.check_vector("var", var, lay, x.shape)
    scale = checks.check_vector("scale", scale, lay, x.shape)
    bias = checks.check_vector("bias", bias, lay, x.shape)
    return _normalize(x, mean, var, scale, bias, lay, epsilon)




def _normalize(x, mean, var, scale, bias, lay, epsilon, out_dtype=None):
    dt = stat_dtype(x.dtype)
    mean, a, b = affine(mean, var, scale, bias, epsilon, dt)
    # (x - mean) * a + b, not x * a + (b - mean * a): the subtraction is exact when
    # x is near mean, which keeps float32 precision at large means.
    y = (x.astype(dt) - lay.b(mean)) * lay.b(a) + (b if jnp.ndim(b) == 0 else lay.b(b))
    return y.astype(x.dtype if out_dtype is None else out_dtype)


# ----------------------------------------------------------------------------
# Training-mode normalization: forward and reverse mode, one collective each way.


class _Config(NamedTuple):
    lay: checks.Layout
    names: Optional[tuple]  # the axes the normalizing statistics (and the gradient's sums) span
    groups: Optional[tuple]  # device groups of `names` that keep separate statistics
    dtype: Any  # output dtype
    reductions: Reductions  # chosen once (jaxbn.backends.select), for forward and backward
    virtual: Optional[str] = None  # virtual batches: "local" (groups within a device) or "span"
    whole_names: Optional[tuple] = None  # "local": the axes the running statistics span


def _as_moments(n, m, m2) -> Moments:
    return Moments(mean=m, var=m2 / jnp.maximum(n, 1), count=n)


def _batch_moments(cfg: _Config, x, mask) -> tuple[Moments, Moments]:
    """(the statistics x is normalized with, those the running averages take) in one all-reduce.

    They differ with virtual batches only: each group of examples is normalized with its
    own statistics, the running averages take the whole global batch's (Chan's merge of
    the groups, not an average of their variances).
    """
    n, m, m2 = cfg.reductions.moments(x, mask, cfg.lay)
    if cfg.virtual == "local":  # the groups are axis 0 of the statistics, on each device
        whole = merge_over_axes(*merge_rows(n, m, m2), cfg.whole_names, None, vmap_axes(cfg.whole_names))
        return _as_moments(n, m, m2), _as_moments(*whole)
    group, everyone = merge_over_axes(n, m, m2, cfg.names, cfg.groups, vmap_axes(cfg.names), whole=True)
    return _as_moments(*group), _as_moments(*(everyone if cfg.virtual == "span" else group))


class Renorm(NamedTuple):
    """Batch Renormalization's inputs to the training layer (no derivative flows into them)."""

    mean: jax.Array  # (*F,) the running mean μ
    var: jax.Array  # (*F,) the running variance (σ² = var + ε)
    r_max: jax.Array  # () >= 1
    d_max: jax.Array  # () >= 0


def _renormalized(stats: Moments, scale, bias, renorm: Optional[Renorm], epsilon):
    """The affine parameters that turn batch normalization into Batch Renormalization:

        y = ((x - μ_B)/σ_B · r + d)·γ + β = (x - μ_B)/σ_B · (γ·r) + (β + γ·d)
        r = clip(σ_B/σ, 1/r_max, r_max),   d = clip((μ_B - μ)/σ, -d_max, d_max)

    with r and d constants (no gradient), σ_B² = var_B + ε, σ² = var + ε. Returns
    ``(scale, bias, r, d)`` (the same scale and bias, r = d = None, without renorm).
    """
    if renorm is None:
        return scale, bias, None, None
    dt = stats.mean.dtype
    sigma = jnp.sqrt(renorm.var.astype(dt) + epsilon)
    r_max, d_max = jnp.asarray(renorm.r_max, dt), jnp.asarray(renorm.d_max, dt)
    r = jnp.clip(jnp.sqrt(stats.var + epsilon) / sigma, 1 / r_max, r_max)
    d = jnp.clip((stats.mean - renorm.mean.astype(dt)) / sigma, -d_max, d_max)
    r, d = jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)
    scale_r = r if scale is None else scale * r
    bias_d = d if scale is None else scale * d
    return scale_r, bias_d if bias is None else bias + bias_d, r, d


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train_normalize(cfg: _Config, x, scale, bias, mask, renorm, epsilon):
    """``(y, stats)``: x normalized with its global batch moments, which carry no derivative
    (renormalized, see `_renormalized`, when `renorm` is given)."""
    stats, running = _batch_moments(cfg, x, mask)
    scale, bias, _, _ = _renormalized(stats, scale, bias, renorm, epsilon)
    y = _normalize(x, stats.mean, stats.var, scale, bias, cfg.lay, epsilon, cfg.dtype)
    return y, jax.lax.stop_gradient(running)


@_train_normalize.defjvp
def _train_jvp(cfg: _Config, primals, tangents):
    """The derivative of y = (x - μ)·a + b, a = γ/σ, σ² = var + ε, with μ, var the global
    masked moments (M the mask, N the valid count):

        ẏ = a·ẋ + γ̇·(x - μ)/σ + β̇ - a·(T1 + (x - μ)·T2/σ²)/N,
        T1 = Σ M·ẋ,   T2 = Σ M·ẋ·(x - μ)       (sums over every entry of every device)

    — one all-reduce of [T1, T2] (`_tangent`). Reverse mode transposes this map with
    the hand-written `_tangent_transpose`: one all-reduce of [Σg, Σg·(x - μ)], each
    device's sums from the statistics backend. Batch Renormalization is the same map
    with γ·r for γ and β + γ·d for β (r, d constants).
    """
    x, scale, bias, mask, renorm, epsilon = primals
    tx, ts, tb, _, _, _ = tangents
    if jnp.iscomplexobj(x):
        # |x - μ|² is only real-linear in x: JAX's own derivative of the formula.
        plain = lambda x, scale, bias: _train_normalize.fun(cfg, x, scale, bias, mask, renorm, epsilon)  # noqa: E731
        return jax.jvp(plain, (x, scale, bias), (tx, ts, tb))
    # The statistics as residuals keep their dependence on x (for derivatives of higher order).
    stats, running = _batch_moments(cfg, x, mask)
    scale_r, bias_d, r, d = _renormalized(stats, scale, bias, renorm, epsilon)
    if renorm is not None:  # tangents of γ·r and β + γ·d
        ts, tb = (None, tb) if scale is None else (ts * r, ts * d if tb is None else tb + ts * d)
        tb = jnp.zeros_like(bias_d) if tb is None else tb
    y = _normalize(x, stats.mean, stats.var, scale_r, bias_d, cfg.lay, epsilon, cfg.dtype)
    present = (scale_r is not None, bias_d is not None, mask is not None)
    linear = [tx] + [t for t, p in zip((ts, tb), present) if p]
    residual = [x, stats.mean, stats.var, stats.count, epsilon] + [v for v, p in zip((scale_r, mask), present[::2]) if p]
    y_dot = _TANGENT.bind(*linear, *residual, cfg=cfg, present=present)
    return (y, jax.lax.stop_gradient(running)), (y_dot, jax.tree.map(jnp.zeros_like, running))


def _unpack(args, present):
    """(tx, ts, tb, x, mean, var, count, epsilon, scale, mask) from the primitive's operands (None where absent)."""
    has_scale, has_bias, has_mask = present
    args = list(args)
    tx = args.pop(0)
    ts = args.pop(0) if has_scale else None
    tb = args.pop(0) if has_bias else None
    x, mean, var, count, epsilon = args[:5]
    rest = args[5:]
    scale = rest.pop(0) if has_scale else None
    mask = rest.pop(0) if has_mask else None
    return tx, ts, tb, x, mean, var, count, epsilon, scale, mask


def _tangent(*args, cfg: _Config, present):
    """ẏ of `_train_jvp`'s docstring, linear in (ẋ, γ̇, β̇)."""
    tx, ts, tb, x, mean, var, count, epsilon, scale, mask = _unpack(args, present)
    lay, dt = cfg.lay, mean.dtype
    xc = x.astype(dt) - lay.b(mean)
    t = tx.astype(dt)
    tm = t if mask is None else jnp.where(mask, t, 0)
    sums = jnp.stack([jnp.sum(tm, lay.reduce_axes), jnp.sum(tm * xc, lay.reduce_axes)])
    sums = group_sum(sums, cfg.names, cfg.groups)
    inv = jax.lax.rsqrt(var + epsilon)
    a = inv if scale is None else inv * scale.astype(dt)
    r = 1.0 / jnp.maximum(count, 1)
    y_dot = t * lay.b(a) - lay.b(a * sums[0] * r) - xc * lay.b(a * inv * inv * sums[1] * r)
    if ts is not None:
        y_dot = y_dot + xc * lay.b(ts.astype(dt) * inv)
    if tb is not None:
        y_dot = y_dot + lay.b(tb.astype(dt))
    return y_dot.astype(cfg.dtype)


def _tangent_transpose(g, *args, cfg: _Config, present):
    """The transpose of `_tangent`: the layer's gradient for the output cotangent g.

    With S1 = Σ g and S2 = Σ g·(x - μ) over every entry of every device (masked
    entries too: their outputs use μ and σ as well):

        ∂x = a·g - M·(a·S1/N + (x - μ)·a·S2/(σ²N)),   ∂γ = S2/σ,   ∂β = S1

    One all-reduce of [S1, S2]. Parameter cotangents follow JAX's autodiff
    convention for the context (`jaxbn.backends.context.param_cotangent`).
    """
    _, _, _, x, mean, var, count, epsilon, scale, mask = _unpack(args, present)
    lay, dt = cfg.lay, mean.dtype
    s = jnp.stack(cfg.reductions.dy_sums(x, g, mean, lay))
    inv = jax.lax.rsqrt(var + epsilon)
    if cfg.groups is None:
        s_global = group_sum(s, cfg.names, None)
        s1, s2 = s_global[0], s_global[1]
        dbias_all, dscale_all = s1, s2 * inv
    else:  # each group has its own σ: a shared parameter takes Σ over devices of S2·(1/σ)
        s_group, s_all = group_sum(jnp.concatenate([s, s[1:] * inv]), cfg.names, cfg.groups, whole=True)
        s1, s2 = s_group[0], s_group[1]
        dbias_all, dscale_all = s_all[0], s_all[2]
    a = inv if scale is None else inv * scale.astype(dt)
    r = 1.0 / jnp.maximum(count, 1)
    c1, c2 = a * s1 * r, a * inv * inv * s2 * r
    corr = lay.b(c1) + (x.astype(dt) - lay.b(mean)) * lay.b(c2)
    if mask is not None:
        corr = jnp.where(mask, corr, 0)
    dx = (g.astype(dt) * lay.b(a) - corr).astype(x.dtype)
    tx, ts, tb = args[0], args[1] if present[0] else None, args[1 + present[0]] if present[1] else None
    out = [dx if ad.is_undefined_primal(tx) else None]
    if present[0]:
        out.append(param_cotangent(ts.aval, s[1] * inv, dscale_all, x, cfg.names)
                   if ad.is_undefined_primal(ts) else None)
    if present[1]:
        out.append(param_cotangent(tb.aval, s[0], dbias_all, x, cfg.names) if ad.is_undefined_primal(tb) else None)
    return out


_TANGENT = linear_op(
    "jaxbn_batch_norm_tangent", _tangent, _tangent_transpose,
    out_aval=lambda *avals, cfg, present: (avals[0].shape, jnp.dtype(cfg.dtype)),
)


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

    def ema(old, new):
        # In float32 (complex64 for a complex mean), stored in the state's dtype (made
        # complex for a complex mean, as Flax's variables become).
        dt = jnp.complex64 if jnp.iscomplexobj(new) else jnp.float32
        out = jnp.promote_types(old.dtype, new.dtype) if jnp.iscomplexobj(new) else old.dtype
        upd = (1.0 - w) * old.astype(dt) + w * new.astype(dt)
        return jnp.where(ok, upd, old.astype(dt)).astype(out)

    return BatchNormState(
        mean=ema(state.mean, batch.mean),
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
    virtual_batch_size: Optional[int] = None,
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
      virtual_batch_size: in training, normalize each group of this many consecutive
        examples of the global batch (axis 0; under `axis_name`, the devices' shards
        in axis-index order) with its own statistics; the running averages take the
        whole batch's. It must divide the global batch and either divide each
        device's batch or be a multiple of it.

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
    return _layer(x, params, state, training=training, axis=axis, momentum=momentum, epsilon=epsilon,
                  axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask, update_stats=update_stats,
                  unbiased_running_var=unbiased_running_var, dtype=dtype, virtual_batch_size=virtual_batch_size)


def _virtual_batches(x, scale, bias, mask, renorm, lay, names, groups, eps, out_dtype, size):
    """Training with virtual batches of `size` examples: ``(y, whole-batch moments)``.

    The global batch along axis 0 (under `names`, the devices' shards concatenated in
    axis-index order) is split into consecutive groups of `size` examples, each
    normalized with its own statistics. Groups inside a device's shard are its
    statistics' leading axis (x viewed as ``(groups, size, ...)``: no collective for
    them); a group spanning k devices is k consecutive devices' merge (device groups,
    the same single all-reduce). The running averages take the whole batch's moments.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TypeError(f"virtual_batch_size must be a positive int or None, got {size!r} ({type(size).__name__})")
    if 0 in lay.feature_axes:
        raise ValueError(f"virtual_batch_size needs axis 0 to be the batch axis, but axis={lay.feature_axes} "
                         "includes axis 0")
    if groups is not None:
        raise ValueError("virtual_batch_size and axis_index_groups cannot be combined: pass one of them")
    local = x.shape[0]
    devices = checks.axis_size(names) if names else 1
    total = devices * local
    if total % size:
        raise ValueError(f"virtual_batch_size={size} must divide the global batch of {total} examples "
                         f"({devices} device(s) x {local})")
    if size > local and size % local == 0:  # each group spans k consecutive devices
        k = size // local
        spans = tuple(tuple(range(i * k, (i + 1) * k)) for i in range(devices // k))
        cfg = _Config(lay, names, spans, out_dtype, select(x, lay), virtual="span")
        return _train_normalize(cfg, x, scale, bias, mask, renorm, eps)
    if local % size:
        raise ValueError(f"virtual_batch_size={size} does not line up with the {local} examples each device "
                         f"holds: it must divide them or be a multiple of them")
    g = local // size
    xg = jnp.reshape(x, (g, size) + x.shape[1:])
    lay_g = checks.layout(xg, (0,) + tuple(a + 1 for a in lay.feature_axes))
    if mask is not None:
        m = jnp.reshape(mask, (1,) * (x.ndim - mask.ndim) + mask.shape)
        mask = m[None] if m.shape[0] == 1 else jnp.reshape(m, (g, size) + m.shape[1:])
    per_group = lambda v: None if v is None else jnp.broadcast_to(v, lay_g.feature_shape)  # noqa: E731
    if renorm is not None:
        renorm = renorm._replace(mean=per_group(renorm.mean), var=per_group(renorm.var))
    cfg = _Config(lay_g, None, None, out_dtype, select(xg, lay_g), virtual="local", whole_names=names)
    y, whole = _train_normalize(cfg, xg, per_group(scale), per_group(bias), mask, renorm, eps)
    return jnp.reshape(y, x.shape), whole


def _layer(x, params, state, *, training, axis, momentum, epsilon, axis_name, axis_index_groups, mask,
           update_stats, unbiased_running_var, dtype, renorm_limits=None, virtual_batch_size=None):
    """`batch_norm`, and Batch Renormalization when `renorm_limits` = (r_max, d_max) is given."""
    x = checks.check_x(x)
    lay = checks.layout(x, axis)
    training = checks.check_bool("training", training)
    update_stats = checks.check_bool("update_stats", update_stats, allow_none=True)
    checks.check_momentum(momentum)
    checks.check_epsilon(epsilon)
    scale, bias = checks.check_params(params, lay, x.shape)
    if not isinstance(state, BatchNormState):
        raise TypeError(f"state must be a jaxbn.BatchNormState (see jaxbn.init_state), got {type(state).__name__}")
    checks.check_vector("state.mean", state.mean, lay, x.shape)
    checks.check_vector("state.var", state.var, lay, x.shape)
    mask = checks.check_mask(mask, x)
    names, groups = checks.axis_names(axis_name), checks.groups(axis_index_groups)
    if update_stats is None:
        update_stats = training
    out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)

    batch = None
    if training:
        eps = jnp.asarray(epsilon, jnp.float32)  # an operand: it may be traced
        renorm = None if renorm_limits is None else Renorm(state.mean, state.var, *renorm_limits)
        if virtual_batch_size is None:
            cfg = _Config(lay, names, groups, out_dtype, select(x, lay))
            y, batch = _train_normalize(cfg, x, scale, bias, mask, renorm, eps)
        else:
            y, batch = _virtual_batches(x, scale, bias, mask, renorm, lay, names, groups, eps, out_dtype,
                                        virtual_batch_size)
    else:
        y = _normalize(x, state.mean, state.var, scale, bias, lay, epsilon, out_dtype)
        if update_stats:
            batch = jax.lax.stop_gradient(_global_moments(x, mask, lay, names, groups, select(x, lay)))
    if update_stats:
        state = running_moments(
            state, batch, momentum=momentum, unbiased_running_var=unbiased_running_var
        )
    return y, state
