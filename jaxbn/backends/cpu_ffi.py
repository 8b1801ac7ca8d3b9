"""One-sweep statistics for XLA:CPU, as XLA FFI custom calls (``jaxbn/csrc/batch_norm_cpu.cc``).

XLA:CPU gives each reduction its own sweep over memory, so the exact two-pass
statistics read x twice and the backward's two sums read dy twice. The kernels
read each input once (two-pass inside cache-sized blocks, Chan's merge across
them; see the source's header). They are written here, not taken from a library,
because no JAX/XLA library offers a multi-output reduction on the CPU and the
saving is measured (``benchmarks/bn_layer.py``: ``jaxbn`` vs ``jaxbn[xla]``).

This file holds the ``ffi_call``s, their JVP rules, the views of x they take and
the capability check `can_run` ("can the kernels serve this x here?"); the build
is ``build.py``. They take float32 and bfloat16 x whose feature axes are
contiguous: trailing (NHWC: rows of C features), or followed by others (NCHW:
slabs of H·W elements per example and feature). Masks: none, or one constant
along the features and every axis after them, which leaves out whole rows (NHWC:
per example, per position) or slabs (NCHW: per example); other masks, and a
cotangent of another dtype than x, are served by the XLA formulation.

``JAXBN_CPU_KERNEL`` (or ``with jaxbn.cpu_kernel.use(...)``) chooses: ``auto``
(default) uses the kernels where they are safe and fast, ``0`` never, ``1``
wherever they are available. ``auto`` means the CPU platform, and a single device,
a ``shard_map`` (or ``pmap``) whose mesh axes are all manual, or a program XLA's
SPMD partitioner splits (sharded ``jit``), where ``spmd.py`` declares how the
kernels' work divides among devices. Without a compiler, or if the build fails,
jaxbn says so once (a warning) and uses the XLA formulation: same results.

``jax.export`` refuses custom calls that carry no compatibility guarantee: to
export a training computation traced on the CPU, trace it with
``JAXBN_CPU_KERNEL=0`` or inside ``with jaxbn.cpu_kernel.use("0"):``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import warnings
from typing import Optional

import jax
import jax.numpy as jnp

from jaxbn._checks import Layout
from jaxbn._stats import count, dy_sums_tangents, mask_shape, moments_tangents
from jaxbn.backends.base import Reductions
from jaxbn.backends.build import compile_library
from jaxbn.backends.context import kind, partitioning_enabled, platform, vary_like
from jaxbn.backends.xla import XLA

__all__ = ["CPU", "available", "build_error", "mode", "use", "can_run", "moments", "masked_moments", "dy_sums"]

_TARGETS = {"jaxbn_moments": "JaxbnMoments", "jaxbn_masked_moments": "JaxbnMaskedMoments",
            "jaxbn_dy_sums": "JaxbnDySums", "jaxbn_slab_moments": "JaxbnSlabMoments",
            "jaxbn_slab_dy_sums": "JaxbnSlabDySums", "jaxbn_masked_slab_moments": "JaxbnMaskedSlabMoments"}
_MODES = ("auto", "0", "1")
_override: Optional[str] = None
_build_error: Optional[str] = None
# The setting is part of jax.jit's cache key: a function traced under one setting is traced
# again under another, instead of reusing a program with (or without) the kernels.
_jit_key = jax.make_user_context(None)


def mode() -> str:
    """``'auto'``, ``'0'`` or ``'1'``: `use`'s setting, else ``$JAXBN_CPU_KERNEL``, else auto."""
    m = _override if _override is not None else os.environ.get("JAXBN_CPU_KERNEL", "auto").strip().lower()
    if m not in _MODES:
        raise ValueError(f"JAXBN_CPU_KERNEL must be one of {_MODES}, got {m!r}")
    return m


@contextlib.contextmanager
def use(setting: str):
    """Within the block, functions traced use this setting (``'auto'``, ``'0'``, ``'1'``).

    The setting is part of ``jax.jit``'s cache key, so a function already jitted outside
    the block is traced again inside it (e.g. for ``jax.export`` without the kernels).
    """
    global _override
    if setting not in _MODES:
        raise ValueError(f"setting must be one of {_MODES}, got {setting!r}")
    old, _override = _override, setting
    try:
        with _jit_key(setting):
            yield
    finally:
        _override = old


