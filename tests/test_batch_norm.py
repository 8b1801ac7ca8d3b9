"""Single-device semantics of the functional core against the float64 oracle."""

import inspect
import subprocess
import sys

import jax
import jax.numpy as jnp
import jax.extend.core
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import _hlo
from oracle import RTOL, np_batch_norm, np_ema, np_grads, np_moments, rel_err

RNG = np.random.default_rng(1)


def _data(shape, mean=1.0, std=2.0, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * std + mean).astype(np.float32)


def _random_state(c, seed=0):
    rng = np.random.default_rng(seed)
    shape = c if isinstance(c, tuple) else (c,)
    return jaxbn.BatchNormState(
        mean=rng.normal(size=shape).astype(np.float32),
        var=rng.uniform(0.5, 2.0, size=shape).astype(np.float32),
        count=np.int32(5),
    )


@pytest.mark.parametrize(
    "shape,axis",
    [((6, 3, 4, 5), -1), ((6, 5, 3, 4), 1), ((4, 3, 2, 5), (1, 3))],
    ids=["nhwc", "nchw", "two_feature_axes"],
)
@pytest.mark.parametrize("masked", [False, True])
def test_training_matches_oracle(shape, axis, masked):
    x = _data(shape)
    feat = (axis,) if isinstance(axis, int) else axis
    fshape = tuple(shape[a] for a in feat)
    params = {"scale": _data(fshape, 1.0, 0.3, 1), "bias": _data(fshape, 0.0, 1.0, 2)}
    state = _random_state(fshape)
    mask = (np.random.default_rng(3).uniform(size=shape) < 0.6) if masked else None
    w = _data(shape, 0.0, 1.0, 4)

    def loss(x, p):
        y, st = jaxbn.batch_norm(x, p, state, training=True, axis=axis, momentum=0.8, mask=mask)
        return jnp.sum(w * y), (y, st)

    (_, (y, st)), (dx, dp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, params)
    y_ref, mean, var, n = np_batch_norm(x, params["scale"], params["bias"], mask, feat)
    m_ref, v_ref = np_ema(state.mean, state.var, mean, var, n, 0.8)
    assert y.dtype == jnp.float32 and st.mean.shape == fshape
    assert rel_err(y, y_ref) < RTOL["float32"]
    assert rel_err(st.mean, m_ref) < RTOL["float32"]
    assert rel_err(st.var, v_ref) < RTOL["float32"]
    dx_ref, ds_ref, db_ref = np_grads(x, params["scale"], params["bias"], w, mask, feat)
    assert rel_err(dx, dx_ref) < 1e-4
    assert rel_err(dp["scale"], ds_ref) < 1e-4
    assert rel_err(dp["bias"], db_ref) < 1e-4


def test_eval_uses_running_stats_and_keeps_state():
    x = _data((8, 5))
    params = {"scale": _data((5,), 1, 0.3, 1), "bias": _data((5,), 0, 1, 2)}
    state = _random_state(5)
    y, st = jaxbn.batch_norm(x, params, state, training=False)
    assert st is state
    ref = (x - state.mean) / np.sqrt(state.var + 1e-5) * params["scale"] + params["bias"]
    assert rel_err(y, ref) < RTOL["float32"]


def test_update_stats_switches():
    x = _data((8, 5))
    state = _random_state(5)
    # Local-statistics evaluation: batch statistics, state untouched.
    y, st = jaxbn.batch_norm(x, None, state, training=True, update_stats=False)
    assert st is state
    assert rel_err(y, np_batch_norm(x, np.ones(5), np.zeros(5))[0]) < RTOL["float32"]
    # Running statistics for the output while folding the batch into the state.
    y, st = jaxbn.batch_norm(x, None, state, training=False, update_stats=True, momentum=0.5)
    assert rel_err(y, (x - state.mean) / np.sqrt(state.var + 1e-5)) < RTOL["float32"]
    _, mean, var, n = np_batch_norm(x, np.ones(5), np.zeros(5))
    m_ref, v_ref = np_ema(state.mean, state.var, mean, var, n, 0.5)
    assert rel_err(st.mean, m_ref) < RTOL["float32"] and rel_err(st.var, v_ref) < RTOL["float32"]
    assert int(st.count) == int(state.count) + 1


