"""Tests of the NNX models (jaxbn/models_nnx.py) and the NNX training path (``config.api='nnx'``:
jaxbn/training/nnx_state.py, nnx_steps.py) on 8 virtual CPU devices.

Runs use configs/smoke.py (an MLP, 512 training images, 16 steps, a NaN batch at step index 5)
on a small IDX copy of Fashion-MNIST, as tests/test_train.py does. The two APIs initialize
their parameters from different random streams, so the loop-level runs agree in accuracy only
roughly; with the same initial values (`load_linen_variables`) the NNX steps reproduce the Linen
steps to float tolerance, on 8 devices and on 1.
"""

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from helpers import (assert_trees_close, host, read_metrics, run_training, smoke_config,  # noqa: E402
                     write_small_idx)
from jaxbn import data, models, models_nnx, train_lib  # noqa: E402
from jaxbn import nnx as bn_nnx  # noqa: E402
from jaxbn.sync_check import check_sync_bn  # noqa: E402
from jaxbn.training import batches, nnx_steps, parallel, steps as linen_steps  # noqa: E402
from jaxbn.training.checkpoints import CheckpointError  # noqa: E402
from jaxbn.training.config import ConfigError  # noqa: E402

NUM_TRAIN, NUM_TEST = 512, 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_small_idx(tmp_path_factory.mktemp("fmnist_small_nnx"), NUM_TRAIN, NUM_TEST)


def make_config(data_dir, **overrides):
    return smoke_config(data_dir, **{"api": "nnx", **overrides})


run = run_training


@pytest.fixture(scope="module")
def nnx_reference(data_dir, tmp_path_factory):
    """One uninterrupted NNX smoke run on every device (8), NaN batch at step index 5."""
    workdir = tmp_path_factory.mktemp("nnx_reference")
    state, summary = run(make_config(data_dir), workdir)
    return str(workdir), host(state), summary


# ---------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------


def test_nnx_models_have_the_linen_models_parameter_counts():
    for name, shape in [("cnn", (28, 28, 1)), ("resnet20", (32, 32, 3)), ("mlp", (28, 28, 1))]:
        init = functools.partial(models.MODELS[name](num_classes=10).init, train=False)
        linen = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, *shape)))
        model = nnx.eval_shape(lambda: models_nnx.MODELS[name](10, in_features=shape[2], image_size=shape[:2],
                                                               rngs=nnx.Rngs(0)))
        want = {"cnn": 694_026, "resnet20": 272_474, "mlp": 12_746}[name]
        assert sum(x.size for x in jax.tree.leaves(linen["params"])) == models_nnx.count_params(model) == want
        shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
        nnx_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        assert shapes(nnx_stats) == shapes(linen["batch_stats"]), name


# Small instances of the same classes (the ResNet has every block kind: identity and projection
# shortcuts), to keep the compilations short.
_SMALL = {
    "cnn": (functools.partial(models.CNN, features=4, hidden=8),
            functools.partial(models_nnx.CNN, features=4, hidden=8, image_size=(12, 12)), (12, 12, 1)),
    "resnet": (functools.partial(models.ResNet, stage_sizes=(1, 1, 2), width=4),
               functools.partial(models_nnx.ResNet, stage_sizes=(1, 1, 2), width=4, in_features=3), (8, 8, 3)),
    "mlp": (models.MLP, functools.partial(models_nnx.MLP, image_size=(6, 6)), (6, 6, 1)),
}


