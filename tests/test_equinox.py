"""jaxbn.equinox.BatchNorm against the float64 oracle and eqx.nn.BatchNorm(mode="batch").

The layer is called per example ``(C, *spatial)`` under ``jax.vmap(axis_name=...)``;
the oracle sees the whole batch ``(N, C, *spatial)`` with feature axis 1.
"""

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

eqx = pytest.importorskip("equinox")
import jaxbn.equinox as jbe  # noqa: E402
from oracle import RTOL, np_batch_norm, np_ema, np_grads, rel_err  # noqa: E402

C = 3
GRAD_TOL = 1e-4  # float32 autodiff against float64 central differences


def _data(shape, mean=1.0, std=2.0, seed=0):
    return np.random.default_rng(seed).normal(mean, std, shape).astype(np.float32)


def _make(axis_name="batch", c=C, seed=1, **kw):
    """A layer with non-trivial weight and bias, and its state."""
    bn, state = eqx.nn.make_with_state(jbe.BatchNorm)(c, axis_name, **kw)
    if bn.channelwise_affine:
        bn = _with_affine(bn, _data((c,), 1.0, 0.3, seed), _data((c,), 0.0, 1.0, seed + 1))
    return bn, state


def _with_affine(bn, weight, bias):
    dt = bn.weight.dtype
    return eqx.tree_at(lambda m: (m.weight, m.bias), bn, (jnp.asarray(weight, dt), jnp.asarray(bias, dt)))


def _batched(bn, name="batch"):
    """(x, state, mask) -> (y, state) over a batch, the state returned once."""
    return jax.vmap(lambda x, s, m: bn(x, s, mask=m), axis_name=name, in_axes=(0, None, 0), out_axes=(0, None))


def _example_mask(mask, ndim):
    """A per-example mask (N,) as the oracle's mask broadcastable to (N, C, *spatial)."""
    return None if mask is None else np.asarray(mask).reshape((-1,) + (1,) * (ndim - 1))


def _oracle(x, bn, mask=None):
    w = np.ones(bn.input_size) if bn.weight is None else bn.weight
    b = np.zeros(bn.input_size) if bn.bias is None else bn.bias
    return np_batch_norm(x, w, b, _example_mask(mask, x.ndim), feature_axes=(1,), eps=bn.eps)


def _running(state, bn):
    return state.get(bn.state_index)


# ----------------------------------------------------------------------------
# One vmap axis.


@pytest.mark.parametrize("shape", [(6, C, 4, 5), (5, C), (4, C, 2, 3, 2)], ids=["2d", "no_spatial", "3d"])
def test_forward_and_running_statistics(shape):
    """Two training steps: y and the EMA against the oracle (equinox#592: any spatial rank)."""
    bn, state = _make(momentum=0.9, eps=1e-3)
    run = jax.jit(_batched(bn))
    x1, x2 = _data(shape, seed=2), _data(shape, mean=-2.0, std=0.5, seed=3)
    ones = np.ones(shape[0], bool)
    st = _running(state, bn)
    np.testing.assert_array_equal(st.mean, np.zeros(C))  # equinox#955: mean 0, var 1 at init
    np.testing.assert_array_equal(st.var, np.ones(C))
    old_mean, old_var = np.zeros(C), np.ones(C)
    for x in (x1, x2):
        y, state = run(x, state, ones)
        y_ref, mean, var, n = _oracle(x, bn)
        assert y.shape == x.shape and y.dtype == jnp.float32
        assert rel_err(y, y_ref) < RTOL["float32"]
        old_mean, old_var = np_ema(old_mean, old_var, mean, var, n, 0.9)
        st = _running(state, bn)
        assert st.mean.dtype == jnp.float32 and st.var.dtype == jnp.float32
        assert rel_err(st.mean, old_mean) < RTOL["float32"]
        assert rel_err(st.var, old_var) < RTOL["float32"]
    assert int(_running(state, bn).count) == 2


