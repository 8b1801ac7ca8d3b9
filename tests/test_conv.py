"""jaxbn.conv.conv_general_dilated: lax's convolution, im2col on the CPU for narrow patches.

Oracle: a float64 NumPy convolution (and its exact gradients, written out);
lax.conv_general_dilated where both are float32. The im2col path must be taken
where promised (no convolution in the CPU program) and nowhere else (lowered for
a GPU the program keeps lax's convolution).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxbn import conv as bn_conv
from jaxbn import models, models_nnx

DN = ("NHWC", "HWIO", "NHWC")


def np_pads(x_shape, k_shape, strides, padding):
    if isinstance(padding, str):
        return lax.padtype_to_pads(x_shape[1:3], k_shape[:2], strides, padding)
    return padding


def np_conv(x, k, strides, padding):
    """float64 y[n,i,j,o] = Σ x_pad[n, i·s+a, j·s+b, c] k[a,b,c,o]."""
    (pt, pb), (pl, pr) = np_pads(x.shape, k.shape, strides, padding)
    xp = np.pad(np.float64(x), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw = k.shape[:2]
    sh, sw = strides
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], ho, wo, k.shape[3]))
    for a in range(kh):
        for b in range(kw):
            y += np.einsum("nhwc,co->nhwo", xp[:, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw],
                           np.float64(k[a, b]))
    return y


def np_conv_grads(x, k, g, strides, padding):
    """float64 gradients of Σ g·conv(x, k) with respect to x and k."""
    (pt, pb), (pl, pr) = np_pads(x.shape, k.shape, strides, padding)
    xp = np.pad(np.float64(x), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    dxp = np.zeros_like(xp)
    dk = np.zeros(k.shape)
    kh, kw = k.shape[:2]
    sh, sw = strides
    ho, wo = g.shape[1:3]
    g = np.float64(g)
    for a in range(kh):
        for b in range(kw):
            sl = (slice(None), slice(a, a + sh * (ho - 1) + 1, sh), slice(b, b + sw * (wo - 1) + 1, sw))
            dk[a, b] = np.einsum("nhwc,nhwo->co", xp[sl], g)
            dxp[sl] += np.einsum("nhwo,co->nhwc", g, np.float64(k[a, b]))
    return dxp[:, pt:pt + x.shape[1], pl:pl + x.shape[2]], dk


CASES = [  # (input shape, kernel shape, strides, padding)
    ((4, 10, 9, 1), (3, 3, 1, 8), (1, 1), "VALID"),  # the article's CNN's first layer
    ((3, 9, 9, 3), (3, 3, 3, 5), (1, 1), "SAME"),  # ResNet's stem
    ((3, 9, 8, 3), (3, 3, 3, 4), (2, 2), "SAME"),
    ((2, 7, 7, 2), (3, 3, 2, 4), (2, 1), ((2, 0), (1, 1))),
    ((2, 6, 6, 4), (1, 1, 4, 3), (2, 2), "VALID"),
    ((2, 8, 8, 1), (5, 5, 1, 3), (1, 1), ((1, 2), (0, 0))),
]


@functools.lru_cache(maxsize=None)
def _compiled(k_shape, strides, padding, which):
    conv = bn_conv.conv_general_dilated if which == "jaxbn" else lax.conv_general_dilated

    def f(x, k, g):
        def loss(x, k):
            return jnp.sum(g * conv(x, k, strides, padding, dimension_numbers=DN))
        return conv(x, k, strides, padding, dimension_numbers=DN), jax.grad(loss, (0, 1))(x, k)

    return jax.jit(f)


def _hashable(p):
    return p if isinstance(p, str) else tuple(tuple(q) for q in p)


@pytest.mark.parametrize("x_shape,k_shape,strides,padding", CASES)
def test_values_and_gradients_match_a_float64_convolution(x_shape, k_shape, strides, padding):
    rng = np.random.default_rng(sum(x_shape) + sum(k_shape))
    x = rng.normal(size=x_shape).astype(np.float32)
    k = rng.normal(size=k_shape).astype(np.float32)
    want = np_conv(x, k, strides, padding)
    g = rng.normal(size=want.shape).astype(np.float32)
    want_dx, want_dk = np_conv_grads(x, k, g, strides, padding)
    assert bn_conv.patches_apply(x, k, strides, padding, DN)
    y, (dx, dk) = _compiled(k_shape, strides, _hashable(padding), "jaxbn")(x, k, g)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dk, want_dk, rtol=1e-5, atol=1e-4)
    ly, (ldx, ldk) = _compiled(k_shape, strides, _hashable(padding), "lax")(x, k, g)
    for a, b in ((y, ly), (dx, ldx), (dk, ldk)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def _program(fn, *args, platform=None):
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,) if platform else None)
    return lowered.as_text() if platform else lowered.compile().as_text()


def test_cpu_program_has_no_convolution_and_other_platforms_keep_lax():
    x = jnp.ones((2, 10, 10, 1))
    k = jnp.ones((3, 3, 1, 4))

    def step(x, k):
        return jax.grad(lambda k: jnp.sum(bn_conv.conv_general_dilated(x, k, (1, 1), "VALID",
                                                                       dimension_numbers=DN) ** 2))(k)

    cpu = _program(step, x, k)
    assert "convolution(" not in cpu and " dot(" in cpu.replace("%", "")
    gpu = _program(step, x, k, platform="cuda")
    assert "stablehlo.convolution" in gpu
    ref = _program(lambda x, k: jax.grad(lambda k: jnp.sum(lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=DN) ** 2))(k), x, k)
    assert "convolution(" in ref  # the check above can see a convolution


@pytest.mark.parametrize("x_shape,k_shape,kwargs", [
    ((2, 9, 9, 4), (3, 3, 4, 8), {}),  # 36 patch columns: wider than MAX_PATCH
    ((2, 9, 9, 1), (3, 3, 1, 4), dict(rhs_dilation=(2, 2))),
    ((2, 9, 9, 1), (3, 3, 1, 4), dict(lhs_dilation=(2, 2))),
    ((2, 9, 9, 2), (3, 3, 1, 4), dict(feature_group_count=2)),
    ((2, 1, 9, 9), (4, 1, 3, 3), dict(dimension_numbers=("NCHW", "OIHW", "NCHW"))),
])
def test_other_convolutions_are_lax_itself(x_shape, k_shape, kwargs):
    kwargs = {"dimension_numbers": DN, **kwargs}
    pads = ((1, 1), (0, 1))
    rng = np.random.default_rng(1)
    x = rng.normal(size=x_shape).astype(np.float32)
    k = rng.normal(size=k_shape).astype(np.float32)
    assert not bn_conv.patches_apply(x, k, (1, 1), pads, **kwargs)
    got = jax.jit(lambda x, k: bn_conv.conv_general_dilated(x, k, (1, 1), pads, **kwargs))(x, k)
    want = jax.jit(lambda x, k: lax.conv_general_dilated(x, k, (1, 1), pads, **kwargs))(x, k)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype,preferred", [(jnp.bfloat16, None), (jnp.bfloat16, jnp.float32),
                                              (jnp.float16, None)])
def test_dtypes_are_lax_s(dtype, preferred):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), dtype)
    k = jnp.asarray(rng.normal(size=(3, 3, 1, 4)), dtype)
    kw = dict(dimension_numbers=DN, preferred_element_type=preferred)
    got = bn_conv.conv_general_dilated(x, k, (1, 1), "VALID", **kw)
    want = lax.conv_general_dilated(x, k, (1, 1), "VALID", **kw)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.float32(got), np_conv(np.float32(x), np.float32(k), (1, 1), "VALID"),
                               rtol=2e-2, atol=5e-2)


def test_jvp_and_vmap():
    rng = np.random.default_rng(3)
    x, tx = (rng.normal(size=(3, 2, 8, 8, 1)).astype(np.float32) for _ in range(2))
    k, tk = (rng.normal(size=(3, 3, 1, 4)).astype(np.float32) for _ in range(2))

    def f(conv):
        return jax.jit(jax.vmap(lambda x, tx: jax.jvp(lambda x, k: conv(x, k, (1, 1), "SAME", dimension_numbers=DN),
                                                      (x, k), (tx, tk))))(x, tx)

    (y, t), (ly, lt) = f(bn_conv.conv_general_dilated), f(lax.conv_general_dilated)
    np.testing.assert_allclose(y, ly, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t, lt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[1], np_conv(x[1], k, (1, 1), "SAME"), rtol=1e-5, atol=1e-5)


def test_models_convolutions_compute_flax_s():
    """The CNN with jaxbn.conv: Flax Conv's variables, outputs and gradients; the NNX twin uses it too."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(4, 12, 12, 1)), jnp.float32)
    ours = models.CNN(num_classes=10)
    assert models._CONV is not nn.Conv  # the models do pass jaxbn.conv (this Flax has the field)
    saved = models._CONV
    models._CONV = nn.Conv
    try:
        flax_conv = models.CNN(num_classes=10)
        v = jax.jit(functools.partial(flax_conv.init, train=False))(jax.random.key(0), x)
    finally:
        models._CONV = saved
    jax.tree.map(np.testing.assert_array_equal, jax.jit(functools.partial(ours.init, train=False))(jax.random.key(0), x), v)

    def loss(params, model):
        out, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(out ** 2)

    got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(v["params"], ours)
    want = jax.jit(jax.value_and_grad(loss), static_argnums=1)(v["params"], flax_conv)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), got, want)
    cnn = models_nnx.CNN(rngs=nnx.Rngs(0))
    assert cnn.Conv_0.conv_general_dilated is bn_conv.conv_general_dilated
