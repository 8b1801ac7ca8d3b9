"""Inference-time tools for Flax Linen models: BN folding and exact recalibration.

* `fold_batch_norms`: works on any Linen model. It traces the model once to find
  which BatchNorm reads exactly, and only, the output of a Conv or Dense, folds
  each such BatchNorm into that layer's kernel and bias, and turns every other
  BatchNorm (e.g. one after a ReLU, as in the article's CNN) into a per-channel
  affine map ``a·x + b`` (no statistics, one fused multiply-add); the report says
  which is which. It returns a `FoldedModel`: the original module run with its
  BatchNorms intercepted and replaced by those affine maps.
* `recalibrate_batch_stats`: recomputes every BatchNorm's running statistics as
  the exact population statistics of the data seen (what PyTorch's
  ``swa_utils.update_bn`` and fvcore's PreciseBN approximate): per batch and per
  device (count, mean, M2) triples merged with Chan's rule in float64, so the
  result is the count-weighted mean and variance of every activation, not an EMA
  and not an average of per-batch variances.

Both recognise BatchNorms by type (`jaxbn._detect.is_batch_norm`): Flax's and
jaxbn's, and their subclasses whatever their names.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.extend.core import Var, jaxprs_in_params
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn._checks import layout
from jaxbn._detect import is_batch_norm
from jaxbn._stats import merge_rows, stat_dtype
from jaxbn.folding import fold_bn_params, fold_conv_bn, fold_dense_bn

__all__ = [
    "AffineChannels",
    "FoldedBatchNorm",
    "FoldedModel",
    "FoldReport",
    "fold_batch_norms",
    "recalibrate_batch_stats",
]


# ----------------------------------------------------------------------------
# What is left of a BatchNorm after folding: x·scale + bias per channel.


def _per_channel(x, scale, bias, axis, dtype):
    """``x·scale + bias`` with the vectors along x's feature axes `axis` (either may be
    None), computed in float32 (float64 for float64 operands) and returned in `dtype`."""
    x = jnp.asarray(x)
    lay = layout(x, axis)
    vs = [v for v in (scale, bias) if v is not None]
    y = x.astype(stat_dtype(jnp.result_type(x, *vs)))
    if scale is not None:
        y = y * lay.b(scale)
    if bias is not None:
        y = y + lay.b(bias)
    return y.astype(dtype)


class AffineChannels(nn.Module):
    """``x·scale + bias`` per channel (last axis); ``scale`` only when present in the variables."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        scale = None
        if self.has_variable("params", "scale"):
            scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        dtype = self.dtype or jnp.result_type(x, *[v for v in (scale, bias) if v is not None])
        return _per_channel(x, scale, bias, -1, dtype)


def FoldedBatchNorm(*, name: Optional[str] = None, dtype: Any = None, **ignored) -> AffineChannels:  # noqa: N802
    """What is left of an evaluation-mode BatchNorm after folding: ``x·scale + bias``.

    A drop-in ``norm`` factory: accepts (and ignores) every BatchNorm argument.
    ``scale`` exists only for BatchNorms that could not be folded into the
    preceding layer; folded ones keep only the bias. For a model whose BatchNorms
    all come from a ``norm`` field and normalize the last axis,
    ``model.clone(norm=FoldedBatchNorm)`` applied to the variables of
    `fold_batch_norms` computes what its `FoldedModel` does, as a plain Linen module.
    """
    return AffineChannels(dtype=dtype, name=name)


def _bn_output_dtype(m, x):
    """The dtype a Linen BatchNorm (Flax's or jaxbn's) returns for input x."""
    if m.dtype is not None:
        return m.dtype
    return jnp.result_type(x, *([m.param_dtype] if m.use_scale or m.use_bias else []))


def _folded_batch_norm(next_fun, args, kwargs, ctx):
    """Interceptor: a BatchNorm's call becomes x·scale + bias with its folded params."""
    m = ctx.module
    if ctx.method_name != "__call__" or not is_batch_norm(m):
        return next_fun(*args, **kwargs)
    path = "/".join(m.path)
    if m.has_variable("batch_stats", "mean"):
        raise ValueError(
            f"FoldedModel.apply: BatchNorm {path!r} has running statistics in the variables given: pass the "
            f"variables returned by fold_batch_norms (a BatchNorm that its trace did not reach is not folded)"
        )

    def get(name):
        return m.get_variable("params", name) if m.has_variable("params", name) else None

    x = jnp.asarray(args[0])
    return _per_channel(x, get("scale"), get("bias"), m.axis, _bn_output_dtype(m, x))


