"""jaxbn.linen.BatchNorm against flax.linen.BatchNorm and the float64 oracle."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxbn import linen as bl
from jaxbn.models import CNN, MLP, ResNet20
from oracle import RTOL, np_batch_norm, np_moments, rel_err


def _x(shape=(8, 3, 3, 5), mean=1.0, std=2.0, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * std + mean).astype(dtype)


def _random_vars(module, x, seed=1):
    """Initialized variables with random params and statistics (never ones/zeros)."""
    v = module.init(jax.random.key(0), x, use_running_average=False)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), v)


def _train(module, v, x, w, mask=None):
    def loss(x, params):
        y, upd = module.apply(
            {"params": params, "batch_stats": v["batch_stats"]}, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
        )
        return jnp.sum(w * y.astype(jnp.float32)), (y, upd["batch_stats"])

    (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, v["params"])
    return y, stats, grads


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(momentum=0.9, epsilon=1e-3), dict(use_bias=False), dict(use_scale=False), dict(axis=(1, 3))],
    ids=["default", "momentum_eps", "no_bias", "no_scale", "two_axes"],
)
def test_matches_flax_train_and_eval(kwargs):
    x = _x()
    w = _x(seed=5)
    ours, theirs = bl.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
    v = _random_vars(theirs, x)
    # Same variable tree, names, shapes and dtypes as Flax, and the same init.
    v0_ours = ours.init(jax.random.key(0), x, use_running_average=False)
    v0_theirs = theirs.init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree.structure(v0_ours) == jax.tree.structure(v0_theirs)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b) or a.dtype == b.dtype, v0_ours, v0_theirs)
    y1, s1, g1 = _train(ours, v, x, w)
    y2, s2, g2 = _train(theirs, v, x, w)
    assert rel_err(y1, y2) < RTOL["float32"]
    jax.tree.map(lambda a, b: rel_err(a, b) < RTOL["float32"] or pytest.fail("batch_stats"), s1, s2)
    jax.tree.map(lambda a, b: rel_err(a, b) < 1e-4 or pytest.fail("grads"), g1, g2)
    e1 = ours.apply(v, x, use_running_average=True)
    e2 = theirs.apply(v, x, use_running_average=True)
    assert rel_err(e1, e2) < RTOL["float32"]


@pytest.mark.parametrize("dtype,param_dtype", [(None, jnp.float32), (jnp.bfloat16, jnp.float32), (None, jnp.bfloat16)])
def test_dtypes_match_flax(dtype, param_dtype):
    x = jnp.asarray(_x(), jnp.bfloat16)
    ours = bl.BatchNorm(dtype=dtype, param_dtype=param_dtype)
    theirs = nn.BatchNorm(dtype=dtype, param_dtype=param_dtype)
    v = theirs.init(jax.random.key(0), x, use_running_average=False)
    (y1, s1), (y2, s2) = (
        m.apply(v, x, use_running_average=False, mutable=["batch_stats"]) for m in (ours, theirs)
    )
    assert y1.dtype == y2.dtype
    assert jax.tree.map(lambda a: a.dtype, s1) == jax.tree.map(lambda a: a.dtype, s2)
    assert rel_err(y1.astype(jnp.float32), y2.astype(jnp.float32)) < RTOL["bfloat16"]
    # jaxbn's statistics are float32-exact for the bf16 values it was given.
    _, var, _ = np_moments(np.asarray(x.astype(jnp.float32)))
    assert rel_err((s1["batch_stats"]["var"] - 0.99) / 0.01, var) < 1e-4


def test_single_device_mask_matches_flax():
    x, w = _x(), _x(seed=5)
    mask = np.random.default_rng(2).uniform(size=(8, 3, 3, 1)) < 0.5
    v = _random_vars(nn.BatchNorm(), x)
    y1, s1, g1 = _train(bl.BatchNorm(), v, x, w, mask)
    y2, s2, g2 = _train(nn.BatchNorm(use_fast_variance=False), v, x, w, mask)
    assert rel_err(y1, y2) < RTOL["float32"]
    assert rel_err(s1["var"], s2["var"]) < RTOL["float32"]
    jax.tree.map(lambda a, b: rel_err(a, b) < 1e-4 or pytest.fail("grads"), g1, g2)


def _sharded_train(module_cls, x, mask):
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    m = module_cls(axis_name="batch", momentum=0.0)
    v = m.init(jax.random.key(0), x[:1], use_running_average=False)

    def body(x, mask):
        y, upd = m.apply(v, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
        return y, upd["batch_stats"]["var"]

    f = jax.shard_map(body, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=(P("batch"), P("batch")), check_vma=False)
    return jax.jit(f)(x, mask)


def test_masks_across_devices_are_exact_where_flax_is_not(ndev):
    """Uneven valid counts per device and an empty shard (flax#2417 and its mask variant)."""
    x = _x((16, 2, 2, 3))
    rows = np.zeros((16, 1, 1, 1), bool)
    rows[2:4] = True  # device 1: 2 rows
    rows[4:5] = True  # device 2: 1 row
    rows[10:16] = True  # devices 5-7: all rows; devices 0, 3, 4: empty
    y, var = _sharded_train(bl.BatchNorm, x, rows)
    y_ref, _, var_ref, _ = np_batch_norm(x, np.ones(3), np.zeros(3), rows)
    assert rel_err(y, y_ref) < RTOL["float32"]
    assert rel_err(var.reshape(8, 3)[0], var_ref) < RTOL["float32"]
    y_flax, var_flax = _sharded_train(nn.BatchNorm, x, rows)
    assert not np.all(np.isfinite(np.asarray(y_flax))) or rel_err(y_flax, y_ref) > 1e-2


def test_large_mean_where_flax_fast_variance_fails():
    x = _x((64, 4), mean=1e4, std=1.0)
    _, var_ref, _ = np_moments(x)
    for module, expect_ok in [(bl.BatchNorm(momentum=0.0), True), (nn.BatchNorm(momentum=0.0), False)]:
        v = module.init(jax.random.key(0), x, use_running_average=False)
        _, s = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        err = rel_err(s["batch_stats"]["var"], var_ref)
        assert (err < 1e-4) == expect_ok, (module, err)


def test_init_with_unbound_axis_name_and_error_when_applied_unbound():
    m = bl.BatchNorm(axis_name="batch")
    x = _x()
    v = m.init(jax.random.key(0), x, use_running_average=False)  # flax#1250
    assert set(v) == {"params", "batch_stats"}
    with pytest.raises(ValueError, match="axis_name='batch' is not bound") as info:
        m.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    # Also a NameError, as Flax's (and JAX's) error: `except NameError` keeps working.
    assert isinstance(info.value, NameError) and isinstance(info.value, bl.UnboundAxisNameError)
    with pytest.raises(NameError):
        nn.BatchNorm(axis_name="batch").apply(v, x, use_running_average=False, mutable=["batch_stats"])
    # Evaluation needs no axis.
    m.apply(v, x, use_running_average=True)


def test_extras_update_stats_cumulative_and_frozen():
    x, w = _x(), _x(seed=5)
    v = _random_vars(nn.BatchNorm(), x)
    # update_stats=False: batch statistics, batch_stats need not be mutable.
    y = bl.BatchNorm(update_stats=False).apply(v, x, use_running_average=False)
    assert rel_err(y, np_batch_norm(x, v["params"]["scale"], v["params"]["bias"])[0]) < RTOL["float32"]
    # momentum=None adds a count and gives a cumulative average.
    m = bl.BatchNorm(momentum=None)
    vc = m.init(jax.random.key(0), x, use_running_average=False)
    assert set(vc["batch_stats"]) == {"mean", "var", "count"}
    _, upd = m.apply(vc, x, use_running_average=False, mutable=["batch_stats"])
    assert rel_err(upd["batch_stats"]["mean"], np_moments(x)[0]) < RTOL["float32"]
    assert int(upd["batch_stats"]["count"]) == 1
    # Frozen BN: running statistics, no gradient to scale and bias.
    frozen = bl.BatchNorm(use_running_average=True, trainable_params=False)
    g = jax.grad(lambda p: jnp.sum(w * frozen.apply({"params": p, "batch_stats": v["batch_stats"]}, x)))(v["params"])
    assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(g))


