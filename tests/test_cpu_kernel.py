"""The one-sweep CPU kernels (jaxbn/cpu_kernel.py) against the float64 oracle and the XLA path."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import _hlo, cpu_kernel
from oracle import RTOL, np_batch_norm, np_moments, rel_err

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU kernels")


@pytest.fixture(scope="module", autouse=True)
def built():
    # With a compiler on the machine the kernels must build: a silent fallback would
    # leave every test below comparing the XLA path with itself.
    with cpu_kernel.use("1"):
        ok = cpu_kernel.available()
    if not ok:
        if shutil.which(os.environ.get("CXX") or "c++") is None:
            pytest.skip("no C++ compiler")
        pytest.fail(f"CPU kernels failed to build: {cpu_kernel.build_error()}")


def _data(shape, mean, std, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.normal(size=shape) * std + mean).astype(np.float32), dtype)


_moments = jax.jit(lambda x: cpu_kernel.moments(x, (-1,)))
_dy_sums = jax.jit(lambda x, dy, m: cpu_kernel.dy_sums(x, dy, m, (-1,)))

SHAPES = {
    "blocks": (64, 7, 5, 24),  # 2240 rows of 24: many 64-row blocks, one chunk
    "chunks": (40, 32, 32, 8),  # 327680 elements: several chunks across threads
    "narrow_ragged": (37, 3, 16),  # 8 channels at a time; 111 rows = 64 + 47 (odd remainders)
    "one_channel": (300, 1),
    "wide": (5, 3, 700),  # 8-row blocks; 700 = 87·8 + 4 channels
    "c40": (3, 50, 40),  # rows of 5 and 8 vectors: sums held in registers
    "c64": (4, 9, 7, 64),
    "tiny": (2, 3),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(SHAPES))
def test_kernels_match_float64_oracle(name, dtype):
    # Mean 1e4 with std 1: E[x²] - E[x]² would lose every digit of the variance.
    shape = SHAPES[name]
    x = _data(shape, 1e4 if dtype == jnp.float32 else 50.0, 1.0, 0, dtype)
    dy = _data(shape, 0.5, 1.0, 1, dtype)
    xd = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, shape[-1])  # the values seen
    gd = np.asarray(dy.astype(jnp.float32), np.float64).reshape(-1, shape[-1])
    mean, m2 = _moments(x)
    mean_ref, var_ref, n = np_moments(xd)
    assert mean.dtype == m2.dtype == jnp.float32 and mean.shape == (shape[-1],)
    assert rel_err(mean, mean_ref) < 1e-7
    assert rel_err(m2, var_ref * n) < 1e-6
    s1, s2 = _dy_sums(x, dy, mean)
    assert rel_err(s1, gd.sum(0)) < 1e-6
    s2_ref = (gd * (xd - np.asarray(mean, np.float64))).sum(0)
    assert np.abs(np.asarray(s2, np.float64) - s2_ref).max() < 1e-6 * np.abs(gd * (xd - mean_ref)).sum(0).max()


def test_kernel_results_do_not_depend_on_thread_timing():
    # Chunks are fixed by the shape and merged in order: bitwise the same every call.
    x = _data(SHAPES["chunks"], 3.0, 2.0, 16)
    dy = _data(SHAPES["chunks"], 0.0, 1.0, 17)
    first = jax.tree.map(np.asarray, (_moments(x), _dy_sums(x, dy, _moments(x)[0])))
    for _ in range(3):
        again = jax.tree.map(np.asarray, (_moments(x), _dy_sums(x, dy, _moments(x)[0])))
        jax.tree.map(np.testing.assert_array_equal, again, first)


def test_kernels_under_vmap_reduce_each_group():
    x = _data((3, 10, 5, 4), 2.0, 1.5, 2)
    mean, m2 = jax.vmap(lambda x: cpu_kernel.moments(x, (-1,)))(x)
    xd = np.asarray(x, np.float64).reshape(3, -1, 4)
    assert rel_err(mean, xd.mean(1)) < 1e-6
    assert rel_err(m2, xd.var(1) * 50) < 1e-6


_masked_moments = jax.jit(lambda x, keep: cpu_kernel.masked_moments(x, keep, (-1,)))


def _keep(rows_shape, seed):
    """~60 % of rows kept; the first 130 rows (two whole 64-row blocks and a part of a
    third, where there are that many) left out, and one row kept for sure."""
    keep = np.random.default_rng(seed).uniform(size=rows_shape) < 0.6
    flat = keep.reshape(-1)
    flat[: min(130, flat.size - 1)] = False
    flat[-1] = True
    return keep


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["blocks", "chunks", "narrow_ragged", "one_channel", "wide"])
def test_masked_kernel_matches_float64_oracle(name, dtype):
    # Rows left out hold NaN, inf and huge values: the kernel must never read them.
    shape = SHAPES[name]
    keep = _keep(shape[:-1], 30)
    x = _data(shape, 1e4 if dtype == jnp.float32 else 50.0, 1.0, 31, dtype)
    junk = np.random.default_rng(32).choice([np.nan, np.inf, -np.inf, 1e30], size=shape)
    bad = jnp.where(keep[..., None], x, jnp.asarray(junk, dtype))
    xd = np.asarray(x.astype(jnp.float32), np.float64)
    mean_ref, var_ref, n = np_moments(xd, keep[..., None])
    mean, m2 = _masked_moments(bad, jnp.asarray(keep))
    assert mean.dtype == m2.dtype == jnp.float32 and mean.shape == (shape[-1],)
    assert rel_err(mean, mean_ref) < 1e-7
    assert rel_err(m2, var_ref * n) < 1e-6
    # Every row kept: the unmasked kernel's results, bitwise; none kept: zeros.
    full = jax.tree.map(np.asarray, _masked_moments(x, jnp.ones(shape[:-1], bool)))
    jax.tree.map(np.testing.assert_array_equal, full, jax.tree.map(np.asarray, _moments(x)))
    for v in _masked_moments(bad, jnp.zeros(shape[:-1], bool)):
        np.testing.assert_array_equal(v, 0)


def test_masked_kernel_jvp_vmap_and_bad_keep():
    x, t = _data((3, 50, 8), 2.0, 1.5, 33), _data((3, 50, 8), 0.0, 1.0, 34)
    keep = jnp.asarray(_keep((3, 50), 35))

    def ref(x, k):  # group 0 keeps no row: mean = M2 = 0, as the kernel gives
        n = jnp.maximum(jnp.sum(k), 1)
        m = jnp.sum(jnp.where(k[:, None], x, 0), 0) / n
        return m, jnp.sum(jnp.where(k[:, None], (x - m) ** 2, 0), 0)

    got = jax.jvp(lambda x: cpu_kernel.masked_moments(x, keep[2], (-1,)), (x[2],), (t[2],))
    want = jax.jvp(lambda x: ref(x, keep[2]), (x[2],), (t[2],))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, b) < 1e-5
    per = jax.vmap(lambda x, k: cpu_kernel.masked_moments(x, k, (-1,)))(x, keep)
    for a, b in zip(per, jax.vmap(ref)(x, keep)):
        assert rel_err(a, b) < 1e-5
    with pytest.raises(ValueError, match=r"keep must be a boolean array of shape \(3, 50\)"):
        cpu_kernel.masked_moments(x, keep[0], (-1,))


@pytest.mark.parametrize("mask_shape", [(16, 1, 1, 1), (16, 6, 6, 1), (6, 1, 1)], ids=["example", "position", "spatial"])
def test_layer_with_row_mask_uses_the_kernel_and_equals_xla_path(mask_shape):
    shape = (16, 6, 6, 8)
    mask = np.random.default_rng(36).uniform(size=mask_shape) < 0.6
    mask.flat[0] = True
    x = _data(shape, 3.0, 2.0, 37)
    w = _data(shape, 0.0, 1.0, 38)
    p = {"scale": _data((8,), 1.0, 0.3, 39), "bias": _data((8,), 0.0, 1.0, 40)}
    f1, f0 = _layer("1", mask=mask), _layer("0", mask=mask)
    assert "jaxbn_masked_moments" in _hlo.custom_calls(_hlo.compiled_text(f1, x, p, w))
    (_, st1), g1 = f1(x, p, w)
    (_, st0), g0 = f0(x, p, w)
    for a, b in zip(jax.tree.leaves((st1, g1)), jax.tree.leaves((st0, g0))):
        assert rel_err(a, b) < RTOL["float32"]
    _, mean, var, _ = np_batch_norm(np.asarray(x, np.float64), p["scale"], p["bias"], mask)
    assert rel_err(st1.mean, 0.2 * mean) < RTOL["float32"] and rel_err(st1.var, 0.8 + 0.2 * var) < RTOL["float32"]


def test_mask_varying_along_features_uses_xla_statistics():
    mask = np.random.default_rng(41).uniform(size=(16, 1, 1, 8)) < 0.6
    x = _data((16, 3, 3, 8), 3.0, 2.0, 42)
    calls = _hlo.custom_calls(_hlo.compiled_text(_layer("1", mask=mask), x, jaxbn.init_params(8), x))
    assert "jaxbn_masked_moments" not in calls and "jaxbn_moments" not in calls and "jaxbn_dy_sums" in calls


def _layer(mode, axis=-1, dtype=None, mask=None):
    """jit(value_and_grad) of Σ w·y of a training BN layer traced with kernel `mode`."""

    def loss(x, p, w):
        with cpu_kernel.use(mode):
            y, st = jaxbn.batch_norm(x, p, jaxbn.init_state(p["scale"].shape), training=True, axis=axis,
                                     momentum=0.8, dtype=dtype, mask=mask)
        return jnp.sum(w * y.astype(jnp.float32)), st

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_with_kernels_equals_xla_path_and_oracle(dtype, layout):
    # NHWC: the row kernels; NCHW (axis=1): the slab kernels.
    shape, axis, prefix = ((16, 6, 6, 8), -1, "jaxbn_") if layout == "nhwc" else ((6, 8, 5, 5), 1, "jaxbn_slab_")
    x = _data(shape, 3.0, 2.0, 3, dtype)
    w = _data(shape, 0.0, 1.0, 4)
    p = {"scale": _data((8,), 1.0, 0.3, 5), "bias": _data((8,), 0.0, 1.0, 6)}
    f1, f0 = _layer("1", axis=axis), _layer("0", axis=axis)
    calls1 = _hlo.custom_calls(_hlo.compiled_text(f1, x, p, w))
    assert f"{prefix}moments" in calls1 and f"{prefix}dy_sums" in calls1
    assert not _hlo.custom_calls(_hlo.compiled_text(f0, x, p, w), "jaxbn_")
    (_, st1), g1 = f1(x, p, w)
    (_, st0), g0 = f0(x, p, w)
    tol = RTOL["float32"]  # statistics and gradients are float32 for both dtypes
    for a, b in zip(jax.tree.leaves((st1, g1)), jax.tree.leaves((st0, g0))):
        assert rel_err(np.asarray(a, np.float32), np.asarray(b, np.float32)) < tol
    xd = np.asarray(x.astype(jnp.float32), np.float64)
    _, mean, var, _ = np_batch_norm(xd, p["scale"], p["bias"], feature_axes=(axis,))
    assert rel_err(st1.mean, 0.2 * mean) < tol and rel_err(st1.var, 0.8 + 0.2 * var) < tol


def test_kernel_jvps_match_the_math():
    # The JVP rules against jax.jvp of the same sums written in jnp, random tangents.
    x, dy = _data((50, 8), 2.0, 1.5, 24), _data((50, 8), 0.5, 1.0, 25)
    mean = _data((8,), 2.0, 0.1, 26)
    tx, tdy, tm = _data((50, 8), 0.0, 1.0, 27), _data((50, 8), 0.0, 1.0, 28), _data((8,), 0.0, 1.0, 29)

    def moments_ref(x):
        m = jnp.mean(x, 0)
        return m, jnp.sum((x - m) ** 2, 0)

    def dy_sums_ref(x, dy, mean):
        return jnp.sum(dy, 0), jnp.sum(dy * (x - mean), 0)

    got = jax.jvp(lambda x: cpu_kernel.moments(x, (-1,)), (x,), (tx,))
    want = jax.jvp(moments_ref, (x,), (tx,))
    got2 = jax.jvp(lambda *a: cpu_kernel.dy_sums(*a, (-1,)), (x, dy, mean), (tx, tdy, tm))
    want2 = jax.jvp(dy_sums_ref, (x, dy, mean), (tx, tdy, tm))
    for a, b in zip(jax.tree.leaves((got, got2)), jax.tree.leaves((want, want2))):
        assert rel_err(a, b) < 1e-5


def test_kernels_are_differentiable_like_the_xla_path():
    # jax.grad of jaxbn.moments, and grad of grad through the training layer (whose
    # backward calls jaxbn_dy_sums), as with the XLA formulation.
    x = _data((6, 5, 8), 2.0, 1.5, 20)
    w = _data((6, 5, 8), 0.0, 1.0, 21)
    p = {"scale": _data((8,), 1.0, 0.3, 22), "bias": _data((8,), 0.0, 1.0, 23)}

    def stats_loss(x):
        m = jaxbn.moments(x)
        return jnp.sum(m.mean ** 3 + m.var * w[0, 0])

    def penalty(x, p):  # ||d/dx Σ w·y||², differentiated again w.r.t. x and the parameters
        g = jax.grad(lambda x: jnp.sum(w * jaxbn.batch_norm(x, p, jaxbn.init_state(8), training=True)[0] ** 2))(x)
        return jnp.sum(g ** 2)

    out = {}
    for mode in ("1", "0"):
        with cpu_kernel.use(mode):
            f1 = jax.jit(jax.grad(stats_loss))
            f2 = jax.jit(jax.grad(penalty, argnums=(0, 1)))
            assert bool(_hlo.custom_calls(_hlo.compiled_text(f2, x, p), "jaxbn_")) == (mode == "1")
            out[mode] = (f1(x), f2(x, p))
    for a, b in zip(jax.tree.leaves(out["1"]), jax.tree.leaves(out["0"])):
        assert rel_err(a, b) < 1e-4


def test_mixed_dtype_backward_falls_back_and_stays_right():
    # bf16 x with a float32 output: dy is float32, which the kernel does not take.
    shape = (8, 4, 4, 8)
    x = _data(shape, 1.0, 2.0, 7, jnp.bfloat16)
    w = _data(shape, 0.0, 1.0, 8)
    p = {"scale": _data((8,), 1.0, 0.3, 9), "bias": _data((8,), 0.0, 1.0, 10)}
    (_, _), g1 = _layer("1", dtype=jnp.float32)(x, p, w)
    (_, _), g0 = _layer("0", dtype=jnp.float32)(x, p, w)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert rel_err(np.asarray(a, np.float32), np.asarray(b, np.float32)) < 1e-2  # bf16 dx


SLAB_SHAPES = {  # (shape, feature axes): features followed by other axes (slabs)
    "nchw": ((6, 8, 9, 7), (1,)),
    "long_slabs": ((3, 5, 4100), (1,)),  # S > 512: nine blocks per slab, the last ragged
    "two_feature_axes": ((2, 3, 4, 5, 6), (1, 2)),
    "leading_features": ((8, 30, 2), (0,)),  # A = 1
    "one_channel": ((7, 1, 13), (1,)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(SLAB_SHAPES))
def test_slab_kernels_match_float64_oracle(name, dtype):
    shape, feat = SLAB_SHAPES[name]
    x = _data(shape, 1e4 if dtype == jnp.float32 else 50.0, 1.0, 50, dtype)
    dy = _data(shape, 0.5, 1.0, 51, dtype)
    xd = np.asarray(x.astype(jnp.float32), np.float64)
    gd = np.asarray(dy.astype(jnp.float32), np.float64)
    red = tuple(a for a in range(len(shape)) if a not in feat)
    bshape = tuple(shape[a] if a in feat else 1 for a in range(len(shape)))
    with cpu_kernel.use("1"):
        calls = _hlo.custom_calls(_hlo.compiled_text(jax.jit(lambda x: cpu_kernel.moments(x, feat)), x))
        mean, m2 = jax.jit(lambda x: cpu_kernel.moments(x, feat))(x)
        s1, s2 = jax.jit(lambda x, dy, m: cpu_kernel.dy_sums(x, dy, m, feat))(x, dy, mean)
    assert "jaxbn_slab_moments" in calls
    mean_ref, var_ref, n = np_moments(xd, feature_axes=feat)
    assert mean.shape == m2.shape == s1.shape == tuple(shape[a] for a in feat)
    assert rel_err(mean, mean_ref) < 1e-7
    assert rel_err(m2, var_ref * n) < 1e-6
    assert rel_err(s1, gd.sum(red)) < 1e-6
    xc = xd - np.asarray(mean, np.float64).reshape(bshape)
    s2_ref = (gd * xc).sum(red)
    assert np.abs(np.asarray(s2, np.float64) - s2_ref).max() < 1e-6 * np.abs(gd * xc).sum(red).max()


def test_slab_kernel_jvps_and_vmap():
    x, dy = _data((5, 4, 3, 7), 2.0, 1.5, 52), _data((5, 4, 3, 7), 0.5, 1.0, 53)
    mean = _data((4,), 2.0, 0.1, 54)
    tx, tdy, tm = _data((5, 4, 3, 7), 0.0, 1.0, 55), _data((5, 4, 3, 7), 0.0, 1.0, 56), _data((4,), 0.0, 1.0, 57)
    r = (0, 2, 3)

    def moments_ref(x):
        m = jnp.mean(x, r)
        return m, jnp.sum((x - m[:, None, None]) ** 2, r)

    def dy_sums_ref(x, dy, mean):
        return jnp.sum(dy, r), jnp.sum(dy * (x - mean[:, None, None]), r)

    got = jax.jvp(lambda x: cpu_kernel.moments(x, (1,)), (x,), (tx,))
    want = jax.jvp(moments_ref, (x,), (tx,))
    got2 = jax.jvp(lambda *a: cpu_kernel.dy_sums(*a, (1,)), (x, dy, mean), (tx, tdy, tm))
    want2 = jax.jvp(dy_sums_ref, (x, dy, mean), (tx, tdy, tm))
    per = jax.vmap(lambda x: cpu_kernel.moments(x, (0,)))(x)  # each example's (4, 3, 7) slabs
    want3 = jax.vmap(lambda x: (jnp.mean(x, (1, 2)), jnp.sum((x - jnp.mean(x, (1, 2))[:, None, None]) ** 2, (1, 2))))(x)
    for a, b in zip(jax.tree.leaves((got, got2, per)), jax.tree.leaves((want, want2, want3))):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["nchw", "long_slabs", "two_feature_axes"])
def test_masked_slab_kernel_matches_float64_oracle(name, dtype):
    # keep over the axes before the features (NCHW: per example); left-out slabs hold junk.
    shape, feat = SLAB_SHAPES[name]
    lead = shape[: feat[0]]
    keep = np.random.default_rng(62).uniform(size=lead) < 0.6
    keep.flat[0], keep.flat[-1] = False, True
    x = _data(shape, 1e4 if dtype == jnp.float32 else 50.0, 1.0, 63, dtype)
    kb = keep.reshape(lead + (1,) * (len(shape) - len(lead)))
    junk = np.random.default_rng(64).choice([np.nan, np.inf, -np.inf, 1e30], size=shape)
    bad = jnp.where(kb, x, jnp.asarray(junk, dtype))
    with cpu_kernel.use("1"):
        mean, m2 = jax.jit(lambda x, k: cpu_kernel.masked_moments(x, k, feat))(bad, jnp.asarray(keep))
        per = jax.vmap(lambda x, k: cpu_kernel.masked_moments(x, k, tuple(a - 1 for a in feat)))(bad, jnp.asarray(keep))
    mean_ref, var_ref, n = np_moments(np.asarray(x.astype(jnp.float32), np.float64), kb, feat)
    assert rel_err(mean, mean_ref) < 1e-7 and rel_err(m2, var_ref * n) < 1e-6
    for i in range(lead[0]):  # vmap over the leading axis: each entry's own statistics (zeros when left out)
        if keep[i].any():
            mi, vi, ni = np_moments(np.asarray(x[i].astype(jnp.float32), np.float64), kb[i], tuple(a - 1 for a in feat))
            assert rel_err(per[0][i], mi) < 1e-6 and rel_err(per[1][i], vi * ni) < 1e-5
        else:
            np.testing.assert_array_equal(per[0][i], 0)


def test_masked_slab_kernel_jvp():
    x, t = _data((6, 4, 3, 7), 2.0, 1.5, 65), _data((6, 4, 3, 7), 0.0, 1.0, 66)
    keep = jnp.asarray([True, False, True, True, False, True])
    kb = keep[:, None, None, None]

    def ref(x):
        n = jnp.sum(keep) * 21
        m = jnp.sum(jnp.where(kb, x, 0), (0, 2, 3)) / n
        return m, jnp.sum(jnp.where(kb, (x - m[:, None, None]) ** 2, 0), (0, 2, 3))

    got = jax.jvp(lambda x: cpu_kernel.masked_moments(x, keep, (1,)), (x,), (t,))
    want = jax.jvp(ref, (x,), (t,))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, b) < 1e-5


def test_which_masks_and_layouts_use_which_kernels():
    x = _data((4, 8, 3, 3), 1.0, 2.0, 11)
    p8 = jaxbn.init_params(8)

    def targets(axis, mask, p=p8):
        calls = _hlo.custom_calls(_hlo.compiled_text(_layer("1", axis=axis, mask=mask), x, p, x))
        return {t for t in ("moments", "masked_moments", "slab_moments", "masked_slab_moments",
                            "dy_sums", "slab_dy_sums") if f"jaxbn_{t}" in calls}

    assert targets((1, 3), None, jaxbn.init_params((8, 3))) == set()  # not contiguous: XLA
    per_example = np.arange(4).reshape(4, 1, 1, 1) < 3
    assert targets(1, per_example) == {"masked_slab_moments", "slab_dy_sums"}
    per_position = np.random.default_rng(67).uniform(size=(4, 1, 3, 3)) < 0.5
    assert targets(1, per_position) == {"slab_dy_sums"}  # varies along H, W: XLA statistics
    nhwc_per_position = np.random.default_rng(68).uniform(size=(4, 8, 3, 1)) < 0.5  # x as NHWC with C = 3
    assert targets(-1, nhwc_per_position, jaxbn.init_params(3)) == {"masked_moments", "dy_sums"}


def _mesh():
    return jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def test_auto_uses_kernels_in_shard_map_and_sharded_jit(ndev):
    x = _data((16, 4, 4, 8), 2.0, 1.5, 12)
    p = {"scale": _data((8,), 1.0, 0.3, 13), "bias": _data((8,), 0.0, 1.0, 14)}

    def body(x, p):
        with cpu_kernel.use("auto"):
            y, st = jaxbn.batch_norm(x, p, jaxbn.init_state(8), training=True, axis_name="d", momentum=0.0)
        g = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, p, jaxbn.init_state(8), training=True,
                                                        axis_name="d")[0] ** 3))(x)
        return y, st.mean, st.var, g

    sm = jax.jit(jax.shard_map(body, mesh=_mesh(), in_specs=(P("d"), P()), out_specs=(P("d"), P(), P(), P("d"))))
    assert "jaxbn_moments" in _hlo.custom_calls(_hlo.compiled_text(sm, x, p))
    y, mean, var, _ = sm(x, p)
    y_ref, m_ref, v_ref, _ = np_batch_norm(np.asarray(x), p["scale"], p["bias"])
    assert rel_err(y, y_ref) < RTOL["float32"]
    assert rel_err(mean, m_ref) < RTOL["float32"] and rel_err(var, v_ref) < RTOL["float32"]

    def plain(x, p):
        with cpu_kernel.use("auto"):
            return jaxbn.batch_norm(x, p, jaxbn.init_state(8), training=True)[0]

    sharding = jax.sharding.NamedSharding(_mesh(), P("d"))
    hlo = _hlo.compiled_text(jax.jit(plain), jax.device_put(x, sharding), p)
    # Declared per-device work (jaxbn/backends/spmd.py): no operand gathered onto every device.
    assert "jaxbn_moments" in _hlo.custom_calls(hlo) and _hlo.collectives(hlo)["all-gather"] == 0


def test_auto_uses_kernels_under_pmap(ndev):
    x = _data((8, 4, 3, 3, 8), 2.0, 1.5, 18)

    def f(x):
        with cpu_kernel.use("auto"):
            return jaxbn.batch_norm(x, None, jaxbn.init_state(8), training=True, axis_name="b")[0]

    pf = jax.pmap(f, axis_name="b")
    assert "jaxbn_moments" in _hlo.custom_calls(_hlo.compiled_text(pf, x))
    y_ref = np_batch_norm(np.asarray(x).reshape(-1, 8), np.ones(8), np.zeros(8))[0]
    assert rel_err(np.asarray(pf(x)).reshape(-1, 8), y_ref) < RTOL["float32"]


def test_kernel_statistics_stay_per_device_under_shard_map_checks(ndev):
    # A custom call's results are typed replicated; jaxbn types them like x, so
    # forgetting axis_name is still caught by out_specs=P().
    x = _data((16, 4, 4, 8), 2.0, 1.5, 15)

    def body(x):
        with cpu_kernel.use("1"):
            return jaxbn.batch_norm(x, jaxbn.init_params(8), jaxbn.init_state(8), training=True)[1].mean

    f = jax.shard_map(body, mesh=_mesh(), in_specs=P("d"), out_specs=P())
    with pytest.raises(Exception, match="(?i)vary|varying|replicat"):
        jax.jit(f)(x)


def test_export_evaluation_always_and_training_with_kernels_off():
    # jax.export refuses custom calls without compatibility guarantees. Inference
    # (training=False) has no reductions, so it never contains one; exporting a
    # training step on the CPU needs the kernels off.
    x = _data((8, 4), 1.0, 2.0, 19)

    def layer(training):
        return jax.jit(lambda x: jaxbn.batch_norm(x, None, jaxbn.init_state(4), training=training)[0])

    with cpu_kernel.use("1"):
        jax.export.export(layer(False))(x)
        with pytest.raises(ValueError, match="jaxbn_moments"):
            jax.export.export(layer(True))(x)
    with cpu_kernel.use("0"):
        exp = jax.export.export(layer(True))(x)
    y_ref = np_batch_norm(np.asarray(x), np.ones(4), np.zeros(4))[0]
    assert rel_err(exp.call(x), y_ref) < RTOL["float32"]


def test_bad_setting_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="setting must be one of"):
        with cpu_kernel.use("on"):
            pass
    monkeypatch.setenv("JAXBN_CPU_KERNEL", "yes")
    with pytest.raises(ValueError, match="JAXBN_CPU_KERNEL must be one of .*'yes'"):
        cpu_kernel.mode()


def test_without_a_compiler_jaxbn_warns_and_uses_xla(tmp_path):
    code = (
        "import warnings, numpy as np, jax, jaxbn\n"
        "x = np.random.default_rng(0).normal(3, 2, (32, 8)).astype(np.float32)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y, st = jax.jit(lambda x: jaxbn.batch_norm(x, None, jaxbn.init_state(8), training=True))(x)\n"
        "assert any('CPU kernels unavailable' in str(m.message) for m in w), [str(m.message) for m in w]\n"
        "assert jaxbn.cpu_kernel.build_error() and 'compiler' in jaxbn.cpu_kernel.build_error()\n"
        "np.testing.assert_allclose(np.asarray(y).std(0), 1, rtol=1e-4)\n"
    )
    env = {**os.environ, "JAXBN_CPU_KERNEL": "1", "JAXBN_CACHE_DIR": str(tmp_path), "CXX": "",
           "PATH": str(tmp_path), "XLA_FLAGS": ""}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_kernels_are_chosen_by_the_platform_the_program_is_lowered_for():
    """Traced on this CPU host with the kernels forced on, a program lowered (or exported)
    for a GPU carries no CPU custom call; lowered for the CPU, it has the kernels."""
    x = _data((8, 4, 4, 16), 1.0, 2.0, 23)
    p = jaxbn.init_params(16)
    f = jax.jit(jax.grad(lambda x, p: jnp.sum(jaxbn.batch_norm(x, p, jaxbn.init_state(16), training=True)[0] ** 2),
                         argnums=(0, 1)))
    with cpu_kernel.use("1"):
        cpu = f.trace(x, p).lower(lowering_platforms=("cpu",)).as_text()
        for plats in (("cuda",), ("tpu",)):
            text = f.trace(x, p).lower(lowering_platforms=plats).as_text()
            assert "jaxbn_" not in text, plats
        exp = jax.export.export(f, platforms=("cuda",))(x, p)
    assert "jaxbn_moments" in cpu and "jaxbn_dy_sums" in cpu
    assert exp.platforms == ("cuda",)


def test_use_is_part_of_the_jit_cache_key_so_export_works_without_kernels(built):
    """A step jitted with the kernels is traced again inside ``use("0")``: its program has no
    custom call there, and jax.export (which refuses custom calls) takes it."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 4, 4, 16)) + 1, jnp.float32)
    p = {"scale": jnp.full((16,), 1.5), "bias": jnp.full((16,), 0.5)}

    def step(x, p):
        def loss(x, p):
            y, st = jaxbn.batch_norm(x, p, jaxbn.init_state(16), training=True)
            return jnp.sum(y * y), st

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, p)

    f = jax.jit(step)
    with cpu_kernel.use("1"):
        outside = f(x, p)
        assert _hlo.custom_calls(f.lower(x, p).compile().as_text(), "jaxbn_")
    with cpu_kernel.use("0"):
        assert not _hlo.custom_calls(f.lower(x, p).compile().as_text(), "jaxbn_")
        inside = f(x, p)
        exp = jax.export.export(f, platforms=("cpu",))(x, p)
    np.testing.assert_allclose(exp.call(x, p)[1][0], outside[1][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(inside[1][0], outside[1][0], rtol=1e-5, atol=1e-5)