@pytest.mark.parametrize("affine", [True, False])
def test_gradients(affine):
    """jax.grad of Σ w·y through vmap, w.r.t. x, weight and bias, against central differences."""
    shape = (4, C, 2, 3)
    x, w = _data(shape, seed=4), _data(shape, 0.0, 1.0, seed=5)
    bn, state = _make(channelwise_affine=affine)
    ones = np.ones(shape[0], bool)

    def loss(x, model, state):
        y, _ = _batched(model)(x, state, ones)
        return jnp.sum(w * y)

    dx, dmodel = jax.grad(loss, argnums=(0, 1), allow_int=True)(x, bn, state)
    ref_w = np.ones(C) if bn.weight is None else bn.weight
    ref_b = np.zeros(C) if bn.bias is None else bn.bias
    gx, gw, gb = np_grads(x, ref_w, ref_b, w, feature_axes=(1,), eps=bn.eps)
    assert rel_err(dx, gx) < GRAD_TOL
    if affine:
        assert rel_err(dmodel.weight, gw) < GRAD_TOL
        assert rel_err(dmodel.bias, gb) < GRAD_TOL


def test_inference_mode_uses_running_statistics():
    bn, state = _make(momentum=0.5)
    x = _data((6, C, 3, 3), seed=6)
    ones = np.ones(6, bool)
    infer = eqx.nn.inference_mode(bn)
    assert infer.inference is True and bn.inference is False
    # A fresh state normalizes with mean 0 and var 1 (equinox#955 initialised var as 0).
    y0, state = _batched(infer)(x, state, ones)
    w, b = np.asarray(bn.weight, np.float64), np.asarray(bn.bias, np.float64)
    bshape = (1, C, 1, 1)
    assert rel_err(y0, x / np.sqrt(1 + bn.eps) * w.reshape(bshape) + b.reshape(bshape)) < RTOL["float32"]
    assert int(_running(state, bn).count) == 0  # inference leaves the state alone
    _, state = _batched(bn)(x, state, ones)  # one training step
    st = _running(state, bn)
    x_new = _data((6, C, 3, 3), mean=4.0, seed=7)
    y, state = jax.jit(_batched(infer))(x_new, state, ones)
    mean, var = (np.asarray(v, np.float64).reshape(bshape) for v in (st.mean, st.var))
    ref = (x_new - mean) / np.sqrt(var + bn.eps) * w.reshape(bshape) + b.reshape(bshape)
    assert rel_err(y, ref) < RTOL["float32"]
    np.testing.assert_array_equal(_running(state, bn).mean, st.mean)
    # The call's `inference` overrides the field, both ways.
    run = jax.vmap(lambda x, s: bn(x, s, inference=True), axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    assert rel_err(run(x_new, state)[0], y) < RTOL["float32"]  # eager vs jit rounding
    run = jax.vmap(lambda x, s: infer(x, s, inference=False), axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    assert rel_err(run(x_new, state)[0], _oracle(x_new, bn)[0]) < RTOL["float32"]
    # Back to training.
    back = eqx.nn.inference_mode(infer, value=False)
    assert rel_err(_batched(back)(x_new, state, ones)[0], _oracle(x_new, bn)[0]) < RTOL["float32"]


def test_mask_with_uneven_counts():
    """Masked-out examples add nothing to the statistics and are normalized like the others."""
    bn, state = _make()
    x = _data((7, C, 3, 2), seed=8)
    x[[1, 4]] += 100.0  # outliers, masked out
    mask = np.array([True, False, True, True, False, True, True])
    y, state = jax.jit(_batched(bn))(x, state, mask)
    y_ref, mean, var, n = _oracle(x, bn, mask)
    assert int(n[0]) == 5 * 6
    assert rel_err(y, y_ref) < RTOL["float32"]
    ema_mean, ema_var = np_ema(np.zeros(C), np.ones(C), mean, var, n, 0.99)
    assert rel_err(_running(state, bn).mean, ema_mean) < RTOL["float32"]
    assert rel_err(_running(state, bn).var, ema_var) < RTOL["float32"]
    # Gradients with the mask.
    w = _data(x.shape, 0.0, 1.0, seed=9)
    xs = _data((5, C, 2), seed=10)
    ms = np.array([True, False, True, False, True])
    ws = w[:5, :, 0, :]
    dx = jax.grad(lambda x: jnp.sum(ws * _batched(bn)(x, state, ms)[0]))(xs)
    gx, _, _ = np_grads(xs, bn.weight, bn.bias, ws, mask=_example_mask(ms, 3), feature_axes=(1,))
    assert rel_err(dx, gx) < GRAD_TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"], ids=["f32_params", "bf16_params"])
def test_bf16_input_float32_state(dtype):
    bn, state = _make(dtype=jnp.dtype(dtype), momentum=0.0)
    x = jnp.asarray(_data((8, C, 4, 4), mean=3.0, seed=11), jnp.bfloat16)
    y, state = jax.jit(_batched(bn))(x, state, np.ones(8, bool))
    assert y.dtype == jnp.result_type(jnp.bfloat16, jnp.dtype(dtype))
    st = _running(state, bn)
    assert st.mean.dtype == jnp.float32 and st.var.dtype == jnp.float32
    xd = np.asarray(x.astype(jnp.float32), np.float64)  # the values actually seen
    y_ref, mean, var, _ = _oracle(xd, bn)
    assert rel_err(st.mean, mean) < RTOL["float32"]  # float32 statistics of the bf16 values
    assert rel_err(st.var, var) < RTOL["float32"]
    assert rel_err(y.astype(jnp.float32), y_ref) < RTOL["bfloat16"]
    g = jax.grad(lambda x: jnp.sum(_batched(bn)(x, state, np.ones(8, bool))[0].astype(jnp.float32) ** 2))(x)
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g)))