def _build(nnx_cls, **kwargs):
    """`nnx_cls(10, **kwargs)` with random parameters drawn cheaply: the first eager run of
    He-normal initialization compiles for ~15 s on this CPU, which the tests do not need."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: nnx_cls(10, rngs=nnx.Rngs(0), **kwargs)),
                                       nnx.Param, ...)
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda a: 0.5 * jax.random.normal(next(keys), a.shape, a.dtype), params)
    rest = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), rest)  # BatchNorm statistics
    return nnx.merge(graphdef, params, rest)


@pytest.mark.parametrize("name", list(_SMALL))
def test_nnx_models_compute_what_the_linen_models_compute(name):
    """With the Linen init loaded: the same outputs and running statistics, training and eval."""
    linen_cls, nnx_cls, shape = _SMALL[name]
    linen = linen_cls(num_classes=10)
    model = _build(nnx_cls)
    # The NNX model's values as Linen variables (the same tree: the structures are compared by
    # load_linen_variables); jitting Linen's init instead would take 20 s to compile.
    pure = lambda f: nnx.to_pure_dict(nnx.state(model, f))
    v = {"params": pure(nnx.Param), "batch_stats": pure(nnx.BatchStat)}
    assert jax.tree.structure(v) == jax.tree.structure(
        jax.eval_shape(functools.partial(linen.init, train=False), jax.random.key(0), jnp.zeros((1, *shape))))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(1), (4, *shape))

    @jax.jit  # one compilation: both models, training and evaluation
    def both(v, state, x):
        m = nnx.merge(graphdef, state)
        models_nnx.load_linen_variables(m, v)  # a no-op here: exercises the mapping
        y_linen, upd = linen.apply(v, x, train=True, mutable=["batch_stats"])
        y_nnx = m(x)
        stats = nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
        m.eval()
        y_linen_eval = linen.apply({"params": v["params"], "batch_stats": upd["batch_stats"]}, x, train=False)
        return (y_nnx, stats, m(x)), (y_linen, upd["batch_stats"], y_linen_eval)

    got, want = both(v, state, x)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-5)


def test_nnx_models_norm_factory_and_reexports():
    model = nnx.eval_shape(lambda: models_nnx.CNN(rngs=nnx.Rngs(0)))
    assert type(model.BatchNorm_0) is bn_nnx.BatchNorm
    flax_bn = nnx.eval_shape(lambda: models_nnx.ResNet20(norm=functools.partial(nnx.BatchNorm, momentum=0.9),
                                                         rngs=nnx.Rngs(0)))
    bns = [m for _, m in nnx.iter_graph(flax_bn) if isinstance(m, nnx.BatchNorm)]
    assert len(bns) == 21 and all(type(m) is nnx.BatchNorm and m.momentum == 0.9 for m in bns)
    zero_init = []  # the last BatchNorm of each block starts with scale 0
    norm = lambda n, **kw: zero_init.append("scale_init" in kw) or bn_nnx.BatchNorm(n, **kw)
    nnx.eval_shape(lambda: models_nnx.ResNet20(norm=norm, rngs=nnx.Rngs(0)))
    assert zero_init == [False] + [False, True] * 3 + [False, True, False] + [False, True] * 2 + [
        False, True, False] + [False, True] * 2
    small = nnx.eval_shape(lambda: models_nnx.ResNet20(rngs=nnx.Rngs(0)))
    assert small.Block_0_0.BatchNorm_1.scale.shape == (16,)
    assert nnx.eval_shape(lambda: models_nnx.CNN(use_norm=False, rngs=nnx.Rngs(0))).BatchNorm_0 is None
    assert models.CNNNNX is models_nnx.CNN and models.ResNet20NNX is models_nnx.ResNet20


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_sync_checker_passes_on_the_nnx_models(name):
    _, nnx_cls, shape = _SMALL[name]
    model = _build(nnx_cls, norm=functools.partial(bn_nnx.BatchNorm, axis_name="batch"))
    report = check_sync_bn(model, None, jax.random.normal(jax.random.key(2), (16, *shape)), axis_name="batch")
    assert report.ok, str(report)


# ---------------------------------------------------------------------------
# The training loop with config.api='nnx'
# ---------------------------------------------------------------------------


def test_nnx_run_outputs(nnx_reference):
    """The same metrics, evaluation, plot, checkpoints and non-finite guard as the Linen path."""
    workdir, state, summary = nnx_reference
    assert not summary["stopped"] and summary["step"] == 16 and int(state.step) == 16
    assert summary["api"] == "nnx" and summary["parallel"] == "nnx.jit" and summary["devices"] == 8
    assert summary["traces"] == {"train": 1, "eval": 1}
    assert summary["nonfinite_steps"] == 1 and int(state.nonfinite_steps) == 1
    assert summary["test_examples"] == NUM_TEST and summary["images_per_sec"] > 0
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows if "test_accuracy" in r and not r.get("final")] == [8, 16]
    assert [r["step"] for r in rows if "train_loss" in r] == [4, 5, 8, 10, 12, 15, 16]
    assert rows[-1]["final"] and rows[-1]["test_accuracy"] == summary["test_accuracy"]
    with open(os.path.join(workdir, "metrics.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(os.path.join(workdir, "config.json")))["api"] == "nnx"
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["10", "15", "16"]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.model))


def test_nnx_accuracy_is_the_linen_paths(nnx_reference, data_dir, tmp_path):
    """Different initial values (NNX's and Linen's random streams): the same accuracy within a
    few points after 16 steps; exact agreement from the same init is tested below."""
    _, linen = run(make_config(data_dir, api="linen", parallel="jit"), tmp_path / "linen")
    print("accuracy: nnx", nnx_reference[2]["test_accuracy"], "linen", linen["test_accuracy"])
    assert abs(nnx_reference[2]["test_accuracy"] - linen["test_accuracy"]) < 0.06
    assert nnx_reference[2]["test_accuracy"] > 0.5


def test_nnx_resume_after_interruption_is_bitwise(nnx_reference, data_dir, tmp_path):
    ref_dir, ref_state, ref_summary = nnx_reference
    workdir = tmp_path / "resumed"
    _, s1 = run(make_config(data_dir, stop_after_steps=7), workdir)  # after the NaN step, mid-epoch
    assert s1["stopped"] and s1["step"] == 7
    state, s2 = run(make_config(data_dir), workdir)
    assert not s2["stopped"] and s2["step"] == 16 and s2["nonfinite_steps"] == 1
    assert_trees_close(host(state), ref_state)  # bitwise: params, statistics, optimizer, counters
    assert s2["test_accuracy"] == ref_summary["test_accuracy"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_sec", "wall_time_s",
                                                                    "train_time_s", "traces")}
                          for r in rows]
    assert strip(read_metrics(workdir)) == strip(read_metrics(ref_dir))


def test_nnx_config_checks(data_dir, tmp_path, nnx_reference):
    with pytest.raises(ConfigError, match="config.api must be one of"):
        run(make_config(data_dir, api="haiku"), tmp_path / "bad")
    with pytest.raises(CheckpointError, match="api"):  # an NNX workdir is not resumed by the Linen path
        run(make_config(data_dir, api="linen", stop_after_steps=20), nnx_reference[0])


# ---------------------------------------------------------------------------
# The steps: the Linen path's math, on 8 devices and on 1
# ---------------------------------------------------------------------------


def _train_and_eval(steps, state, config, ds):
    """16 smoke steps (NaN batch at index 5) from `state`; the final state and test accuracy."""
    split = {k: v[:NUM_TRAIN] for k, v in ds.train.items()}
    spe = batches.steps_per_epoch(NUM_TRAIN, config.global_batch_size)
    step = 0
    for epoch in range(2):
        for b in batches.train_batches(split, global_batch_size=config.global_batch_size, seed=config.seed,
                                       epoch=epoch, process_index=0, process_count=1, start_step=0):
            if step == config.debug_nan_step:
                b["image"] = np.full_like(b["image"], np.nan)
            state, _ = steps.train(state, steps.put_batch(b))
            step += 1
    assert step == 2 * spe
    test = {k: v[:NUM_TEST] for k, v in ds.test.items()}
    result = linen_steps.evaluate(steps, state, test, global_batch_size=128)
    return state, result["test_accuracy"]


def test_nnx_steps_reproduce_the_linen_steps_and_one_device(data_dir):
    """From the Linen init: NNX on 8 devices = Linen ('jit') on 8 devices = NNX on 1 device, to float
    tolerance (parameters, running statistics) and exactly in test accuracy."""
    config = make_config(data_dir, api="linen", parallel="jit")
    ds = data.load_dataset(data_dir)
    spe, total = NUM_TRAIN // config.global_batch_size, 2 * NUM_TRAIN // config.global_batch_size
    lsteps, _ = linen_steps.steps_for(config, ds.num_classes, ds.image_shape, spe, total)
    lstate, lacc = _train_and_eval(lsteps, lsteps.init(jax.random.key(config.seed)), config, ds)
    linen_init = host(lsteps.init(jax.random.key(config.seed)))  # on the host: steps donate

    results = {}
    for ndev in (8, 1):
        mesh = parallel.make_mesh(jax.devices()[:ndev])
        steps = nnx_steps.make_nnx_steps(config, ds.num_classes, ds.image_shape,
                                         train_lib.create_optimizer(config, spe, total), mesh)
        init = jax.device_put(steps.init(jax.random.key(config.seed)), steps.replicated)
        trainer = steps.to_device(init)
        models_nnx.load_linen_variables(trainer.model, jax.device_put(
            {"params": linen_init.params, "batch_stats": linen_init.batch_stats}, steps.replicated))
        trainer, acc = _train_and_eval(steps, trainer, config, ds)
        assert steps.traces == {"train": 1, "eval": 1}
        results[ndev] = (host(nnx.to_pure_dict(nnx.state(trainer.model))), acc, steps.from_device(trainer))
    linen_vars = {"params": lstate.params, "batch_stats": lstate.batch_stats}
    for ndev, (model_state, acc, st) in results.items():
        assert acc == lacc, ndev
        assert int(st.nonfinite_steps) == 1 and int(st.step) == 16
        for c, tree in linen_vars.items():  # pick the NNX values at the Linen paths
            picked = jax.tree_util.tree_map_with_path(
                lambda path, _: functools.reduce(lambda d, k: d[k.key], path, model_state), tree)
            assert_trees_close(picked, tree, rtol=2e-5, atol=2e-6)
