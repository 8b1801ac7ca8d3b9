"""Inference-time tools for Flax Linen models: BN folding and exact recalibration.

* `fold_batch_norms`: finds every BatchNorm whose input is the output of a
  Conv or Dense (by tracing the model), folds the BatchNorm into that layer's
  kernel and returns a BN-free model (the same model built with
  ``norm=FoldedBatchNorm``) with its inference variables. A BatchNorm that does
  not directly follow a Conv/Dense (e.g. after a ReLU, as in the article's CNN)
  cannot be folded into the preceding layer exactly; it becomes a per-channel
  affine map ``a·x + b`` (no statistics, one fused multiply-add) and the report
  says so.
* `recalibrate_batch_stats`: recomputes every BatchNorm's running statistics as
  the exact population statistics of the data seen (what PyTorch's
  ``swa_utils.update_bn`` and fvcore's PreciseBN approximate): per batch and per
  device (count, mean, M2) triples merged with Chan's rule in float64, so the
  result is the count-weighted mean and variance of every activation, not an EMA
  and not an average of per-batch variances.

Both work with `jaxbn.linen.BatchNorm` and `flax.linen.BatchNorm`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.folding import fold_bn_params, fold_conv_bn, fold_dense_bn

__all__ = ["AffineChannels", "FoldedBatchNorm", "FoldReport", "fold_batch_norms", "recalibrate_batch_stats"]


class AffineChannels(nn.Module):
    """``x·scale + bias`` per channel (last axis); ``scale`` only when present in the variables."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        if self.has_variable("params", "scale"):
            x = x * self.param("scale", nn.initializers.ones, (x.shape[-1],))
        y = x + self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return y.astype(self.dtype or y.dtype)


def FoldedBatchNorm(*, name: Optional[str] = None, dtype: Any = None, **ignored) -> AffineChannels:  # noqa: N802
    """What is left of an evaluation-mode BatchNorm after folding: ``x·scale + bias``.

    A drop-in ``norm`` factory: accepts (and ignores) every BatchNorm argument.
    ``scale`` exists only for BatchNorms that could not be folded into the
    preceding layer; folded ones keep only the bias.
    """
    return AffineChannels(dtype=dtype, name=name)


@dataclasses.dataclass
class FoldReport:
    folded: dict  # BatchNorm path -> Conv/Dense path it was folded into
    not_folded: dict  # BatchNorm path -> reason (kept as a per-channel affine map)

    def __str__(self):
        lines = [f"folded {len(self.folded)} BatchNorm layers into the preceding Conv/Dense"]
        lines += [f"  {bn} -> {lin}" for bn, lin in self.folded.items()]
        lines += [f"  NOT folded {bn}: {why}" for bn, why in self.not_folded.items()]
        return "\n".join(lines)


