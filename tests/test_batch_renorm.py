"""Batch Renormalization against a float64 NumPy oracle written from the paper's formulas:
forward, running statistics and gradients (r, d constant), on one device and across
devices (shard_map, pmap, sharded jit), with masks and an empty shard; the schedule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
from jaxbn import _hlo
from oracle import np_ema, np_moments, rel_err

NDEV = 8
SHAPE = (NDEV * 4, 3, 6)
C = SHAPE[-1]
EPS, MOMENTUM, R_MAX, D_MAX = 1e-5, 0.9, 1.5, 0.5


@functools.lru_cache(maxsize=None)
def _inputs(masked: bool):
    rng = np.random.default_rng(5)
    x = (rng.normal(size=SHAPE) * rng.uniform(0.5, 3, C) + rng.normal(size=C) * 2).astype(np.float32)
    scale, bias = rng.uniform(0.5, 2, C).astype(np.float32), rng.normal(size=C).astype(np.float32)
    w = rng.normal(size=SHAPE).astype(np.float32)
    # Running statistics near some features' batch statistics and far from others': some
    # r and d clip, some do not.
    state = jaxbn.BatchNormState(mean=rng.normal(size=C).astype(np.float32) * 2,
                                 var=rng.uniform(0.2, 6, C).astype(np.float32), count=np.int32(7))
    mask = None
    if masked:
        rows = rng.uniform(size=(NDEV, 4)) < np.linspace(0, 1, NDEV)[:, None]
        rows[0], rows[-1, 0] = False, True
        mask = rows.reshape(-1, 1, 1)
    return x, scale, bias, w, state, mask


def np_renorm(x, scale, bias, state, mask, r_max=R_MAX, d_max=D_MAX, frozen=None):
    """y of the paper's formula in float64; `frozen` = (r, d) to hold them constant."""
    x = np.asarray(x, np.float64)
    mean, var, n = np_moments(x, mask)
    sigma_b, sigma = np.sqrt(var + EPS), np.sqrt(np.asarray(state.var, np.float64) + EPS)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mean - np.asarray(state.mean, np.float64)) / sigma, -d_max, d_max)
    if frozen is not None:
        r, d = frozen
    y = ((x - mean) / sigma_b * r + d) * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
    return y, mean, var, n, (r, d)


@functools.lru_cache(maxsize=None)
def _oracle(masked: bool, h=1e-5):
    x, scale, bias, w, state, mask = _inputs(masked)
    y, mean, var, n, rd = np_renorm(x, scale, bias, state, mask)
    new_mean, new_var = np_ema(state.mean, state.var, mean, var, n, MOMENTUM)
    args = [np.array(a, np.float64) for a in (x, scale, bias)]

    def loss(a):
        return float(np.sum(w * np_renorm(a[0], a[1], a[2], state, mask, frozen=rd)[0]))

    grads = []
    for arr in args:
        g = np.zeros_like(arr)
        for j in range(arr.size):
            old = arr.flat[j]
            arr.flat[j] = old + h
            lp = loss(args)
            arr.flat[j] = old - h
            lm = loss(args)
            arr.flat[j] = old
            g.flat[j] = (lp - lm) / (2 * h)
        grads.append(g)
    return y, new_mean, new_var, grads


def _loss(x, params, state, w, mask, axis_name=None):
    y, st = jaxbn.batch_renorm(x, params, state, training=True, r_max=R_MAX, d_max=D_MAX, momentum=MOMENTUM,
                               axis_name=axis_name, mask=mask)
    return jnp.sum(w * y), (y, st)


def _grad(**kw):
    return jax.value_and_grad(functools.partial(_loss, **kw), argnums=(0, 1), has_aux=True)


