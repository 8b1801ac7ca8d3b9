"""train.py as several processes (jax.distributed on 127.0.0.1, gloo CPU collectives).

Two processes with 4 virtual CPU devices each must train in lockstep and match
one process with 8 devices; a process whose peer never starts must fail fast
with a clear message. Every subprocess runs under a timeout.
"""

import functools
import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import smoke  # noqa: E402
from helpers import write_small_idx  # noqa: E402
from jaxbn import train_lib  # noqa: E402

TIMEOUT_S = 80
LOG_LINE = re.compile(r"\[process (\d)/(\d)\] step (\d+): train_loss=(\S+) train_accuracy=(\S+)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_all(procs, timeout):
    """(returncode, stdout, stderr) of each process; kills them all past `timeout`."""
    deadline, out = time.monotonic() + timeout, []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1, deadline - time.monotonic()))
            out.append((p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[1][-3000:] for p in procs]
        pytest.fail(f"a process ran past {timeout} s (hang?); stderr tails: {logs}")
    return out


def train_log(stderr):
    return [m.groups() for m in map(LOG_LINE.search, stderr.splitlines()) if m]


def restore_host(workdir, config):
    """The final checkpoint of `workdir` as NumPy arrays (whatever wrote it)."""
    model = train_lib.create_model(config, 10)
    tx = train_lib.create_optimizer(config, 8, 16)
    abstract = jax.eval_shape(functools.partial(train_lib.create_train_state, model=model, tx=tx,
                                                image_shape=(28, 28, 1)), jax.random.key(0))
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    manager = train_lib.checkpoint_manager(workdir)
    state, meta = train_lib.restore_checkpoint(manager, target)
    manager.close()
    return state, meta


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_small_idx(tmp_path_factory.mktemp("fmnist_small"))


def test_two_processes_match_one_process(data_dir, tmp_path):
    common = ["--config", os.path.join(ROOT, "configs", "smoke.py"), f"--config.dataset={data_dir}"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    port = free_port()
    procs = [launch(common + ["--workdir", two, "--coordinator_address", f"127.0.0.1:{port}",
                              "--num_processes", "2", "--process_id", str(i)], devices=4) for i in range(2)]
    procs.append(launch(common + ["--workdir", one], devices=8))
    (rc0, out0, err0), (rc1, out1, err1), (rc, out, err) = wait_all(procs, TIMEOUT_S)
    assert (rc0, rc1, rc) == (0, 0, 0), (err0[-3000:], err1[-3000:], err[-3000:])
    assert "Distributed: process 0 of 2, 4 local / 8 global devices" in err0

    # Lockstep: both processes see the same global metrics at the same steps.
    log0, log1, log = train_log(err0), train_log(err1), train_log(err)
    assert [r[2:] for r in log0] == [r[2:] for r in log1]
    assert [r[0] for r in log0] == ["0"] * len(log0) and [r[0] for r in log1] == ["1"] * len(log1)
    assert [int(r[2]) for r in log0] == [4, 5, 8, 10, 12, 15, 16] == [int(r[2]) for r in log]
    np.testing.assert_allclose(np.array([r[3:] for r in log0], float), np.array([r[3:] for r in log], float),
                               rtol=1e-5)
    final = [line for line in out0.splitlines() if line.startswith("Final test accuracy")]
    assert final and final[0].split(";")[0] in out1  # process 1 reports the same accuracy

    # Same final state as one process with 8 devices, up to float summation order.
    config = smoke.get_config()
    state2, meta2 = restore_host(two, config)
    state1, meta1 = restore_host(one, config)
    assert meta2 == meta1 and meta2["step"] == 16
    for (path, a), b in zip(jax.tree.leaves_with_path(state2), jax.tree.leaves(state1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    final2, final1 = (json.loads(open(os.path.join(w, "metrics.jsonl")).readlines()[-1]) for w in (two, one))
    assert final2["test_accuracy"] == final1["test_accuracy"]
    assert final2["test_loss"] == pytest.approx(final1["test_loss"], rel=1e-5)
    assert final2["traces"] == {"train": 1, "eval": 1}


def test_missing_peer_fails_fast_with_clear_error(tmp_path):
    port = free_port()
    start = time.monotonic()
    proc = launch(["--config", os.path.join(ROOT, "configs", "smoke.py"), "--workdir", str(tmp_path),
                   "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                   "--process_id", "0", "--distributed_timeout", "5"], devices=4)
    [(rc, _, err)] = wait_all([proc], 60)
    assert rc == 3, err[-3000:]
    assert time.monotonic() - start < 45
    assert "timed out after 5 s: process 0 of 2 could not gather all processes" in err
    assert f"127.0.0.1:{port}" in err and "--distributed_timeout" in err
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))  # never got to train