def test_cumulative_average_and_unbiased_variance():
    """momentum=None with unbiased_running_var reproduces PyTorch's cumulative rule."""
    state = jaxbn.init_state(4)
    xs = [_data((6, 4), seed=s) for s in range(3)]
    step = jax.jit(lambda x, s: jaxbn.batch_norm(x, None, s, training=True, momentum=None, unbiased_running_var=True)[1])
    ref_mean, ref_var = np.zeros(4), np.ones(4)
    for k, x in enumerate(xs, start=1):
        state = step(x, state)
        xd = x.astype(np.float64)
        ref_mean = ref_mean + (xd.mean(0) - ref_mean) / k
        ref_var = ref_var + (xd.var(0, ddof=1) - ref_var) / k
        assert rel_err(state.mean, ref_mean) < RTOL["float32"]
        assert rel_err(state.var, ref_var) < RTOL["float32"]
        assert int(state.count) == k


def test_params_optional():
    x = _data((8, 3))
    y_none, _ = jaxbn.batch_norm(x, None, jaxbn.init_state(3), training=True)
    y_bias, _ = jaxbn.batch_norm(x, {"bias": np.full(3, 2.0, np.float32)}, jaxbn.init_state(3), training=True)
    y_scale, _ = jaxbn.batch_norm(x, {"scale": np.full(3, 3.0, np.float32)}, jaxbn.init_state(3), training=True)
    ref = np_batch_norm(x, np.ones(3), np.zeros(3))[0]
    assert rel_err(y_none, ref) < RTOL["float32"]
    assert rel_err(y_bias, ref + 2) < RTOL["float32"]
    assert rel_err(y_scale, 3 * ref) < RTOL["float32"]


def test_large_mean_variance_is_exact_on_first_step(ndev):
    """Mean 1e4, std 1: two-pass per device + Chan merge, single device and 8 devices."""
    x = _data((64, 4, 4), mean=1e4, std=1.0, seed=7)
    _, var_ref, _ = np_moments(x)
    st1 = jaxbn.batch_norm(x, None, jaxbn.init_state(4), training=True, momentum=0.0)[1]
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    f = jax.shard_map(
        lambda x: jaxbn.batch_norm(x, None, jaxbn.init_state(4), training=True, momentum=0.0, axis_name="d")[1],
        mesh=mesh,
        in_specs=P("d"),
        out_specs=P(),
    )
    st8 = jax.jit(f)(x)
    assert rel_err(st1.var, var_ref) < 1e-4
    assert rel_err(st8.var, var_ref) < 1e-4
    y = jaxbn.batch_norm(x, None, jaxbn.init_state(4), training=True)[0]
    assert rel_err(y, np_batch_norm(x, np.ones(4), np.zeros(4))[0]) < 1e-3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    x32 = _data((16, 2, 6), mean=3.0, std=2.0)
    x = jnp.asarray(x32, dtype)
    params = {"scale": _data((6,), 1, 0.3, 1), "bias": _data((6,), 0, 1, 2)}
    y, st = jaxbn.batch_norm(x, params, jaxbn.init_state(6), training=True, momentum=0.0)
    assert y.dtype == dtype
    assert st.mean.dtype == jnp.float32 and st.var.dtype == jnp.float32
    xd = np.asarray(x.astype(jnp.float32), np.float64)  # the values actually seen
    y_ref, mean, var, _ = np_batch_norm(xd, params["scale"], params["bias"])
    assert rel_err(st.mean, mean) < RTOL["float32"]  # float32 statistics
    assert rel_err(st.var, var) < RTOL["float32"]
    assert rel_err(y.astype(jnp.float32), y_ref) < RTOL[jnp.dtype(dtype).name]
    # Evaluation with the same statistics gives the same output (same precision).
    y_eval, _ = jaxbn.batch_norm(x, params, st, training=False)
    np.testing.assert_array_equal(np.asarray(y_eval, np.float32), np.asarray(y, np.float32))
    # bf16 gradients come back in bf16 and are finite.
    g = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, params, st, training=True)[0].astype(jnp.float32) ** 2))(x)
    assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="counts XLA:CPU kernels")
