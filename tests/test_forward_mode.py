"""Forward-mode AD through the training layer (jax.jvp, jax.jacfwd, jax.linearize),
on one device and across devices, against the float64 oracle's directional derivative."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from jaxbn import _hlo
from oracle import np_batch_norm, rel_err

NDEV = 8
SHAPE = (NDEV * 4, 3, 5)  # (N, H, C), feature axis -1
C = SHAPE[-1]


@functools.lru_cache(maxsize=None)
def _inputs(masked: bool):
    rng = np.random.default_rng(11)
    x = (rng.normal(size=SHAPE) * rng.uniform(0.5, 3, C) + rng.normal(size=C) * 4).astype(np.float32)
    scale, bias = rng.uniform(0.5, 2, C).astype(np.float32), rng.normal(size=C).astype(np.float32)
    tx = rng.normal(size=SHAPE).astype(np.float32)
    ts, tb = rng.normal(size=C).astype(np.float32), rng.normal(size=C).astype(np.float32)
    mask = None
    if masked:  # uneven counts per device, device 0 empty
        rows = rng.uniform(size=(NDEV, 4)) < np.linspace(0, 1, NDEV)[:, None]
        rows[0], rows[-1, 0] = False, True
        mask = rows.reshape(-1, 1, 1)
    return x, scale, bias, tx, ts, tb, mask


@functools.lru_cache(maxsize=None)
def _oracle(masked: bool, h: float = 1e-4):
    """(y, ẏ) in float64: ẏ by central differences along (tx, ts, tb)."""
    x, scale, bias, tx, ts, tb, mask = (None if a is None else np.asarray(a, np.float64) for a in _inputs(masked))
    if mask is not None:
        mask = mask.astype(bool)

    def y(e):
        return np_batch_norm(x + e * tx, scale + e * ts, bias + e * tb, mask)[0]

    return y(0.0), (y(h) - y(-h)) / (2 * h)


def _layer(x, scale, bias, mask, axis_name=None):
    return jaxbn.batch_norm(x, {"scale": scale, "bias": bias}, jaxbn.init_state(C), training=True,
                            axis_name=axis_name, mask=mask)[0]


def _jvp(x, scale, bias, tx, ts, tb, mask, axis_name=None):
    return jax.jvp(lambda x, s, b: _layer(x, s, b, mask, axis_name), (x, scale, bias), (tx, ts, tb))


def _mesh():
    return jax.make_mesh((NDEV,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def run_single(*a):
    return jax.jit(_jvp)(*a)


def run_shard_map(x, scale, bias, tx, ts, tb, mask):
    spec_m = None if mask is None else P("d")
    f = jax.shard_map(functools.partial(_jvp, axis_name="d"), mesh=_mesh(),
                      in_specs=(P("d"), P(), P(), P("d"), P(), P(), spec_m), out_specs=(P("d"), P("d")))
    return jax.jit(f)(x, scale, bias, tx, ts, tb, mask)


def run_pmap(x, scale, bias, tx, ts, tb, mask):
    split = lambda a: None if a is None else a.reshape((NDEV, -1) + a.shape[1:])  # noqa: E731
    f = jax.pmap(functools.partial(_jvp, axis_name="d"), axis_name="d", in_axes=(0, None, None, 0, None, None, 0))
    y, t = f(split(x), scale, bias, split(tx), ts, tb, split(mask))
    return y.reshape(SHAPE), t.reshape(SHAPE)


def run_sharded_jit(x, scale, bias, tx, ts, tb, mask):
    sh = NamedSharding(_mesh(), P("d"))
    put = lambda a: None if a is None else jax.device_put(a, sh)  # noqa: E731
    return jax.jit(_jvp)(put(x), scale, bias, put(tx), ts, tb, put(mask))


@pytest.mark.parametrize("kernels", ["0", "1"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@pytest.mark.parametrize("runner", [run_single, run_shard_map, run_pmap, run_sharded_jit],
                         ids=["one_device", "shard_map", "pmap", "sharded_jit"])
def test_jvp_equals_the_oracle_directional_derivative(ndev, runner, masked, kernels):
    y_ref, t_ref = _oracle(masked)
    with jaxbn.cpu_kernel.use(kernels):
        y, t = runner(*_inputs(masked))
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(t, t_ref) < 1e-4


def test_jacfwd_linearize_and_jacrev_agree():
    x, scale, bias, tx, ts, tb, _ = _inputs(False)
    x, tx = x[:6, 0], tx[:6, 0]  # (6, C): a small Jacobian
    f = lambda x: _layer(x, scale, bias, None)  # noqa: E731
    jf, jr = jax.jacfwd(f)(x), jax.jacrev(f)(x)
    assert jf.shape == (6, C, 6, C) and rel_err(jf, jr) < 1e-5
    y, lin = jax.linearize(f, x)
    assert rel_err(lin(tx), jax.jvp(f, (x,), (tx,))[1]) < 1e-6
    # Forward over reverse: the Hessian-vector product of a scalar loss.
    loss = lambda x: jnp.sum(jnp.sin(f(x)))  # noqa: E731
    hvp = jax.jvp(jax.grad(loss), (x,), (tx,))[1]
    hvp_rr = jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), tx))(x)
    assert rel_err(hvp, hvp_rr) < 1e-4

    def plain(x):  # the formula by JAX's own autodiff, for an independent second derivative
        m = x.mean(0)
        return (x - m) / jnp.sqrt(((x - m) ** 2).mean(0) + 1e-5) * scale + bias

    hvp_plain = jax.jvp(jax.grad(lambda x: jnp.sum(jnp.sin(plain(x)))), (x,), (tx,))[1]
    assert rel_err(hvp, hvp_plain) < 1e-4


def test_bf16_and_vmap_jvp():
    x, scale, bias, tx, ts, tb, _ = _inputs(False)
    y16, t16 = jax.jvp(lambda x: _layer(x, scale, bias, None), (x.astype(jnp.bfloat16),), (tx.astype(jnp.bfloat16),))
    assert y16.dtype == t16.dtype == jnp.bfloat16
    y, t = jax.jvp(lambda x: _layer(x, scale, bias, None), (x,), (tx,))
    assert rel_err(t16, t) < 3e-2
    xs, txs = x.reshape((4, -1) + x.shape[1:]), tx.reshape((4, -1) + x.shape[1:])
    tv = jax.vmap(lambda x, t: jax.jvp(lambda x: _layer(x, scale, bias, None), (x,), (t,))[1])(xs, txs)
    for i in range(4):
        ref = _oracle_single(xs[i], scale, bias, txs[i])
        assert rel_err(tv[i], ref) < 1e-4


def _oracle_single(x, scale, bias, tx, h=1e-4):
    x, tx = np.asarray(x, np.float64), np.asarray(tx, np.float64)
    return (np_batch_norm(x + h * tx, scale, bias)[0] - np_batch_norm(x - h * tx, scale, bias)[0]) / (2 * h)


def test_one_collective_each_way_forward_and_reverse(ndev):
    """Reverse mode keeps 1 + 1 all-reduces; forward mode adds one for the tangent."""
    x, scale, bias, tx, ts, tb, _ = _inputs(False)
    mesh = _mesh()

    def sm(f, n_out):
        return jax.shard_map(f, mesh=mesh, in_specs=(P("d"), P(), P(), P("d")), out_specs=(P(),) * n_out)

    def rev(x, s, b, w):
        loss = lambda x, s, b: jax.lax.psum(jnp.sum(w * _layer(x, s, b, None, "d")), "d")  # noqa: E731
        return jax.grad(loss, argnums=(1, 2))(x, s, b)

    def fwd(x, s, b, t):
        y, yt = jax.jvp(lambda x: _layer(x, s, b, None, "d"), (x,), (t,))
        return jax.lax.psum(jnp.sum(yt), "d"), jax.lax.psum(jnp.sum(y), "d")

    # Each program: one all-reduce of the devices' (n, mean, M2) rows and one of a (2, C)
    # pair of sums — [Σg, Σg·(x - μ)] in reverse mode, [Σẋ, Σẋ·(x - μ)] in forward mode —
    # besides what the test itself reduces (the loss's psum is no output in reverse mode,
    # and its transpose moves nothing).
    for f, total in ((rev, 2), (fwd, None)):
        text = _hlo.compiled_text(jax.jit(sm(f, 2)), x, scale, bias, tx)
        shapes = [str(a) for i in _hlo.instructions(text) if i.op == "all-reduce" for a in i.arrays]
        assert shapes.count(f"f32[{NDEV},3,{C}]") == 1 and shapes.count(f"f32[2,{C}]") == 1, (f.__name__, shapes)
        if total is not None:
            assert _hlo.count_collectives(text) == total


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(C)(x))


def test_linen_and_nnx_modules_support_jvp():
    x, _, _, tx, _, _, _ = _inputs(False)
    x, tx = x[:, 0], tx[:, 0]
    net = _LinenNet()
    v = net.init(jax.random.key(0), x, train=False)
    f = lambda x: net.apply(v, x, train=True, mutable=["batch_stats"])[0]  # noqa: E731
    y, t = jax.jvp(f, (x,), (tx,))
    t_rev = jax.vjp(f, x)[1]
    # <J t, u> == <t, J^T u> for a random u: forward and reverse mode are each other's transposes.
    u = np.random.default_rng(3).normal(size=y.shape).astype(np.float32)
    assert abs(float(jnp.vdot(t, u)) - float(jnp.vdot(tx, t_rev(u)[0]))) < 1e-3 * float(jnp.abs(t).sum())

    # NNX, the functional way (split, then merge inside the transformed function), as Flax's own.
    rng = np.random.default_rng(4)
    x = x * rng.uniform(0.5, 2, C).astype(np.float32) + 3
    tangents = {}
    for name, cls in (("jaxbn", jaxbn.nnx.BatchNorm), ("flax", nnx.BatchNorm)):
        bn = cls(C, momentum=0.9, rngs=nnx.Rngs(0))
        bn.train()
        graph, state = nnx.split(bn)

        def g(x, state):
            m = nnx.merge(graph, state)
            return m(x), nnx.state(m)

        (_, new_state), (t2, _) = jax.jvp(g, (x, state), (tx, jax.tree.map(jnp.zeros_like, state)))
        tangents[name] = t2
    _, t_ref = jax.jvp(lambda x: _layer(x, np.ones(C, np.float32), np.zeros(C, np.float32), None), (x,), (tx,))
    assert rel_err(tangents["jaxbn"], t_ref) < 1e-5
    assert rel_err(tangents["jaxbn"], tangents["flax"]) < 1e-4  # Flax's fast variance differs by ~1e-6