@dataclasses.dataclass(frozen=True)
class FoldedModel:
    """A Linen model whose BatchNorms are the per-channel affine maps of its folded variables.

    ``apply`` is ``module.apply`` (same arguments, ``method=``, ``mutable=`` and all)
    with every BatchNorm call, Flax's or jaxbn's, replaced by
    ``x·params['scale'] + params['bias']`` along the BatchNorm's feature axes (each
    entry optional), whatever its mode: no statistics are read or updated.
    """

    module: nn.Module

    def apply(self, variables, *args, **kwargs):
        with nn.intercept_methods(_folded_batch_norm):
            return self.module.apply(variables, *args, **kwargs)


@dataclasses.dataclass
class FoldReport:
    folded: dict  # BatchNorm path -> Conv/Dense path it was folded into
    not_folded: dict  # BatchNorm path -> reason (kept as a per-channel affine map)

    def __str__(self):
        lines = [f"folded {len(self.folded)} BatchNorm layers into the preceding Conv/Dense"]
        lines += [f"  {bn} -> {lin}" for bn, lin in self.folded.items()]
        lines += [f"  NOT folded {bn}: {why}" for bn, why in self.not_folded.items()]
        return "\n".join(lines)


# ----------------------------------------------------------------------------
# Which BatchNorm reads which layer's output: one trace of the model.

_OUT, _IN = "jaxbn.fold.output:", "jaxbn.fold.bn_input:"  # jaxpr markers (checkpoint_name).


@dataclasses.dataclass
class _Layer:
    path: tuple
    module: nn.Module
    calls: int = 0
    feature_shape: tuple = ()  # BatchNorms: the shape of their statistics.
    features_last: bool = False  # BatchNorms: whether the last axis is the only feature axis.


def _marker(eqn, prefix: str) -> Optional[str]:
    name = eqn.params.get("name") if eqn.primitive.name == "name" else None
    return name[len(prefix):] if isinstance(name, str) and name.startswith(prefix) else None


def _bn_inputs(jaxpr) -> dict:
    """BatchNorm path -> (Conv/Dense path whose output is its input, or None; whether
    that output feeds anything else too), read off the markers of the traced jaxpr.

    Inside each (sub-)jaxpr on its own: a value crossing into a sub-jaxpr (nn.remat,
    nn.jit, ...) counts as another use, so the answer errs towards not folding.
    """
    found = {}

    def walk(jx):
        uses = collections.Counter(v for e in jx.eqns for v in e.invars if isinstance(v, Var))
        uses.update(v for v in jx.outvars if isinstance(v, Var))
        made_by = {}
        for e in jx.eqns:
            lin = _marker(e, _OUT)
            if lin is not None:
                made_by[e.outvars[0]] = lin
            bn = _marker(e, _IN)
            if bn is not None:
                v = e.invars[0]
                src = made_by.get(v) if isinstance(v, Var) else None
                found[bn] = (src, src is not None and uses[v] > 1)
            for sub in jaxprs_in_params(e.params):
                walk(sub)

    walk(jaxpr)
    return found


