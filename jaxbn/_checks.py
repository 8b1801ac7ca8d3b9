"""Argument checks and the layout of per-feature vectors against x.

Every error names the argument, what was expected and what was given, in one
line: ``"<argument> must be <expected>, got <actual>"`` (TypeError for a wrong
kind of value, ValueError for a wrong value). Traced values are accepted where a
number may be traced (momentum, epsilon) and checked only when concrete.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._types import ArrayLike, Axis, AxisName


def _kind(v) -> str:
    return f"{v!r} ({type(v).__name__})"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def as_shape(num_features: Union[int, Sequence[int]], name: str = "num_features") -> tuple[int, ...]:
    """`num_features` (an int or a tuple of ints, each >= 1) as a shape tuple."""
    if _is_int(num_features):
        shape = (num_features,)
    elif isinstance(num_features, (tuple, list)):
        shape = tuple(num_features)
    else:
        shape = None
    if not shape or any(not _is_int(d) or d < 1 for d in shape):
        raise (ValueError if shape is not None else TypeError)(
            f"{name} must be a positive int or a tuple of positive ints, got {_kind(num_features)}"
        )
    return tuple(int(d) for d in shape)


def check_x(x: ArrayLike) -> jax.Array:
    """x as an array: floating point (or complex), at least one dimension."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(f"x must be a floating-point or complex array, got dtype {x.dtype} (shape {x.shape})")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    return x


def feature_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
    """The feature axes named by `axis`, non-negative and sorted."""
    if _is_int(axis):
        axes = (axis,)
    elif isinstance(axis, (tuple, list)):
        axes = tuple(axis)
    else:
        raise TypeError(f"axis must be an int or a tuple of ints, got {_kind(axis)}")
    if not axes:
        raise ValueError(f"axis must name at least one feature axis, got {axis!r}")
    out = []
    for a in axes:
        if not _is_int(a):
            raise TypeError(f"axis must be an int or a tuple of ints, got {_kind(axis)}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis={axis!r} is out of range for x with {ndim} dimensions: each feature axis "
                f"must be an int in [{-ndim}, {ndim - 1}]"
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis={axis!r} names the same axis twice")
    return tuple(sorted(out))


class Layout(NamedTuple):
    """How per-feature vectors line up with x."""

    feature_axes: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    bshape: tuple[int, ...]  # feature vectors reshaped to broadcast against x.

    def b(self, v: jax.Array) -> jax.Array:
        """A feature vector broadcastable against x."""
        return jnp.reshape(v, self.bshape)


def layout(x: jax.Array, axis: Axis) -> Layout:
    feat = feature_axes(x.ndim, axis)
    red = tuple(a for a in range(x.ndim) if a not in feat)
    fshape = tuple(x.shape[a] for a in feat)
    bshape = tuple(x.shape[a] if a in feat else 1 for a in range(x.ndim))
    return Layout(feat, red, fshape, bshape)


def check_vector(name: str, v: Optional[ArrayLike], lay: Layout, x_shape) -> Optional[jax.Array]:
    """A per-feature vector of x's feature shape (None passes through)."""
    if v is None:
        return None
    v = jnp.asarray(v)
    if v.shape != lay.feature_shape:
        raise ValueError(
            f"{name} has shape {v.shape}, expected {lay.feature_shape}: the size of the feature "
            f"axes {lay.feature_axes} of x with shape {tuple(x_shape)}"
        )
    return v


def params_entries(params, name: str = "params"):
    """``(scale, bias)`` of a BatchNorm's parameter dict (either may be None), or (None, None)."""
    if params is None:
        return None, None
    if not hasattr(params, "keys"):
        raise TypeError(
            f"{name} must be a dict with optional keys 'scale' and 'bias' or None, got {type(params).__name__}"
        )
    unknown = set(params.keys()) - {"scale", "bias"}
    if unknown:
        raise ValueError(f"{name} has unexpected keys {sorted(unknown)}, expected a subset of ['bias', 'scale']")
    return params.get("scale"), params.get("bias")


def check_params(params: Optional[dict], lay: Layout, x_shape):
    scale, bias = params_entries(params)
    return check_vector("params['scale']", scale, lay, x_shape), check_vector("params['bias']", bias, lay, x_shape)


def check_mask(mask: Optional[ArrayLike], x: jax.Array) -> Optional[jax.Array]:
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


def concrete(v) -> Optional[float]:
    """v as a Python float, or None when it is traced."""
    try:
        return float(v)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _is_number(v) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, numbers.Real):
        return True
    dtype = getattr(v, "dtype", None)
    return dtype is not None and np.ndim(v) == 0 and jnp.issubdtype(dtype, jnp.number)


