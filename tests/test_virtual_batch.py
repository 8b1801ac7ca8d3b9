"""Virtual (ghost) batches: each group of V consecutive examples of the global batch is
normalized with its own statistics; the running averages take the whole batch's moments.
Against a float64 NumPy oracle on the global batch, on one device and 8 (groups inside a
device's shard, groups spanning devices), with masks; collectives counted."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
from jaxbn import _hlo
from oracle import np_batch_norm, np_ema, np_moments, rel_err

NDEV, LOCAL = 8, 4
SHAPE = (NDEV * LOCAL, 3, 5)
C = SHAPE[-1]
MOMENTUM = 0.9


@functools.lru_cache(maxsize=None)
def _inputs(masked: bool):
    rng = np.random.default_rng(9)
    x = (rng.normal(size=SHAPE) * rng.uniform(0.5, 3, C) + rng.normal(size=C) * 3).astype(np.float32)
    # Groups differ: a shift per 2 examples, so group statistics differ from the batch's.
    x = x + np.repeat(rng.normal(size=SHAPE[0] // 2) * 2, 2)[:, None, None].astype(np.float32)
    scale, bias = rng.uniform(0.5, 2, C).astype(np.float32), rng.normal(size=C).astype(np.float32)
    w = rng.normal(size=SHAPE).astype(np.float32)
    state = jaxbn.BatchNormState(mean=rng.normal(size=C).astype(np.float32),
                                 var=rng.uniform(0.5, 2, C).astype(np.float32), count=np.int32(0))
    mask = None
    if masked:
        rows = rng.uniform(size=SHAPE[0]) < 0.7
        rows[:LOCAL] = False  # device 0 holds nothing valid
        rows[[5, 9, 13, 17, 21, 25, 29]] = True  # every other group keeps something
        mask = rows.reshape(-1, 1, 1)
    return x, scale, bias, w, state, mask


def np_virtual(x, scale, bias, mask, v):
    """y with each group of v consecutive examples normalized by its own statistics."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for g in range(0, x.shape[0], v):
        m = None if mask is None else mask[g:g + v]
        out[g:g + v] = np_batch_norm(x[g:g + v], scale, bias, m)[0]
    return out


@functools.lru_cache(maxsize=None)
def _oracle(masked: bool, v: int, h=1e-5):
    x, scale, bias, w, state, mask = _inputs(masked)
    y = np_virtual(x, scale, bias, mask, v)
    mean, var, n = np_moments(x, mask)  # the whole batch's, not an average of the groups'
    new = np_ema(state.mean, state.var, mean, var, n, MOMENTUM)
    args = [np.array(a, np.float64) for a in (x, scale, bias)]
    grads = []
    for arr in args:
        g = np.zeros_like(arr)
        for j in range(arr.size):
            old = arr.flat[j]
            arr.flat[j] = old + h
            lp = np.sum(w * np_virtual(*args, mask, v))
            arr.flat[j] = old - h
            lm = np.sum(w * np_virtual(*args, mask, v))
            arr.flat[j] = old
            g.flat[j] = (lp - lm) / (2 * h)
        grads.append(g)
    return y, new, grads


def _loss(x, params, state, w, mask, v, axis_name=None):
    y, st = jaxbn.batch_norm(x, params, state, training=True, momentum=MOMENTUM, axis_name=axis_name, mask=mask,
                             virtual_batch_size=v)
    return jnp.sum(w * y), (y, st)


