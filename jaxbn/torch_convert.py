"""Converting PyTorch BatchNorm checkpoints to and from jaxbn.

A ``torch.nn.BatchNorm{1,2,3}d`` (or ``SyncBatchNorm``) state dict holds

    weight (C,), bias (C,)              -> params['scale'], params['bias']
    running_mean (C,), running_var (C,) -> BatchNormState.mean, BatchNormState.var
    num_batches_tracked () int64        -> BatchNormState.count (int32)

(``affine=False`` modules have no weight/bias; ``track_running_stats=False``
modules have no running statistics at all and always normalize with batch
statistics: in jaxbn that is ``batch_norm(..., training=True, update_stats=False)``,
nothing to convert.)

Conventions to carry over (`batch_norm_kwargs_from_torch` gives them as kwargs):

* momentum: PyTorch's ``m`` weighs the *new* batch, jaxbn's (Flax's) the old
  value: ``momentum = 1 - m``; PyTorch's ``momentum=None`` (cumulative average)
  is ``momentum=None`` here, with ``state.count`` playing num_batches_tracked.
* running variance: PyTorch stores the *unbiased* batch variance (``· N/(N-1)``)
  in its running average. The converted state keeps it as is, which is exactly
  what evaluation needs; to continue training PyTorch-compatibly pass
  ``unbiased_running_var=True`` to ``jaxbn.batch_norm``. There is no exact
  conversion to jaxbn's default biased running variance: each batch's correction
  N/(N-1) is mixed into the average with its own batch size and the initial value
  1 is not corrected, and the state dict records neither. (If every batch had the
  same size N and many updates were made, ``var · (N-1)/N`` is a close
  approximation.)
* channel axis: PyTorch data is channels-first (``NCHW``, features on axis 1);
  jaxbn's per-channel vectors are the same for either layout, so the converted
  state serves ``axis=-1`` for channels-last (``NHWC``) JAX data, or ``axis=1``
  for ``NCHW`` data. `nchw_to_nhwc` / `nhwc_to_nchw` move the channel axis.

``import jaxbn.torch_convert`` does not import torch; torch is imported only by
``to_torch_state_dict(..., as_torch=True)``. Inputs may be torch tensors or
NumPy arrays.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from jaxbn._types import BatchNormState

__all__ = [
    "from_torch_state_dict",
    "to_torch_state_dict",
    "batch_norm_kwargs_from_torch",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
]

_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _to_numpy(name: str, v: Any) -> np.ndarray:
    """A torch tensor (any device, bf16 included) or array-like as a NumPy array.

    Always a copy: ``tensor.numpy()`` shares the tensor's memory and JAX may wrap a
    CPU NumPy array without copying, so without it the "immutable" jax arrays would
    change when PyTorch updates its running statistics in place.
    """
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # torch.Tensor, without importing torch.
        v = v.detach().cpu()
        if v.is_floating_point() and str(v.dtype) not in ("torch.float16", "torch.float32", "torch.float64"):
            v = v.float()  # bfloat16 & co. have no NumPy dtype in torch.
        return np.array(v.numpy(), copy=True)
    try:
        return np.array(v, copy=True)
    except Exception as e:  # pragma: no cover - depends on the object.
        raise TypeError(f"{name} must be a torch tensor or an array, got {type(v).__name__}") from e


def _norm_prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    return prefix + "." if prefix and not prefix.endswith(".") else prefix


def _module_sd(obj) -> Tuple[Mapping, Any]:
    """(state dict, module or None) from a state dict or a torch module."""
    if isinstance(obj, Mapping):
        return obj, None
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return obj.state_dict(), obj
    raise TypeError(
        f"sd must be a state dict (a mapping of names to tensors/arrays) or a torch BatchNorm "
        f"module, got {type(obj).__name__}"
    )


def from_torch_state_dict(sd, *, prefix: str = "") -> Tuple[dict, BatchNormState, dict]:
    """Converts a PyTorch BatchNorm state dict to ``(params, state, hyper)``.

    Args:
      sd: a state dict (``module.state_dict()``, or any mapping of names to torch
        tensors or NumPy arrays), possibly of a whole model, or a torch BatchNorm
        module itself (then `hyper` also holds its momentum and epsilon).
      prefix: the BatchNorm's name in `sd`, e.g. ``'layer1.0.bn1.'`` (a missing
        trailing dot is added).

    Returns:
      ``(params, state, hyper)``:
        * params: ``{'scale': (C,), 'bias': (C,)}`` in the checkpoint's dtype
          (bfloat16 becomes float32), ``{}`` for an ``affine=False`` module;
        * state: ``BatchNormState`` with float32 mean and var (PyTorch's unbiased
          running variance, unchanged) and int32 count = num_batches_tracked (0
          if the checkpoint predates it);
        * hyper: keyword arguments for ``jaxbn.batch_norm``:
          ``{'unbiased_running_var': True}``, plus ``momentum``, ``epsilon`` and
          ``axis`` (-1, channels-last) from `batch_norm_kwargs_from_torch` when
          `sd` is a module.

    Raises:
      ValueError: no running statistics (``track_running_stats=False``, or a wrong
        prefix: the message lists the prefixes present), inconsistent shapes.

    Example:
      >>> import numpy as np
      >>> from jaxbn.torch_convert import from_torch_state_dict
      >>> sd = {'bn.running_mean': np.zeros(3, np.float32), 'bn.running_var': np.ones(3, np.float32)}
      >>> params, state, hyper = from_torch_state_dict(sd, prefix='bn')
      >>> params, state.mean.shape, hyper
      ({}, (3,), {'unbiased_running_var': True})
    """
    sd, module = _module_sd(sd)
    prefix = _norm_prefix(prefix)
    get = {k: sd.get(prefix + k) for k in _KEYS}

    if get["running_mean"] is None or get["running_var"] is None:
        present = sorted(
            k[: -len("running_mean")] for k in sd if isinstance(k, str) and k.endswith("running_mean")
        )
        if get["weight"] is not None or get["bias"] is not None:
            why = (
                f"the BatchNorm at prefix {prefix!r} was built with track_running_stats=False: it always "
                f"normalizes with batch statistics (jaxbn.batch_norm(..., training=True, "
                f"update_stats=False)); there are no running statistics to convert"
            )
        else:
            why = f"no BatchNorm found at prefix {prefix!r}; prefixes with running statistics: {present}"
        raise ValueError(
            f"sd lacks {prefix}running_mean / {prefix}running_var: {why}"
        )

    mean = _to_numpy(prefix + "running_mean", get["running_mean"])
    var = _to_numpy(prefix + "running_var", get["running_var"])
    if mean.ndim != 1:
        raise ValueError(f"{prefix}running_mean has shape {mean.shape}, expected a vector (C,)")
    shape = mean.shape
    if var.shape != shape:
        raise ValueError(f"{prefix}running_var has shape {var.shape}, expected {shape} (running_mean's)")

    params = {}
    for src, dst in (("weight", "scale"), ("bias", "bias")):
        if get[src] is None:
            continue
        v = _to_numpy(prefix + src, get[src])
        if v.shape != shape:
            raise ValueError(f"{prefix}{src} has shape {v.shape}, expected {shape} (running_mean's)")
        params[dst] = jnp.asarray(v)

    nbt = get["num_batches_tracked"]
    count = 0 if nbt is None else int(_to_numpy(prefix + "num_batches_tracked", nbt).reshape(()))
    if not 0 <= count <= np.iinfo(np.int32).max:
        raise ValueError(f"{prefix}num_batches_tracked={count} does not fit an int32 count")
    state = BatchNormState(
        mean=jnp.asarray(mean, jnp.float32),
        var=jnp.asarray(var, jnp.float32),
        count=jnp.asarray(count, jnp.int32),
    )
    hyper = {"unbiased_running_var": True}
    if module is not None:
        hyper = batch_norm_kwargs_from_torch(module)
    return params, state, hyper


def to_torch_state_dict(
    params: Optional[Mapping],
    state: BatchNormState,
    *,
    prefix: str = "",
    as_torch: bool = False,
) -> dict:
    """Converts jaxbn ``(params, state)`` to a PyTorch BatchNorm state dict.

    Keys ``weight``, ``bias`` (only those present in `params`: an
    ``affine=False`` module has neither), ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` (0-d int64), each preceded by `prefix`. The running
    variance is written as is: PyTorch expects the unbiased one, i.e. a state
    trained with ``unbiased_running_var=True`` (or converted from PyTorch).

    Args:
      params: ``{'scale', 'bias'}`` (keys optional) or None.
      state: ``BatchNormState`` (a mapping with mean, var, count also works).
      prefix: prepended to every key (a missing trailing dot is added).
      as_torch: return CPU torch tensors (imports torch) instead of NumPy arrays.

    Returns:
      A dict ready for ``module.load_state_dict`` (with ``as_torch=True``;
      PyTorch also accepts it for a submodule via ``strict=False``).
    """
    prefix = _norm_prefix(prefix)
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict with optional keys 'scale' and 'bias' or None, got {type(params).__name__}")
    unknown = set(params.keys()) - {"scale", "bias"}
    if unknown:
        raise ValueError(f"params has unexpected keys {sorted(unknown)}, expected a subset of ['bias', 'scale']")
    if isinstance(state, Mapping):
        mean, var, count = state.get("mean"), state.get("var"), state.get("count", 0)
    else:
        mean, var, count = getattr(state, "mean", None), getattr(state, "var", None), getattr(state, "count", 0)
    if mean is None or var is None:
        raise TypeError(f"state must be a jaxbn.BatchNormState with mean and var, got {type(state).__name__}")

    mean = np.asarray(mean)
    if mean.ndim != 1:
        raise ValueError(f"state.mean has shape {mean.shape}, expected a vector (C,)")
    out = {}
    for src, dst in (("scale", "weight"), ("bias", "bias")):
        if params.get(src) is None:
            continue
        v = np.array(params[src], copy=True)
        if v.shape != mean.shape:
            raise ValueError(f"params[{src!r}] has shape {v.shape}, expected {mean.shape} (state.mean's)")
        out[prefix + dst] = v
    var = np.asarray(var)
    if var.shape != mean.shape:
        raise ValueError(f"state.var has shape {var.shape}, expected {mean.shape} (state.mean's)")
    # Writable copies, never views of jax buffers.
    out[prefix + "running_mean"] = np.array(mean, np.float32, copy=True)
    out[prefix + "running_var"] = np.array(var, np.float32, copy=True)
    out[prefix + "num_batches_tracked"] = np.array(count, np.int64, copy=True).reshape(())

    if as_torch:
        import torch  # Lazily: jaxbn does not depend on torch.

        def to_t(a: np.ndarray):
            if a.dtype.name == "bfloat16":
                return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
            return torch.from_numpy(a)  # `a` is already a private copy.

        out = {k: to_t(v) for k, v in out.items()}
    return out


def batch_norm_kwargs_from_torch(module, *, data_format: str = "channels_last") -> dict:
    """The ``jaxbn.batch_norm`` keyword arguments matching a torch BatchNorm module.

        {'momentum': 1 - module.momentum (None if None), 'epsilon': module.eps,
         'unbiased_running_var': True, 'axis': -1 or 1}

    Args:
      module: ``torch.nn.BatchNorm{1,2,3}d`` / ``SyncBatchNorm`` (anything with
        ``momentum``, ``eps`` and ``track_running_stats``).
      data_format: ``'channels_last'`` (``NHWC`` JAX data, ``axis=-1``) or
        ``'channels_first'`` (PyTorch's ``NCHW`` data as is, ``axis=1``; also right
        for BatchNorm1d's ``(N, C)`` and ``(N, C, L)``).

    Raises:
      ValueError: a module with ``track_running_stats=False`` (use
        ``training=True, update_stats=False`` instead), unknown data_format.
    """
    for attr in ("momentum", "eps"):
        if not hasattr(module, attr):
            raise TypeError(f"module must be a torch BatchNorm module, got {type(module).__name__} without .{attr}")
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
    if not getattr(module, "track_running_stats", True):
        raise ValueError(
            "module was built with track_running_stats=False: it always normalizes with batch "
            "statistics, which is jaxbn.batch_norm(..., training=True, update_stats=False)"
        )
    m = module.momentum
    if m is not None and not isinstance(m, numbers.Real):
        raise TypeError(f"module.momentum must be a number or None, got {m!r}")
    return {
        "momentum": None if m is None else 1.0 - float(m),
        "epsilon": float(module.eps),
        "unbiased_running_var": True,
        "axis": -1 if data_format == "channels_last" else 1,
    }


def _move(x, src: int, dst: int, name: str):
    if getattr(x, "ndim", None) is None and not hasattr(x, "dim"):
        x = np.asarray(x)
    ndim = x.ndim if hasattr(x, "ndim") else x.dim()
    if ndim < 3:
        raise ValueError(f"{name} expects at least 3 dimensions (batch, channels, spatial...), got shape {tuple(x.shape)}")
    if isinstance(x, np.ndarray):
        return np.moveaxis(x, src, dst)
    if hasattr(x, "movedim") and hasattr(x, "detach"):  # torch.Tensor
        return x.movedim(src, dst)
    return jnp.moveaxis(x, src, dst)


def nchw_to_nhwc(x):
    """Moves the channel axis from 1 to last: NCHW -> NHWC (NCL -> NLC, NCDHW -> NDHWC).

    NumPy arrays stay NumPy, torch tensors stay torch, anything else becomes a jax.Array.
    """
    return _move(x, 1, -1, "nchw_to_nhwc")


def nhwc_to_nchw(x):
    """Moves the channel axis from last to 1: NHWC -> NCHW (the inverse of `nchw_to_nhwc`)."""
    return _move(x, -1, 1, "nhwc_to_nchw")
