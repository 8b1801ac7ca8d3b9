"""Model-level BN folding and exact population-statistics recalibration."""

import functools
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbn import linen as bl
from jaxbn import nnx as bnnx
from jaxbn._detect import is_batch_norm
from jaxbn.inference import FoldedBatchNorm, FoldedModel, fold_batch_norms, recalibrate_batch_stats
from jaxbn.models import CNN, ResNet
from oracle import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_RESNET = functools.partial(ResNet, stage_sizes=(1, 1), width=4)


def _randomized(v, seed=0):
    """Random params and statistics (BN scales far from 1, means far from 0)."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, a.dtype), v["params"])
    stats = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.asarray(
            rng.uniform(0.2, 3.0, a.shape) if p[-1].key == "var" else rng.normal(size=a.shape), a.dtype
        ),
        v["batch_stats"],
    )
    return {"params": params, "batch_stats": stats}


def test_fold_resnet_is_exact_and_bn_free():
    x = jax.random.normal(jax.random.key(0), (3, 12, 12, 3))
    model = TINY_RESNET(norm=bl.BatchNorm)
    v = _randomized(model.init(jax.random.key(1), x, train=True))
    folded_model, fv, report = fold_batch_norms(model, v, x)
    assert "batch_stats" not in fv
    assert len(report.folded) == 6 and not report.not_folded  # stem, 2 per block, 1 projection
    assert report.folded["Block_1_0/BatchNorm_proj"] == "Block_1_0/Conv_proj"
    y_ref = model.apply(v, x, train=False)
    assert rel_err(folded_model.apply(fv, x, train=False), y_ref) < 1e-5
    # The same variables drive the model rebuilt with norm=FoldedBatchNorm.
    assert rel_err(model.clone(norm=FoldedBatchNorm).apply(fv, x, train=False), y_ref) < 1e-5


def test_fold_cnn_says_bn_after_relu_is_not_folded():
    x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
    model = CNN()
    v = _randomized(model.init(jax.random.key(1), x, train=True))
    folded_model, fv, report = fold_batch_norms(model, v, x)
    assert not report.folded and "BatchNorm_0" in report.not_folded
    assert "not exact" in str(report) or "would not be exact" in str(report)
    assert rel_err(folded_model.apply(fv, x, train=False), model.apply(v, x, train=False)) < 1e-5


class Forgetful(bl.BatchNorm):
    """A BatchNorm subclass without "BatchNorm" in its name; drops the axis_name it is given."""

    def __post_init__(self):
        object.__setattr__(self, "axis_name", None)
        super().__post_init__()


class _Plain(nn.Module):
    """A model with no `norm` field: BatchNorms of every kind, written inline."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        ra = not train
        y = nn.Conv(6, (3, 3), name="conv")(x)
        y = nn.BatchNorm(use_running_average=ra, epsilon=1e-3, name="bn_conv")(y)  # Conv -> BN: folded
        y = bl.BatchNorm(use_running_average=ra, name="bn_relu")(nn.relu(y))  # after a ReLU: a*x + b
        r = nn.Conv(6, (1, 1), use_bias=False, name="conv_skip")(y)
        y = nn.BatchNorm(use_running_average=ra, name="bn_skip")(r) + r  # conv output read twice: a*x + b
        y = bl.BatchNorm(use_running_average=ra, axis=(-2, -1), name="bn_wc")(y)  # two feature axes: a*x + b
        y = nn.Dense(5, use_bias=False, name="dense")(y.reshape((y.shape[0], -1)))
        y = Forgetful(use_running_average=ra, name="bn_dense")(y)  # Dense -> BN subclass: folded
        return nn.Dense(3, name="head")(nn.relu(y))


