"""Tests of the training loop (jaxbn/training, its re-export jaxbn/train_lib.py, train.py) on 8
virtual CPU devices.

Every run uses configs/smoke.py (an MLP, 512 training images, 16 steps) on a
small IDX copy of Fashion-MNIST; runs with the same model and optimizer share
compiled steps, so the whole file takes well under a minute on two cores.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import smoke  # noqa: E402
from helpers import write_small_idx  # noqa: E402
from jaxbn import data, train_lib  # noqa: E402
from jaxbn.training import parallel  # noqa: E402

NUM_TRAIN, NUM_TEST = 512, 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_small_idx(tmp_path_factory.mktemp("fmnist_small"), NUM_TRAIN, NUM_TEST)


def make_config(data_dir, **overrides):
    config = smoke.get_config()
    config.dataset = data_dir
    config.debug_nan_step = 5  # every run skips one NaN batch: the counter must survive resumes
    for k, v in overrides.items():
        config[k] = v
    return config


def run(config, workdir):
    return train_lib.train_and_evaluate(config, str(workdir))


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    flat_a, flat_b = jax.tree.leaves_with_path(host(a)), jax.tree.leaves(host(b))
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One uninterrupted smoke run (shard_map, jaxbn BN) with a NaN batch at step index 5."""
    workdir = tmp_path_factory.mktemp("reference")
    state, summary = run(make_config(data_dir), workdir)
    return str(workdir), host(state), summary


def test_run_outputs(reference):
    workdir, state, summary = reference
    assert not summary["stopped"] and summary["step"] == 16 and int(state.step) == 16
    assert summary["traces"] == {"train": 1, "eval": 1}  # each step compiled once
    assert summary["nonfinite_steps"] == 1 and int(state.nonfinite_steps) == 1
    assert summary["test_examples"] == NUM_TEST  # 128 + 128 + 44 (padded, masked) rows
    assert summary["test_accuracy"] > 0.4 and summary["images_per_sec"] > 0
    rows = read_metrics(workdir)
    evals = [r for r in rows if "test_accuracy" in r and not r.get("final")]
    assert [r["step"] for r in evals] == [8, 16]  # after each epoch
    assert all(r["test_examples"] == NUM_TEST for r in evals)
    assert rows[-1]["final"] and rows[-1]["test_accuracy"] == summary["test_accuracy"]
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == [4, 5, 8, 10, 12, 15, 16]
    assert train_rows[-1]["nonfinite_steps"] == 1
    assert all(np.isfinite(r["train_loss"]) for r in train_rows)
    with open(os.path.join(workdir, "metrics.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(os.path.join(workdir, "config.json")))["model"] == "mlp"
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["10", "15", "16"]
    for leaf in jax.tree.leaves((state.params, state.batch_stats)):
        assert np.all(np.isfinite(leaf))


def test_eval_matches_direct_computation(reference, data_dir):
    """Evaluation weighs by the mask: padded rows of the last batch do not count."""
    _, state, summary = reference
    config = make_config(data_dir)
    ds = data.load_dataset(data_dir)
    model = train_lib.create_model(config, ds.num_classes)
    x = ds.test["image"].astype(np.float32) / 255.0
    logits = np.asarray(model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                                    train=False))
    accuracy = np.mean(np.argmax(logits, -1) == ds.test["label"])
    shifted = logits - logits.max(-1, keepdims=True)
    nll = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(NUM_TEST), ds.test["label"]]
    assert summary["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert summary["test_loss"] == pytest.approx(nll.mean(), rel=1e-5)


def test_nonfinite_step_changes_nothing(data_dir, tmp_path):
    """The NaN batch (step index 5) updates neither params, BN statistics nor optimizer state."""
    before, s1 = run(make_config(data_dir, stop_after_steps=5), tmp_path / "a")
    after, s2 = run(make_config(data_dir, stop_after_steps=6), tmp_path / "b")
    assert s1["stopped"] and s2["stopped"]
    assert int(before.step) == 5 and int(after.step) == 6
    assert int(before.nonfinite_steps) == 0 and int(after.nonfinite_steps) == 1
    assert_trees_equal(before.params, after.params)
    assert_trees_equal(before.batch_stats, after.batch_stats)
    assert_trees_equal(before.opt_state, after.opt_state)
    # The next (finite) step does train.
    later, _ = run(make_config(data_dir, stop_after_steps=7), tmp_path / "c")
    assert not np.array_equal(np.asarray(later.params["Dense_0"]["kernel"]),
                              np.asarray(after.params["Dense_0"]["kernel"]))


def test_resume_after_interruption_is_exact(reference, data_dir, tmp_path):
    ref_dir, ref_state, ref_summary = reference
    workdir = str(tmp_path / "run")
    state, summary = run(make_config(data_dir, stop_after_steps=12), workdir)
    assert summary["stopped"] and summary["step"] == 12
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir), key=int) == ["5", "10"]
    assert read_metrics(workdir)[-1]["step"] == 12  # logged after the last checkpoint
    # A crash in the middle of saving step 15 leaves orbax's temporary directory behind.
    partial = os.path.join(ckpt_dir, "15.orbax-checkpoint-tmp-1234567890")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "manifest.ocdbt"), "wb") as f:
        f.write(b"\0" * 10)

    state, summary = run(make_config(data_dir), workdir)  # resumes from step 10 (mid-epoch 1)
    assert not os.path.exists(partial)
    assert summary["step"] == 16 and summary["nonfinite_steps"] == 1
    assert summary["traces"] == {"train": 1, "eval": 1}
    assert_trees_equal(state, ref_state)  # bitwise: params, batch_stats, opt_state, counters
    assert summary["test_accuracy"] == ref_summary["test_accuracy"]
    # metrics.jsonl has no duplicate record of step 12 (logged, lost with the interruption, replayed).
    assert [(r["step"], sorted(r)) for r in read_metrics(workdir)] == [
        (r["step"], sorted(r)) for r in read_metrics(ref_dir)]

    # Running again in a finished workdir evaluates the last checkpoint and trains nothing.
    state2, summary2 = run(make_config(data_dir), workdir)
    assert summary2["step"] == 16 and summary2["test_accuracy"] == ref_summary["test_accuracy"]
    assert_trees_equal(state2.params, ref_state.params)


