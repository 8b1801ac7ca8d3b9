"""jaxbn.max_pool against flax.linen.max_pool: values and the exact gradient (ties included)."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxbn import max_pool as mp
from jaxbn.models import CNN
from jaxbn import linen as bl


def _flax(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def _ours(x):
    return mp.max_pool(x, (2, 2), strides=(2, 2))


def _tied(shape, seed=0, dtype=np.float32):
    """ReLU of small integers: most windows hold several equal maxima (zeros, or equal positives)."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.integers(-3, 3, shape), 0).astype(dtype)


def _grads(pool, x, w):
    return jax.grad(lambda x: jnp.sum(pool(x).astype(jnp.float32) * w))(x)


def _assert_bitwise(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    # bytes, not values: also tells -0.0 from 0.0
    np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))


SHAPES = [(4, 6, 6, 3), (3, 7, 5, 2), (2, 9, 9, 4), (2, 2, 3, 1), (5, 8, 8), (2, 3, 6, 6, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("data", ["ties", "normal"])
def test_values_and_gradient_equal_flax(shape, data):
    rng = np.random.default_rng(1)
    x = _tied(shape) if data == "ties" else rng.normal(size=shape).astype(np.float32)
    assert mp.fast_path_applies(x, (2, 2), (2, 2), "VALID")
    y = _flax(x)
    _assert_bitwise(_ours(x), y)
    w = rng.normal(size=y.shape).astype(np.float32)
    _assert_bitwise(_grads(_ours, x, w), _grads(_flax, x, w))
    _assert_bitwise(jax.jit(functools.partial(_grads, _ours))(x, w), jax.jit(functools.partial(_grads, _flax))(x, w))


def test_ties_go_to_the_first_maximum_row_major():
    # Every 2×2 window of 0, 1, -0.0, NaN: the one element XLA's select_and_scatter(ge) picks.
    wins = np.array(list(itertools.product([0.0, 1.0, -0.0, np.nan], repeat=4)), np.float32)  # (256, 4)
    x = wins.reshape(256, 1, 2, 2).transpose(1, 2, 0, 3).reshape(1, 2, 512, 1)  # windows side by side
    assert x[0, 0, 2 * 5 + 1, 0] == wins[5, 1] or np.isnan(wins[5, 1])
    w = np.arange(1, 257, dtype=np.float32).reshape(1, 1, 256, 1)
    g_ours, g_flax = _grads(_ours, x, w), _grads(_flax, x, w)
    _assert_bitwise(g_ours, g_flax)
    # one nonzero per window, and a window of equal values routes to its top-left element
    assert int(np.count_nonzero(np.asarray(g_ours))) == 256
    np.testing.assert_array_equal(np.asarray(_ours(x)), np.asarray(_flax(x)))  # NaNs compare equal here
    x4 = np.zeros((1, 2, 2, 1), np.float32)
    np.testing.assert_array_equal(np.asarray(_grads(_ours, x4, np.ones((1, 1, 1, 1), np.float32)))[0, :, :, 0],
                                  [[1, 0], [0, 0]])


def test_odd_sizes_drop_the_last_row_and_column():
    x = _tied((2, 7, 5, 3), seed=2)
    g = np.asarray(_grads(_ours, x, np.ones((2, 3, 2, 3), np.float32)))
    assert not g[:, 6].any() and not g[:, :, 4].any()
    _assert_bitwise(g, _grads(_flax, x, np.ones((2, 3, 2, 3), np.float32)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, np.float64])
def test_low_and_high_precision(dtype):
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        dtype = jnp.float32
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 10, 10, 8)), dtype)
    x = jnp.maximum(jnp.round(x * 2), 0)  # ties, in this dtype
    y = _flax(x)
    _assert_bitwise(_ours(x), y)
    w = jnp.asarray(rng.normal(size=y.shape), dtype)
    f = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * w).astype(jnp.float32)))(x)
    _assert_bitwise(f(_ours), f(_flax))
    assert f(_ours).dtype == x.dtype


@pytest.mark.parametrize(
    "args",
    [((2, 2), None, "VALID"), ((3, 3), (2, 2), "VALID"), ((2, 2), (2, 2), "SAME"), ((2, 2), (1, 1), "VALID"),
     ((2, 2), (2, 2), ((0, 1), (1, 0))), ((2,), (2,), "VALID")],
    ids=["stride1", "3x3", "same", "s11", "pairs", "1d"],
)
def test_other_arguments_fall_back_to_reduce_window(args):
    window, strides, padding = args
    shape = (3, 7, 4) if len(window) == 1 else (3, 7, 6, 4)
    x = _tied(shape, seed=4)
    assert not mp.fast_path_applies(x, window, strides, padding)
    f_ours = lambda x: mp.max_pool(x, window, strides, padding)
    f_flax = lambda x: nn.max_pool(x, window, strides, padding)
    y = f_flax(x)
    _assert_bitwise(f_ours(x), y)
    w = np.random.default_rng(0).normal(size=y.shape).astype(np.float32)
    _assert_bitwise(_grads(f_ours, x, w), _grads(f_flax, x, w))


def test_unbatched_and_tiny_inputs():
    x = _tied((6, 6, 3))  # no batch dim: Flax adds one
    _assert_bitwise(_ours(x), _flax(x))
    tiny = _tied((2, 1, 5, 3))  # smaller than a window: reduce_window's path, empty output
    assert not mp.fast_path_applies(tiny, (2, 2), (2, 2))
    assert _ours(tiny).shape == _flax(tiny).shape == (2, 0, 2, 3)
    ints = np.arange(2 * 4 * 4 * 1).reshape(2, 4, 4, 1)
    assert not mp.fast_path_applies(ints, (2, 2), (2, 2))


