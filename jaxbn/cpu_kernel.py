"""One-sweep BatchNorm reductions for XLA:CPU, as XLA FFI custom calls.

XLA:CPU gives each reduction its own sweep over memory, so the exact two-pass
statistics read x twice and the backward's two sums read dy twice: float32
training moves 40 bytes per element where 32 suffice. ``csrc/batch_norm_cpu.cc``
reads each input once (two-pass inside cache-sized blocks, Chan's merge across
them; see its header). It is written here, not taken from a library, because no
JAX/XLA library offers a multi-output reduction on the CPU and the saving is
measured (``benchmarks/bn_layer.py``: ``jaxbn`` vs ``jaxbn[xla]``).

The source is compiled on first use with the system's C++ compiler against the
XLA FFI headers that ship with jaxlib, and cached in ``$JAXBN_CACHE_DIR`` (default
``~/.cache/jaxbn``) under a hash of the source, jaxlib, the compiler and the CPU.
Without a compiler, or if the build fails, jaxbn says so once (a warning) and
uses the XLA formulation: same results, 25 % more memory traffic.

``JAXBN_CPU_KERNEL`` (or ``with jaxbn.cpu_kernel.use(...)``) chooses: ``auto``
(default) uses the kernels where they are safe and fast, ``0`` never, ``1``
wherever they are available (tests use it to run them on a multi-device host).
``auto`` means: the CPU backend, and either a single device, a ``shard_map`` (or
``pmap``, built on it) whose mesh axes are all manual, or a program XLA's SPMD
partitioner splits (sharded ``jit``), where jaxbn/partitioning.py declares how
the kernels' work divides among devices (the partitioner itself does not know a
custom call and would gather its operands onto every device). Inside a partially
manual ``shard_map`` they are not used.
The kernels take float32 and bfloat16 x whose feature axes are contiguous: trailing
(NHWC: rows of C features), or followed by others (NCHW: slabs of H·W elements per
example and feature). Masks: none, or one constant along the features and every axis
after them, which leaves out whole rows (NHWC: per example, per position) or slabs
(NCHW: per example). Anything else goes to the XLA formulation.

``jax.export`` refuses custom calls that carry no compatibility guarantee:
evaluation-mode BatchNorm (no reductions) exports as is, but to export a training
computation traced on the CPU, trace it with ``JAXBN_CPU_KERNEL=0`` or inside
``with jaxbn.cpu_kernel.use("0"):``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import partitioning

__all__ = ["available", "build_error", "mode", "use", "moments", "masked_moments", "dy_sums", "usable"]

_SOURCE = Path(__file__).parent / "csrc" / "batch_norm_cpu.cc"
_TARGETS = {"jaxbn_moments": "JaxbnMoments", "jaxbn_masked_moments": "JaxbnMaskedMoments",
            "jaxbn_dy_sums": "JaxbnDySums", "jaxbn_slab_moments": "JaxbnSlabMoments",
            "jaxbn_slab_dy_sums": "JaxbnSlabDySums", "jaxbn_masked_slab_moments": "JaxbnMaskedSlabMoments"}
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]
_build_error: Optional[str] = None
_MODES = ("auto", "0", "1")
_override: Optional[str] = None


def mode() -> str:
    """``'auto'``, ``'0'`` or ``'1'``: `use`'s setting, else ``$JAXBN_CPU_KERNEL``, else auto."""
    m = _override if _override is not None else os.environ.get("JAXBN_CPU_KERNEL", "auto").strip().lower()
    if m not in _MODES:
        raise ValueError(f"JAXBN_CPU_KERNEL must be one of {_MODES}, got {m!r}")
    return m


@contextlib.contextmanager
def use(setting: str):
    """Within the block, functions *traced* use this setting (``'auto'``, ``'0'``, ``'1'``).

    The choice is made at trace time: a function jitted before keeps its program.
    """
    global _override
    if setting not in _MODES:
        raise ValueError(f"setting must be one of {_MODES}, got {setting!r}")
    old, _override = _override, setting
    try:
        yield
    finally:
        _override = old


def _cache_dir() -> Path:
    d = os.environ.get("JAXBN_CACHE_DIR")
    if d:
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxbn"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def _compile() -> Path:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    import jaxlib

    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), jaxlib.__version__, version, _cpu_id(), " ".join(_FLAGS)]).encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"batch_norm_cpu-{key}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError:  # e.g. a read-only home: build for this process only
        out = Path(tempfile.mkdtemp(prefix="jaxbn-")) / out.name
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders never load a partial file
    return out


@functools.cache
def _load() -> bool:
    global _build_error
    try:
        lib = ctypes.cdll.LoadLibrary(str(_compile()))
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


