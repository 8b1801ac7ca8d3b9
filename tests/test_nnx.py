"""jaxbn.nnx.BatchNorm against flax.nnx.BatchNorm and the float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbn import nnx as bnnx
from oracle import RTOL, np_batch_norm, rel_err


def _x(shape=(8, 3, 5), seed=0):
    return (np.random.default_rng(seed).normal(size=shape) * 2 + 1).astype(np.float32)


def _pair(**kw):
    return bnnx.BatchNorm(5, rngs=nnx.Rngs(0), **kw), nnx.BatchNorm(5, rngs=nnx.Rngs(0), **kw)


def test_same_variables_as_flax():
    ours, theirs = _pair()
    s1, s2 = nnx.state(ours), nnx.state(theirs)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    assert set(nnx.state(ours, nnx.BatchStat).keys()) == {"mean", "var"}
    assert set(nnx.state(ours, nnx.Param).keys()) == {"scale", "bias"}


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.8, epsilon=1e-3), dict(use_scale=False)], ids=["default", "mom", "noscale"])
def test_train_eval_and_grads_match_flax(kw):
    x, w = _x(), _x(seed=3)
    ours, theirs = _pair(**kw)
    for m in (ours, theirs):
        if m.scale is not None:
            m.scale[...] = jnp.asarray(np.linspace(0.5, 1.5, 5), jnp.float32)
        m.bias[...] = jnp.asarray(np.linspace(-1, 1, 5), jnp.float32)

    def loss(m, x):
        return jnp.sum(w * m(x))

    g1 = nnx.grad(loss, argnums=(0, 1))(ours, x)
    g2 = nnx.grad(loss, argnums=(0, 1))(theirs, x)
    assert rel_err(g1[1], g2[1]) < 1e-4
    jax.tree.map(lambda a, b: rel_err(a, b) < 1e-4 or pytest.fail("param grads"), nnx.state(g1[0], nnx.Param), nnx.state(g2[0], nnx.Param))
    assert rel_err(ours.mean[...], theirs.mean[...]) < RTOL["float32"]
    assert rel_err(ours.var[...], theirs.var[...]) < RTOL["float32"]
    ours.eval()
    theirs.eval()
    assert rel_err(ours(x), theirs(x)) < RTOL["float32"]
    mean_before = np.asarray(ours.mean[...])
    ours(x)  # eval mode leaves the statistics alone
    np.testing.assert_array_equal(ours.mean[...], mean_before)
    ours.train()
    y = ours(x)
    ref = np_batch_norm(x, ours.scale[...] if ours.scale is not None else np.ones(5), ours.bias[...], None, (-1,), kw.get("epsilon", 1e-5))[0]
    assert rel_err(y, ref) < RTOL["float32"]


def test_view_and_call_override():
    ours, _ = _pair()
    x = _x()
    frozen = nnx.view(ours, use_running_average=True)
    y = frozen(x)
    assert rel_err(y, x / np.sqrt(1 + 1e-5)) < RTOL["float32"]
    assert rel_err(ours(x, use_running_average=True), y) < RTOL["float32"]


def test_frozen_batch_norm_for_fine_tuning():
    """Running statistics, not updated; no gradient to scale and bias."""
    m = bnnx.BatchNorm(5, use_running_average=True, trainable_params=False, rngs=nnx.Rngs(0))
    m.mean[...] = jnp.arange(5.0)
    m.var[...] = jnp.linspace(0.5, 2.0, 5)
    x = _x()
    g_model, g_x = nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=(0, 1))(m, x)
    assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(nnx.state(g_model, nnx.Param)))
    assert float(jnp.abs(g_x).max()) > 0
    ref = (x - np.arange(5.0)) / np.sqrt(np.linspace(0.5, 2.0, 5) + 1e-5)
    assert rel_err(m(x), ref) < RTOL["float32"]
    np.testing.assert_array_equal(m.mean[...], np.arange(5.0))


# ----------------------------------------------------------------------------
# Flax NNX's behaviour beyond the math: dtypes, hijax variables, view_info, inputs.

_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def _out_tol(dtype):
    return {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 2e-3}[jnp.dtype(dtype)]


def test_output_dtype_and_values_match_flax_for_every_dtype_combination():
    """Flax NNX promotes (x, mean, var, scale, bias) together: bf16 x with bf16 params gives
    float32 (the float32 statistics take part); `dtype` casts all. jaxbn's statistics stay float32."""
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(16, 4)) * 3 + 1
    checked = 0
    for xname, xdt in [*_DTYPES.items(), ("i32", jnp.int32)]:
        x = jnp.asarray(np.round(x0) if xdt == jnp.int32 else x0).astype(xdt)
        for pname, pdt in _DTYPES.items():
            for dname, dt in [("None", None), *_DTYPES.items()]:
                for use_running_average in (False, True):
                    ours, theirs = (
                        cls(4, param_dtype=pdt, dtype=dt, use_running_average=use_running_average, rngs=nnx.Rngs(0))
                        for cls in (bnnx.BatchNorm, nnx.BatchNorm)
                    )
                    for m in (ours, theirs):
                        m.mean[...] = jnp.linspace(-1, 1, 4)
                        m.var[...] = jnp.linspace(0.5, 2, 4)
                        m.scale[...] = jnp.linspace(0.5, 1.5, 4).astype(pdt)
                        m.bias[...] = jnp.linspace(-0.5, 0.5, 4).astype(pdt)
                    y1, y2 = ours(x), theirs(x)
                    case = (xname, pname, dname, use_running_average)
                    assert y1.dtype == y2.dtype, case
                    assert rel_err(y1, y2) < _out_tol(y2.dtype), case
                    assert ours.mean[...].dtype == ours.var[...].dtype == jnp.float32, case
                    assert rel_err(ours.var[...], theirs.var[...]) < 1e-5, case
                    checked += 1
    assert checked == 4 * 3 * 4 * 2
    # Named cases, for the record.
    bf = jnp.ones((4, 3), jnp.bfloat16)
    assert bnnx.BatchNorm(3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(bf).dtype == jnp.float32
    assert bnnx.BatchNorm(3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(jnp.ones((4, 3))).dtype == jnp.bfloat16


def test_statistics_stay_float32_exact_for_low_precision_inputs():
    x = jnp.asarray(_x((64, 5)) + 1e3, jnp.bfloat16)
    m = bnnx.BatchNorm(5, momentum=0.0, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    m(x)
    ref = np.asarray(x, np.float64)
    assert m.mean[...].dtype == jnp.float32
    assert rel_err(m.mean[...], ref.mean(0)) < 1e-6
    assert rel_err(m.var[...], ref.var(0)) < 1e-4


def test_custom_promote_dtype_is_applied_as_in_flax():
    calls = []

    def to_f16(args, /, *, dtype=None, inexact=True):
        calls.append(dtype)
        return tuple(None if a is None else jnp.asarray(a, jnp.float16) for a in args)

    x = _x()
    ours, theirs = _pair(promote_dtype=to_f16, dtype=None)
    assert ours.promote_dtype is to_f16
    y1, y2 = ours(x), theirs(x)
    assert calls == [None, None]
    assert y1.dtype == y2.dtype == jnp.float16
    assert rel_err(y1, y2) < 2e-3


def test_integer_input_is_promoted_as_flax():
    x = jnp.asarray(np.round(_x() * 3), jnp.int32)
    ours, theirs = _pair()
    y1, y2 = ours(x), theirs(x)
    assert y1.dtype == y2.dtype == jnp.float32
    assert rel_err(y1, y2) < RTOL["float32"]
    assert rel_err(ours.mean[...], theirs.mean[...]) < RTOL["float32"]


def test_grad_through_hijax_variables():
    """With mutable-array (hijax) variables the new running statistics are written without a
    gradient, as Flax writes them; the gradient and the update equal the plain-variable ones."""

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 5, rngs=rngs)
            self.bn = bnnx.BatchNorm(5, momentum=0.5, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.bn(self.linear(x)))

    x = jnp.asarray(_x((8, 3)))
    results = []
    for hijax in (True, False):
        with nnx.var_defaults(hijax=hijax):
            model = Model(nnx.Rngs(0))

        @jax.jit
        def step(x):
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)

            def loss(params):
                return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

            return jax.grad(loss)(nnx.with_vars(params, hijax=False))

        if hijax:
            grads = step(x)
        else:  # plain variables: the functional form
            grads, _ = nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=(0, 1))(model, x)
            grads = nnx.state(grads, nnx.Param)
        results.append((grads, np.asarray(model.bn.mean[...]), np.asarray(model.bn.var[...])))
    (g1, mean1, var1), (g2, mean2, var2) = results
    assert jax.tree.structure(nnx.to_pure_dict(g1)) == jax.tree.structure(nnx.to_pure_dict(g2))
    flat1, flat2 = (np.concatenate([np.ravel(a) for a in jax.tree.leaves(nnx.to_pure_dict(g))]) for g in (g1, g2))
    assert rel_err(flat1, flat2) < 1e-5  # the Linear bias's gradient is ~0 (BatchNorm removes it)
    assert float(np.abs(mean1).max()) > 0
    np.testing.assert_allclose(mean1, mean2, rtol=1e-6)
    np.testing.assert_allclose(var1, var2, rtol=1e-6)