def _mesh():
    return jax.make_mesh((NDEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def run_single(x, params, state, w, mask, v):
    f = jax.jit(jax.value_and_grad(functools.partial(_loss, v=v), argnums=(0, 1), has_aux=True))
    (_, (y, st)), (dx, dp) = f(x, params, state, w, mask)
    return y, st, dx, dp


def run_shard_map(x, params, state, w, mask, v):
    def body(x, params, state, w, mask):
        loss, aux = _loss(x, params, state, w, mask, v, axis_name="d")
        return jax.lax.psum(loss, "d"), aux

    f = jax.shard_map(body, mesh=_mesh(), in_specs=(P("d"), P(), P(), P("d"), None if mask is None else P("d")),
                      out_specs=(P(), (P("d"), P())))
    (_, (y, st)), (dx, dp) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, params, state, w, mask)
    return y, st, dx, dp


def run_pmap(x, params, state, w, mask, v):
    split = lambda a: None if a is None else a.reshape((NDEV, -1) + a.shape[1:])  # noqa: E731

    def body(x, params, state, w, mask):
        (_, (y, st)), (dx, dp) = jax.value_and_grad(functools.partial(_loss, v=v, axis_name="d"), argnums=(0, 1),
                                                    has_aux=True)(x, params, state, w, mask)
        return y, st, dx, jax.lax.psum(dp, "d")

    y, st, dx, dp = jax.pmap(body, axis_name="d", in_axes=(0, None, None, 0, 0))(
        split(x), params, state, split(w), split(mask))
    first = lambda t: jax.tree.map(lambda a: a[0], t)  # noqa: E731
    return y.reshape(SHAPE), first(st), dx.reshape(SHAPE), first(dp)


def run_sharded_jit(x, params, state, w, mask, v):
    sh = NamedSharding(_mesh(), P("d"))
    put = lambda a: None if a is None else jax.device_put(a, sh)  # noqa: E731
    return run_single(put(x), params, state, put(w), put(mask), v)


CASES = [  # (runner, virtual batch size): groups inside a shard (2), a shard each (4), spanning 2 devices (8)
    (run_single, 4), (run_single, 8),
    (run_shard_map, 2), (run_shard_map, 4), (run_shard_map, 8),
    (run_pmap, 2), (run_pmap, 16),
    (run_sharded_jit, 4),
]


@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@pytest.mark.parametrize("runner, v", CASES, ids=[f"{r.__name__[4:]}-V{v}" for r, v in CASES])
def test_equals_the_oracle(ndev, runner, v, masked):
    x, scale, bias, w, state, mask = _inputs(masked)
    y_ref, (mean_ref, var_ref), (dx_ref, ds_ref, db_ref) = _oracle(masked, v)
    y, st, dx, dp = runner(x, {"scale": scale, "bias": bias}, state, w, mask, v)
    keep = np.ones(SHAPE, bool) if mask is None else np.broadcast_to(mask, SHAPE)
    assert rel_err(np.where(keep, y, 0), np.where(keep, y_ref, 0)) < 1e-5
    assert rel_err(st.mean, mean_ref) < 1e-5 and rel_err(st.var, var_ref) < 1e-5
    assert rel_err(dx, dx_ref) < 1e-4
    assert rel_err(dp["scale"], ds_ref) < 1e-4 and rel_err(dp["bias"], db_ref) < 1e-4


def test_groups_differ_from_the_batch():
    """The oracle's groups really have other statistics than the batch (the test can fail)."""
    x, scale, bias, *_ = _inputs(False)
    assert rel_err(np_virtual(x, scale, bias, None, 4), np_batch_norm(x, scale, bias)[0]) > 0.05


def test_collectives(ndev):
    """Groups inside a device: one all-reduce forward (the running statistics), none
    backward. Groups spanning devices: one each way."""
    x, scale, bias, w, state, _ = _inputs(False)
    params = {"scale": scale, "bias": bias}
    for v, want in ((2, 1), (8, 2)):
        def body(x, p, w, v=v):
            g = jax.grad(lambda x, p: jax.lax.psum(_loss(x, p, state, w, None, v, "d")[0], "d"), argnums=(0, 1))(x, p)
            return g, jaxbn.batch_norm(x, p, state, training=True, axis_name="d", virtual_batch_size=v)[1]

        f = jax.shard_map(body, mesh=_mesh(), in_specs=(P("d"), P(), P("d")), out_specs=((P("d"), P()), P()))
        assert _hlo.count_collectives(_hlo.compiled_text(jax.jit(f), x, params, w)) == want, v


def test_batch_renorm_with_virtual_batches_and_errors(ndev):
    x, scale, bias, w, state, _ = _inputs(False)
    params = {"scale": scale, "bias": bias}
    a = jaxbn.batch_renorm(x, params, state, training=True, r_max=1.0, d_max=0.0, virtual_batch_size=4)
    b = jaxbn.batch_norm(x, params, state, training=True, virtual_batch_size=4)
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-6)
    bad = [(dict(virtual_batch_size=5), ValueError, r"virtual_batch_size=5 must divide the global batch of 32"),
           (dict(virtual_batch_size=0), TypeError, r"virtual_batch_size must be a positive int or None, got 0"),
           (dict(virtual_batch_size=2.0), TypeError, r"got 2.0 \(float\)"),
           (dict(virtual_batch_size=4, axis=0), ValueError, r"needs axis 0 to be the batch axis")]
    for kw, exc, pattern in bad:
        with pytest.raises(exc, match=pattern):
            jaxbn.batch_norm(x, params if "axis" not in kw else None, state if "axis" not in kw else
                             jaxbn.init_state(SHAPE[0]), training=True, **kw)
    # 6 examples per device: V = 4 neither divides them nor is a multiple of them.
    x6 = np.zeros((NDEV * 6, 5), np.float32)
    f = jax.shard_map(lambda x: jaxbn.batch_norm(x, None, jaxbn.init_state(5), training=True, axis_name="d",
                                                 virtual_batch_size=4)[0], mesh=_mesh(), in_specs=P("d"),
                      out_specs=P("d"))
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 does not line up with the 6 examples each device"):
        f(x6)


def test_axis_index_groups_under_shard_map(ndev):
    """Device groups (the same machinery as spanning virtual batches) work under shard_map too."""
    x, scale, bias, w, state, _ = _inputs(False)
    groups = [[0, 2, 4, 6], [1, 3, 5, 7]]
    params = {"scale": scale, "bias": bias}

    def body(x, p, w):
        loss = lambda x, p: jnp.sum(w * jaxbn.batch_norm(x, p, state, training=True, axis_name="d",  # noqa: E731
                                                         axis_index_groups=groups)[0])
        y = jaxbn.batch_norm(x, p, state, training=True, axis_name="d", axis_index_groups=groups)[0]
        return y, jax.grad(loss)(x, p)

    f = jax.shard_map(body, mesh=_mesh(), in_specs=(P("d"), P(), P("d")), out_specs=(P("d"), P("d")))
    y, dx = jax.jit(f)(x, params, w)
    shards = x.reshape((NDEV, LOCAL) + SHAPE[1:])
    for g in groups:
        xg = np.concatenate([shards[i] for i in g])
        y_ref = np_batch_norm(xg, scale, bias)[0]
        got = np.concatenate([np.asarray(y).reshape(shards.shape)[i] for i in g])
        assert rel_err(got, y_ref) < 1e-5