def test_fold_any_linen_model():
    x = jax.random.normal(jax.random.key(0), (4, 7, 5, 3))
    model = _Plain()
    v = _randomized(model.init(jax.random.key(1), x, train=True))
    folded_model, fv, report = fold_batch_norms(model, v, x)
    assert isinstance(folded_model, FoldedModel) and folded_model.module is model
    assert report.folded == {"bn_conv": "conv", "bn_dense": "dense"}
    assert set(report.not_folded) == {"bn_relu", "bn_skip", "bn_wc"}
    assert "not the output of a Conv/Dense" in report.not_folded["bn_relu"]
    assert "the output of conv_skip also feeds other operations" in report.not_folded["bn_skip"]
    assert "feature axis" in report.not_folded["bn_wc"]
    assert "batch_stats" not in fv
    assert set(fv["params"]["bn_conv"]) == {"bias"} and set(fv["params"]["bn_relu"]) == {"scale", "bias"}
    assert fv["params"]["bn_wc"]["scale"].shape == (5, 6)
    y_ref = model.apply(v, x)  # evaluation mode
    y = folded_model.apply(fv, x)
    assert y.dtype == y_ref.dtype and rel_err(y, y_ref) < 1e-5
    assert rel_err(jax.jit(folded_model.apply)(fv, x), y_ref) < 1e-5
    # The folded model wants the folded variables.
    with pytest.raises(ValueError, match="pass the variables returned by fold_batch_norms"):
        folded_model.apply(v, x)


def test_fold_errors():
    with pytest.raises(TypeError, match="must be a flax.linen.Module"):
        fold_batch_norms(object(), {}, jnp.ones((1, 2)))


