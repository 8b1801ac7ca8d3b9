"""train.py as several processes (jax.distributed on 127.0.0.1, gloo CPU collectives).

Two processes with 4 virtual CPU devices each must train in lockstep and match
one process with 8 devices, on the Linen path and on the NNX path
(``--config.api=nnx``); a process whose peer never starts must say whom it waits
for and fail fast with a clear message; a process whose peer dies must end with
one line naming it, and the rerun resume. Every subprocess runs under a timeout.
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
from jaxbn.training import nnx_steps  # noqa: E402

TIMEOUT_S = 80
LOG_LINE = re.compile(r"\[process (\d)/(\d)\] step (\d+): train_loss=(\S+) train_accuracy=(\S+)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, devices, log=None):
    """train.py with `args` on `devices` CPU devices; stdout and stderr to pipes, or both to the
    file `log` (to watch a running process)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    out = subprocess.PIPE if log is None else open(log, "w")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, env=env, cwd=ROOT,
                            stdout=out, stderr=subprocess.PIPE if log is None else subprocess.STDOUT,
                            text=True)


def wait_for_line(path, text, procs, timeout):
    """Waits until the file `path` contains `text`; kills `procs` and fails past `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in open(path).read():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
        p.wait()
    pytest.fail(f"{text!r} not in {path} within {timeout} s: {open(path).read()[-3000:]}")


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
    """The final checkpoint of `workdir` as NumPy arrays (whatever wrote it), in the state of
    `config.api`'s path (Linen `TrainState` or NNX `NNXTrainState`)."""
    tx = train_lib.create_optimizer(config, 8, 16)
    if config.api == "nnx":
        init = nnx_steps.make_nnx_steps(config, 10, (28, 28, 1), tx).init
    else:
        init = functools.partial(train_lib.create_train_state, model=train_lib.create_model(config, 10), tx=tx,
                                 image_shape=(28, 28, 1))
    abstract = jax.eval_shape(init, jax.random.key(0))
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    manager = train_lib.checkpoint_manager(workdir)
    state, meta = train_lib.restore_checkpoint(manager, target)
    manager.close()
    return state, meta


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_small_idx(tmp_path_factory.mktemp("fmnist_small"))