@functools.cache
def _load() -> bool:
    global _build_error
    try:
        lib = ctypes.cdll.LoadLibrary(str(compile_library()))
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        return True
    except Exception as e:  # any failure leaves the XLA formulation in charge
        _build_error = f"{type(e).__name__}: {e}"
        warnings.warn(f"jaxbn: CPU kernels unavailable, using the XLA formulation ({_build_error})", stacklevel=3)
        return False


def available() -> bool:
    """Whether the kernels are built and registered (builds them on first call)."""
    return mode() != "0" and _load()


def build_error() -> Optional[str]:
    """Why the kernels could not be built, or None."""
    return _build_error


def _contiguous(feature_axes, ndim: int) -> Optional[tuple]:
    f = sorted(a % ndim for a in feature_axes)
    return tuple(f) if f and f == list(range(f[0], f[0] + len(f))) else None


def can_run(x: jax.Array, feature_axes: tuple) -> bool:
    """Whether the kernels serve x with these feature axes in the current context."""
    m = mode()
    if m == "0" or platform() != "cpu":
        return False
    if x.dtype not in (jnp.float32, jnp.bfloat16) or x.ndim == 0:
        return False
    if _contiguous(feature_axes, x.ndim) is None or x.size == 0:
        return False
    if m == "auto":
        k = kind()
        if k == "partial" or (k == "spmd" and not partitioning_enabled()):
            return False  # XLA would have to split the custom calls, which it cannot
    return available()


def _view(x, feature_axes):
    """x as rows ``(R, C)`` when its feature axes are trailing, else as slabs
    ``(A, C, S)`` (A: the axes before the features, S: those after), and the
    features' shape."""
    if not _load():
        raise RuntimeError(f"jaxbn CPU kernels unavailable: {_build_error}")
    f = _contiguous(feature_axes, x.ndim)
    if f is None:
        raise ValueError(f"feature_axes must be contiguous axes of x (ndim {x.ndim}), got {feature_axes}")
    fs = x.shape[f[0] : f[-1] + 1]
    a, c, s = math.prod(x.shape[: f[0]]), math.prod(fs), math.prod(x.shape[f[-1] + 1 :])
    return jnp.reshape(x, (a, c) if s == 1 else (a, c, s)), fs


def _call(name, c, *args):
    out = jax.ShapeDtypeStruct((c,), jnp.float32)
    return tuple(jax.ffi.ffi_call(name, (out, out), vmap_method="broadcast_all")(*args))


def _red(v):  # a rows (R, C) or slabs (A, C, S) view: the features are axis 1
    return (0,) + tuple(range(2, v.ndim))


def _col(m, v):  # a feature vector broadcast against the view
    return jnp.reshape(m, m.shape + (1,) * (v.ndim - 2))


def _moments_kernel(target: str):
    """v -> (mean, M2) per feature of a rows or slabs view, with its JVP rule."""

    @jax.custom_jvp
    def op(v):
        return _call(target, v.shape[1], v)

    @op.defjvp
    def _jvp(primals, tangents):
        (v,), (t,) = primals, tangents
        mean, m2 = op(v)
        return (mean, m2), moments_tangents(v, _col(mean, v), t, _red(v))

    return op


def _masked_moments_kernel(target: str):
    """(v, keep) -> (mean, M2) per feature over the rows or slabs (axis 0 of the view)
    that `keep` keeps, with its JVP rule."""

    @jax.custom_jvp
    def op(v, keep):
        return _call(target, v.shape[1], v, keep)

    @op.defjvp
    def _jvp(primals, tangents):
        (v, keep), (t, _) = primals, tangents
        mean, m2 = op(v, keep)
        k = jnp.reshape(keep, keep.shape + (1,) * (v.ndim - 1))
        n = jnp.sum(keep, dtype=jnp.float32) * math.prod(v.shape[2:])
        return (mean, m2), moments_tangents(v, _col(mean, v), t, _red(v), keep=k, n=n)

    return op


def _dy_sums_kernel(target: str):
    """(v, dv, mean) -> (Σdy, Σdy·(x - mean)) per feature of rows or slabs views, with its JVP rule."""

    @jax.custom_jvp
    def op(v, dv, mean):
        return _call(target, v.shape[1], v, dv, mean)

    @op.defjvp
    def _jvp(primals, tangents):
        (v, dv, mean), (tv, tdv, tm) = primals, tangents
        s1, s2 = op(v, dv, mean)
        return (s1, s2), dy_sums_tangents(v, dv, _col(mean, v), s1, tv, tdv, tm, _red(v))

    return op


