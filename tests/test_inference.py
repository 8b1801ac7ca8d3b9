"""Model-level BN folding and exact population-statistics recalibration."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbn import linen as bl
from jaxbn.inference import fold_batch_norms, recalibrate_batch_stats
from jaxbn.models import CNN, ResNet
from oracle import rel_err

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


def test_fold_cnn_says_bn_after_relu_is_not_folded():
    x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
    model = CNN()
    v = _randomized(model.init(jax.random.key(1), x, train=True))
    folded_model, fv, report = fold_batch_norms(model, v, x)
    assert not report.folded and "BatchNorm_0" in report.not_folded
    assert "not exact" in str(report) or "would not be exact" in str(report)
    assert rel_err(folded_model.apply(fv, x, train=False), model.apply(v, x, train=False)) < 1e-5


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


def test_recalibration_errors():
    with pytest.raises(ValueError, match="mesh and axis_name go together"):
        recalibrate_batch_stats(lambda v, x: None, {}, [], axis_name="batch")