# ----------------------------------------------------------------------------
# Several axis names.


def test_nested_vmap():
    """Statistics over ("outer", "inner") are the whole (A·B)-batch's (equinox#707)."""
    a, b = 3, 4
    x = _data((a, b, C, 2, 2), seed=12)
    w = _data(x.shape, 0.0, 1.0, seed=13)
    bn, state = _make(("outer", "inner"))

    def run(model, x, state):
        inner = jax.vmap(model, axis_name="inner", in_axes=(0, None), out_axes=(0, None))
        return jax.vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, None))(x, state)

    y, new = eqx.filter_jit(run)(bn, x, state)
    flat = x.reshape((a * b,) + x.shape[2:])
    y_ref, mean, var, n = _oracle(flat, bn)
    assert rel_err(y.reshape(flat.shape), y_ref) < RTOL["float32"]
    assert rel_err(_running(new, bn).var, np_ema(np.zeros(C), np.ones(C), mean, var, n, 0.99)[1]) < RTOL["float32"]
    dx, dm = jax.grad(lambda x, m: jnp.sum(w * run(m, x, state)[0]), argnums=(0, 1), allow_int=True)(x, bn)
    gx, gw, gb = np_grads(flat, bn.weight, bn.bias, w.reshape(flat.shape), feature_axes=(1,))
    assert rel_err(dx.reshape(flat.shape), gx) < GRAD_TOL
    assert rel_err(dm.weight, gw) < GRAD_TOL and rel_err(dm.bias, gb) < GRAD_TOL
    # Naming only the inner axis keeps one set of statistics per outer index.
    bn_in, state_in = _make("inner")
    inner = jax.vmap(bn_in, axis_name="inner", in_axes=(0, None), out_axes=(0, None))
    y_in, _ = jax.vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, 0))(x, state_in)
    for i in range(a):
        assert rel_err(y_in[i], _oracle(x[i], bn_in)[0]) < RTOL["float32"]


def _mesh():
    return jax.make_mesh((8,), ("dev",), axis_types=(jax.sharding.AxisType.Auto,))


def _global_inputs(ndev, per=2):
    """8 devices × `per` examples, a device whose examples are all masked out, uneven counts."""
    shape = (ndev * per, C, 3, 2)
    x, w = _data(shape, seed=14), _data(shape, 0.0, 1.0, seed=15)
    mask = np.ones(shape[0], bool)
    mask[[6, 7, 10]] = False  # device 3 empty, device 5 half
    return x, w, mask


def _check_global(bn, x, w, mask, y, new, dx, dw, db):
    y_ref, mean, var, n = _oracle(x, bn, mask)
    assert rel_err(y, y_ref) < RTOL["float32"]
    ema_mean, ema_var = np_ema(np.zeros(C), np.ones(C), mean, var, n, 0.99)
    assert rel_err(_running(new, bn).mean, ema_mean) < RTOL["float32"]
    assert rel_err(_running(new, bn).var, ema_var) < RTOL["float32"]
    gx, gw, gb = np_grads(x, bn.weight, bn.bias, w, mask=_example_mask(mask, x.ndim), feature_axes=(1,))
    assert rel_err(dx, gx) < GRAD_TOL
    assert rel_err(dw, gw) < GRAD_TOL and rel_err(db, gb) < GRAD_TOL