@pytest.mark.parametrize("masked", [False, True], ids=["", "per_example_mask"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_training_layer_writes_no_x_sized_temporary(dtype, masked):
    # The layer's traffic: every reduction streams x (and dy) in the input's own dtype
    # through its own optimization barrier; the only x-sized arrays the compiled
    # forward+backward writes are y and dx. A shared float32 copy of x or dy, or a
    # materialized x - mean, would show up here (jaxbn/backends/xla.py, private).
    shape = (16, 6, 6, 8)
    x = jnp.asarray(_data(shape, 3.0, 2.0), dtype)
    dy = jnp.asarray(_data(shape, 0.0, 1.0, 1), dtype)
    params = jaxbn.init_params(8)
    mask = jnp.arange(16).reshape(16, 1, 1, 1) < 11 if masked else None

    def f(x, dy, params):
        y, vjp = jax.vjp(lambda x, p: jaxbn.batch_norm(x, p, jaxbn.init_state(8), training=True, mask=mask)[0],
                         x, params)
        return y, vjp(dy)

    # 'dtype[shape] kernel' for each array of at least x's size that the compiled program writes
    written = [f"{a} {k}" for k, a in _hlo.large_outputs(_hlo.compiled_text(f, x, dy, params), x.size)]
    name = jnp.dtype(dtype).name.replace("bfloat16", "bf16").replace("float32", "f32")
    assert len(written) == 2 and all(w.startswith(name) for w in written), written


@pytest.mark.parametrize(
    "mask_shape",
    [(6, 1, 1, 1), (6, 3, 1, 1), (1, 3, 4, 1), (6, 1, 4, 5), (4, 5)],
    ids=["per_example", "per_row", "spatial", "example_and_channel", "trailing"],
)
def test_partial_mask_statistics_ignore_masked_entries(mask_shape):
    # A mask constant along some reduced axes is applied to partial sums over those
    # axes; whatever the masked-out entries hold (NaN, inf, huge) must not reach the
    # statistics, the running state or the valid outputs.
    shape = (6, 3, 4, 5)
    rng = np.random.default_rng(7)
    mask = rng.uniform(size=mask_shape) < 0.6
    mask.flat[0] = True
    full = np.broadcast_to(mask, shape)
    x = _data(shape, 2.0, 1.5)
    x_bad = np.where(full, x, rng.choice([np.nan, np.inf, -np.inf, 1e30], size=shape)).astype(np.float32)
    params = {"scale": _data((5,), 1.0, 0.3, 1), "bias": _data((5,), 0.0, 1.0, 2)}
    state = _random_state(5)
    mom = jaxbn.moments(x_bad, mask=mask)
    mean, var, n = np_moments(x, full)
    np.testing.assert_array_equal(mom.count, n)
    assert rel_err(mom.mean, mean) < RTOL["float32"] and rel_err(mom.var, var) < RTOL["float32"]
    y, st = jaxbn.batch_norm(x_bad, params, state, training=True, momentum=0.8, mask=mask)
    y_ref = np_batch_norm(x, params["scale"], params["bias"], full)[0]
    m_ref, v_ref = np_ema(state.mean, state.var, mean, var, n, 0.8)
    assert rel_err(np.where(full, y, 0), np.where(full, y_ref, 0)) < RTOL["float32"]
    assert rel_err(st.mean, m_ref) < RTOL["float32"] and rel_err(st.var, v_ref) < RTOL["float32"]


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _eqns(sub)


@pytest.mark.parametrize("mask_shape", [(6, 1, 1, 1), (6, 3, 4, 1), (3, 4, 1)])
def test_count_reads_only_the_mask(mask_shape):
    # The count comes from the mask's own entries (times the sizes of the axes it is
    # broadcast along): summing the mask widened to x's shape cost XLA:CPU 11–14 ms
    # against 1 ms for both passes over a 16×56×56×64 x (benchmarks/layer_variants.py).
    shape = (6, 3, 4, 5)
    mask = np.random.default_rng(0).uniform(size=mask_shape) < 0.6
    x = _data(shape)
    jaxpr = jax.make_jaxpr(lambda x, m: jaxbn.moments(x, mask=m))(x, mask).jaxpr
    widened = [e for e in _eqns(jaxpr) if e.primitive.name == "convert_element_type"
               and e.invars[0].aval.dtype == np.bool_ and e.outvars[0].aval.shape == shape]
    assert not widened, widened
    np.testing.assert_array_equal(jaxbn.moments(x, mask=mask).count, np_moments(x, mask)[2])


def test_non_finite_batch_never_reaches_state():
    x = _data((8, 3))
    x[2, 1] = np.nan
    state = _random_state(3)
    _, st = jaxbn.batch_norm(x, None, state, training=True)
    assert np.all(np.isfinite(st.mean)) and np.all(np.isfinite(st.var))
    np.testing.assert_array_equal(st.mean[1], state.mean[1])  # the NaN feature is kept
    assert st.mean[0] != state.mean[0]  # the finite ones are updated
    # A NaN in a masked-out entry is ignored entirely.
    mask = np.ones((8, 1), bool)
    mask[2] = False
    _, st = jaxbn.batch_norm(x, None, state, training=True, mask=mask)
    assert np.all(np.isfinite(st.mean)) and st.mean[1] != state.mean[1]


def test_moments_and_normalize_public():
    x = _data((5, 3, 4))
    mask = np.random.default_rng(0).uniform(size=(5, 3, 1)) < 0.7
    m = jaxbn.moments(x, mask=mask)
    mean, var, n = np_moments(x, mask)
    assert rel_err(m.mean, mean) < RTOL["float32"] and rel_err(m.var, var) < RTOL["float32"]
    np.testing.assert_array_equal(m.count, n)
    # moments is differentiable: d Σvar / dx = 2 M (x - mean) / n.
    g = jax.grad(lambda x: jnp.sum(jaxbn.moments(x, mask=mask).var))(x)
    mb = np.broadcast_to(mask, x.shape)
    assert rel_err(g, np.where(mb, 2 * (x - mean) / n, 0)) < 1e-5
    y = jaxbn.normalize(x, mean.astype(np.float32), var.astype(np.float32), axis=-1, epsilon=1e-3)
    assert rel_err(y, (x - mean) / np.sqrt(var + 1e-3)) < RTOL["float32"]


def test_empty_mask_gives_zero_moments():
    m = jaxbn.moments(_data((4, 2)), mask=np.zeros((4, 1), bool))
    assert np.all(np.asarray(m.mean) == 0) and np.all(np.asarray(m.var) == 0) and np.all(np.asarray(m.count) == 0)


def test_vmap_without_axis_name_is_per_example():
    """vmap over an ensemble axis: each member keeps its own statistics (dm-haiku#788)."""
    xs = _data((3, 8, 4))
    ys, sts = jax.vmap(lambda x: jaxbn.batch_norm(x, None, jaxbn.init_state(4), training=True))(xs)
    for i in range(3):
        assert rel_err(ys[i], np_batch_norm(xs[i], np.ones(4), np.zeros(4))[0]) < RTOL["float32"]
    assert sts.mean.shape == (3, 4)


# --- Errors -------------------------------------------------------------------

X = np.ones((4, 3), np.float32) + np.arange(12, dtype=np.float32).reshape(4, 3)
S = jaxbn.init_state(3)


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(x=np.arange(12).reshape(4, 3)), TypeError, r"x must be a floating-point or complex array, got dtype int"),
        (dict(axis=2), ValueError, r"axis=2 is out of range for x with 2 dimensions"),
        (dict(axis=(0, 0)), ValueError, r"names the same axis twice"),
        (dict(params={"scale": np.ones(4, np.float32)}), ValueError, r"params\['scale'\] has shape \(4,\), expected \(3,\)"),
        (dict(params={"gamma": np.ones(3)}), ValueError, r"unexpected keys \['gamma'\]"),
        (dict(state=jaxbn.init_state(5)), ValueError, r"state.mean has shape \(5,\), expected \(3,\)"),
        (dict(state={"mean": 0}), TypeError, r"state must be a jaxbn.BatchNormState"),
        (dict(mask=np.ones((3, 3), bool)), ValueError, r"mask with shape \(3, 3\) does not broadcast to x's shape \(4, 3\)"),
        (dict(mask=np.ones((4, 1))), TypeError, r"mask must be a boolean array, got dtype float"),
        (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\].*got 1.5"),
        (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\].*got -0.1"),
        (dict(epsilon=-1e-5), ValueError, r"epsilon must be >= 0, got -1e-05"),
        (dict(axis_name="batch"), ValueError, r"axis_name='batch' is not bound"),
        (dict(axis=1.0), TypeError, r"axis must be an int or a tuple of ints, got 1.0 \(float\)"),
        (dict(axis=(0, "1")), TypeError, r"axis must be an int or a tuple of ints, got \(0, '1'\)"),
        (dict(momentum="0.9"), TypeError, r"momentum must be a number in \[0, 1\] or None, got '0.9' \(str\)"),
        (dict(epsilon="1e-5"), TypeError, r"epsilon must be a number >= 0, got '1e-5' \(str\)"),
        (dict(training="yes"), TypeError, r"training must be a bool \(True or False\), got 'yes' \(str\)"),
        (dict(training=1), TypeError, r"training must be a bool \(True or False\), got 1 \(int\)"),
        (dict(update_stats="no"), TypeError, r"update_stats must be a bool \(True or False\) or None, got 'no'"),
        (dict(axis_name=3), TypeError, r"axis_name must be a str, a tuple of str or None, got 3 \(int\)"),
    ],
)
def test_bad_input_errors(kwargs, exc, pattern):
    args = dict(x=X, params=None, state=S, training=True)
    args.update(kwargs)
    x, params, state = args.pop("x"), args.pop("params"), args.pop("state")
    with pytest.raises(exc, match=pattern):
        jaxbn.batch_norm(x, params, state, **args)