@pytest.mark.parametrize("model_cls,shape", [(CNN, (4, 28, 28, 1)), (ResNet20, (2, 16, 16, 3)), (MLP, (4, 8))])
def test_checkpoint_from_flax_model_loads_into_jaxbn_model(model_cls, shape):
    x = _x(shape, mean=0.5, std=1.0)
    flax_model = model_cls(norm=nn.BatchNorm)
    ours = model_cls(norm=bl.BatchNorm)
    v = flax_model.init(jax.random.key(0), x, train=True)
    assert jax.tree.structure(v) == jax.tree.structure(ours.init(jax.random.key(0), x, train=True))
    # One Flax training step makes the statistics non-trivial, then both agree.
    _, upd = flax_model.apply(v, x, train=True, mutable=["batch_stats"])
    v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    for train in (False, True):
        out_flax = flax_model.apply(v, x, train=train, mutable=["batch_stats"])[0]
        out_ours = ours.apply(v, x, train=train, mutable=["batch_stats"])[0]
        assert rel_err(out_ours, out_flax) < 1e-4


def test_model_parameter_counts():
    counts = {}
    for name, model_cls, shape in [("cnn", CNN, (1, 28, 28, 1)), ("resnet20", ResNet20, (1, 32, 32, 3))]:
        v = jax.eval_shape(lambda: model_cls().init(jax.random.key(0), jnp.ones(shape), train=True))
        counts[name] = (sum(a.size for a in jax.tree.leaves(v["params"])), sum(a.size for a in jax.tree.leaves(v["batch_stats"])))
    assert counts["cnn"] == (694_026, 64)
    assert counts["resnet20"] == (272_474, 1_568)
    v = jax.eval_shape(lambda: CNN().init(jax.random.key(0), jnp.ones((1, 28, 28, 1)), train=True))
    assert v["params"]["Conv_0"]["kernel"].shape == (3, 3, 1, 32)
    assert v["params"]["Dense_0"]["kernel"].shape == (13 * 13 * 32, 128)
    assert v["batch_stats"]["BatchNorm_0"]["mean"].shape == (32,)