def test_vmap_inside_shard_map(ndev):
    """Statistics over ("dev", "batch"): y, running statistics and gradients are the global
    batch's. check_vma=False (see test_checked_shard_map_error), so the gradients follow
    pmap's convention: those of the local loss, parameter gradients psummed."""
    x, w, mask = _global_inputs(ndev)
    bn, state = _make(("dev", "batch"))

    def local(x, w, m, weight, bias, state):
        def loss(x, weight, bias):
            y, st = _batched(_with_affine(bn, weight, bias))(x, state, m)
            return jnp.sum(w * y), (y, st)

        (_, (y, st)), (dx, dw, db) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, weight, bias)
        return y, st, dx, jax.lax.psum(dw, "dev"), jax.lax.psum(db, "dev")

    f = jax.shard_map(local, mesh=_mesh(), in_specs=(P("dev"), P("dev"), P("dev"), P(), P(), P()),
                      out_specs=(P("dev"), P(), P("dev"), P(), P()), check_vma=False)
    _check_global(bn, x, w, mask, *jax.jit(f)(x, w, mask, bn.weight, bn.bias, state))


def test_checked_shard_map_error(ndev):
    """jax 0.10.2 cannot psum over a vmap axis inside shard_map(check_vma=True) (an
    AssertionError in its pvary): the layer says what to do instead."""
    x, _, mask = _global_inputs(ndev)
    bn, state = _make(("dev", "batch"))
    f = jax.shard_map(lambda x, m, s: _batched(bn)(x, s, m), mesh=_mesh(), in_specs=(P("dev"), P("dev"), P()),
                      out_specs=(P("dev"), P()))
    with pytest.raises(ValueError, match="check_vma=False"):
        f(x, mask, state)


def test_vmap_under_sharded_jit(ndev):
    """Equinox's data parallelism: the global batch sharded over 8 devices, one vmap axis,
    jit; XLA partitions the statistics."""
    x, w, mask = _global_inputs(ndev)
    bn, state = _make("batch")
    sharded = jax.sharding.NamedSharding(_mesh(), P("dev"))
    xs, ws, ms = (jax.device_put(a, sharded) for a in (x, w, mask))

    def loss(x, weight, bias):
        y, st = _batched(_with_affine(bn, weight, bias))(x, state, ms)
        return jnp.sum(ws * y), (y, st)

    (_, (y, new)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(xs, bn.weight, bn.bias)
    assert y.sharding.is_equivalent_to(sharded, y.ndim)
    _check_global(bn, x, w, mask, y, new, *grads)


def test_vmap_inside_pmap(ndev):
    per = 3
    x = _data((ndev, per, C, 2, 2), seed=16)
    bn, state = _make(("dev", "batch"))
    f = jax.pmap(lambda x, s: jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s),
                 axis_name="dev", in_axes=(0, None))
    y, new = f(x, state)
    flat = x.reshape((-1,) + x.shape[2:])
    y_ref, mean, var, n = _oracle(flat, bn)
    assert rel_err(y.reshape(flat.shape), y_ref) < RTOL["float32"]
    st = _running(new, bn)
    assert rel_err(st.mean[0], np_ema(np.zeros(C), np.ones(C), mean, var, n, 0.99)[0]) < RTOL["float32"]
    np.testing.assert_array_equal(st.var, np.broadcast_to(st.var[0], st.var.shape))  # the same on every device


# ----------------------------------------------------------------------------
# Against Equinox.


