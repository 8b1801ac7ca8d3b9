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
from helpers import (assert_trees_close, host, read_metrics, run_training, smoke_config,  # noqa: E402
                     write_small_idx)
from jaxbn import data, train_lib  # noqa: E402
from jaxbn.training import parallel  # noqa: E402

NUM_TRAIN, NUM_TEST = 512, 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_small_idx(tmp_path_factory.mktemp("fmnist_small"), NUM_TRAIN, NUM_TEST)


def make_config(data_dir, **overrides):
    return smoke_config(data_dir, **overrides)


run = run_training
assert_trees_equal = assert_trees_close


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

    # Running again in a finished workdir evaluates the last checkpoint, trains and writes
    # nothing, and reports the run that trained it.
    final = read_metrics(workdir)[-1]
    state2, summary2 = run(make_config(data_dir), workdir)
    assert summary2["step"] == 16 and summary2["test_accuracy"] == ref_summary["test_accuracy"]
    assert summary2["already_finished"] and summary2["original"]["images_per_sec"] == final["images_per_sec"] > 0
    assert read_metrics(workdir)[-1] == final
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


# ---------------------------------------------------------------------------
# What a person sees (issue 15 section 4)
# ---------------------------------------------------------------------------


def test_smoke_config_states_the_accuracy_its_run_gives(reference):
    """configs/smoke.py's docstring promises a final accuracy; the reference run (the smoke config
    on the same 512/300 images, plus one NaN batch the docstring says changes nothing) gives it."""
    import re

    promised = re.search(r'"Final\s+test\s+accuracy:\s+(\d+\.\d\d)%"', smoke.__doc__)
    assert promised, "configs/smoke.py's docstring no longer states 'Final test accuracy: NN.NN%'"
    got = f"{100 * reference[2]['test_accuracy']:.2f}"
    assert got == promised.group(1), (
        f"configs/smoke.py promises {promised.group(1)}% but the smoke run gives {got}%: update the "
        f"docstring")


def test_cosine_schedule_without_warmup_is_quiet_and_unchanged(caplog):
    """No "polynomial schedule ... non-positive `transition_steps`" line per run (optax logs one
    for a zero-step warm-up), and the same learning rates as optax's warm-up+cosine schedule."""
    import logging

    import optax
    from jaxbn.training import state as state_lib

    config = smoke.get_config()
    assert config.lr_schedule == "cosine" and config.warmup_epochs == 0
    with caplog.at_level(logging.DEBUG):
        schedule = state_lib.create_learning_rate_schedule(config, 8, 16)
        state_lib.create_optimizer(config, 8, 16)
    assert not [r for r in caplog.records if "transition_steps" in r.getMessage()]
    expected = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, 0, 16, 0.0)
    steps = np.arange(20)
    np.testing.assert_array_equal(np.asarray(schedule(steps)), np.asarray(expected(steps)))


def _bar_output(columns, monkeypatch):
    """What the training progress bar writes to a pty that reports `columns` columns, as the
    loop makes it (on sys.stderr)."""
    import fcntl
    import struct
    import termios

    from jaxbn.training.metrics import progress_bar

    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns, 0, 0))
        with os.fdopen(slave, "w", encoding="utf-8") as f:  # closes the slave side
            monkeypatch.setattr(sys, "stderr", f)
            with progress_bar(16, 0, True) as bar:
                for _ in range(16):
                    bar.update(1)
            monkeypatch.undo()
        out = b""
        while True:  # everything written, then EIO (or EOF) once no slave is open
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out.decode("utf-8")
    finally:
        os.close(master)


@pytest.mark.parametrize("columns", [0, 60, 200])
def test_progress_bar_in_a_terminal(columns, monkeypatch):
    """A pty that reports 0 columns (no size set) gets a fixed-width bar, where tqdm's own
    dynamic_ncols printed none; a real terminal's bar fits its width."""
    out = _bar_output(columns, monkeypatch)
    lines = [line for line in out.replace("\r\n", "\r").split("\r") if line.strip()]
    assert lines and "100%|" in lines[-1] and "16/16" in lines[-1], repr(out)
    width = 100 if columns == 0 else columns - 1
    assert all(len(line.rstrip()) <= width for line in lines), repr(out)
    assert len(lines[-1].rstrip()) >= min(width, 80) - 1, repr(out)  # the bar uses the width