def test_init_errors():
    with pytest.raises(ValueError, match=r"num_features must be a positive int"):
        jaxbn.init_state(0)
    for bad in (8.0, "8", None, True):
        for init in (jaxbn.init_state, jaxbn.init_params):
            with pytest.raises(TypeError, match=rf"num_features must be a positive int or a tuple of positive ints, got {bad!r} \({type(bad).__name__}\)"):
                init(bad)
    with pytest.raises(ValueError, match=r"num_features must be a positive int or a tuple of positive ints, got \(2, 0\)"):
        jaxbn.init_params((2, 0))
    with pytest.raises(ValueError, match=r"mean has shape \(2,\), expected \(3,\)"):
        jaxbn.normalize(X, np.zeros(2), np.ones(3))


# --- API conventions ----------------------------------------------------------


def test_api_conventions():
    assert sorted(jaxbn.__all__) == sorted(
        ["BatchNormState", "Moments", "batch_norm", "batch_renorm", "init_params", "init_state", "moments", "normalize",
         "renorm_limits", "running_moments"]
    )
    kw_only = {
        "batch_norm": {"training", "axis", "momentum", "epsilon", "axis_name", "axis_index_groups", "mask", "update_stats", "unbiased_running_var", "dtype", "virtual_batch_size"},
        "moments": {"axis", "axis_name", "axis_index_groups", "mask"},
        "normalize": {"axis", "epsilon"},
        "running_moments": {"momentum", "unbiased_running_var"},
        "init_params": {"dtype"},
    }
    for name, opts in kw_only.items():
        sig = inspect.signature(getattr(jaxbn, name))
        got = {p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert got == opts, name
        assert getattr(jaxbn, name).__doc__
    p = jaxbn.init_params(7)
    assert set(p) == {"scale", "bias"} and p["scale"].shape == (7,) and p["scale"].dtype == jnp.float32
    s = jaxbn.init_state(7)
    assert s.mean.shape == (7,) and s.var.shape == (7,) and float(s.var[0]) == 1.0 and int(s.count) == 0


def test_import_jaxbn_does_not_import_flax():
    code = "import sys, jaxbn; bad = [m for m in ('flax', 'optax', 'torch', 'tensorflow') if m in sys.modules]; print(bad); assert not bad"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_traced_epsilon_in_training():
    """epsilon is an operand: it may be traced (a schedule, a jit argument), gradients included."""
    x = RNG.normal(1.0, 2.0, size=(16, 3)).astype(np.float32)
    w = RNG.normal(size=(16, 3)).astype(np.float32)

    def loss(x, eps):
        return jnp.sum(w * jaxbn.batch_norm(x, None, jaxbn.init_state(3), training=True, epsilon=eps)[0])

    for eps in (1e-5, 0.5):
        y = jax.jit(lambda x, e: jaxbn.batch_norm(x, None, jaxbn.init_state(3), training=True, epsilon=e)[0])(x, eps)
        assert rel_err(y, np_batch_norm(x, np.ones(3), np.zeros(3), eps=eps)[0]) < RTOL["float32"]
        g = jax.jit(jax.grad(loss))(x, eps)
        assert rel_err(g, np_grads(x, np.ones(3), np.zeros(3), w, eps=eps)[0]) < 1e-4