def test_corrupt_checkpoint_gives_clear_error(reference, data_dir, tmp_path):
    ref_dir, ref_state, _ = reference
    workdir = str(tmp_path / "copy")
    shutil.copytree(ref_dir, workdir)
    latest = os.path.join(workdir, "checkpoints", "16")
    for root, _, files in os.walk(os.path.join(latest, "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(train_lib.CheckpointError) as e:
        run(make_config(data_dir), workdir)
    msg = str(e.value)
    assert latest in msg and "delete" in msg and "step 15" in msg
    # Following the advice resumes from step 15 and ends where the reference ended.
    shutil.rmtree(latest)
    state, summary = run(make_config(data_dir), workdir)
    assert summary["step"] == 16
    assert_trees_equal(state.params, ref_state.params)


def test_resume_with_different_config_is_refused(reference, data_dir, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(reference[0], workdir)
    with pytest.raises(train_lib.CheckpointError, match=r"norm: saved 'jaxbn', now 'flax'"):
        run(make_config(data_dir, norm="flax"), workdir)


@pytest.mark.parametrize("parallel,norm", [("jit", "jaxbn"), ("pmap", "jaxbn"), ("shard_map", "flax")])
def test_parallel_modes_and_norms_agree(reference, data_dir, tmp_path, parallel, norm):
    """pmap, sharded jit and Flax's BatchNorm train the same model as shard_map + jaxbn."""
    _, ref_state, ref_summary = reference
    state, summary = run(make_config(data_dir, parallel=parallel, norm=norm), tmp_path)
    assert summary["traces"] == {"train": 1, "eval": 1}
    assert summary["nonfinite_steps"] == 1 and summary["test_examples"] == NUM_TEST
    # Same global statistics and gradients up to float32 summation order (Flax's
    # BatchNorm uses E[x²]-E[x]², a little further off).
    tol = 1e-4 if norm == "flax" else 1e-5
    assert_trees_equal(state, ref_state, rtol=tol, atol=tol)
    assert abs(summary["test_accuracy"] - ref_summary["test_accuracy"]) <= 2 / NUM_TEST


def test_config_errors(data_dir, tmp_path):
    with pytest.raises(train_lib.ConfigError, match=r"global_batch_size=60 must be divisible by the "
                       r"number of devices \(8 .*use e.g. 56 or 64"):
        run(make_config(data_dir, global_batch_size=60), tmp_path)
    with pytest.raises(train_lib.ConfigError, match=r"config.parallel must be one of .*got 'vmap'"):
        run(make_config(data_dir, parallel="vmap"), tmp_path)
    with pytest.raises(train_lib.ConfigError, match=r"config.norm must be one of"):
        run(make_config(data_dir, norm="group"), tmp_path)
    with pytest.raises(train_lib.ConfigError, match=r"train_examples=9999 exceeds the 512"):
        run(make_config(data_dir, train_examples=9999), tmp_path)


def test_missing_or_corrupt_data(data_dir, tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        run(make_config(str(tmp_path / "nowhere")), tmp_path / "w1")
    broken = str(tmp_path / "broken")
    shutil.copytree(data_dir, broken)
    path = os.path.join(broken, "t10k-images-idx3-ubyte")
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(data.DataError, match="truncated") as e:
        run(make_config(broken), tmp_path / "w2")
    assert path in str(e.value)


def test_cli_unknown_override_and_missing_data(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/smoke.py"),
           "--workdir", str(tmp_path / "w")]
    p = subprocess.run(cmd + ["--config.no_such_field=1"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "unknown config field" in p.stderr and "no_such_field" in p.stderr
    p = subprocess.run(cmd + [f"--config.dataset={tmp_path / 'nowhere'}"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "train.py: error:" in p.stderr and "nowhere does not exist" in p.stderr
    assert "Traceback" not in p.stderr


def test_train_lib_reexports_the_training_modules():
    from jaxbn.training import checkpoints, config, loop, steps

    assert train_lib.train_and_evaluate is loop.train_and_evaluate
    assert train_lib.ConfigError is config.ConfigError
    assert train_lib.CheckpointError is checkpoints.CheckpointError
    assert train_lib.Steps is steps.Steps and train_lib.PARALLEL_MODES == ("shard_map", "pmap", "jit")
    assert all(hasattr(train_lib, name) for name in train_lib.__all__)


def test_parallel_modes_are_objects():
    assert tuple(parallel.MODES) == parallel.PARALLEL_MODES == ("shard_map", "pmap", "jit")
    assert [parallel.get_mode(n).bn_axis_name for n in parallel.MODES] == ["batch", "batch", None]
    assert parallel.get_mode(parallel.PMAP) is parallel.PMAP