def _is_bn(m) -> bool:
    return isinstance(m, (nn.BatchNorm, jaxbn.linen.BatchNorm)) or (
        "BatchNorm" in type(m).__name__ and hasattr(m, "use_running_average")
    )


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _trace_pairs(model, variables, x, apply_kwargs):
    """(bn_path, producer_path or None, bn_module, producer_module) in call order."""
    outputs = {}  # id(tracer) -> (path, module)
    alive = []
    found = []

    def interceptor(next_fun, args, kwargs, ctx):
        m = ctx.module
        out = next_fun(*args, **kwargs)
        if ctx.method_name != "__call__":
            return out
        if _is_bn(m):
            src = outputs.get(id(args[0]))
            found.append((tuple(m.path), src, m))
        elif isinstance(m, (nn.Conv, nn.Dense)):
            outputs[id(out)] = (tuple(m.path), m)
            alive.append(out)  # keeps ids unique while tracing
        return out

    def run(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(v, x, **apply_kwargs)

    jax.eval_shape(run, variables, x)
    return found


def fold_batch_norms(model: nn.Module, variables: dict, x: jax.typing.ArrayLike, *, apply_kwargs: Optional[dict] = None):
    """Folds every Conv→BN and Dense→BN pair of a Linen model for inference.

    With ``a = scale/sqrt(var + ε)`` and ``b = bias - mean·a`` per channel,
    ``BN(conv(z, K) + c) = conv(z, K·a) + (c - mean)·a + bias``: the kernel is
    scaled along its output axis (any spatial rank, grouped and depthwise too) and
    the shift moves into the bias. Exact up to float rounding.

    Args:
      model: a Linen model with a ``norm`` field (a BatchNorm factory), such as
        `jaxbn.models.CNN` or `jaxbn.models.ResNet`.
      variables: its ``{'params', 'batch_stats'}``.
      x: an example input (only its shape and dtype are used).
      apply_kwargs: call arguments for evaluation mode (default ``{'train': False}``).

    Returns:
      ``(folded_model, folded_variables, report)``: the model rebuilt with
      ``norm=FoldedBatchNorm`` and variables without ``batch_stats``, giving the
      same outputs as ``model.apply(variables, x, train=False)``.
    """
    if not hasattr(model, "norm"):
        raise ValueError(f"model must have a `norm` field (a BatchNorm factory), got {type(model).__name__}")
    apply_kwargs = {"train": False} if apply_kwargs is None else apply_kwargs
    pairs = _trace_pairs(model, variables, x, apply_kwargs)
    params = _unfreeze(jax.tree.map(np.asarray, variables["params"]))  # a mutable host copy
    report = FoldReport({}, {})
    for bn_path, src, bn in pairs:
        bn_params = _get(params, bn_path)
        bn_state = {k: np.asarray(v) for k, v in _get(variables["batch_stats"], bn_path).items()}
        eps = bn.epsilon
        features_last = bn.axis in (-1, (-1,), [-1])
        if src is not None and features_last:
            (lin_path, lin) = src
            lp = _get(params, lin_path)
            if isinstance(lin, nn.Conv):
                k, b = fold_conv_bn(lp["kernel"], lp.get("bias"), bn_params, bn_state, epsilon=eps, feature_group_count=lin.feature_group_count)
            else:
                k, b = fold_dense_bn(lp["kernel"], lp.get("bias"), bn_params, bn_state, epsilon=eps)
            lp["kernel"] = np.asarray(k)
            if "bias" in lp:
                lp["bias"] = np.asarray(b)
                _set(params, bn_path, {"bias": np.zeros_like(np.asarray(b))})
            else:
                _set(params, bn_path, {"bias": np.asarray(b)})
            report.folded["/".join(bn_path)] = "/".join(lin_path)
        else:
            a, b = fold_bn_params(bn_params, bn_state, epsilon=eps)
            _set(params, bn_path, {"scale": np.asarray(a), "bias": np.asarray(b)})
            report.not_folded["/".join(bn_path)] = (
                "its input is not the output of a Conv/Dense (e.g. a BatchNorm after a ReLU): "
                "folding into the preceding layer would not be exact; kept as a per-channel affine a*x+b"
            )
    folded_model = model.clone(norm=FoldedBatchNorm)
    return folded_model, {"params": jax.tree.map(jnp.asarray, params)}, report


def _unfreeze(tree):
    if hasattr(tree, "items"):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


# ----------------------------------------------------------------------------
# Recalibration.


def _chan_merge(acc, n, mean, m2):
    """Merges (n, mean, M2) into the float64 accumulator (Chan et al.)."""
    if acc is None:
        return n, mean, m2
    n0, mean0, m20 = acc
    tot = n0 + n
    safe = np.maximum(tot, 1)
    delta = mean - mean0
    return tot, mean0 + delta * n / safe, m20 + m2 + delta**2 * n0 * n / safe


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
            if ctx.method_name == "__call__" and _is_bn(m) and not m.is_initializing():
                mo = jaxbn.moments(jax.lax.stop_gradient(args[0]), axis=m.axis, mask=kwargs.get("mask"))
                stats["/".join(m.path)] = (mo.count, mo.mean, mo.var * mo.count)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            apply_fn(variables, batch)
        return jax.tree.map(lambda a: a[None], stats)

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
        for path, (n, mean, m2) in out.items():
            for d in range(n.shape[0]):  # every device's shard
                acc[path] = _chan_merge(
                    acc.get(path), n[d].astype(np.float64), mean[d].astype(np.float64), m2[d].astype(np.float64)
                )
    if not acc:
        raise ValueError("batches gave no batch (or the model has no BatchNorm in training mode)")
    new_stats = _unfreeze(jax.tree.map(np.asarray, dict(variables["batch_stats"])))
    for path, (n, mean, m2) in acc.items():
        layer = _get(new_stats, path.split("/"))
        var = m2 / np.maximum(n - 1 if unbiased else n, 1)
        layer["mean"] = jnp.asarray(mean, layer["mean"].dtype)
        layer["var"] = jnp.asarray(var, layer["var"].dtype)
    return {**variables, "batch_stats": new_stats}