def _trace(model, variables, x, apply_kwargs):
    """(BatchNorms, Conv/Dense layers, _bn_inputs) of one evaluation-mode call, by path."""
    bns, linears = {}, {}

    def interceptor(next_fun, args, kwargs, ctx):
        m = ctx.module
        if ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(m.path)
        if is_batch_norm(m):
            z = jnp.asarray(args[0])
            lay = layout(z, m.axis)
            bn = bns.setdefault(path, _Layer(tuple(m.path), m, 0, lay.feature_shape, lay.feature_axes == (z.ndim - 1,)))
            bn.calls += 1
            return next_fun(checkpoint_name(z, _IN + path), *args[1:], **kwargs)
        out = next_fun(*args, **kwargs)
        if isinstance(m, (nn.Conv, nn.Dense)):
            linears.setdefault(path, _Layer(tuple(m.path), m)).calls += 1
            out = checkpoint_name(out, _OUT + path)
        return out

    def run(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(v, x, **apply_kwargs)

    jaxpr = jax.make_jaxpr(run)(variables, x)
    return bns, linears, _bn_inputs(jaxpr.jaxpr)


def _why_not_folded(bn: _Layer, src: Optional[str], shared: bool, linears: dict) -> Optional[str]:
    """Why `bn` cannot be folded into the layer before it (None: it can)."""
    if bn.calls > 1:
        return "it is called more than once"
    if not bn.features_last:
        return "its feature axis is not the input's last axis (the Conv/Dense output features)"
    if src is None:
        return "its input is not the output of a Conv/Dense (e.g. a BatchNorm after a ReLU)"
    if shared:
        return f"the output of {src} also feeds other operations"
    if linears[src].calls > 1:
        return f"{src} is called more than once (its weights are shared)"
    return None


def _lookup(tree, path):
    for k in path:
        if not hasattr(tree, "keys") or k not in tree:
            return None
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _pop(tree, path):
    """Removes and returns the entry at `path`, and the dicts it leaves empty (None if absent)."""
    if not path or not hasattr(tree, "keys") or path[0] not in tree:
        return None
    if len(path) == 1:
        return tree.pop(path[0])
    out = _pop(tree[path[0]], path[1:])
    if not tree[path[0]]:
        del tree[path[0]]
    return out


def _unfreeze(tree):
    if hasattr(tree, "items"):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def _affine_map(bn: _Layer, bn_params, bn_state):
    """(a, b) of the BatchNorm's features shape (any number of feature axes)."""
    flat = lambda d: None if d is None else {k: np.reshape(v, -1) for k, v in d.items()}  # noqa: E731
    a, b = fold_bn_params(flat(bn_params), flat(bn_state), epsilon=bn.module.epsilon)
    return np.reshape(a, bn.feature_shape), np.reshape(b, bn.feature_shape)


def fold_batch_norms(
    model: nn.Module, variables: dict, x: jax.typing.ArrayLike, *, apply_kwargs: Optional[dict] = None
):
    """Folds every evaluation-mode BatchNorm of a Linen model for inference.

    With ``a = scale/sqrt(var + ε)`` and ``b = bias - mean·a`` per channel,
    ``BN(conv(z, K) + c) = conv(z, K·a) + (c - mean)·a + bias``: the kernel is
    scaled along its output axis (any spatial rank, grouped and depthwise too) and
    the shift moves into the bias. Exact up to float rounding.

    One trace of ``model.apply(variables, x, **apply_kwargs)`` finds the pairs: a
    BatchNorm is folded into a `flax.linen.Conv` or `flax.linen.Dense` when its
    input is that layer's output and nothing else reads that output, both are
    called once, and the BatchNorm normalizes the last axis. Every other BatchNorm
    the trace reaches (after a ReLU, a reshape or a residual sum; shared; another
    feature axis) becomes the affine map ``a·x + b``; the report says why.

    Args:
      model: any `flax.linen.Module`; BatchNorms are Flax's or jaxbn's Linen ones
        or subclasses of them, wherever they sit. (NNX models are not supported:
        fold their layers with `jaxbn.folding`.)
      variables: its ``{'params', 'batch_stats'}`` (other collections are kept).
      x: an example input (only its shape and dtype are used).
      apply_kwargs: call arguments for evaluation mode (default ``{'train': False}``).

    Returns:
      ``(folded_model, folded_variables, report)``. ``folded_model`` is a
      `FoldedModel`: ``folded_model.apply(folded_variables, x, **apply_kwargs)``
      gives the same outputs as ``model.apply(variables, x, **apply_kwargs)``
      (``train=False`` for the models of `jaxbn.models`). ``folded_variables`` has
      the folded Conv/Dense kernels and biases and, at each BatchNorm's path,
      ``params`` ``{'bias'}`` (folded) or ``{'scale', 'bias'}`` (kept as a map) and
      no ``batch_stats``. ``report`` is a `FoldReport`.

    Raises:
      TypeError: `model` is not a Linen module.
      ValueError: a BatchNorm's statistics do not have its input's feature shape
        (variables stacked by a lifted transform such as ``nn.scan``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a flax.linen.Module, got {type(model).__name__} (NNX models are not supported: "
            f"fold their layers with jaxbn.folding)"
        )
    apply_kwargs = {"train": False} if apply_kwargs is None else apply_kwargs
    bns, linears, inputs = _trace(model, variables, x, apply_kwargs)
    params = _unfreeze(jax.tree.map(np.asarray, variables["params"]))  # mutable host copies
    stats = _unfreeze(jax.tree.map(np.asarray, variables.get("batch_stats", {})))
    report = FoldReport({}, {})
    for path, bn in bns.items():
        bn_params = _lookup(params, bn.path)
        bn_state = _pop(stats, bn.path)
        if bn_state is None:
            raise ValueError(f"BatchNorm {path!r} has no batch_stats in the variables given")
        mean_shape = np.shape(bn_state["mean"])
        if mean_shape != bn.feature_shape:
            raise ValueError(
                f"BatchNorm {path!r} has a running mean of shape {mean_shape}, expected {bn.feature_shape}: the "
                f"feature shape of its input (variables stacked by a lifted transform such as nn.scan cannot be "
                f"folded)"
            )
        src, shared = inputs.get(path, (None, False))
        why = _why_not_folded(bn, src, shared, linears)
        if why is None:
            lin = linears[src]
            lp = _lookup(params, lin.path)
            if isinstance(lin.module, nn.Conv):
                k, b = fold_conv_bn(
                    lp["kernel"], lp.get("bias"), bn_params, bn_state, epsilon=bn.module.epsilon,
                    feature_group_count=lin.module.feature_group_count,
                )
            else:
                k, b = fold_dense_bn(lp["kernel"], lp.get("bias"), bn_params, bn_state, epsilon=bn.module.epsilon)
            lp["kernel"] = np.asarray(k)
            if "bias" in lp:
                lp["bias"] = np.asarray(b)
                b = np.zeros_like(np.asarray(b))
            _set(params, bn.path, {"bias": np.asarray(b)})
            report.folded[path] = src
        else:
            a, b = _affine_map(bn, bn_params, bn_state)
            _set(params, bn.path, {"scale": a, "bias": b})
            report.not_folded[path] = (
                f"{why}: folding into the preceding layer would not be exact; kept as a per-channel affine a*x+b"
            )
    folded = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    folded["params"] = params
    if stats:  # batch_stats of modules other than BatchNorms
        folded["batch_stats"] = stats
    return FoldedModel(model), jax.tree.map(jnp.asarray, folded), report


# ----------------------------------------------------------------------------
# Recalibration.


def recalibrate_batch_stats(
    apply_fn: Callable,
    variables: dict,
    batches: Iterable,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    axis_name: Optional[str] = None,
    num_batches: Optional[int] = None,
    unbiased: bool = False,
) -> dict:
    """Population statistics of every BatchNorm over a stream of batches.

    Each batch runs through ``apply_fn(variables, batch)`` in training mode (so
    layers see the activations they saw in training, as PreciseBN does). Every
    BatchNorm's input is intercepted and reduced per device to
    ``(n, mean, M2)``; these are merged over devices and batches in float64:

        mean = Σ_b n_b m_b / N,    var = (Σ_b M2_b + Σ_b n_b (m_b - mean)²) / N

    i.e. the mean and (biased, or with `unbiased` the N-1) variance of all the
    activations seen — not an EMA, and not an average of per-batch variances.

    Args:
      apply_fn: ``apply_fn(variables, batch)`` calling ``model.apply`` in
        training mode with ``mutable=['batch_stats']`` (its result is ignored).
      variables: the model's variables; ``batch_stats`` is replaced.
      batches: an iterable of input batches (global batches when `mesh` is set).
      mesh: run data-parallel under `shard_map` over this mesh (batches are split
        along their leading axis over `axis_name`).
      axis_name: the mesh axis for the batch (required with `mesh`).
      num_batches: stop after this many batches (K).
      unbiased: store ``M2/(N-1)`` (PyTorch's convention).

    Returns:
      New variables with recalibrated ``batch_stats`` (same tree as before).
    """
    if (mesh is None) != (axis_name is None):
        raise ValueError(f"mesh and axis_name go together, got mesh={mesh!r} and axis_name={axis_name!r}")

    def local(variables, batch):
        stats = {}

        def interceptor(next_fun, args, kwargs, ctx):
            m = ctx.module
            if ctx.method_name == "__call__" and is_batch_norm(m) and not m.is_initializing():
                mo = jaxbn.moments(jax.lax.stop_gradient(args[0]), axis=m.axis, mask=kwargs.get("mask"))
                stats.setdefault("/".join(m.path), []).append((mo.count, mo.mean, mo.var * mo.count))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            apply_fn(variables, batch)
        # path -> (n, mean, M2), each (1, calls, *F): a row per call of the layer, this device's.
        return {p: tuple(jnp.stack(r)[None] for r in zip(*calls)) for p, calls in stats.items()}

    if mesh is None:
        step = jax.jit(local)
    else:
        step = jax.jit(
            jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=P(axis_name), check_vma=False)
        )
    acc = {}
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        out = jax.device_get(step(variables, batch))
        for path, triple in out.items():
            # One row per device and call, and the total so far; merged in float64.
            rows = [np.asarray(r, np.float64).reshape((-1,) + r.shape[2:]) for r in triple]
            if path in acc:
                rows = [np.concatenate([t[None], r]) for t, r in zip(acc[path], rows)]
            acc[path] = merge_rows(*rows, xp=np)  # float64 on the host
    if not acc:
        raise ValueError("batches gave no batch (or the model has no BatchNorm in training mode)")
    new_stats = _unfreeze(jax.tree.map(np.asarray, dict(variables["batch_stats"])))
    for path, (n, mean, m2) in acc.items():
        layer = _lookup(new_stats, path.split("/"))
        var = m2 / np.maximum(n - 1 if unbiased else n, 1)
        layer["mean"] = jnp.asarray(mean, layer["mean"].dtype)
        layer["var"] = jnp.asarray(var, layer["var"].dtype)
    return {**variables, "batch_stats": new_stats}
