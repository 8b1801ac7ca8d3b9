"""Cross-device statistics: every parallel API equals one device on the global batch.

Each runner maps the same global inputs to (y, new_state, dx, dscale, dbias) in
global terms; all are compared with the float64 NumPy oracle computed on the whole
global batch (statistics by definition, gradients by finite differences).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
from jaxbn import _hlo
from oracle import RTOL, np_batch_norm, np_ema, np_grads, rel_err

NDEV = 8
LOCAL = 4  # rows per device
SHAPE = (NDEV * LOCAL, 2, 3)  # global batch (N, H, C), feature axis -1
C = SHAPE[-1]
MOMENTUM = 0.9


def _mesh(shape=(NDEV,), names=("d",)):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


@functools.lru_cache(maxsize=None)
def _inputs(mask_kind: str):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=SHAPE) * rng.uniform(0.5, 3, size=C) + rng.normal(size=C) * 4).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, size=C).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)
    w = rng.normal(size=SHAPE).astype(np.float32)
    state = jaxbn.BatchNormState(
        mean=rng.normal(size=C).astype(np.float32),
        var=rng.uniform(0.5, 2, size=C).astype(np.float32),
        count=np.int32(3),
    )
    if mask_kind == "none":
        mask = None
    else:
        # Uneven valid counts per device; device 0's shard is entirely masked.
        rows = rng.uniform(size=(NDEV, LOCAL)) < np.linspace(0.0, 1.0, NDEV)[:, None]
        rows[0] = False
        rows[-1, 0] = True
        mask = rows.reshape(SHAPE[0], 1, 1)
    return x, scale, bias, w, state, mask


@functools.lru_cache(maxsize=None)
def _oracle(mask_kind: str):
    x, scale, bias, w, state, mask = _inputs(mask_kind)
    y, mean, var, n = np_batch_norm(x, scale, bias, mask)
    new_mean, new_var = np_ema(state.mean, state.var, mean, var, n, MOMENTUM)
    dx, dscale, dbias = np_grads(x, scale, bias, w, mask)
    return y, new_mean, new_var, dx, dscale, dbias


def _bn(x, params, state, mask, axis_name=None, **kw):
    return jaxbn.batch_norm(
        x, params, state, training=True, momentum=MOMENTUM, axis_name=axis_name, mask=mask, **kw
    )


def _loss(x, params, state, w, mask, axis_name=None, **kw):
    y, new_state = _bn(x, params, state, mask, axis_name, **kw)
    return jnp.sum(w * y), (y, new_state)


def _grad_fn(**kw):
    return jax.value_and_grad(functools.partial(_loss, **kw), argnums=(0, 1), has_aux=True)


# --- Runners: global inputs -> (y, state, dx, dparams) -------------------------


@jax.jit
def _single(x, params, state, w, mask):
    (_, (y, st)), (dx, dp) = _grad_fn()(x, params, state, w, mask)
    return y, st, dx, dp


def run_single(x, params, state, w, mask):
    return _single(x, params, state, w, mask)


def _split(a):
    return None if a is None else a.reshape((NDEV, -1) + a.shape[1:])


def _merge(a):
    return a.reshape((-1,) + a.shape[2:])


@functools.partial(jax.pmap, axis_name="d", in_axes=(0, None, None, 0, 0))
def _pmap(x, params, state, w, mask):
    # pmap convention: gradient of the local loss, then reduce parameter gradients.
    (_, (y, st)), (dx, dp) = _grad_fn(axis_name="d")(x, params, state, w, mask)
    return y, st, dx, jax.lax.psum(dp, "d")


def run_pmap(x, params, state, w, mask):
    y, st, dx, dp = _pmap(_split(x), params, state, _split(w), _split(mask))
    return _merge(y), jax.tree.map(lambda a: a[0], st), _merge(dx), jax.tree.map(lambda a: a[0], dp)


def _shard_map_checked(x, params, state, w, mask):
    def body(x, params, state, w, mask):
        loss, (y, st) = _loss(x, params, state, w, mask, axis_name="d")
        return jax.lax.psum(loss, "d"), (y, st)

    spec_m = None if mask is None else P("d")
    f = jax.shard_map(
        body, mesh=_mesh(), in_specs=(P("d"), P(), P(), P("d"), spec_m), out_specs=(P(), (P("d"), P()))
    )
    (_, (y, st)), (dx, dp) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, params, state, w, mask)
    return y, st, dx, dp


_shard_map_checked_jit = jax.jit(_shard_map_checked)


def run_shard_map(x, params, state, w, mask):
    return _shard_map_checked_jit(x, params, state, w, mask)


@jax.jit
def _shard_map_unchecked(x, params, state, w, mask):
    def body(x, params, state, w, mask):
        (_, (y, st)), (dx, dp) = _grad_fn(axis_name="d")(x, params, state, w, mask)
        return y, st, dx, jax.lax.psum(dp, "d")

    spec_m = None if mask is None else P("d")
    f = jax.shard_map(
        body,
        mesh=_mesh(),
        in_specs=(P("d"), P(), P(), P("d"), spec_m),
        out_specs=(P("d"), P(), P("d"), P()),
        check_vma=False,
    )
    return f(x, params, state, w, mask)


def run_shard_map_unchecked(x, params, state, w, mask):
    return _shard_map_unchecked(x, params, state, w, mask)


def _multi_axis(x, params, state, w, mask):
    names = ("a", "b")

    def body(x, params, state, w, mask):
        loss, (y, st) = _loss(x, params, state, w, mask, axis_name=names)
        return jax.lax.psum(loss, names), (y, st)

    spec_m = None if mask is None else P(names)
    f = jax.shard_map(
        body,
        mesh=_mesh((2, 4), names),
        in_specs=(P(names), P(), P(), P(names), spec_m),
        out_specs=(P(), (P(names), P())),
    )
    (_, (y, st)), (dx, dp) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, params, state, w, mask)
    return y, st, dx, dp


_multi_axis_jit = jax.jit(_multi_axis)


def run_multi_axis(x, params, state, w, mask):
    return _multi_axis_jit(x, params, state, w, mask)


def run_sharded_jit(x, params, state, w, mask):
    sh = NamedSharding(_mesh(), P("d"))
    put = lambda a: None if a is None else jax.device_put(a, sh)  # noqa: E731
    return _single(put(x), params, state, put(w), put(mask))


@jax.jit
def _vmap(x, params, state, w, mask):
    def body(x, w, mask):
        return _loss(x, params, state, w, mask, axis_name="v")

    def total(x, params):
        loss, (y, st) = jax.vmap(
            lambda x, w, m: _loss(x, params, state, w, m, axis_name="v"),
            in_axes=(0, 0, None if mask is None else 0),
            axis_name="v",
        )(x, w, mask)
        return jnp.sum(loss), (y, st)

    (_, (y, st)), (dx, dp) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(x, params)
    return y, st, dx, dp


def run_vmap(x, params, state, w, mask):
    y, st, dx, dp = _vmap(_split(x), params, state, _split(w), _split(mask))
    return _merge(y), jax.tree.map(lambda a: a[0], st), _merge(dx), dp


RUNNERS = {
    "single": run_single,
    "pmap": run_pmap,
    "shard_map": run_shard_map,
    "shard_map_unchecked": run_shard_map_unchecked,
    "shard_map_2d_axes": run_multi_axis,
    "sharded_jit": run_sharded_jit,
    "vmap": run_vmap,
}


@pytest.mark.parametrize("mask_kind", ["none", "uneven_with_empty_shard"])
@pytest.mark.parametrize("runner", list(RUNNERS))
def test_parallel_equals_global_batch(runner, mask_kind, ndev):
    x, scale, bias, w, state, mask = _inputs(mask_kind)
    params = {"scale": scale, "bias": bias}
    y, st, dx, dp = RUNNERS[runner](x, params, state, w, mask)
    y_ref, mean_ref, var_ref, dx_ref, dscale_ref, dbias_ref = _oracle(mask_kind)
    tol = RTOL["float32"]
    assert np.all(np.isfinite(np.asarray(y)))
    assert rel_err(y, y_ref) < tol
    assert rel_err(st.mean, mean_ref) < tol
    assert rel_err(st.var, var_ref) < tol
    assert int(st.count) == 4
    assert rel_err(dx, dx_ref) < 1e-4  # FD reference; dx is a small difference of O(1) terms.
    assert rel_err(dp["scale"], dscale_ref) < tol * 10
    assert rel_err(dp["bias"], dbias_ref) < tol * 10


def test_state_is_replicated_under_shard_map(ndev):
    """out_specs=P() for the new state type-checks (it is invariant across devices)."""
    x, scale, bias, w, state, mask = _inputs("none")
    f = jax.shard_map(
        lambda x, s: _bn(x, None, s, None, "d")[1],
        mesh=_mesh(),
        in_specs=(P("d"), P()),
        out_specs=P(),
    )
    st = jax.jit(f)(x, state)
    assert rel_err(st.mean, _oracle("none")[1]) < RTOL["float32"]


def test_missing_axis_name_under_shard_map_is_an_error(ndev):
    """Forgetting axis_name leaves per-device state, which out_specs=P() refuses."""
    x, _, _, _, state, _ = _inputs("none")
    f = jax.shard_map(
        lambda x, s: _bn(x, None, s, None)[1], mesh=_mesh(), in_specs=(P("d"), P()), out_specs=P()
    )
    with pytest.raises(Exception, match="(?i)vary|varying|replicat"):
        jax.jit(f)(x, state)


def test_wrong_axis_name_is_an_error(ndev):
    x, _, _, _, state, _ = _inputs("none")
    f = jax.shard_map(
        lambda x, s: _bn(x, None, s, None, "batch")[0], mesh=_mesh(), in_specs=(P("d"), P()), out_specs=P("d")
    )
    with pytest.raises(ValueError, match="axis_name='batch'"):
        jax.jit(f)(x, state)
    with pytest.raises(ValueError, match="axis_name='d'"):
        _bn(x, None, state, None, "d")


def test_fully_masked_global_batch_keeps_state_and_gives_no_nan(ndev):
    x, scale, bias, w, state, _ = _inputs("none")
    mask = np.zeros((SHAPE[0], 1, 1), bool)
    y, st, dx, dp = run_shard_map(x, {"scale": scale, "bias": bias}, state, w, mask)
    for a in (y, dx, dp["scale"], dp["bias"], st.mean, st.var):
        assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(st.mean, state.mean)
    np.testing.assert_array_equal(st.var, state.var)
    assert int(st.count) == int(state.count)


def test_pmap_axis_index_groups(ndev):
    """Two groups of four devices keep separate statistics, each exact."""
    x, scale, bias, _, state, _ = _inputs("none")
    groups = [[0, 2, 4, 6], [1, 3, 5, 7]]
    w = _inputs("none")[3]
    f = jax.pmap(
        lambda x, w: _grad_fn(axis_name="d", axis_index_groups=groups)(x, {"scale": scale, "bias": bias}, state, w, None),
        axis_name="d",
    )
    (_, (y, st)), (dx, _) = f(_split(x), _split(w))
    for g in groups:
        xg = np.concatenate([_split(x)[i] for i in g])
        wg = np.concatenate([_split(w)[i] for i in g])
        y_ref, mean, var, n = np_batch_norm(xg, scale, bias)
        assert rel_err(np.concatenate([y[i] for i in g]), y_ref) < RTOL["float32"]
        dx_ref = np_grads(xg, scale, bias, wg)[0]
        assert rel_err(np.concatenate([dx[i] for i in g]), dx_ref) < 1e-4
        m_ref, v_ref = np_ema(state.mean, state.var, mean, var, n, MOMENTUM)
        assert rel_err(st.mean[g[0]], m_ref) < RTOL["float32"]
        assert rel_err(st.var[g[-1]], v_ref) < RTOL["float32"]


def test_shard_map_sub_axis_of_2d_mesh(ndev):
    """Mesh ('replica', 'bn') = (2, 4): statistics over 'bn' only, one set per replica."""
    x, scale, bias, _, state, _ = _inputs("none")
    f = jax.shard_map(
        lambda x: (lambda y, st: (y, st.mean))(*_bn(x, {"scale": scale, "bias": bias}, state, None, "bn")),
        mesh=_mesh((2, 4), ("replica", "bn")),
        in_specs=P(("replica", "bn")),
        out_specs=(P(("replica", "bn")), P("replica")),
    )
    y, new_mean = jax.jit(f)(x)
    half = SHAPE[0] // 2
    for r in range(2):
        xs = x[r * half : (r + 1) * half]
        y_ref, mean, var, n = np_batch_norm(xs, scale, bias)
        assert rel_err(y[r * half : (r + 1) * half], y_ref) < RTOL["float32"]
        m_ref, _ = np_ema(state.mean, state.var, mean, var, n, MOMENTUM)
        assert rel_err(new_mean[r * C : (r + 1) * C], m_ref) < RTOL["float32"]


@pytest.mark.parametrize("runner", ["shard_map", "pmap_fwd"])
def test_one_collective_forward_one_backward(runner, ndev):
    x, scale, bias, w, state, mask = _inputs("uneven_with_empty_shard")
    params = {"scale": scale, "bias": bias}
    if runner == "shard_map":
        fwd = jax.jit(
            jax.shard_map(
                lambda x, p, s, m: _bn(x, p, s, m, "d"),
                mesh=_mesh(),
                in_specs=(P("d"), P(), P(), P("d")),
                out_specs=(P("d"), P()),
            )
        )
        assert _hlo.count_collectives(_hlo.lowered_text(fwd, x, params, state, mask)) == 1
        assert _hlo.count_collectives(_hlo.lowered_text(_shard_map_checked_jit, x, params, state, w, mask)) == 2
    else:
        fwd = jax.pmap(lambda x, m: _bn(x, params, state, m, "d"), axis_name="d")
        assert _hlo.count_collectives(_hlo.lowered_text(fwd, _split(x), _split(mask))) == 1
        # Local parameter gradients (the caller reduces them): 1 forward + 1 backward.
        local = jax.pmap(lambda x, w, m: _grad_fn(axis_name="d")(x, params, state, w, m), axis_name="d")
        assert _hlo.count_collectives(_hlo.lowered_text(local, _split(x), _split(w), _split(mask))) == 2


def test_remat_and_single_trace(ndev):
    traces = []
    x, scale, bias, w, state, _ = _inputs("none")
    params = {"scale": scale, "bias": bias}

    @jax.jit
    def f(x, params):
        traces.append(1)
        g = jax.checkpoint(lambda x, p: jnp.sum(w * _bn(x, p, state, None)[0]))
        return jax.grad(g, argnums=(0, 1))(x, params)

    dx, dp = f(x, params)
    f(x * 2.0, params)
    assert len(traces) == 1
    _, _, _, dx_ref, dscale_ref, _ = _oracle("none")
    assert rel_err(dx, dx_ref) < 1e-4
    assert rel_err(dp["scale"], dscale_ref) < 1e-4


def test_local_statistics_inside_shard_map_have_exact_gradients(ndev):
    """axis_name=None under shard_map: per-device statistics, replicated parameters.

    The parameter gradient is the sum of every device's contribution (what autodiff of
    the same math gives), checked against per-device float64 oracles.
    """
    x, scale, bias, w, state, _ = _inputs("none")

    def body(x, w, p):
        return jax.lax.psum(jnp.sum(w * _bn(x, p, state, None)[0]), "d")

    f = jax.shard_map(body, mesh=_mesh(), in_specs=(P("d"), P("d"), P()), out_specs=P())
    dp = jax.jit(jax.grad(f, argnums=2))(x, w, {"scale": scale, "bias": bias})
    ref = [np_grads(xs, scale, bias, ws) for xs, ws in zip(_split(x), _split(w))]
    assert rel_err(dp["scale"], sum(r[1] for r in ref)) < 1e-4
    assert rel_err(dp["bias"], sum(r[2] for r in ref)) < 1e-4