def _unpartitioned() -> bool:
    if jax.device_count() == 1:
        return True
    mesh = jax.sharding.get_abstract_mesh()
    return bool(mesh.axis_names) and all(
        t == jax.sharding.AxisType.Manual for t in mesh.axis_types
    )


def _contiguous(feature_axes, ndim: int) -> Optional[tuple]:
    f = sorted(a % ndim for a in feature_axes)
    return tuple(f) if f and f == list(range(f[0], f[0] + len(f))) else None


def usable(x: jax.Array, feature_axes: tuple) -> bool:
    """Whether to use the kernels for x with these feature axes (contiguous)."""
    m = mode()
    if m == "0" or jax.default_backend() != "cpu":
        return False
    if x.dtype not in (jnp.float32, jnp.bfloat16) or x.ndim == 0:
        return False
    if _contiguous(feature_axes, x.ndim) is None or x.size == 0:
        return False
    if m == "auto" and not (_unpartitioned() or partitioning.active()):
        return False  # a partially manual shard_map: the XLA formulation
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


# The custom calls have JVP rules in plain jnp (linear in the tangents, so reverse
# mode transposes them): jaxbn.moments stays differentiable, and so does the
# training layer's backward (grad of grad, e.g. gradient penalties).


def _call(name, c, *args):
    out = jax.ShapeDtypeStruct((c,), jnp.float32)
    return tuple(jax.ffi.ffi_call(name, (out, out), vmap_method="broadcast_all")(*args))


def moments_tangents(x, mean, t, red):
    """Tangents of (mean, M2) over axes `red` (`mean` broadcastable against x):
    mean = Σx/n, M2 = Σ(x - mean)²:  d mean = Σdx/n,  d M2 = 2·Σ(x - mean)·dx  (as Σ(x - mean) = 0)."""
    dt = mean.dtype
    n = max(int(np.prod([x.shape[a] for a in red], dtype=np.int64)), 1)
    t = t.astype(dt)
    return jnp.sum(t, red) / n, 2 * jnp.sum((x.astype(dt) - mean) * t, red)


def dy_sums_tangents(x, dy, mean, s1, tx, tdy, tm, red):
    """Tangents of (S1, S2) = (Σdy, Σdy·(x - μ)) over axes `red` (`mean` broadcastable
    against x; `tm`, its tangent, and `s1` feature-shaped):
    dS1 = Σd(dy),  dS2 = Σd(dy)·(x - μ) + Σdy·dx - dμ·S1."""
    f32 = jnp.float32
    tdy = tdy.astype(f32)
    ds1 = jnp.sum(tdy, red)
    ds2 = jnp.sum(tdy * (x.astype(f32) - mean), red) + jnp.sum(dy.astype(f32) * tx.astype(f32), red) - tm * s1
    return ds1, ds2


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
_DY_SUMS = {2: _dy_sums_kernel("jaxbn_dy_sums"), 3: _dy_sums_kernel("jaxbn_slab_dy_sums")}


def moments(x: jax.Array, feature_axes):
    """(mean, M2) over all but the (contiguous) `feature_axes` of x, float32, one sweep."""
    v, fs = _view(x, feature_axes)
    mean, m2 = _MOMENTS[v.ndim](v)
    return mean.reshape(fs), m2.reshape(fs)


def _masked_moments_kernel(target: str):
    """(v, keep) -> (mean, M2) per feature over the rows or slabs (axis 0 of the view)
    that `keep` keeps, with its JVP rule."""

    @jax.custom_jvp
    def op(v, keep):
        return _call(target, v.shape[1], v, keep)

    @op.defjvp
    def _jvp(primals, tangents):
        # Over the kept entries K (n of them): d mean = Σ_K t / n,  d M2 = 2·Σ_K (x - mean)·t.
        (v, keep), (t, _) = primals, tangents
        mean, m2 = op(v, keep)
        k = jnp.reshape(keep, keep.shape + (1,) * (v.ndim - 1))
        n = jnp.maximum(jnp.sum(keep, dtype=jnp.float32) * math.prod(v.shape[2:]), 1)
        t = jnp.where(k, t.astype(jnp.float32), 0)
        xc = jnp.where(k, v.astype(jnp.float32) - _col(mean, v), 0)
        return (mean, m2), (jnp.sum(t, _red(v)) / n, 2 * jnp.sum(xc * t, _red(v)))

    return op


_MASKED_MOMENTS = {2: _masked_moments_kernel("jaxbn_masked_moments"),
                   3: _masked_moments_kernel("jaxbn_masked_slab_moments")}


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