# ----------------------------------------------------------------------------
# What Flax accepts, jaxbn's module accepts; it is a flax.linen.BatchNorm.


_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def test_output_and_variable_dtypes_match_flax_for_every_combination():
    """Output dtype: `dtype`, else x's and the params' promoted (integers with float32);
    batch_stats float32, or param_dtype with force_float32_reductions=False, as Flax."""
    x0 = _x((16, 4), mean=1.0, std=3.0)
    tol = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 2e-3}
    checked = 0
    for xname, xdt in [*_DTYPES.items(), ("i32", jnp.int32)]:
        x = jnp.asarray(np.round(x0) if xdt == jnp.int32 else x0).astype(xdt)
        for pdt in _DTYPES.values():
            for dt in (None, *_DTYPES.values()):
                for f32 in (True, False):
                    kw = dict(param_dtype=pdt, dtype=dt, force_float32_reductions=f32, momentum=0.5)
                    ours, theirs = bl.BatchNorm(**kw), nn.BatchNorm(**kw)
                    v = theirs.init(jax.random.key(0), x, use_running_average=False)
                    assert jax.tree.map(lambda a: a.dtype, ours.init(jax.random.key(0), x, use_running_average=False)) \
                        == jax.tree.map(lambda a: a.dtype, v)
                    case = (xname, pdt, dt, f32)
                    for ura in (False, True):
                        (y1, s1), (y2, s2) = (
                            m.apply(v, x, use_running_average=ura, mutable=["batch_stats"]) for m in (ours, theirs)
                        )
                        assert y1.dtype == y2.dtype, case
                        # Flax rounds to x's precision before (and, without float32 reductions, in)
                        # its statistics: compare to the coarser of x's and y's precisions.
                        coarse = max(tol[jnp.dtype(y2.dtype)], tol.get(jnp.dtype(xdt), 0.0))
                        assert rel_err(y1, y2) < coarse, case
                        if f32 or xdt == jnp.float32:  # else Flax's statistics are low-precision
                            assert rel_err(s1["batch_stats"]["var"], s2["batch_stats"]["var"]) < 1e-2, case
                    checked += 1
    assert checked == 4 * 3 * 4 * 2


def test_integer_input_is_promoted_as_flax():
    x = jnp.asarray(np.round(_x() * 3), jnp.int32)
    for kw in (dict(), dict(use_scale=False, use_bias=False)):
        v = nn.BatchNorm(**kw).init(jax.random.key(0), x, use_running_average=False)
        (y1, s1), (y2, s2) = (
            m.apply(v, x, use_running_average=False, mutable=["batch_stats"])
            for m in (bl.BatchNorm(**kw), nn.BatchNorm(**kw))
        )
        assert y1.dtype == y2.dtype == jnp.float32
        assert rel_err(y1, y2) < RTOL["float32"]
        assert rel_err(s1["batch_stats"]["var"], s2["batch_stats"]["var"]) < RTOL["float32"]


