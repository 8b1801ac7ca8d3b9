"""Folding evaluation-mode BatchNorm into the neighbouring linear layer.

In evaluation mode BatchNorm is a per-channel affine map. With running statistics
``mean``, ``var`` and parameters ``scale`` (γ), ``bias`` (β):

    BN(z) = (z - mean) / sqrt(var + ε) · γ + β = a · z + b,
    a = γ / sqrt(var + ε),    b = β - mean · a.

so it can be merged into the weights of the linear layer just before it
(conv/dense -> BN, `fold_conv_bn`, `fold_dense_bn`) or, in some cases, just after
it (BN -> dense/conv, `fold_bn_into_next_linear`, `fold_bn_into_next_conv`). The
folded network computes the same function as the original one in evaluation mode
(``jaxbn.batch_norm(..., training=False)``) up to rounding; it no longer trains
like it (the running statistics are baked in).

Everything here is a pure function of arrays (in the spirit of PyTorch's
``torch.nn.utils.fusion``): nothing is mutated. Layouts follow Flax:

* conv kernels are ``(*spatial, in_features // feature_group_count, out_features)``
  (``HWIO`` in 2-D, any spatial rank), the output feature axis last, as used by
  ``flax.linen.Conv`` and ``jax.lax.conv_general_dilated`` with
  ``dimension_numbers=('NHWC', 'HWIO', 'NHWC')`` (or its 1-D/3-D analogues);
* dense kernels are ``(in_features, out_features)`` (``flax.linen.Dense``);
* BatchNorm parameters are ``{'scale': (C,), 'bias': (C,)}`` (either key may be
  missing or None: scale 1, bias 0; ``params=None`` means neither), the running
  statistics a ``jaxbn.BatchNormState`` or a mapping with ``'mean'`` and ``'var'``
  (Flax's ``batch_stats`` collection) of shape ``(C,)``.

For PyTorch ``OIHW`` kernels transpose first (``kernel.transpose(2, 3, 1, 0)``).

Computation is in float32 (float64 if any input is float64); folded kernels come
back in the kernel's dtype, folded biases in the given bias's dtype (the kernel's
dtype when no bias is given).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from jaxbn._checks import check_epsilon, params_entries
from jaxbn._stats import affine, stat_dtype

__all__ = [
    "fold_bn_params",
    "fold_conv_bn",
    "fold_dense_bn",
    "fold_bn_into_next_linear",
    "fold_bn_into_next_conv",
]

ArrayLike = jax.typing.ArrayLike
Padding = Union[str, int, Sequence[Union[int, Tuple[int, int]]]]


# ----------------------------------------------------------------------------
# Argument checking.


def _float_array(name: str, v: ArrayLike) -> jax.Array:
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {v.dtype} (shape {v.shape})")
    return v


def _running_stats(state, sname: str):
    """(mean, var) of a `jaxbn.BatchNormState` or of a mapping with 'mean' and 'var'."""
    if isinstance(state, Mapping):
        missing = {"mean", "var"} - set(state.keys())
        if missing:
            raise ValueError(f"{sname} lacks the keys {sorted(missing)}: expected 'mean' and 'var'")
        return state["mean"], state["var"]
    if hasattr(state, "mean") and hasattr(state, "var"):
        return state.mean, state.var
    raise TypeError(
        f"{sname} must be a jaxbn.BatchNormState or a mapping with 'mean' and 'var', got {type(state).__name__}"
    )


def _bn_vectors(params, state, pname: str, sname: str):
    """(scale|None, bias|None, mean, var) checked to be float vectors of one shape (C,)."""
    scale, bias = params_entries(params, pname)
    mean, var = _running_stats(state, sname)
    mean = _float_array(f"{sname}.mean", mean)
    if mean.ndim != 1:
        raise ValueError(
            f"{sname}.mean has shape {mean.shape}, expected a vector (C,): folding needs one feature axis"
        )
    shape = mean.shape
    out = []
    for name, v in ((f"{pname}['scale']", scale), (f"{pname}['bias']", bias), (f"{sname}.var", var)):
        if v is None:
            if name.endswith(".var"):
                raise ValueError(f"{name} is None, expected an array of shape {shape}")
            out.append(None)
            continue
        v = _float_array(name, v)
        if v.shape != shape:
            raise ValueError(f"{name} has shape {v.shape}, expected {shape} (the shape of {sname}.mean)")
        out.append(v)
    scale, bias, var = out
    return scale, bias, mean, var


def _affine(params, state, epsilon, pname, sname, *extra):
    """(a, b, mean, beta) with BN(z) = (z - mean)·a + beta = a·z + b, in the compute dtype
    (float32, float64 if any of the BN vectors or `extra` arrays is); beta is 0 without a bias."""
    check_epsilon(epsilon)
    scale, bias, mean, var = _bn_vectors(params, state, pname, sname)
    dt = stat_dtype(jnp.result_type(*[v for v in (scale, bias, mean, var, *extra) if v is not None]))
    mean, a, beta = affine(mean, var, scale, bias, jnp.asarray(epsilon, dt), dt)
    return a, beta - mean * a, mean, beta


# ----------------------------------------------------------------------------
# Folding.


def fold_bn_params(params: Optional[Mapping], state, *, epsilon: float = 1e-5) -> Tuple[jax.Array, jax.Array]:
    """The per-channel affine map of an evaluation-mode BatchNorm.

        BN(z) = (z - mean) / sqrt(var + ε) · scale + bias = a · z + b
        a = scale / sqrt(var + ε),        b = bias - mean · a

    Args:
      params: ``{'scale': (C,), 'bias': (C,)}``, either key optional, or None.
      state: ``jaxbn.BatchNormState`` (or a mapping with 'mean' and 'var') of shape (C,).
      epsilon: the BatchNorm's ε (>= 0).

    Returns:
      ``(a, b)``, float32 vectors of shape (C,) (float64 for float64 inputs).

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> from jaxbn.folding import fold_bn_params
      >>> st = jaxbn.BatchNormState(jnp.array([1.0]), jnp.array([4.0]), jnp.array(0))
      >>> a, b = fold_bn_params(None, st, epsilon=0.0)
      >>> float(a[0]), float(b[0])
      (0.5, -0.5)
    """
    a, b, _, _ = _affine(params, state, epsilon, "params", "state")
    return a, b


def _fold_into_output(kernel, bias, bn_params, bn_state, epsilon, kname, bname, groups, min_ndim, what):
    kernel = _float_array(kname, kernel)
    if kernel.ndim < min_ndim:
        raise ValueError(f"{kname} has shape {kernel.shape}, expected {what}")
    if bias is not None:
        bias = _float_array(bname, bias)
    a, b, mean, beta = _affine(bn_params, bn_state, epsilon, "bn_params", "bn_state", kernel, bias)
    (c,) = a.shape
    out = kernel.shape[-1]
    if out != c:
        raise ValueError(
            f"{kname} has {out} output features (its last axis, shape {kernel.shape}), expected {c}: "
            f"the number of BatchNorm features (bn_state.mean has shape {mean.shape})"
        )
    if groups is not None and out % groups:
        raise ValueError(
            f"{kname} has {out} output features (shape {kernel.shape}), which feature_group_count="
            f"{groups} does not divide"
        )
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"{bname} has shape {bias.shape}, expected ({out},): the kernel's output features")
    dt = a.dtype
    new_kernel = (kernel.astype(dt) * a).astype(kernel.dtype)
    if bias is None:
        new_bias = b.astype(kernel.dtype)
    else:
        # (c - mean)·a + beta: subtract before scaling (exact when c ≈ mean).
        new_bias = ((bias.astype(dt) - mean) * a + beta).astype(bias.dtype)
    return new_kernel, new_bias


def _check_groups(feature_group_count) -> int:
    if not isinstance(feature_group_count, numbers.Integral) or feature_group_count < 1:
        raise ValueError(f"feature_group_count must be a positive int, got {feature_group_count!r}")
    return int(feature_group_count)


def fold_conv_bn(
    kernel: ArrayLike,
    conv_bias: Optional[ArrayLike],
    bn_params: Optional[Mapping],
    bn_state,
    *,
    epsilon: float = 1e-5,
    feature_group_count: int = 1,
) -> Tuple[jax.Array, jax.Array]:
    """Folds ``conv -> BN`` into one conv: returns ``(kernel', bias')``.

    With ``a, b`` from `fold_bn_params` and the conv ``z = x ⊛ W + c``:

        BN(z) = a·(x ⊛ W) + a·c + b = x ⊛ W' + c'
        W'[..., i, o] = W[..., i, o] · a[o],     c' = (c - mean)·a + bias

    Scaling is along the output feature axis only, so strides, padding, dilation,
    grouped (``feature_group_count > 1``) and depthwise convs fold the same way.

    Args:
      kernel: ``(*spatial, in_features // feature_group_count, C)`` (Flax ``HWIO``,
        any number of spatial axes, output features last).
      conv_bias: ``(C,)`` or None (zeros: a conv with ``use_bias=False``).
      bn_params: ``{'scale': (C,), 'bias': (C,)}`` (keys optional) or None.
      bn_state: ``jaxbn.BatchNormState`` or ``{'mean', 'var'}`` of shape (C,).
      epsilon: the BatchNorm's ε.
      feature_group_count: the conv's group count (checked against the kernel).

    Returns:
      ``(kernel', bias')``: kernel' in kernel's dtype and shape, bias' of shape
      (C,) in conv_bias's dtype (kernel's when conv_bias is None).

    Raises:
      ValueError: the kernel's last axis is not C, C not divisible by the group
        count, shapes of the BN vectors or bias, negative epsilon.
      TypeError: non-floating arrays, malformed params/state.
    """
    groups = _check_groups(feature_group_count)
    return _fold_into_output(
        kernel, conv_bias, bn_params, bn_state, epsilon, "kernel", "conv_bias", groups, 3,
        "a conv kernel (*spatial, in_features // feature_group_count, out_features) with at "
        "least one spatial axis (use fold_dense_bn for a dense kernel)",
    )


def fold_dense_bn(
    kernel: ArrayLike,
    bias: Optional[ArrayLike],
    bn_params: Optional[Mapping],
    bn_state,
    *,
    epsilon: float = 1e-5,
) -> Tuple[jax.Array, jax.Array]:
    """Folds ``Dense -> BN`` into one Dense: returns ``(kernel', bias')``.

        BN(x @ W + c) = x @ (W · a[None, :]) + (c - mean)·a + bias

    Args:
      kernel: ``(in_features, C)`` (``flax.linen.Dense``'s layout).
      bias: ``(C,)`` or None (zeros).
      bn_params, bn_state, epsilon: the BatchNorm's, as in `fold_conv_bn`.

    Returns:
      ``(kernel', bias')`` as in `fold_conv_bn`.
    """
    kernel = _float_array("kernel", kernel)
    if kernel.ndim != 2:
        raise ValueError(f"kernel has shape {kernel.shape}, expected a dense kernel (in_features, out_features)")
    return _fold_into_output(kernel, bias, bn_params, bn_state, epsilon, "kernel", "bias", None, 2, "")


def fold_bn_into_next_linear(
    bn_params: Optional[Mapping],
    bn_state,
    next_kernel: ArrayLike,
    next_bias: Optional[ArrayLike],
    *,
    epsilon: float = 1e-5,
) -> Tuple[jax.Array, jax.Array]:
    """Folds ``BN -> Dense`` into the Dense: returns ``(kernel', bias')``.

        BN(x) @ W + c = (a·x + b) @ W + c = x @ W' + c'
        W' = a[:, None] · W,          c' = c + b @ W

    The BN's output must feed the Dense directly (``ReLU -> BN -> Dense`` folds);
    a nonlinearity in between (``BN -> ReLU -> Dense``) cannot be folded.

    Args:
      bn_params, bn_state, epsilon: the BatchNorm's, features (C,).
      next_kernel: ``(C, out_features)``.
      next_bias: ``(out_features,)`` or None (zeros).

    Returns:
      ``(kernel', bias')``: kernel' in next_kernel's dtype and shape, bias' of
      shape (out_features,) in next_bias's dtype (next_kernel's when None).
    """
    w = _float_array("next_kernel", next_kernel)
    if w.ndim != 2:
        raise ValueError(
            f"next_kernel has shape {w.shape}, expected a dense kernel (in_features, out_features) "
            f"(use fold_bn_into_next_conv for a conv kernel)"
        )
    c = None if next_bias is None else _float_array("next_bias", next_bias)
    a, b, mean, _ = _affine(bn_params, bn_state, epsilon, "bn_params", "bn_state", w, c)
    if w.shape[0] != a.shape[0]:
        raise ValueError(
            f"next_kernel has {w.shape[0]} input features (its first axis, shape {w.shape}), expected "
            f"{a.shape[0]}: the number of BatchNorm features (bn_state.mean has shape {mean.shape})"
        )
    if c is not None and c.shape != (w.shape[1],):
        raise ValueError(f"next_bias has shape {c.shape}, expected ({w.shape[1]},): next_kernel's output features")
    dt = a.dtype
    w32 = w.astype(dt)
    new_w = (a[:, None] * w32).astype(w.dtype)
    shift = jnp.dot(b, w32, precision=jax.lax.Precision.HIGHEST)
    new_c = shift if c is None else c.astype(dt) + shift
    return new_w, new_c.astype(w.dtype if c is None else c.dtype)


def _padding_is_exact(padding, spatial: Tuple[int, ...]) -> bool:
    """Whether `padding` adds no padded entries for a kernel of this spatial shape."""
    if isinstance(padding, str):
        p = padding.upper()
        if p == "VALID":
            return True
        # SAME pads (k - 1) in total per axis (dilation aside, k = 1 stays 1): none for 1x1.
        return p in ("SAME", "SAME_LOWER") and all(k == 1 for k in spatial)
    if isinstance(padding, numbers.Integral):
        return int(padding) == 0
    try:
        items = list(padding)
    except TypeError:
        return False
    for item in items:
        if isinstance(item, numbers.Integral):
            if int(item) != 0:
                return False
            continue
        try:
            lo, hi = item
        except (TypeError, ValueError):
            return False
        if not (isinstance(lo, numbers.Integral) and isinstance(hi, numbers.Integral)) or lo or hi:
            return False
    return True


def fold_bn_into_next_conv(
    bn_params: Optional[Mapping],
    bn_state,
    next_kernel: ArrayLike,
    next_bias: Optional[ArrayLike],
    *,
    padding: Padding,
    epsilon: float = 1e-5,
    feature_group_count: int = 1,
) -> Tuple[jax.Array, jax.Array]:
    """Folds ``BN -> conv`` into the conv: returns ``(kernel', bias')``.

    With ``a, b`` from `fold_bn_params` and g groups of ``I_g = C / g`` input and
    ``O_g = O / g`` output features (input channel of kernel entry ``[..., k, o]``:
    ``ch(k, o) = (o // O_g)·I_g + k``):

        conv(a·x + b) = x ⊛ W' + c'
        W'[..., k, o] = W[..., k, o] · a[ch(k, o)]
        c'[o] = c[o] + Σ_{spatial, k} W[..., k, o] · b[ch(k, o)]

    This is exact only when the conv reads nothing but BN outputs, i.e. without
    padding: zero padding would feed the conv zeros that never went through the
    BatchNorm, which no folded kernel can reproduce at the borders. So the caller
    must state the conv's `padding`: ``'VALID'``, explicit all-zero padding, or
    ``'SAME'`` for a kernel whose spatial size is all 1 (which pads nothing) are
    accepted; anything else raises ValueError. Strides and dilation do not matter.

    Args:
      bn_params, bn_state, epsilon: the BatchNorm's, features (C,).
      next_kernel: ``(*spatial, C // feature_group_count, out_features)`` (Flax HWIO).
      next_bias: ``(out_features,)`` or None (zeros).
      padding: the conv's padding (required), as given to Flax/lax.
      feature_group_count: the conv's group count (C for depthwise).

    Returns:
      ``(kernel', bias')`` as in `fold_bn_into_next_linear`.

    Raises:
      ValueError: padding other than VALID (see above), shapes.
    """
    groups = _check_groups(feature_group_count)
    w = _float_array("next_kernel", next_kernel)
    if w.ndim < 3:
        raise ValueError(
            f"next_kernel has shape {w.shape}, expected a conv kernel (*spatial, in_features // "
            f"feature_group_count, out_features) with at least one spatial axis (use "
            f"fold_bn_into_next_linear for a dense kernel)"
        )
    if not _padding_is_exact(padding, tuple(w.shape[:-2])):
        raise ValueError(
            f"fold_bn_into_next_conv is exact only for padding='VALID' (no padded entries), got "
            f"padding={padding!r} with kernel spatial shape {tuple(w.shape[:-2])}: with zero padding "
            f"the conv sees padded zeros that did not go through the BatchNorm, so no folded kernel "
            f"reproduces the border outputs. Keep the BatchNorm, fold it into the preceding layer "
            f"(fold_conv_bn), or pad the BatchNorm's input yourself with the per-channel value the "
            f"BatchNorm maps to 0 (-b/a with (a, b) = fold_bn_params(...)) and use padding='VALID'."
        )
    c = None if next_bias is None else _float_array("next_bias", next_bias)
    a, b, mean, _ = _affine(bn_params, bn_state, epsilon, "bn_params", "bn_state", w, c)
    (ch,) = a.shape
    i_g, out = w.shape[-2], w.shape[-1]
    if i_g * groups != ch:
        raise ValueError(
            f"next_kernel has {i_g} input features per group (axis -2, shape {w.shape}), so "
            f"{i_g * groups} input features with feature_group_count={groups}, expected {ch}: the "
            f"number of BatchNorm features (bn_state.mean has shape {mean.shape})"
        )
    if out % groups:
        raise ValueError(
            f"next_kernel has {out} output features (shape {w.shape}), which feature_group_count="
            f"{groups} does not divide"
        )
    if c is not None and c.shape != (out,):
        raise ValueError(f"next_bias has shape {c.shape}, expected ({out},): next_kernel's output features")

    def per_entry(v):  # (C,) -> (I_g, O): v[ch(k, o)].
        return jnp.repeat(v.reshape(groups, i_g).T, out // groups, axis=1)

    dt = a.dtype
    w32 = w.astype(dt)
    new_w = (w32 * per_entry(a)).astype(w.dtype)
    shift = jnp.sum(w32 * per_entry(b), axis=tuple(range(w.ndim - 1)))
    new_c = shift if c is None else c.astype(dt) + shift
    return new_w, new_c.astype(w.dtype if c is None else c.dtype)