def _cli(args, env_extra=None, timeout=120):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("JAX_PLATFORMS", None)  # as a user runs it: JAX looks for a TPU first
    env.update(env_extra or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                           os.path.join(ROOT, "configs/smoke.py")] + args, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_run_is_quiet_and_a_rerun_reports_the_original_run(data_dir, tmp_path):
    """`python train.py` shows jaxbn's lines but not JAX's TPU probe nor optax's schedule note; run
    again in the finished workdir, it trains nothing, writes nothing, and reports the run that
    trained (not "0 images/s")."""
    workdir = tmp_path / "w"
    args = ["--workdir", str(workdir), f"--config.dataset={data_dir}"]
    p = _cli(args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Unable to initialize backend" not in p.stderr and "transition_steps" not in p.stderr
    assert "mlp (jaxbn BN, shard_map) on 1 device(s)" in p.stderr and "test_accuracy=" in p.stderr
    final = p.stdout.strip().splitlines()[-1]
    assert final.startswith("Final test accuracy: ") and " 0 images/s" not in final, final
    record = read_metrics(workdir)[-1]
    before = {name: os.stat(workdir / name).st_mtime_ns for name in ("metrics.jsonl", "metrics.png")}

    p = _cli(args)
    assert p.returncode == 0, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith(f"Nothing to train: {workdir} holds this run, finished after 16 steps"), last
    assert f"test accuracy {100 * record['test_accuracy']:.2f}%" in last
    assert f"{record['images_per_sec']:.0f} images/s" in last and " 0 images/s" not in last, last
    assert {name: os.stat(workdir / name).st_mtime_ns for name in before} == before
    assert "Given directory is read only" not in p.stderr and "Traceback" not in p.stderr


def test_cli_unknown_field_is_readable_with_its_suggestion(tmp_path):
    p = _cli(["--workdir", str(tmp_path / "w"), "--config.paralel=jit"], {"JAX_PLATFORMS": "cpu"})
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        "train.py: error: unknown config field 'paralel' (--config.paralel=jit). Did you mean "
        "\"parallel\" instead of \"paralel\"? Every --config.FIELD must be a field of the config "
        "file's get_config().")