def check_epsilon(epsilon) -> None:
    """epsilon: a number >= 0 (or traced)."""
    if not _is_number(epsilon):
        raise TypeError(f"epsilon must be a number >= 0, got {_kind(epsilon)}")
    e = concrete(epsilon)
    if e is not None and not e >= 0.0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")


def check_momentum(momentum) -> None:
    """momentum: a number in [0, 1] (or traced), or None for a cumulative average."""
    if momentum is None:
        return
    if not _is_number(momentum):
        raise TypeError(f"momentum must be a number in [0, 1] or None, got {_kind(momentum)}")
    m = concrete(momentum)
    if m is not None and not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (or None for a cumulative average), got {momentum!r}")


def check_bool(name: str, v, allow_none: bool = False) -> Optional[bool]:
    """A Python (or NumPy) boolean flag; None too when allowed."""
    if v is None and allow_none:
        return None
    if not isinstance(v, (bool, np.bool_)):
        expected = "a bool (True or False)" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {expected}, got {_kind(v)}")
    return bool(v)


def axis_names(axis_name: AxisName) -> Optional[tuple]:
    """`axis_name` as a tuple of names, or None for no cross-device reduction."""
    if axis_name is None:
        return None
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, (tuple, list)) or any(not isinstance(n, str) for n in names):
        raise TypeError(f"axis_name must be a str, a tuple of str or None, got {_kind(axis_name)}")
    return tuple(names) or None


def groups(axis_index_groups) -> Optional[tuple]:
    """`axis_index_groups` as a hashable tuple of tuples of ints."""
    if axis_index_groups is None:
        return None
    try:
        return tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    except TypeError:
        raise TypeError(
            f"axis_index_groups must be a list of lists of device indices or None, got {_kind(axis_index_groups)}"
        ) from None


def check_groups(groups: Optional[tuple], size: int) -> None:
    """Device groups must partition ``range(size)`` into groups of one size."""
    if groups is None:
        return
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(size)) or len({len(g) for g in groups}) != 1:
        raise ValueError(
            f"axis_index_groups must split the {size} devices of the axis into groups of equal size "
            f"(each index in range({size}) exactly once), got {[list(g) for g in groups]}"
        )


class UnboundAxisNameError(ValueError, NameError):
    """`axis_name` names an axis that is not bound (no enclosing pmap/shard_map/vmap).

    Both a `ValueError`, as the other argument checks raise, and a `NameError`, as
    Flax's BatchNorm and `jax.lax.psum` raise (``except NameError`` keeps working).
    """


def axis_size(names: tuple) -> int:
    """Total size of the named axes; a clear error when one is not bound."""
    size = 1
    for n in names:
        try:
            size *= jax.lax.axis_size(n)
        except NameError as e:
            raise UnboundAxisNameError(
                f"axis_name={n!r} is not bound here: call this inside pmap, shard_map or vmap "
                f"with that axis name, or pass axis_name=None for per-device statistics ({e})"
            ) from None
    return size


def is_bound(axis_name: AxisName) -> bool:
    """Whether every named axis is bound in the current trace."""
    try:
        axis_size(axis_names(axis_name) or ())
    except UnboundAxisNameError:
        return False
    return True


def dtype_or_none(dtype: Any):
    return None if dtype is None else jnp.dtype(dtype)
