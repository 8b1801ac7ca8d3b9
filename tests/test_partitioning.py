"""BatchNorm under sharded jit (jaxbn/backends/spmd.py): the global batch's statistics,
one all-reduce forward and one backward, no gathered operands, CPU kernels on each
device's rows. Oracle: float64 NumPy on the whole batch (tests/oracle.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import _hlo, cpu_kernel
from oracle import RTOL, np_batch_norm, np_grads, np_moments, rel_err

C = 8
SHAPE = (16, 3, 4, C)


def _data(shape, mean, std, seed):
    return (np.random.default_rng(seed).standard_normal(shape) * std + mean).astype(np.float32)


X = _data(SHAPE, 30.0, 2.0, 0)  # mean ≫ std: a one-pass E[x²] - E[x]² would lose digits
W = _data(SHAPE, 0.0, 1.0, 1)
PARAMS = {"scale": _data((C,), 1.0, 0.3, 2), "bias": _data((C,), 0.0, 1.0, 3)}


def _loss(x, p):
    y, st = jaxbn.batch_norm(x, p, jaxbn.init_state(C), training=True, momentum=0.0)
    return jnp.sum(W * y**2), (y, st)  # a cotangent that depends on y


_grad = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True))
_fwd = jax.jit(lambda x, p: _loss(x, p)[1])


def _reference():
    """Single device, the XLA formulation: y and state against the oracle here, gradients
    from jax.grad of the same math (tests/test_batch_norm.py checks those against FD)."""
    x = jax.device_put(X, jax.devices()[0])
    with cpu_kernel.use("0"):
        (_, (y, st)), (dx, dp) = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True))(x, PARAMS)
    y_ref, m_ref, v_ref, _ = np_batch_norm(X, PARAMS["scale"], PARAMS["bias"])
    assert rel_err(y, y_ref) < RTOL["float32"]
    assert rel_err(st.mean, m_ref) < RTOL["float32"] and rel_err(st.var, v_ref) < RTOL["float32"]
    return y_ref, m_ref, v_ref, np.asarray(dx), jax.tree.map(np.asarray, dp)


REF = None


def _ref():
    global REF
    if REF is None:
        REF = _reference()
    return REF


def _mesh2d():
    return jax.make_mesh((4, 2), ("b", "f"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


SPECS = {
    "batch": ((8,), ("b",), P("b")),
    "batch_and_features": ((4, 2), ("b", "f"), P("b", None, None, "f")),
    "width": ((2, 4), ("b", "w"), P("b", None, "w")),  # a spatial axis sharded too
}


def _put(spec_name):
    shape, names, spec = SPECS[spec_name]
    mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
    return jax.device_put(X, NamedSharding(mesh, spec))


def _collectives(hlo: str) -> dict:
    """Collectives in a compiled program, less the scalar all-reduce of the running count's
    "any feature updated" flag that a feature-sharded state update needs."""
    out = {op: n for op, n in _hlo.collectives(hlo).items() if op in ("all-reduce", "all-gather", "all-to-all")}
    out["all-reduce"] -= _hlo.count_ops(hlo, "all-reduce", shape="pred[]")
    return out


@pytest.mark.parametrize("kernel", ["auto", "0"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_sharded_jit_equals_the_global_batch(spec_name, kernel, ndev):
    y_ref, m_ref, v_ref, dx_ref, dp_ref = _ref()
    x = _put(spec_name)
    with cpu_kernel.use(kernel):
        (_, (y, st)), (dx, dp) = _grad(x, PARAMS)
    assert rel_err(y, y_ref) < RTOL["float32"]
    assert rel_err(st.mean, m_ref) < RTOL["float32"] and rel_err(st.var, v_ref) < RTOL["float32"]
    assert rel_err(dx, dx_ref) < 1e-4
    assert rel_err(dp["scale"], dp_ref["scale"]) < 1e-4 and rel_err(dp["bias"], dp_ref["bias"]) < 1e-4
    assert y.sharding.is_equivalent_to(x.sharding, x.ndim) and dx.sharding.is_equivalent_to(x.sharding, x.ndim)


@pytest.mark.parametrize("kernel", ["auto", "0"])
def test_sharded_jit_one_all_reduce_each_way_nothing_gathered(kernel, ndev):
    x = _put("batch")
    with cpu_kernel.use(kernel):
        fwd = _collectives(_hlo.compiled_text(_fwd, x, PARAMS))
        hlo = _hlo.compiled_text(_grad, x, PARAMS)
    both = _collectives(hlo)
    assert fwd == {"all-reduce": 1, "all-gather": 0, "all-to-all": 0}, fwd
    assert both == {"all-reduce": 2, "all-gather": 0, "all-to-all": 0}, both
    if kernel == "auto" and cpu_kernel.available():
        rows = SHAPE[0] // 8 * SHAPE[1] * SHAPE[2]  # each device's 2 of 16 examples: 24 rows of 8 features
        rows_of_x = (_hlo.Array("f32", (rows, C)),)  # a kernel's first operand: x as this device's rows
        for name in ("jaxbn_moments", "jaxbn_dy_sums"):
            assert any(ops[0] == rows_of_x for ops in _hlo.custom_call_operands(hlo, name)), name


def test_moments_sharded_jit_jvp_and_vmap(ndev):
    x = _put("batch_and_features")
    t = jnp.asarray(_data(SHAPE, 0.0, 1.0, 5))
    m_ref, v_ref = np_moments(X)[:2]

    f = jax.jit(lambda x: jaxbn.moments(x))
    st = f(x)
    assert rel_err(st.mean, m_ref) < RTOL["float32"] and rel_err(st.var, v_ref) < RTOL["float32"]

    # JVP: d var = 2·Σ(x - mean)·t / n, d mean = Σt / n.
    xc = X.astype(np.float64) - m_ref
    n = X.size // C
    _, tan = jax.jit(lambda x, t: jax.jvp(lambda x: jaxbn.moments(x), (x,), (t,)))(x, t)
    assert rel_err(tan.mean, np.asarray(t, np.float64).reshape(-1, C).sum(0) / n) < RTOL["float32"]
    assert rel_err(tan.var, 2 * (xc * np.asarray(t, np.float64)).reshape(-1, C).sum(0) / n) < 1e-4

    # vmap inside sharded jit: per-example statistics, as without sharding.
    per = jax.jit(jax.vmap(lambda x: jaxbn.moments(x).var))(x)
    want = np.stack([np_moments(X[i])[1] for i in range(SHAPE[0])])
    assert rel_err(per, want) < RTOL["float32"]


def test_partially_manual_shard_map_uses_the_xla_formulation(ndev):
    """shard_map over one axis of a 2-D mesh: the other axis is still partitioned by XLA."""
    mesh = _mesh2d()

    def body(x, p):
        with cpu_kernel.use("auto"):
            return jaxbn.batch_norm(x, p, jaxbn.init_state(C), training=True, axis_name="b")[0]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("b"), P()), out_specs=P("b"), axis_names={"b"}))
    x = jax.device_put(X, NamedSharding(mesh, P("b")))
    assert not _hlo.custom_calls(_hlo.compiled_text(f, x, PARAMS), "jaxbn_")
    assert rel_err(f(x, PARAMS), np_batch_norm(X, PARAMS["scale"], PARAMS["bias"])[0]) < RTOL["float32"]


# Masks: per example (devices 0's two examples and one more left out: an empty shard
# under 8-way batch sharding), per position, per entry.
MASKS = {
    "per_example": np.array([False, False] + [True] * 5 + [False] + [True] * 8).reshape(16, 1, 1, 1),
    "per_position": np.random.default_rng(6).uniform(size=SHAPE[:3] + (1,)) < 0.6,
    "per_entry": np.random.default_rng(7).uniform(size=SHAPE) < 0.6,
}


def _masked_loss(x, p, mask):
    y, st = jaxbn.batch_norm(x, p, jaxbn.init_state(C), training=True, momentum=0.0, mask=mask)
    return jnp.sum(W * y), (y, st)


_masked_grad = jax.jit(jax.grad(_masked_loss, argnums=(0, 1), has_aux=True))
_masked_fwd = jax.jit(lambda x, p, mask: _masked_loss(x, p, mask)[1][1])


def _put_like(a, x):
    """`a` sharded as x along the axes where their sizes agree, replicated along the rest."""
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    return jax.device_put(a, NamedSharding(x.sharding.mesh, P(*(s if a.shape[i] == x.shape[i] else None
                                                                 for i, s in enumerate(spec)))))


@pytest.mark.parametrize(
    "spec_name,mask_name",
    [("batch", "per_example"), ("batch_and_features", "per_entry"), ("width", "per_position")],
)
def test_sharded_jit_masked_equals_the_global_batch(spec_name, mask_name, ndev):
    """Masked statistics under sharded jit, against the float64 oracle (gradients by
    finite differences of the whole batch), in one all-reduce each way; masked-out
    entries holding NaN do not reach the statistics."""
    mask = MASKS[mask_name]
    x = _put(spec_name)
    m = _put_like(mask, x)
    y_ref, m_ref, v_ref, _ = np_batch_norm(X, PARAMS["scale"], PARAMS["bias"], mask)
    dx_ref, ds_ref, db_ref = np_grads(X, PARAMS["scale"], PARAMS["bias"], W, mask)
    (dx, dp), (y, st) = _masked_grad(x, PARAMS, m)
    assert rel_err(y, y_ref) < RTOL["float32"]
    assert rel_err(st.mean, m_ref) < RTOL["float32"] and rel_err(st.var, v_ref) < RTOL["float32"]
    assert rel_err(dx, dx_ref) < 1e-4
    assert rel_err(dp["scale"], ds_ref) < 1e-4 and rel_err(dp["bias"], db_ref) < 1e-4

    bad = np.where(np.broadcast_to(mask, SHAPE), X, np.float32(np.nan))
    st = _masked_fwd(jax.device_put(bad, x.sharding), PARAMS, m)
    assert rel_err(st.mean, m_ref) < RTOL["float32"] and rel_err(st.var, v_ref) < RTOL["float32"]

    fwd = _collectives(_hlo.compiled_text(_masked_fwd, x, PARAMS, m))
    both = _collectives(_hlo.compiled_text(_masked_grad, x, PARAMS, m))
    assert fwd == {"all-reduce": 1, "all-gather": 0, "all-to-all": 0}, fwd
    assert both == {"all-reduce": 2, "all-gather": 0, "all-to-all": 0}, both


def test_masked_moments_sharded_jit_jvp_and_vmap(ndev):
    mask = MASKS["per_position"]
    x = _put("batch_and_features")
    m = _put_like(mask, x)
    t = jnp.asarray(_data(SHAPE, 0.0, 1.0, 5))
    m_ref, v_ref, n_ref = np_moments(X, mask)
    f = jax.jit(lambda x, t: jax.jvp(lambda x: jaxbn.moments(x, mask=m), (x,), (t,)))
    st, tan = f(x, t)
    assert rel_err(st.mean, m_ref) < RTOL["float32"] and rel_err(st.var, v_ref) < RTOL["float32"]
    np.testing.assert_array_equal(st.count, n_ref)

    # d mean = Σ_M t / n,  d var = 2·Σ_M (x - mean)·t / n
    full = np.broadcast_to(mask, SHAPE)
    t64 = np.where(full, np.asarray(t, np.float64), 0)
    xc = np.where(full, X.astype(np.float64) - m_ref, 0)
    assert rel_err(tan.mean, t64.reshape(-1, C).sum(0) / n_ref) < RTOL["float32"]
    assert rel_err(tan.var, 2 * (xc * t64).reshape(-1, C).sum(0) / n_ref) < 1e-4

    # vmap inside sharded jit: per-example masked statistics.
    per = jax.jit(jax.vmap(lambda x, k: jaxbn.moments(x, mask=k).var))(x, m)
    want = np.stack([np_moments(X[i], mask[i])[1] for i in range(SHAPE[0])])
    assert rel_err(per, want) < RTOL["float32"]


@pytest.mark.parametrize("masked", [False, True], ids=["", "per_example_mask"])
def test_sharded_jit_nchw_slab_kernels(masked, ndev):
    """Features on axis 1 (NCHW), batch and features sharded: the slab kernels on each
    device's part (a per-example mask with an empty device shard: the masked slab
    kernel), one all-reduce each way, the global batch's results."""
    xn = np.ascontiguousarray(np.transpose(X, (0, 3, 1, 2)))
    wn = np.ascontiguousarray(np.transpose(W, (0, 3, 1, 2)))
    mask = MASKS["per_example"] if masked else None

    def loss(x, p, m):
        y, st = jaxbn.batch_norm(x, p, jaxbn.init_state(C), training=True, momentum=0.0, axis=1, mask=m)
        return jnp.sum(wn * y), (y, st)

    mesh = _mesh2d()
    x = jax.device_put(xn, NamedSharding(mesh, P("b", "f")))
    m = None if mask is None else jax.device_put(mask, NamedSharding(mesh, P("b")))
    with cpu_kernel.use("auto"):
        f = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        hlo = _hlo.compiled_text(f, x, PARAMS, m)
    (dx, dp), (y, st) = f(x, PARAMS, m)
    if cpu_kernel.available():
        targets = _hlo.custom_calls(hlo)
        assert f'jaxbn_{"masked_" if masked else ""}slab_moments' in targets and "jaxbn_slab_dy_sums" in targets
    assert _collectives(hlo) == {"all-reduce": 2, "all-gather": 0, "all-to-all": 0}, _collectives(hlo)
    y_ref, m_ref, v_ref, _ = np_batch_norm(xn, PARAMS["scale"], PARAMS["bias"], mask, feature_axes=(1,))
    dx_ref, ds_ref, db_ref = np_grads(xn, PARAMS["scale"], PARAMS["bias"], wn, mask, feature_axes=(1,))
    assert rel_err(y, y_ref) < RTOL["float32"]
    assert rel_err(st.mean, m_ref) < RTOL["float32"] and rel_err(st.var, v_ref) < RTOL["float32"]
    assert rel_err(dx, dx_ref) < 1e-4
    assert rel_err(dp["scale"], ds_ref) < 1e-4 and rel_err(dp["bias"], db_ref) < 1e-4