def test_setup_script_says_what_it_installs_and_how_long(tmp_path):
    """scripts/setup.sh announces each slow step (with a rough duration) before running it, on a
    fresh checkout; run with stand-ins for python/pip and apt-get that only record their calls."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("scripts/setup.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy(os.path.join(ROOT, name), repo / name)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_python = fake_bin / "python3"
    fake_python.write_text(
        "#!/bin/bash\n"
        "if [ \"$1 $2\" = '-m venv' ]; then mkdir -p \"$3/bin\" && cp \"$0\" \"$3/bin/python\"; exit 0; fi\n"
        "if [ \"$1 $2\" = '-m pip' ]; then echo \"RAN: pip ${*:3}\"; fi\n"
        "exit 0\n")
    fake_apt = fake_bin / "apt-get"
    fake_apt.write_text("#!/bin/bash\necho \"RAN: apt-get $*\"\n")
    for f in (fake_python, fake_apt):
        f.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake_python), PATH=f"{fake_bin}:{os.environ['PATH']}")
    p = subprocess.run(["bash", str(repo / "scripts/setup.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    ran = [i for i, line in enumerate(lines) if line.startswith("RAN: pip install")]
    assert ran, p.stdout
    for i in ran:  # the last thing said before each pip call announces it, with a duration
        said = [line for line in lines[:i] if line.startswith("setup:") and "done in" not in line]
        assert said and "minute" in " ".join(said[-2:]), p.stdout
    assert "jax==0.10.2" in p.stdout and "installing jaxbn" in p.stdout
    assert lines[-1].startswith("setup: ready (setup took")
    p = subprocess.run(["bash", str(repo / "scripts/setup.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert "RAN: pip" not in p.stdout and "up to date" in p.stdout


# ---------------------------------------------------------------------------
# Faults of the work directory (issue 17, items 1-3)
# ---------------------------------------------------------------------------

ENOSPC_FROM_ORBAX = ('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local file "{}": '
                     'Failed to write 44520 bytes to file 17: No space left on device [os_error_code=\'28\']')


def test_disk_full_while_saving_a_checkpoint(reference, data_dir, tmp_path, monkeypatch):
    """The save of step 10 fails as orbax fails on a full disk: one error naming the disk, the
    place and the kept checkpoint (step 5, intact); the partial checkpoint is removed; a rerun
    resumes from step 5 and ends where the uninterrupted run ended."""
    import orbax.checkpoint as ocp
    from jaxbn.training.workdir import WorkdirError

    ref_dir, ref_state, _ = reference
    workdir = str(tmp_path / "run")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 10:  # what a full disk leaves: orbax's temporary directory, half written
            partial = os.path.join(str(self.directory), "10.orbax-checkpoint-tmp", "state")
            os.makedirs(partial)
            raise ValueError(ENOSPC_FROM_ORBAX.format(partial))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(WorkdirError) as e:
        run(make_config(data_dir), workdir)
    msg = str(e.value)
    assert msg.startswith("disk full (no space left on device) while saving the checkpoint of step 10")
    assert f"at {ckpt_dir} (" in msg and f"kept the last complete checkpoint {ckpt_dir}/5 (step 5)" in msg
    assert "run the same command again" in msg
    assert os.listdir(ckpt_dir) == ["5"]
    monkeypatch.undo()  # space freed
    state, summary = run(make_config(data_dir), workdir)
    assert summary["step"] == 16 and not summary.get("already_finished")
    assert_trees_equal(state, ref_state)
    assert read_metrics(workdir) == [r for r in read_metrics(workdir)]  # every line parses
    assert [r["step"] for r in read_metrics(workdir)] == [r["step"] for r in read_metrics(ref_dir)]


def test_disk_full_while_writing_metrics_then_torn_line_is_dropped(reference, data_dir, tmp_path,
                                                                     monkeypatch, caplog):
    """Appending step 12's record fails half-way on a full disk: a clear error naming
    metrics.jsonl and the kept checkpoint (step 10); the rerun drops the torn last line with a
    warning naming the file and ends where the uninterrupted run ended."""
    import errno
    import logging

    from jaxbn.training.metrics import MetricsWriter
    from jaxbn.training.workdir import WorkdirError

    ref_dir, ref_state, _ = reference
    workdir = str(tmp_path / "run")
    path = os.path.join(workdir, "metrics.jsonl")
    real_write = MetricsWriter.write

    def write(self, record):
        if record["step"] == 12:
            with open(self.path, "a") as f:
                f.write(json.dumps(record)[:17])  # the part that fit
            err = OSError(errno.ENOSPC, "No space left on device", self.path)
            self._raise_if_disk_full(err, f"appending step 12 to {self.path}")
        return real_write(self, record)

    monkeypatch.setattr(MetricsWriter, "write", write)
    with pytest.raises(WorkdirError) as e:
        run(make_config(data_dir), workdir)
    msg = str(e.value)
    assert msg.startswith(f"disk full (no space left on device) while appending step 12 to {path}")
    assert f"checkpoints/10 (step 10), which a rerun resumes from" in msg
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING):
        state, summary = run(make_config(data_dir), workdir)
    assert any(path in r.getMessage() and "torn last line" in r.getMessage() for r in caplog.records)
    assert summary["step"] == 16
    assert_trees_equal(state, ref_state)
    assert [(r["step"], sorted(r)) for r in read_metrics(workdir)] == [
        (r["step"], sorted(r)) for r in read_metrics(ref_dir)]


def test_torn_last_metrics_line_resumes_and_corruption_elsewhere_is_named(reference, data_dir,
                                                                          tmp_path, caplog):
    import logging

    from jaxbn.training.metrics import MetricsError

    ref_dir, ref_state, _ = reference
    torn, corrupt = str(tmp_path / "torn"), str(tmp_path / "corrupt")
    run(make_config(data_dir, stop_after_steps=12), torn)
    shutil.copytree(torn, corrupt)
    with open(os.path.join(torn, "metrics.jsonl"), "a") as f:
        f.write('{"step": 13, "epo')  # a crash in the middle of a write
    with caplog.at_level(logging.WARNING):
        state, summary = run(make_config(data_dir), torn)
    assert any("metrics.jsonl: dropped its torn last line" in r.getMessage() for r in caplog.records)
    assert_trees_equal(state, ref_state)
    assert [r["step"] for r in read_metrics(torn)] == [r["step"] for r in read_metrics(ref_dir)]

    path = os.path.join(corrupt, "metrics.jsonl")
    with open(path) as f:
        lines = f.readlines()
    lines[1] = lines[1][:20] + "\n"
    with open(path, "w") as f:
        f.writelines(lines)
    with pytest.raises(MetricsError, match=rf"{path}, line 2: not a metrics record"):
        run(make_config(data_dir), corrupt)


def test_unwritable_workdir_is_refused_before_training(data_dir, tmp_path, monkeypatch):
    import errno
    import tempfile

    from jaxbn.training import loop
    from jaxbn.training.workdir import WorkdirError

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before checking the workdir")

    monkeypatch.setattr(loop, "steps_for", no_compiling)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(WorkdirError, match=rf"cannot write to the workdir {blocker}/w: .*Not a directory"):
        run(make_config(data_dir), blocker / "w")

    def denied(*args, **kwargs):  # what a directory without write permission gives a non-root user
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(WorkdirError, match=rf"cannot write to the workdir {tmp_path}/w: {tmp_path}/w: "
                                           r"Permission denied\. .*choose a writable --workdir"):
        run(make_config(data_dir), tmp_path / "w")


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs (room for one smoke checkpoint, not two), or skip where mounting is not
    allowed (not root, or a container without the capability)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_cli_on_a_full_then_read_only_disk(data_dir, tiny_tmpfs):
    """Real faults, as a user meets them: `python train.py` on a disk that fills up ends in a few
    lines, the last one `train.py: error:` (not orbax's tracebacks); after space is freed the
    rerun resumes; on the disk made read-only, the finished run is still evaluated, and a new run
    is refused in one line."""
    workdir = tiny_tmpfs / "w"
    args = ["--workdir", str(workdir), f"--config.dataset={data_dir}"]
    p = _cli(args, {"JAX_PLATFORMS": "cpu"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) <= 20, p.stderr[-3000:]
    assert lines[-1].startswith("train.py: error: disk full (no space left on device) while saving "
                                f"the checkpoint of step 10, at {workdir}/checkpoints"), lines[-1]
    assert f"kept the last complete checkpoint {workdir}/checkpoints/5 (step 5)" in lines[-1]
    assert "Traceback" not in p.stderr and os.listdir(workdir / "checkpoints") == ["5"]

    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_tmpfs)], check=True)
    p = _cli(args, {"JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0 and "Resuming from" in p.stderr and "at step 5" in p.stderr, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1].startswith("Final test accuracy: ")

    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    p = _cli(args, {"JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1].startswith("Nothing to train"), p.stderr
    p = _cli(["--workdir", str(tiny_tmpfs / "new"), f"--config.dataset={data_dir}"], {"JAX_PLATFORMS": "cpu"})
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f"train.py: error: cannot write to the workdir {tiny_tmpfs}/new: {tiny_tmpfs}/new: read-only file "
        f"system. Checkpoints and metrics go there; choose a writable --workdir (nothing was trained)")
    assert "compil" not in p.stderr.lower() and "step" not in p.stderr