def test_vmap_and_grad_of_grad():
    x = _tied((3, 2, 6, 6, 2), seed=5)
    w = np.random.default_rng(6).normal(size=(3, 2, 3, 3, 2)).astype(np.float32)
    _assert_bitwise(jax.vmap(_ours)(x), jax.vmap(_flax)(x))
    g = lambda pool: jax.vmap(jax.grad(lambda x, w: jnp.sum(pool(x) * w)))(x, w)
    _assert_bitwise(g(_ours), g(_flax))

    # reverse over reverse: d/dx <grad_x sum(pool(x)^2), v> = routing of 2 * pool-of-v's routing
    xn = np.random.default_rng(7).normal(size=(2, 6, 6, 2)).astype(np.float32)
    xn[:, ::2] = np.maximum(xn[:, ::2], 0.5)  # some ties at 0.5
    v = np.random.default_rng(8).normal(size=xn.shape).astype(np.float32)

    def hvp(pool):
        inner = jax.grad(lambda x: jnp.sum(pool(x) ** 2))
        return jax.grad(lambda x: jnp.sum(inner(x) * v))(xn)

    _assert_bitwise(hvp(_ours), hvp(_flax))


def test_forward_mode_jvp_jacfwd_hessian():
    rng = np.random.default_rng(12)
    x = _tied((2, 5, 6, 3), seed=12)  # ties and an odd height
    t = rng.normal(size=x.shape).astype(np.float32)
    (y1, t1), (y2, t2) = jax.jvp(_ours, (x,), (t,)), jax.jvp(_flax, (x,), (t,))
    _assert_bitwise(y1, y2)
    np.testing.assert_array_equal(t1, t2)  # equal values (a zero tangent's sign may differ)
    xs = _tied((1, 4, 4, 2), seed=13)
    np.testing.assert_array_equal(jax.jacfwd(_ours)(xs), jax.jacfwd(_flax)(xs))
    np.testing.assert_array_equal(jax.jacrev(_ours)(xs), jax.jacrev(_flax)(xs))
    f = lambda pool: (lambda x: jnp.sum(jnp.tanh(pool(x)) * 1.5))
    xs2 = xs + 0.25
    np.testing.assert_allclose(jax.hessian(f(_ours))(xs2), jax.hessian(f(_flax))(xs2), rtol=1e-6, atol=1e-7)
    y_lin, lin = jax.linearize(_ours, x)
    np.testing.assert_array_equal(lin(t), t2)


def test_shard_map(ndev):
    from jax import shard_map

    mesh = Mesh(np.array(jax.devices()[:ndev]), ("batch",))
    x = _tied((2 * ndev, 8, 8, 3), seed=9)
    w = np.random.default_rng(10).normal(size=(2 * ndev, 4, 4, 3)).astype(np.float32)

    def run(pool):
        def loss(x, w):
            return jax.lax.psum(jnp.sum(pool(x) * w), "batch")

        f = shard_map(jax.value_and_grad(loss), mesh=mesh, in_specs=(P("batch"), P("batch")),
                      out_specs=(P(), P("batch")))
        return jax.jit(f)(x, w)

    (l1, g1), (l2, g2) = run(_ours), run(_flax)
    _assert_bitwise(g1, g2)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)  # a sum that XLA may fuse with the pool in another order


@pytest.mark.parametrize("norm", ["jaxbn", "flax"])
def test_cnn_outputs_and_gradients_unchanged(norm):
    cls = bl.BatchNorm if norm == "jaxbn" else nn.BatchNorm
    norm_f = functools.partial(cls, momentum=0.9)
    ours, theirs = CNN(norm=norm_f), CNN(norm=norm_f, pool=nn.max_pool)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(16, 28, 28, 1)).astype(np.float32)
    x[:, :, :10] = 0.0  # blank rows, as MNIST's borders: many tied windows after Conv/ReLU/BN
    labels = rng.integers(0, 10, 16)
    v = ours.init(jax.random.key(0), x, train=False)
    v_theirs = theirs.init(jax.random.key(0), x, train=False)
    jax.tree.map(_assert_bitwise, v, v_theirs)  # same parameters: checkpoints unchanged

    def step(model, params):
        def loss(params):
            logits, upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                                      mutable=["batch_stats"])
            ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
            return ce, (logits, upd["batch_stats"])

        return jax.value_and_grad(loss, has_aux=True)(params)

    # Op by op, every op sees the same inputs: all bitwise equal.
    (l1, (y1, s1)), g1 = step(ours, v["params"])
    (l2, (y2, s2)), g2 = step(theirs, v["params"])
    _assert_bitwise(y1, y2)
    _assert_bitwise(l1, l2)
    jax.tree.map(_assert_bitwise, s1, s2)
    jax.tree.map(_assert_bitwise, g1, g2)
    # Jitted, XLA fuses the reductions after the pool's gradient differently: float rounding only.
    (l1, (y1, s1)), g1 = jax.jit(step, static_argnums=0)(ours, v["params"])
    (l2, (y2, s2)), g2 = jax.jit(step, static_argnums=0)(theirs, v["params"])
    _assert_bitwise(y1, y2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), g1, g2)
    _assert_bitwise(ours.apply(v, x, train=False), theirs.apply(v, x, train=False))


def test_imports_no_framework():
    import subprocess
    import sys

    code = "import sys, jaxbn.max_pool\nassert 'flax' not in sys.modules and 'torch' not in sys.modules\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert CNN().pool is mp.max_pool  # the models' default