# By the view's rank: rows (R, C) for trailing features, slabs (A, C, S) otherwise.
_MOMENTS = {2: _moments_kernel("jaxbn_moments"), 3: _moments_kernel("jaxbn_slab_moments")}
_MASKED_MOMENTS = {2: _masked_moments_kernel("jaxbn_masked_moments"),
                   3: _masked_moments_kernel("jaxbn_masked_slab_moments")}
_DY_SUMS = {2: _dy_sums_kernel("jaxbn_dy_sums"), 3: _dy_sums_kernel("jaxbn_slab_dy_sums")}


def moments(x: jax.Array, feature_axes):
    """(mean, M2) over all but the (contiguous) `feature_axes` of x, float32, one sweep."""
    v, fs = _view(x, feature_axes)
    mean, m2 = _MOMENTS[v.ndim](v)
    return mean.reshape(fs), m2.reshape(fs)


def masked_moments(x: jax.Array, keep: jax.Array, feature_axes):
    """(mean, M2) over all but the (contiguous) `feature_axes` of x, counting only the
    rows (features trailing) or slabs (features followed by other axes) that the
    boolean `keep`, of shape ``x.shape[:feature_axes[0]]``, keeps; float32, one
    sweep; left-out rows and slabs are never read. With nothing kept, mean = M2 = 0."""
    v, fs = _view(x, feature_axes)
    lead = x.shape[: min(a % x.ndim for a in feature_axes)]
    if keep.shape != lead or keep.dtype != jnp.bool_:
        raise ValueError(f"keep must be a boolean array of shape {lead}, got {keep.dtype} {keep.shape}")
    mean, m2 = _MASKED_MOMENTS[v.ndim](v, jnp.reshape(keep, (v.shape[0],)))
    return mean.reshape(fs), m2.reshape(fs)


def dy_sums(x: jax.Array, dy: jax.Array, mean: jax.Array, feature_axes):
    """(Σdy, Σdy·(x - mean)) over all but the (contiguous) `feature_axes`, float32,
    one sweep."""
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have x's dtype {x.dtype}, got {dy.dtype}")
    v, fs = _view(x, feature_axes)
    dv, _ = _view(dy, feature_axes)
    m = jnp.reshape(mean.astype(jnp.float32), (v.shape[1],))
    s1, s2 = _DY_SUMS[v.ndim](v, dv, m)
    return s1.reshape(fs), s2.reshape(fs)


class _CpuFfi(Reductions):
    """The kernels behind the backend interface; what they cannot serve goes to XLA.

    The kernels exist only on the CPU, whatever platform the tracing process defaults
    to: each call is a `jax.lax.platform_dependent` choice made when the program is
    lowered — the kernel for the CPU, the XLA formulation for any other platform (a
    program traced on a CPU host and lowered, exported or run for a GPU carries no CPU
    custom call). A program lowered for the CPU alone contains only the kernel.
    """

    name = "cpu"
    opaque = True

    def moments(self, x, mask, lay: Layout):
        f0 = lay.feature_axes[0]
        if mask is None:
            kernel = lambda x: vary_like(moments(x, lay.feature_axes), x)  # noqa: E731
        elif all(d == 1 for d in mask_shape(mask, x.ndim)[f0:]):
            # The mask leaves out whole rows (NHWC) or slabs (NCHW): one sweep over the kept ones.
            k = mask_shape(mask, x.ndim)

            def kernel(x):
                keep = jnp.broadcast_to(jnp.reshape(mask, k)[(...,) + (0,) * (x.ndim - f0)], x.shape[:f0])
                return vary_like(masked_moments(x, keep, lay.feature_axes), x, mask)
        else:
            return XLA.moments(x, mask, lay)
        m, m2 = jax.lax.platform_dependent(x, cpu=kernel, default=lambda x: XLA.moments(x, mask, lay)[1:])
        return count(x.shape, mask, lay, m.dtype), m, m2

    def dy_sums(self, x, dy, mean, lay: Layout):
        if dy.dtype != x.dtype:
            return XLA.dy_sums(x, dy, mean, lay)
        return jax.lax.platform_dependent(
            x, dy, mean, cpu=lambda x, dy, mean: vary_like(dy_sums(x, dy, mean, lay.feature_axes), x, dy, mean),
            default=lambda x, dy, mean: XLA.dy_sums(x, dy, mean, lay))


CPU = _CpuFfi()
