"""Complex inputs (Flax's semantics): mean of x, variance of |x - mean|², complex
running mean, on one device and across devices, against a complex128 NumPy oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import jaxbn
from oracle import rel_err

NDEV = 8
SHAPE = (NDEV * 3, 4, 2)


@functools.lru_cache(maxsize=None)
def _data():
    rng = np.random.default_rng(21)
    x = (rng.normal(size=SHAPE) + 1j * rng.normal(size=SHAPE)) * [1.5, 0.5] + [2 - 1j, -3 + 0.5j]
    rows = rng.uniform(size=SHAPE[0]) < 0.6
    rows[:3] = False  # device 0 holds nothing valid
    rows[-1] = True
    mask = rows.reshape(-1, 1, 1)
    x = np.where(mask, x, np.nan + 1j * np.nan)  # left-out entries may hold anything
    return x.astype(np.complex64), mask


def _np_stats(x, mask):
    x = np.asarray(x, np.complex128)
    m = np.broadcast_to(mask, x.shape)
    n = m.sum((0, 1))
    mean = np.where(m, x, 0).sum((0, 1)) / n
    var = np.where(m, np.abs(x - mean) ** 2, 0).sum((0, 1)) / n
    return mean, var


def test_one_device_and_shard_map_equal_the_oracle(ndev):
    x, mask = _data()
    mean, var = _np_stats(x, mask)
    y_ref = (x.astype(np.complex128) - mean) / np.sqrt(var + 1e-5)
    state = jaxbn.init_state(2)

    def layer(x, mask, axis_name=None):
        return jaxbn.batch_norm(x, None, state, training=True, momentum=0.9, mask=mask, axis_name=axis_name)

    mesh = jax.make_mesh((NDEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sm = jax.shard_map(functools.partial(layer, axis_name="d"), mesh=mesh, in_specs=(P("d"), P("d")),
                       out_specs=(P("d"), P()))
    for y, st in (jax.jit(layer)(x, mask), jax.jit(sm)(x, mask)):
        assert y.dtype == jnp.complex64 and st.mean.dtype == jnp.complex64 and st.var.dtype == jnp.float32
        m = np.broadcast_to(mask, x.shape)
        assert rel_err(np.where(m, y, 0), np.where(m, y_ref, 0)) < 1e-5
        assert rel_err(st.mean, 0.1 * mean) < 1e-5
        assert rel_err(st.var, 0.9 + 0.1 * var) < 1e-5
        s = jaxbn.moments(x, mask=mask)
        assert rel_err(s.mean, mean) < 1e-5 and rel_err(s.var, var) < 1e-5 and s.var.dtype == jnp.float32
    # Without a mask (under jit on 8 devices: the declared partitioning), a real count and variance.
    xs = np.where(mask, x, 0).astype(np.complex64)
    mean0, var0 = _np_stats(xs, np.ones_like(mask))
    y, st = jax.jit(lambda x: layer(x, None))(xs)
    assert st.var.dtype == jnp.float32 and rel_err(st.var, 0.9 + 0.1 * var0) < 1e-5
    assert rel_err(y, (xs - mean0) / np.sqrt(var0 + 1e-5)) < 1e-5


def test_gradients_agree_across_devices(ndev):
    """A real loss of complex outputs: the gradient on 8 devices equals one device's."""
    x, mask = _data()
    x = np.where(mask, x, 0).astype(np.complex64)
    w = np.random.default_rng(2).normal(size=SHAPE).astype(np.float32)
    params = {"scale": np.array([1.5, 0.7], np.float32), "bias": np.array([0.1, -0.2], np.float32)}

    def loss(x, params, axis_name=None):
        y, _ = jaxbn.batch_norm(x, params, jaxbn.init_state(2), training=True, mask=mask_arg, axis_name=axis_name)
        return jnp.sum(w_arg * jnp.abs(y) ** 2 + jnp.real(y))

    mask_arg, w_arg = mask, w
    g1 = jax.grad(loss, argnums=(0, 1))(x, params)

    def plain(x, params):  # the formula, by JAX's own autodiff
        m = np.broadcast_to(mask, x.shape)
        n = m.sum((0, 1))
        mean = jnp.where(m, x, 0).sum((0, 1)) / n
        var = jnp.where(m, jnp.abs(x - mean) ** 2, 0).sum((0, 1)) / n
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * params["scale"] + params["bias"]
        return jnp.sum(w * jnp.abs(y) ** 2 + jnp.real(y))

    g_ref = jax.grad(plain, argnums=(0, 1))(x, params)
    assert rel_err(g1[0], g_ref[0]) < 1e-4 and rel_err(g1[1]["scale"], g_ref[1]["scale"]) < 1e-4

    mesh = jax.make_mesh((NDEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def body(x, params, mask, w):
        nonlocal mask_arg, w_arg
        mask_arg, w_arg = mask, w
        return jax.lax.psum(loss(x, params, "d"), "d")

    sm = jax.shard_map(body, mesh=mesh, in_specs=(P("d"), P(), P("d"), P("d")), out_specs=P())
    g8 = jax.jit(jax.grad(sm, argnums=(0, 1)))(x, params, mask, w)
    assert rel_err(g8[0], g_ref[0]) < 1e-4 and rel_err(g8[1]["scale"], g_ref[1]["scale"]) < 1e-4
    assert rel_err(g8[1]["bias"], g_ref[1]["bias"]) < 1e-4