def test_matches_equinox_batch_mode_in_training():
    """Where eqx.nn.BatchNorm(mode="batch") is right: training output, gradients, the stored
    (not debiased) running averages after a step, for a single vmap axis. Its inference
    output is not compared: it divides var (initialised at 1) by 1 - momentum**count."""
    x, w = _data((6, C, 3, 3), mean=2.0, seed=17), _data((6, C, 3, 3), 0.0, 1.0, seed=18)
    ours, s1 = _make(momentum=0.9)
    theirs, s2 = eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, "batch", momentum=0.9, mode="batch")
    theirs = _with_affine(theirs, ours.weight, ours.bias)

    def run(model, x, state):
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    y1, n1 = run(ours, x, s1)
    y2, n2 = run(theirs, x, s2)
    assert rel_err(y1, y2) < RTOL["float32"]
    mean2, var2 = n2.get(theirs.batch_state_index)
    assert rel_err(_running(n1, ours).mean, mean2) < RTOL["float32"]
    assert rel_err(_running(n1, ours).var, var2) < RTOL["float32"]

    def grads(model, state):
        # filter_grad: Equinox's axis_name is a pytree leaf (equinox#1074), jax.grad refuses it.
        return eqx.filter_grad(lambda xm: jnp.sum(w * run(xm[1], xm[0], state)[0]))((x, model))

    (dx1, dm1), (dx2, dm2) = grads(ours, n1), grads(theirs, n2)
    assert rel_err(dx1, dx2) < GRAD_TOL
    assert rel_err(dm1.weight, dm2.weight) < GRAD_TOL and rel_err(dm1.bias, dm2.bias) < GRAD_TOL


def test_in_sequential_with_filter_jit():
    """A StatefulLayer: eqx.nn.Sequential threads the state; eqx.filter_jit keeps `inference` static."""
    key = jax.random.key(0)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx.nn.Conv2d(2, C, 3, padding=1, key=key), jbe.BatchNorm(C, "batch"), eqx.nn.Lambda(jax.nn.relu)]
    )

    @eqx.filter_jit
    def step(model, x, state):
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    x = _data((5, 2, 4, 4), seed=19)
    y, state = step(model, x, state)
    h = jax.vmap(model.layers[0])(x)
    ref = np.maximum(_oracle(np.asarray(h), model.layers[1])[0], 0)
    assert rel_err(y, ref) < 1e-4
    y_eval, state2 = step(eqx.nn.inference_mode(model), x, state)
    assert int(state2.get(model.layers[1].state_index).count) == 1


# ----------------------------------------------------------------------------
# Arguments and packaging.


def test_argument_errors():
    with pytest.raises(TypeError, match="axis_name"):
        jbe.BatchNorm(C, None)
    with pytest.raises(TypeError, match="axis_name"):
        jbe.BatchNorm(C, ())
    with pytest.raises(ValueError, match="mode"):
        jbe.BatchNorm(C, "batch", mode="ema")
    with pytest.raises(ValueError, match="momentum"):
        jbe.BatchNorm(C, "batch", momentum=1.5)
    bn, state = eqx.nn.make_with_state(jbe.BatchNorm)(C, "batch")
    with pytest.raises(ValueError, match="input_size=3"):
        jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(jnp.ones((4, C + 1, 2)), state)
    bn, state = eqx.nn.make_with_state(jbe.BatchNorm)(C, "batch")
    with pytest.raises(ValueError, match="not bound"):
        bn(jnp.ones((C, 2)), state)  # outside vmap
    bn, state = eqx.nn.make_with_state(jbe.BatchNorm)(C, "batch")
    # plain jax.jit traces the `inference` flag (a pytree leaf): say what to do instead.
    with pytest.raises(TypeError, match="filter_jit"):
        jax.jit(lambda m, x, s: jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s))(
            bn, jnp.ones((4, C, 2)), state)


def test_axis_name_is_static():
    """equinox#1074: axis_name is not a pytree leaf (jit/grad see only arrays and the flag)."""
    bn, _ = eqx.nn.make_with_state(jbe.BatchNorm)(C, ("dev", "batch"))
    leaves = jax.tree.leaves(bn)
    assert all(not isinstance(v, str) for v in leaves)
    assert bn.axis_name == ("dev", "batch")


def test_import_jaxbn_does_not_import_equinox():
    code = (
        "import sys, jaxbn\n"
        "assert 'equinox' not in sys.modules\n"
        "import jaxbn.equinox\n"
        "assert 'equinox' in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_readme_equinox_example():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("\n## Equinox", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    scope = {}
    exec(compile(code, "README.md (Equinox)", "exec"), scope)
    assert scope["y"].shape == (32, 16, 8, 8)
    assert int(scope["state"].get(scope["model"].bn.state_index).count) == 1