def test_view_info_documents_use_running_average_as_flax():
    class Block(nnx.Module):
        def __init__(self, bn_cls):
            self.bn = bn_cls(3, rngs=nnx.Rngs(0))
            self.dropout = nnx.Dropout(0.1)

    ours, theirs = nnx.view_info(Block(bnnx.BatchNorm)), nnx.view_info(Block(nnx.BatchNorm))
    assert ours == theirs
    assert "BatchNorm:\n  use_running_average: bool | None = None\n    if True, the stored batch statistics" in ours


def test_is_a_flax_batch_norm_and_found_by_class():
    """Code that finds BatchNorm layers with isinstance (to pass use_running_average, freeze them,
    exclude them from weight decay) finds jaxbn's; the variables are the same."""

    class Net(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([nnx.Linear(5, 5, rngs=nnx.Rngs(0)), bnnx.BatchNorm(5, rngs=nnx.Rngs(0))])

        def __call__(self, x, train):
            for layer in self.layers:
                x = layer(x, use_running_average=not train) if isinstance(layer, nnx.BatchNorm) else layer(x)
            return x

    net = Net()
    assert isinstance(net.layers[1], nnx.BatchNorm) and isinstance(net.layers[1], bnnx.BatchNorm)
    found = [path for path, m in nnx.iter_modules(net) if isinstance(m, nnx.BatchNorm)]
    assert found == [("layers", 1)]
    net(_x((8, 5)), train=False)
    np.testing.assert_array_equal(net.layers[1].mean[...], np.zeros(5))  # eval: untouched
    net(_x((8, 5)), train=True)
    assert float(np.abs(net.layers[1].mean[...]).max()) > 0


def test_unbound_axis_name_is_a_name_error_with_jaxbn_message():
    m = bnnx.BatchNorm(5, axis_name="batch", rngs=nnx.Rngs(0))
    x = _x()
    with pytest.raises(NameError, match="axis_name='batch' is not bound") as info:
        m(x)
    assert isinstance(info.value, ValueError) and isinstance(info.value, bnnx.UnboundAxisNameError)
    with pytest.raises(NameError):  # Flax raises a NameError too
        nnx.BatchNorm(5, axis_name="batch", rngs=nnx.Rngs(0))(x)
    np.testing.assert_array_equal(m.mean[...], np.zeros(5))
    m(x, use_running_average=True)  # evaluation needs no axis
