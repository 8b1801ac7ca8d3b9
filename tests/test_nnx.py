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