@pytest.mark.parametrize("api, parallel", [("linen", "shard_map"), ("nnx", "nnx.jit")])
def test_two_processes_match_one_process(data_dir, tmp_path, api, parallel):
    """2 processes x 4 devices = 1 process x 8 devices: the same train metrics at every logged
    step, final state (to float tolerance) and test accuracy; on each training path."""
    common = ["--config", os.path.join(ROOT, "configs", "smoke.py"), f"--config.dataset={data_dir}",
              f"--config.api={api}"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    port = free_port()
    procs = [launch(common + ["--workdir", two, "--coordinator_address", f"127.0.0.1:{port}",
                              "--num_processes", "2", "--process_id", str(i)], devices=4) for i in range(2)]
    procs.append(launch(common + ["--workdir", one], devices=8))
    (rc0, out0, err0), (rc1, out1, err1), (rc, out, err) = wait_all(procs, TIMEOUT_S)
    assert (rc0, rc1, rc) == (0, 0, 0), (err0[-3000:], err1[-3000:], err[-3000:])
    assert "Distributed: process 0 of 2, 4 local / 8 global devices" in err0
    assert f"BN, {parallel}) on 8 device(s) x 2 process(es)" in err0, err0[-3000:]  # the path asked for
    assert f"BN, {parallel}) on 8 device(s) x 1 process(es)" in err, err[-3000:]

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
    config.api = api
    state2, meta2 = restore_host(two, config)
    state1, meta1 = restore_host(one, config)
    assert meta2 == meta1 and meta2["step"] == 16
    for (path, a), b in zip(jax.tree.leaves_with_path(state2), jax.tree.leaves(state1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    final2, final1 = (json.loads(open(os.path.join(w, "metrics.jsonl")).readlines()[-1]) for w in (two, one))
    assert final2["test_accuracy"] == final1["test_accuracy"]
    assert final2["test_loss"] == pytest.approx(final1["test_loss"], rel=1e-5)
    assert final2["traces"] == {"train": 1, "eval": 1}
    assert (final2["api"], final2["parallel"], final2["processes"], final1["processes"]) == (api, parallel, 2, 1)
    print(f"{api}: final test accuracy {final1['test_accuracy']:.4%} (1 x 8), "
          f"{final2['test_accuracy']:.4%} (2 x 4)")


def test_missing_peer_fails_fast_with_clear_error(tmp_path):
    """Process 0 whose peer never starts, and process 1 whose coordinator never starts: each says
    every 2 s whom it waits for and how to wait less, then ends with status 3 and one message."""
    port0, port1 = free_port(), free_port()
    start = time.monotonic()
    procs = [launch(["--config", os.path.join(ROOT, "configs", "smoke.py"), "--workdir", str(tmp_path / str(i)),
                     "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                     "--process_id", str(i), "--distributed_timeout", "6"], devices=4)
             for i, port in ((0, port0), (1, port1))]
    [(rc, _, err), (rc1, _, err1)] = wait_all(procs, 60)
    assert (rc, rc1) == (3, 3), (err[-3000:], err1[-3000:])
    assert time.monotonic() - start < 45
    assert "timed out after 6 s: process 0 of 2 could not gather all processes" in err
    assert f"127.0.0.1:{port0}" in err and "--distributed_timeout" in err
    assert not os.path.exists(os.path.join(tmp_path, "0", "checkpoints"))  # never got to train
    # Meanwhile: who is awaited (process 1; for process 1, the coordinator that does not answer).
    waits = [line for line in err.splitlines() if "still waiting" in line]
    assert len(waits) >= 2, err[-3000:]
    assert (f"process 0 of 2: still waiting for process(es) 1 to connect to 127.0.0.1:{port0}"
            in waits[0]) and "--distributed_timeout=SECONDS to wait less" in waits[0]
    assert (f"process 1 of 2: still waiting for process 0 (the coordinator, 127.0.0.1:{port1} does not "
            "answer yet)" in err1), err1[-3000:]


def test_lost_peer_ends_with_one_line_and_the_rerun_resumes(data_dir, tmp_path):
    """Process 1 SIGKILLed mid-run: process 0 ends within 60 s (status 4) with one line naming
    process 1 and the last complete checkpoint, instead of a ~90 s hang and SIGABRT; rerunning
    both processes resumes from that checkpoint."""
    workdir, port = tmp_path / "run", free_port()
    common = ["--config", os.path.join(ROOT, "configs", "smoke.py"), f"--config.dataset={data_dir}",
              "--config.num_epochs=100", "--workdir", str(workdir), "--num_processes", "2"]
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [launch(common + ["--coordinator_address", f"127.0.0.1:{port}", "--process_id", str(i)],
                    devices=4, log=logs[i]) for i in range(2)]
    wait_for_line(logs[1], "step 20:", procs, TIMEOUT_S)
    procs[1].kill()
    killed = time.monotonic()
    try:
        rc0 = procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail(f"process 0 still runs 60 s after its peer died: {logs[0].read_text()[-3000:]}")
    elapsed = time.monotonic() - killed
    procs[1].wait()
    out = logs[0].read_text()
    last = out.strip().splitlines()[-1]
    # Seconds when a collective fails (gloo: connection reset); when it blocks instead, the
    # heartbeat watch ends the process 30 s after the peer's last beat. Either way within 60 s.
    assert rc0 == 4 and elapsed < 55, (rc0, elapsed, out[-3000:])
    assert re.match(r"train\.py: error: lost process 1 of 2 \((a collective failed: .*Gloo|no heartbeat "
                    r"for 3\d s; this process was waiting for it)", last), last
    match = re.search(r"The last complete checkpoint, step (\d+) in (\S+)/checkpoints, is intact\. "
                      r"Restart every process with the same command to resume\.$", last)
    assert match and match.group(2) == str(workdir), last
    assert "Traceback" not in out and "Check failure stack trace" not in out

    step = int(match.group(1))
    port = free_port()
    procs = [launch(common + ["--coordinator_address", f"127.0.0.1:{port}", "--process_id", str(i),
                              f"--config.stop_after_steps={step + 2}"], devices=4) for i in range(2)]
    [(rc0, _, err0), (rc1, _, err1)] = wait_all(procs, TIMEOUT_S)
    assert (rc0, rc1) == (0, 0), (err0[-3000:], err1[-3000:])
    assert f"Resuming from {workdir}/checkpoints at step {step}" in err0, err0[-3000:]