def test_fold_in_a_fresh_process():
    """Only jaxbn.inference and Flax imported (jaxbn.linen never): BatchNorms are still found."""
    code = textwrap.dedent("""
        import sys
        import flax.linen as nn, jax, jax.numpy as jnp
        from jaxbn.inference import fold_batch_norms

        class M(nn.Module):
            @nn.compact
            def __call__(self, x, train=False):
                y = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
                return nn.BatchNorm(use_running_average=not train)(nn.relu(y))

        assert "jaxbn.linen" not in sys.modules
        x = jax.random.normal(jax.random.key(0), (3, 5))
        m = M()
        v = m.init(jax.random.key(1), x)
        v = {"params": v["params"],
             "batch_stats": jax.tree.map(lambda a: a * 0.5 + 0.25, v["batch_stats"])}
        fm, fv, report = fold_batch_norms(m, v, x)
        assert report.folded == {"BatchNorm_0": "Dense_0"} and list(report.not_folded) == ["BatchNorm_1"], report
        y, y_ref = fm.apply(fv, x), m.apply(v, x)
        err = float(jnp.abs(y - y_ref).max() / jnp.abs(y_ref).max())
        assert err < 1e-5, err
        assert "flax.nnx" not in sys.modules, "asking about a Linen module imported NNX"
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


# ----------------------------------------------------------------------------
# BatchNorm detection (one rule for folding, recalibration and the sync checker).


class _LinenSub(nn.BatchNorm):
    pass


class _NNXSub(nnx.BatchNorm):
    pass


class Sticky(bnnx.BatchNorm):
    pass


class MyBatchNormLike(nn.Module):
    """Looks like a BatchNorm (name, fields) but is not one."""

    axis_name: str = "batch"
    use_running_average: bool = True

    @nn.compact
    def __call__(self, x):
        return x


class MyNNXBatchNormLike(nnx.Module):
    def __init__(self):
        self.axis_name = "batch"
        self.use_running_average = True


def _rngs():
    return nnx.Rngs(0)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: nn.BatchNorm(), True),
        (lambda: bl.BatchNorm(), True),
        (lambda: nnx.BatchNorm(4, rngs=_rngs()), True),
        (lambda: bnnx.BatchNorm(4, rngs=_rngs()), True),
        (lambda: _LinenSub(), True),
        (lambda: Forgetful(), True),
        (lambda: _NNXSub(4, rngs=_rngs()), True),
        (lambda: Sticky(4, rngs=_rngs()), True),
        (lambda: nn.Dense(3), False),
        (lambda: nn.GroupNorm(), False),
        (lambda: nn.LayerNorm(), False),
        (lambda: nnx.Linear(2, 3, rngs=_rngs()), False),
        (lambda: MyBatchNormLike(), False),
        (lambda: MyNNXBatchNormLike(), False),
        (lambda: nn.BatchNorm, False),  # the class, not a module
        (lambda: "BatchNorm", False),
        (lambda: None, False),
    ],
    ids=[
        "flax-linen", "jaxbn-linen", "flax-nnx", "jaxbn-nnx", "flax-linen-subclass", "jaxbn-linen-subclass",
        "flax-nnx-subclass", "jaxbn-nnx-subclass", "Dense", "GroupNorm", "LayerNorm", "nnx-Linear",
        "MyBatchNormLike", "MyNNXBatchNormLike", "class", "str", "None",
    ],
)
def test_is_batch_norm(make, expected):
    assert is_batch_norm(make()) is expected


def _batches(k=4, n=8, seed=0):
    rng = np.random.default_rng(seed)
    # Batches with different means, so the mean of per-batch variances is wrong.
    return [(rng.normal(size=(n, 8, 8, 3)) + i).astype(np.float32) for i in range(k)]


def test_recalibration_is_the_population_statistics(ndev):
    model = TINY_RESNET(norm=functools.partial(bl.BatchNorm, axis_name=None))
    batches = _batches()
    v = _randomized(model.init(jax.random.key(1), batches[0], train=True))
    apply_fn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
    new = recalibrate_batch_stats(apply_fn, v, batches)
    # The stem BN's input (the stem conv output) does not depend on any BN.
    conv = lambda x: model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"])[1]  # noqa: E731
    acts = np.concatenate([np.asarray(conv(b)["intermediates"]["Conv_stem"]["__call__"][0], np.float64) for b in batches])
    pop_mean, pop_var = acts.reshape(-1, 4).mean(0), acts.reshape(-1, 4).var(0)
    got = new["batch_stats"]["BatchNorm_stem"]
    assert rel_err(got["mean"], pop_mean) < 1e-5 and rel_err(got["var"], pop_var) < 1e-5
    assert jax.tree.structure(new) == jax.tree.structure(v)
    # Data-parallel over 8 devices (synchronized BNs) gives the same statistics.
    sync = TINY_RESNET(norm=functools.partial(bl.BatchNorm, axis_name="batch"))
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    apply_sync = lambda v, x: sync.apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
    new8 = recalibrate_batch_stats(apply_sync, v, batches, mesh=mesh, axis_name="batch")
    jax.tree.map(lambda a, b: rel_err(a, b) < 1e-4 or pytest.fail("8 devices differ"), new8["batch_stats"], new["batch_stats"])
    # unbiased: N/(N-1).
    newu = recalibrate_batch_stats(apply_fn, v, batches, unbiased=True, num_batches=2)
    acts2 = acts[: 2 * 8].reshape(-1, 4)
    assert rel_err(newu["batch_stats"]["BatchNorm_stem"]["var"], acts2.var(0, ddof=1)) < 1e-5


class _SharedBN(nn.Module):
    """One BatchNorm called on two inputs: its statistics are those of both."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        bn = bl.BatchNorm(use_running_average=not train, name="bn")
        return bn(x) + bn(2.0 * x + 1.0)


def test_recalibration_of_a_shared_batch_norm():
    model = _SharedBN()
    batches = [b.reshape(-1, 3) for b in _batches(k=3)]
    v = model.init(jax.random.key(0), batches[0])
    new = recalibrate_batch_stats(lambda v, x: model.apply(v, x, mutable=["batch_stats"]), v, batches)
    acts = np.concatenate([np.concatenate([b, 2.0 * b + 1.0]) for b in np.asarray(batches, np.float64)])
    got = new["batch_stats"]["bn"]
    assert rel_err(got["mean"], acts.mean(0)) < 1e-5 and rel_err(got["var"], acts.var(0)) < 1e-5


def test_recalibration_errors():
    with pytest.raises(ValueError, match="mesh and axis_name go together"):
        recalibrate_batch_stats(lambda v, x: None, {}, [], axis_name="batch")
