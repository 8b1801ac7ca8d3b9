"""`lax.conv_general_dilated`, computed on XLA:CPU as patches × kernel when the patches are narrow.

`conv_general_dilated` takes `lax.conv_general_dilated`'s arguments and returns
its values; `flax.linen.Conv` and `flax.nnx.Conv` take it as their
``conv_general_dilated`` argument, so a model's variables, initial values and
meaning do not change (the article's CNN in `jaxbn.models` uses it).

Why: a convolution with few input channels, such as the first layer of an
image model (3×3 on one grayscale channel), is a poor fit for XLA:CPU's
convolution kernels. Its kernel gradient runs as a convolution over the batch
dimension after a transpose of the whole output gradient (the largest cost in a
profile of the article's CNN train step: batch 128, 28×28×1, 32 filters).
Written as im2col — the ``kh·kw·C_in`` shifted views of the input side by side,
times the kernel as a ``(kh·kw·C_in, C_out)`` matrix — the forward is one matrix
product and, by autodiff, the kernel gradient is ``patchesᵀ @ dy``, one matrix
product with a long contraction: the whole CNN train step is ×1.27–×1.31
faster than with lax's convolution on the 2-core CPU this project is measured on
(`python benchmarks/train_step.py`, candidate ``jaxbn+laxconv``). With many input channels the patches are
``kh·kw`` times the input and the convolution kernels win, so only patches of
at most `MAX_PATCH` columns take this path.

Only on the CPU: the choice is `lax.platform_dependent`, so the same program
lowered for a GPU or TPU runs `lax.conv_general_dilated` there.

Values and gradients equal the convolution's up to floating-point summation
order (tests/test_conv.py, against `lax.conv_general_dilated` and a float64
NumPy convolution). Works under ``jit``, ``vmap``, ``grad``, ``jvp`` and
``shard_map`` (everything is plain `jax.numpy`).

Imports only JAX (``import jaxbn`` stays framework-free).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated", "patches_apply", "MAX_PATCH"]

# At most this many patch columns (kh·kw·C_in) take the im2col path on the CPU: a 3×3
# kernel on up to 3 channels (benchmarks/train_step.py: the CNN's 3×3×1 makes its whole step
# ×1.27–×1.31 faster, ResNet-20's 3×3×3 stem ×1.04; its 3×3×16..64 convolutions were slower
# as im2col in a scratch A/B).
MAX_PATCH = 27

_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # ConvDimensionNumbers of NHWC/HWIO/NHWC


def _dims(dimension_numbers, lhs_ndim):
    if dimension_numbers is None:
        return None
    dn = lax.conv_dimension_numbers((1,) * lhs_ndim, (1,) * lhs_ndim, dimension_numbers)
    return tuple(tuple(s) for s in dn)


def _ones(v) -> bool:
    return v is None or all(int(d) == 1 for d in v)


def patches_apply(lhs, rhs, window_strides, padding, dimension_numbers=None, lhs_dilation=None,
                  rhs_dilation=None, feature_group_count: int = 1, batch_group_count: int = 1) -> bool:
    """Whether `conv_general_dilated` computes these arguments as im2col on the CPU.

    2-D, channels-last (``("NHWC", "HWIO", "NHWC")``, what Flax passes), no
    dilation, no feature or batch groups, floating inputs and at most
    `MAX_PATCH` patch columns.
    """
    return (
        lhs.ndim == 4
        and rhs.ndim == 4
        and _dims(dimension_numbers, lhs.ndim) == _NHWC
        and _ones(lhs_dilation)
        and _ones(rhs_dilation)
        and feature_group_count == 1
        and batch_group_count == 1
        and jnp.issubdtype(lhs.dtype, jnp.floating)
        and jnp.issubdtype(rhs.dtype, jnp.floating)
        and rhs.shape[0] * rhs.shape[1] * rhs.shape[2] <= MAX_PATCH
        and (isinstance(padding, str) or len(padding) == 2)
    )


def _im2col(lhs, rhs, window_strides, padding, precision, preferred_element_type):
    kh, kw, cin, cout = rhs.shape
    sh, sw = (int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
    (pt, pb), (pl, pr) = ((int(a), int(b)) for a, b in padding)
    x = lhs
    if pt or pb or pl or pr:  # lax.pad: negative padding crops, as the convolution's does
        x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    n, h, w, _ = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv_general_dilated: kernel {(kh, kw)} larger than the padded input {(h, w)}")
    # Columns in the kernel's (kh, kw, C_in) row-major order, so the kernel reshapes in place.
    cols = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    y = lax.dot_general(patches.reshape(n * ho * wo, kh * kw * cin), rhs.reshape(kh * kw * cin, cout),
                        (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
    return y.reshape(n, ho, wo, cout)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int],
                         padding: Union[str, Sequence[Tuple[int, int]]],
                         lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, out_sharding: Any = None):
    """`lax.conv_general_dilated` with the same arguments and values; im2col on the CPU.

    The im2col path is taken when `patches_apply` holds, no `out_sharding` is
    given and the program runs on the CPU; anything else is
    `lax.conv_general_dilated` itself.
    """
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                  feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                  precision=precision, preferred_element_type=preferred_element_type, out_sharding=out_sharding)

    def conv(lhs, rhs):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)

    if out_sharding is not None or not patches_apply(lhs, rhs, window_strides, padding, dimension_numbers,
                                                     lhs_dilation, rhs_dilation, feature_group_count,
                                                     batch_group_count):
        return conv(lhs, rhs)

    out = jax.eval_shape(conv, lhs, rhs)

    def im2col(lhs, rhs):
        return _im2col(lhs, rhs, window_strides, padding, precision, preferred_element_type).astype(out.dtype)

    return lax.platform_dependent(lhs, rhs, cpu=im2col, default=conv)
