"""The studies of experiments/ (README: "What BatchNorm does, measured") and the training
library's variants they use (config.norm 'batch_renorm', 'group_norm', 'none'; config.bn_sync,
cnn_norm_before_relu, resnet_width, resnet_blocks).

Each study runs with ``--quick`` in its own process (it sets its device count before JAX
starts) on the installed Fashion-MNIST, and must write its JSON record and its figure:
about a minute for both on two cores.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import default, smoke  # noqa: E402
from jaxbn.training import config as config_lib  # noqa: E402
from jaxbn.training import datasets  # noqa: E402
from jaxbn.training.steps import make_steps  # noqa: E402
from jaxbn.training.state import create_model, create_optimizer  # noqa: E402

needs_fashion_mnist = pytest.mark.skipif(not os.path.isdir(datasets.DEFAULT_DATA_DIR),
                                         reason="dataset-fashion-mnist is not installed")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(script, *args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def check_record(doc, study, num_devices):
    assert doc["study"] == study and doc["status"] == "complete" and doc["settings"]["mode"] == "quick"
    env = doc["environment"]
    assert env["device_count"] == num_devices and env["cpu_count"] >= 1 and env["platform"]
    assert env["versions"]["jax"] == jax.__version__ and env["versions"]["flax"]
    for run in doc["runs"]:
        assert run["config"]["seed"] == run["seed"] and run["config"]["dataset"] == "fashion_mnist"
        assert run["evals"] and set(run["evals"][-1]) == {"step", "epoch", "test_loss", "test_accuracy"}
        assert run["train"] and run["final"]["step"] == run["evals"][-1]["step"]
        assert 0.0 <= run["final"]["test_accuracy"] <= 1.0 and np.isfinite(run["final"]["test_loss"])
        assert run["final"]["test_accuracy"] == run["evals"][-1]["test_accuracy"]
        assert run["final"]["traces"] == {"train": 1, "eval": 1}


@needs_fashion_mnist
def test_sync_vs_local_quick(tmp_path):
    p = run_script("sync_vs_local.py", "--quick", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    with open(tmp_path / "sync_vs_local_quick.json") as f:
        doc = json.load(f)
    check_record(doc, "sync_vs_local", 8)
    arms = {"sync": ("jaxbn", True), "local": ("jaxbn", False), "renorm_local": ("batch_renorm", False),
            "group": ("group_norm", True)}
    assert [r["arm"] for r in doc["runs"]] == list(arms)
    for run in doc["runs"]:
        c = run["config"]
        assert (c["norm"], c["bn_sync"]) == arms[run["arm"]]
        assert c["model"] == "resnet20" and c["parallel"] == "shard_map"
        assert c["global_batch_size"] == 8 * run["per_device_batch"]
        assert c["learning_rate"] == pytest.approx(0.4 * c["global_batch_size"] / 128)
    assert [(r["arm"], r["per_device_batch"], r["test_accuracy"]["n"]) for r in doc["summary"]] == [
        (arm, 2, 1) for arm in arms]
    assert (tmp_path / "sync_vs_local_quick.png").read_bytes()[:8] == PNG_MAGIC
    assert "BN, per-device statistics" in p.stdout and "wrote" in p.stdout.splitlines()[-1]


@needs_fashion_mnist
def test_bn_vs_lr_quick(tmp_path):
    p = run_script("bn_vs_lr.py", "--quick", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    with open(tmp_path / "bn_vs_lr_quick.json") as f:
        doc = json.load(f)
    check_record(doc, "bn_vs_lr", 1)
    models = {"none": ("none", False), "after_relu": ("jaxbn", False), "before_relu": ("jaxbn", True)}
    assert {(r["model"], r["optimizer"]) for r in doc["runs"]} == {(m, o) for m in models for o in ("adam", "sgd")}
    for run in doc["runs"]:
        c = run["config"]
        assert (c["norm"], c["cnn_norm_before_relu"]) == models[run["model"]]
        assert c["model"] == "cnn" and c["optimizer"] == run["optimizer"] and c["lr_schedule"] == "constant"
        assert c["learning_rate"] == run["learning_rate"] and c["global_batch_size"] == 128
        assert len(run["evals"]) == doc["settings"]["epochs"] == 2  # the test loss against the steps
    assert len(doc["summary"]) == 6 and all(r["test_accuracy"]["n"] == 1 for r in doc["summary"])
    assert (tmp_path / "bn_vs_lr_quick.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("script, args, message", [
    ("sync_vs_local.py", ["--arms", "sync,nope"], "argument --arms: 'nope' is not one of sync, local"),
    ("sync_vs_local.py", ["--batch-sizes", "2,0"], "argument --batch-sizes: '0' is not a per-device batch size > 0"),
    ("sync_vs_local.py", ["--quick", "--batch-sizes", "32"], "32 x 8 devices exceeds the 128 training images"),
    ("bn_vs_lr.py", ["--lrs", "1e-3,x"], "argument --lrs: 'x' is not a learning rate"),
    ("bn_vs_lr.py", ["--seeds", "0"], "argument --seeds: '0' is not a number of seeds"),
    ("bn_vs_lr.py", ["--models", "after_relu,after_relu"], "'after_relu' is given twice"),
])
def test_bad_arguments_give_one_line(script, args, message):
    p = run_script(script, *args, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"{script}: error: ") and message in p.stderr, p.stderr


def test_variant_fields_are_checked():
    config = default.get_config()
    config_lib.check_config(config, 8)
    bad = [
        (dict(bn_sync=False, parallel="jit"), "bn_sync=False needs parallel 'shard_map' or 'pmap'"),
        (dict(bn_sync=False, norm="group_norm"), "bn_sync=False (per-device statistics) applies to norm"),
        (dict(cnn_norm_before_relu=True, model="mlp"), "cnn_norm_before_relu=True applies to model 'cnn'"),
        (dict(resnet_width=8), "config.resnet_width=8 apply to model 'resnet20', got 'cnn'"),
        (dict(resnet_blocks=0, model="resnet20"), "config.resnet_blocks must be an int >= 1, got 0"),
        (dict(renorm_warmup_steps=-1), "config.renorm_warmup_steps must be an int >= 0"),
        (dict(norm="group_norm", api="nnx"), "config.api='nnx' trains BatchNorm models only"),
        (dict(bn_sync=False, api="nnx"), "bn_sync=False need(s) api='linen'"),
        (dict(norm="layer_norm"), "config.norm must be one of"),
    ]
    for overrides, message in bad:
        c = default.get_config()
        c.update(overrides)
        with pytest.raises(config_lib.ConfigError, match=None) as e:
            config_lib.check_config(c, 8)
        assert message in str(e.value), (overrides, str(e.value))


def test_configs_without_the_variant_fields_mean_the_defaults(tmp_path):
    """A config (or a saved config.json, written before the fields existed) without them is
    the default model: checked, compiled and resumed as before."""
    config = default.get_config()
    saved = config_lib.config_dict(config)
    for name in config_lib.VARIANT_FIELDS:
        del saved[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    assert config_lib.saved_config_diffs(config, str(path)) == []
    config.bn_sync = False
    assert config_lib.saved_config_diffs(config, str(path)) == ["bn_sync: saved True, now False"]
    old = default.get_config()
    with old.unlocked():
        for name in config_lib.VARIANT_FIELDS:
            del old[name]
    config_lib.check_config(old, 8)
    a, b = create_model(old, 10), create_model(default.get_config(), 10)
    assert type(a) is type(b) and not a.norm_before_relu and not b.norm_before_relu
    assert a.norm.func is b.norm.func and a.norm.keywords == b.norm.keywords


def test_models_of_the_variants():
    x = jnp.asarray(np.random.default_rng(0).random((4, 28, 28, 1), np.float32))
    shapes = {}
    for name, overrides in {"after": {}, "before": dict(cnn_norm_before_relu=True), "none": dict(norm="none"),
                            "group": dict(norm="group_norm", group_norm_groups=4)}.items():
        c = default.get_config()
        c.update(overrides)
        variables = create_model(c, 10).init(jax.random.key(0), x, train=False)
        shapes[name] = jax.tree.map(jnp.shape, variables)
    assert shapes["before"] == shapes["after"] and "batch_stats" in shapes["after"]
    assert "batch_stats" not in shapes["none"] and "BatchNorm_0" not in shapes["none"]["params"]
    assert "batch_stats" not in shapes["group"] and shapes["group"]["params"]["BatchNorm_0"]["scale"] == (32,)
    c = default.get_config()
    c.update(model="resnet20", resnet_width=4, resnet_blocks=1)
    params = create_model(c, 10).init(jax.random.key(0), x, train=False)["params"]
    assert sorted(k for k in params if k.startswith("Block")) == ["Block_0_0", "Block_1_0", "Block_2_0"]
    assert params["Conv_stem"]["kernel"].shape == (3, 3, 1, 4) and params["Dense_head"]["kernel"].shape == (16, 10)


@pytest.mark.parametrize("sync", [True, False])
def test_per_device_statistics_and_their_running_average(ndev, sync):
    """bn_sync=False: each device normalizes with its own batch's statistics, and the running
    statistics become the mean over the devices of their per-device updates (replicated)."""
    config = smoke.get_config()  # MLP: Dense(16, no bias) -> BatchNorm -> ReLU -> Dense
    config.bn_sync = sync
    model = create_model(config, 10)
    steps = make_steps(config, model, create_optimizer(config, 8, 16), (28, 28, 1))
    state = steps.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    # Shards with different means, so that per-device and global variances differ.
    images = (rng.random((64, 28, 28, 1)) * np.repeat(np.arange(1, 9), 8)[:, None, None, None] / 8).astype(np.float32)
    batch = {"image": images, "label": rng.integers(0, 10, 64).astype(np.int32)}
    h = images.reshape(64, -1).astype(np.float64) @ np.asarray(state.params["Dense_0"]["kernel"], np.float64)
    new_state, _ = steps.train(state, steps.put_batch(batch))
    stats = jax.tree.map(np.asarray, new_state.batch_stats["BatchNorm_0"])
    if sync:
        mean, var = h.mean(0), h.var(0)
    else:
        shards = h.reshape(ndev, -1, h.shape[1])
        mean, var = shards.mean(1).mean(0), shards.var(1).mean(0)
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)
    assert not np.allclose(h.var(0), h.reshape(ndev, -1, h.shape[1]).var(1).mean(0), rtol=1e-2)