def test_is_a_flax_batch_norm_with_the_same_fields_and_variables():
    """Code that detects BatchNorm layers by class (to pass use_running_average, exclude them
    from weight decay, freeze them) finds jaxbn's; its fields, call and variables are Flax's."""
    import dataclasses

    assert issubclass(bl.BatchNorm, nn.BatchNorm)
    theirs = [f.name for f in dataclasses.fields(nn.BatchNorm) if f.name not in ("parent", "name")]
    ours = [f.name for f in dataclasses.fields(bl.BatchNorm) if f.name not in ("parent", "name")]
    assert ours[: len(theirs)] == theirs  # jaxbn's extras come after Flax's
    # Positional construction, as Flax: BatchNorm(use_running_average, axis, momentum, ...).
    assert bl.BatchNorm(True, -1, 0.9).momentum == 0.9

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            for layer in (nn.Dense(5), bl.BatchNorm()):
                x = layer(x, use_running_average=not train) if isinstance(layer, nn.BatchNorm) else layer(x)
            return x

    x = _x((8, 5))
    v = Net().init(jax.random.key(0), x, train=True)
    _, upd = Net().apply(v, x, train=True, mutable=["batch_stats"])
    assert float(jnp.abs(upd["batch_stats"]["BatchNorm_0"]["mean"]).max()) > 0
    y, upd = Net().apply(v, x, train=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(upd["batch_stats"]["BatchNorm_0"]["mean"], np.zeros(5))
    # Interceptors that look for BatchNorm by class see jaxbn's calls.
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            seen.append(type(context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        Net().apply(v, x, train=False)
    assert seen == [bl.BatchNorm]


def test_epsilon_as_an_array_and_traced_in_evaluation():
    x = _x()
    v = _random_vars(nn.BatchNorm(), x)
    for eps in (np.float64(0.5), jnp.float32(0.5)):  # concrete arrays: made Python floats
        y1 = bl.BatchNorm(epsilon=eps).apply(v, x, use_running_average=False, mutable=["batch_stats"])[0]
        y2 = nn.BatchNorm(epsilon=0.5).apply(v, x, use_running_average=False, mutable=["batch_stats"])[0]
        assert rel_err(y1, y2) < RTOL["float32"]
    f = jax.jit(lambda eps, cls: cls(epsilon=eps).apply(v, x, use_running_average=True), static_argnums=1)
    assert rel_err(f(0.5, bl.BatchNorm), f(0.5, nn.BatchNorm)) < RTOL["float32"]


def test_traced_epsilon_in_training():
    x = _x()
    v = _random_vars(nn.BatchNorm(), x)
    f = jax.jit(
        lambda eps, cls: cls(epsilon=eps).apply(v, x, use_running_average=False, mutable=["batch_stats"])[0],
        static_argnums=1,
    )
    assert rel_err(f(0.5, bl.BatchNorm), f(0.5, nn.BatchNorm)) < RTOL["float32"]


@pytest.mark.parametrize("norm", [bl.BatchNorm, lambda **k: bl.BatchRenorm(schedule=lambda c: (3.0, 5.0), **k)])
def test_tabulate_and_method_calls_as_flax(norm):
    """nn.tabulate (and every interceptor) sees one BatchNorm call per layer, as with Flax's:
    the module's helpers are not module methods."""

    def net(bn):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(3)(bn(use_running_average=False)(nn.Dense(4)(x)))

        return Net()

    x = _x((6, 5))
    calls = []

    def spy(next_fun, args, kwargs, context):
        calls.append((type(context.module).__mro__[-3].__name__, context.method_name))
        return next_fun(*args, **kwargs)

    rows = {}
    for name, bn in (("flax", nn.BatchNorm), ("jaxbn", norm)):
        table = nn.tabulate(net(bn), jax.random.key(0), mutable=True)(x)
        assert "_counts_updates" not in table and "_renorm_limits" not in table
        rows[name] = table.count("\n") - 2 * table.count("count")  # BatchRenorm's schedule: a count variable
        v = net(bn).init(jax.random.key(0), x)
        calls.clear()
        with nn.intercept_methods(spy):
            net(bn).apply(v, x, mutable=["batch_stats"])
        rows[name, "calls"] = [m for _, m in calls]
    assert rows["jaxbn"] == rows["flax"]
    assert rows["jaxbn", "calls"] == rows["flax", "calls"] == ["__call__"] * 4