def _mesh():
    return jax.make_mesh((NDEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def run_single(x, params, state, w, mask):
    (_, (y, st)), (dx, dp) = jax.jit(_grad())(x, params, state, w, mask)
    return y, st, dx, dp


def run_shard_map(x, params, state, w, mask):
    def body(x, params, state, w, mask):
        loss, aux = _loss(x, params, state, w, mask, axis_name="d")
        return jax.lax.psum(loss, "d"), aux

    f = jax.shard_map(body, mesh=_mesh(), in_specs=(P("d"), P(), P(), P("d"), None if mask is None else P("d")),
                      out_specs=(P(), (P("d"), P())))
    (_, (y, st)), (dx, dp) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, params, state, w, mask)
    return y, st, dx, dp


def run_pmap(x, params, state, w, mask):
    split = lambda a: None if a is None else a.reshape((NDEV, -1) + a.shape[1:])  # noqa: E731

    def body(x, params, state, w, mask):
        (_, (y, st)), (dx, dp) = _grad(axis_name="d")(x, params, state, w, mask)
        return y, st, dx, jax.lax.psum(dp, "d")

    y, st, dx, dp = jax.pmap(body, axis_name="d", in_axes=(0, None, None, 0, 0))(
        split(x), params, state, split(w), split(mask))
    first = lambda t: jax.tree.map(lambda a: a[0], t)  # noqa: E731
    return y.reshape(SHAPE), first(st), dx.reshape(SHAPE), first(dp)


def run_sharded_jit(x, params, state, w, mask):
    sh = NamedSharding(_mesh(), P("d"))
    put = lambda a: None if a is None else jax.device_put(a, sh)  # noqa: E731
    return run_single(put(x), params, state, put(w), put(mask))


@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@pytest.mark.parametrize("runner", [run_single, run_shard_map, run_pmap, run_sharded_jit],
                         ids=["one_device", "shard_map", "pmap", "sharded_jit"])
def test_equals_the_oracle(ndev, runner, masked):
    x, scale, bias, w, state, mask = _inputs(masked)
    y_ref, mean_ref, var_ref, (dx_ref, ds_ref, db_ref) = _oracle(masked)
    y, st, dx, dp = runner(x, {"scale": scale, "bias": bias}, state, w, mask)
    keep = np.ones(SHAPE, bool) if mask is None else np.broadcast_to(mask, SHAPE)
    assert rel_err(np.where(keep, y, 0), np.where(keep, y_ref, 0)) < 1e-5
    assert rel_err(st.mean, mean_ref) < 1e-5 and rel_err(st.var, var_ref) < 1e-5 and int(st.count) == 8
    assert rel_err(dx, dx_ref) < 1e-4
    assert rel_err(dp["scale"], ds_ref) < 1e-4 and rel_err(dp["bias"], db_ref) < 1e-4


def test_the_oracle_clips_some_features_and_not_others():
    *_, (r, d) = np_renorm(*[_inputs(False)[i] for i in (0, 1, 2, 4, 5)])
    assert 0 < np.sum(np.abs(r) == R_MAX) + np.sum(r == 1 / R_MAX) < C
    assert 0 < np.sum(np.abs(d) == D_MAX) < C


def test_limits_one_and_zero_are_batch_norm_exactly():
    x, scale, bias, w, state, mask = _inputs(True)
    params = {"scale": scale, "bias": bias}

    def both(x, params):
        a = jaxbn.batch_renorm(x, params, state, training=True, r_max=1.0, d_max=0.0, mask=mask)
        b = jaxbn.batch_norm(x, params, state, training=True, mask=mask)
        return a, b

    (ya, sa), (yb, sb) = jax.jit(both)(x, params)
    np.testing.assert_array_equal(ya, yb)
    jax.tree.map(np.testing.assert_array_equal, sa, sb)
    ga = jax.grad(lambda x: jnp.sum(w * jaxbn.batch_renorm(x, params, state, training=True, r_max=1, d_max=0)[0]))(x)
    gb = jax.grad(lambda x: jnp.sum(w * jaxbn.batch_norm(x, params, state, training=True)[0]))(x)
    np.testing.assert_allclose(ga, gb, rtol=0, atol=1e-6)


def test_traced_limits_bf16_and_evaluation():
    x, scale, bias, w, state, _ = _inputs(False)
    params = {"scale": scale, "bias": bias}
    f = jax.jit(lambda x, r, d: jaxbn.batch_renorm(x, params, state, training=True, r_max=r, d_max=d)[0])
    y_ref = np_renorm(x, scale, bias, state, None)[0]
    assert rel_err(f(x, R_MAX, D_MAX), y_ref) < 1e-5
    y16 = f(x.astype(jnp.bfloat16), R_MAX, D_MAX)
    assert y16.dtype == jnp.bfloat16 and rel_err(y16, y_ref) < 2e-2
    ye, se = jaxbn.batch_renorm(x, params, state, training=False, r_max=R_MAX, d_max=D_MAX)
    yb, _ = jaxbn.batch_norm(x, params, state, training=False)
    np.testing.assert_array_equal(ye, yb)
    assert se is state or int(se.count) == int(state.count)


def test_one_collective_each_way(ndev):
    x, scale, bias, w, state, _ = _inputs(False)
    f = jax.shard_map(lambda x, p, w: jax.grad(lambda x, p: jax.lax.psum(_loss(x, p, state, w, None, "d")[0], "d"),
                                               argnums=(0, 1))(x, p),
                      mesh=_mesh(), in_specs=(P("d"), P(), P("d")), out_specs=(P("d"), P()))
    text = _hlo.compiled_text(jax.jit(f), x, {"scale": scale, "bias": bias}, w)
    assert _hlo.count_collectives(text) == 2


def test_schedule_is_the_papers():
    r, d = jaxbn.renorm_limits(jnp.array([0, 5000, 15000, 25000, 40000, 90000]))
    np.testing.assert_allclose(r, [1, 1, 1 + 2 * 10000 / 35000, 1 + 2 * 20000 / 35000, 3, 3], rtol=1e-6)
    np.testing.assert_allclose(d, [0, 0, 5 * 10000 / 20000, 5, 5, 5], rtol=1e-6)
    with pytest.raises(ValueError, match="r_max must be >= 1, got 0.5"):
        jaxbn.batch_renorm(np.ones((4, 2), np.float32), None, jaxbn.init_state(2), training=True, r_max=0.5, d_max=0)
    with pytest.raises(TypeError, match="d_max must be a number >= 0, got '1'"):
        jaxbn.batch_renorm(np.ones((4, 2), np.float32), None, jaxbn.init_state(2), training=True, r_max=2, d_max="1")


def test_linen_and_nnx_modules():
    import jaxbn.linen as bl
    import jaxbn.nnx as bn
    from flax import nnx

    x, scale, bias, w, state, mask = _inputs(True)
    x2, mask2 = x.reshape(-1, C), np.broadcast_to(mask, SHAPE[:2] + (1,)).reshape(-1, 1)
    y_ref, st_ref = jaxbn.batch_renorm(x2, None, jaxbn.init_state(C), training=True, r_max=R_MAX, d_max=D_MAX,
                                       mask=mask2)
    m = bl.BatchRenorm(use_running_average=False, r_max=R_MAX, d_max=D_MAX)
    v = m.init(jax.random.key(0), x2)
    y, upd = m.apply(v, x2, mask=mask2, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(upd["batch_stats"]["mean"], st_ref.mean)
    v = {**v, **upd}
    ye = m.clone(use_running_average=True).apply(v, x2)
    np.testing.assert_array_equal(ye, bl.BatchNorm(use_running_average=True).apply(v, x2))
    n = bn.BatchRenorm(C, r_max=R_MAX, d_max=D_MAX, rngs=nnx.Rngs(0))
    n.train()
    np.testing.assert_array_equal(n(x2, mask=mask2), y_ref)
    np.testing.assert_array_equal(n.var[...], st_ref.var)
    # A schedule: a count variable that the updates advance; at count 0 the layer is BatchNorm.
    s = bl.BatchRenorm(use_running_average=False, schedule=jaxbn.renorm_limits)
    vs = s.init(jax.random.key(0), x2)
    ys, upd = s.apply(vs, x2, mutable=["batch_stats"])
    assert int(upd["batch_stats"]["count"]) == 1
    np.testing.assert_array_equal(ys, jaxbn.batch_norm(x2, None, jaxbn.init_state(C), training=True)[0])


def test_modules_take_virtual_batch_size():
    import jaxbn.linen as bl
    import jaxbn.nnx as bn
    from flax import nnx

    x = _inputs(False)[0].reshape(-1, C)
    y_ref = jaxbn.batch_norm(x, None, jaxbn.init_state(C), training=True, virtual_batch_size=8)[0]
    m = bl.BatchNorm(use_running_average=False, virtual_batch_size=8)
    y, _ = m.apply(m.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, y_ref)
    n = bn.BatchNorm(C, virtual_batch_size=8, rngs=nnx.Rngs(0))
    n.train()
    np.testing.assert_array_equal(n(x), y_ref)
