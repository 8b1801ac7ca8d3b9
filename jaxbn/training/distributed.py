"""Starting several processes and failing well when one is missing or lost.

`initialize_distributed` joins the cluster; while it waits, a thread says every
few seconds whom it waits for and how to shorten the wait, and ends the process
(status 3) after the timeout with one clear message.

`watch_peers` then starts a heartbeat: each process writes a counter to the
coordination service's key-value store twice a second and reads the others'. A
peer whose counter stops for `lost_after_s` seconds is declared lost and the
process ends (status 4) with one line naming it and saying how to resume,
instead of hanging in a collective and then aborting with a C++ stack trace
when JAX's own heartbeat (100 s) gives up. `exit_if_peer_lost` does the same at
once when a collective failed (gloo: ``Connection reset by peer``), naming the
peer whose heartbeat stopped.

Not covered: when process 0 (which hosts JAX's coordination service) dies, JAX
ends the other processes itself at once (``client.h ... Terminating process``);
this is fast but its message is JAX's.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

from absl import logging
import jax

from jaxbn.training.config import ConfigError

__all__ = ["initialize_distributed", "watch_peers", "finish_watch", "watching", "exit_if_peer_lost", "is_peer_failure",
           "EXIT_NEVER_JOINED", "EXIT_PEER_LOST"]

EXIT_NEVER_JOINED = 3
EXIT_PEER_LOST = 4
_KEY = "jaxbn/heartbeat/"
_watch: Optional["_PeerWatch"] = None


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *,
                           timeout_s: int = 300, auto_detect: bool = False,
                           report_every_s: Optional[float] = None) -> bool:
    """Calls `jax.distributed.initialize` when several processes are asked for.

    With any of `coordinator_address`, `num_processes`, `process_id` given (the
    others come from JAX's cluster auto-detection or ``JAX_COORDINATOR_ADDRESS``),
    or with `auto_detect` (SLURM, Open MPI, Kubernetes, Cloud TPU), joins the
    cluster; otherwise does nothing and returns False.

    While waiting, logs every `report_every_s` seconds (default: a tenth of the
    timeout, 2 to 30 s) whom this process waits for (the coordinator, when its
    address does not answer yet, or the other processes) and that
    ``--distributed_timeout`` shortens the wait. JAX aborts the process (SIGABRT,
    a C++ stack trace) when a peer does not show up within its initialization
    timeout; a watchdog ends the process first, after `timeout_s` seconds, with
    exit status 3 and a message saying which process waited for how many peers
    where.

    Must run before any other JAX call.
    """
    if all(v is None for v in (coordinator_address, num_processes, process_id)) and not auto_detect:
        return False
    if timeout_s <= 0:
        raise ConfigError(f"distributed timeout must be positive, got {timeout_s}")
    who = (f"process {process_id if process_id is not None else '?'} of "
           f"{num_processes if num_processes is not None else '?'}")
    where = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "(auto-detected)")
    if report_every_s is None:
        report_every_s = min(30.0, max(2.0, timeout_s / 10))
    done = _start_watchdog(timeout_s, who, where, process_id, num_processes, report_every_s)
    logging.info("Joining %s via coordinator %s (timeout %d s)", who, where, timeout_s)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s + 60)
    done.set()
    logging.info("Distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _coordinator_answers(address: str) -> Optional[bool]:
    """Whether a TCP connection to host:port succeeds (None when `address` is not host:port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
            return True
    except OSError:
        return False


def _waiting_for(process_id: Optional[int], num_processes: Optional[int], where: str) -> str:
    others = ("the other processes" if process_id is None or num_processes is None else
              "process(es) " + ", ".join(str(p) for p in range(num_processes) if p != process_id))
    if process_id != 0 and _coordinator_answers(where) is False:
        return f"process 0 (the coordinator, {where} does not answer yet)"
    return f"{others} to connect to {where}"


def _start_watchdog(timeout_s: int, who: str, where: str, process_id: Optional[int],
                    num_processes: Optional[int], report_every_s: float) -> threading.Event:
    """A daemon thread that reports the wait every `report_every_s` seconds and ends the process
    (status 3) unless the returned event is set within `timeout_s` seconds."""
    done = threading.Event()
    start = time.monotonic()

    def watchdog():
        while not done.wait(max(0.0, min(report_every_s, start + timeout_s - time.monotonic()))):
            waited = time.monotonic() - start
            if waited >= timeout_s:
                break
            logging.warning("%s: still waiting for %s (%.0f s of %d s); start every process with the "
                            "same --coordinator_address and --num_processes, or give "
                            "--distributed_timeout=SECONDS to wait less", who,
                            _waiting_for(process_id, num_processes, where), waited, timeout_s)
        if done.is_set():
            return
        sys.stderr.write(
            f"\nerror: jax.distributed.initialize timed out after {timeout_s} s: {who} could not "
            f"gather all processes at coordinator {where}. Start every process (--process_id 0 .. "
            f"num_processes-1) with the same --coordinator_address and --num_processes, check "
            f"that process 0 runs and its address is reachable, or raise --distributed_timeout.\n")
        sys.stderr.flush()
        os._exit(EXIT_NEVER_JOINED)

    threading.Thread(target=watchdog, name="distributed-init-watchdog", daemon=True).start()
    return done


class _PeerWatch:
    """The heartbeat thread: writes this process's counter, reads the others', ends the process
    when one stops for `lost_after_s` seconds."""

    def __init__(self, client, process_id: int, num_processes: int, resume_hint: Callable[[], str],
                 interval_s: float, lost_after_s: float):
        self.client, self.pid, self.n = client, process_id, num_processes
        self.resume_hint, self.interval_s, self.lost_after_s = resume_hint, interval_s, lost_after_s
        now = time.monotonic()
        self.values: Dict[int, Optional[str]] = {p: None for p in range(num_processes) if p != process_id}
        self.changed: Dict[int, float] = {p: now for p in self.values}
        self.lock = threading.Lock()
        self.exiting = threading.Lock()
        self.stop = threading.Event()

    def _beat(self, beat: int) -> None:
        self.client.key_value_set(f"{_KEY}{self.pid}", str(beat), allow_overwrite=True)
        seen = dict(self.client.key_value_dir_get(_KEY))
        now = time.monotonic()
        with self.lock:
            for p in self.values:
                v = seen.get(f"{_KEY}{p}")
                if v != self.values[p]:
                    self.values[p], self.changed[p] = v, now

    def silent(self) -> Dict[int, float]:
        """Seconds since each peer's counter last moved."""
        now = time.monotonic()
        with self.lock:
            return {p: now - t for p, t in self.changed.items()}

    def finish(self) -> None:
        """Stops beating and tells the peers that this process finished (not lost)."""
        self.stop.set()
        try:
            self.client.key_value_set(f"{_KEY}{self.pid}", "done", allow_overwrite=True)
        except Exception:  # pylint: disable=broad-except
            pass

    def run(self) -> None:
        beat = 0
        while not self.stop.wait(self.interval_s):
            beat += 1
            try:
                self._beat(beat)
            except Exception as e:  # pylint: disable=broad-except
                # The coordination service (in process 0) does not answer; JAX usually ends
                # this process itself first.
                logging.warning("heartbeat: the coordination service did not answer: %s", str(e)[:200])
            lost = {p: s for p, s in self.silent().items()
                    if s >= self.lost_after_s and self.values.get(p) != "done"}
            if lost:
                self.exit_lost(lost, f"no heartbeat for {max(lost.values()):.0f} s; this process was "
                                     "waiting for it")

    def exit_lost(self, lost: Dict[int, float], what: str) -> None:
        if not self.exiting.acquire(blocking=False):
            while True:  # the other thread is saying it and ends the process
                time.sleep(1)
        names = ", ".join(f"process {p}" for p in sorted(lost)) or "a peer"
        try:
            hint = self.resume_hint()
        except Exception as e:  # pylint: disable=broad-except
            hint = f"(could not read the checkpoints: {e}) "
        sys.stdout.flush()
        sys.stderr.write(
            f"\ntrain.py: error: lost {names} of {self.n} ({what}); process {self.pid} stops. {hint}"
            f"Restart every process with the same command to resume.\n")
        sys.stderr.flush()
        # os._exit: jax's atexit shutdown would wait for the lost peer at a barrier, then abort.
        os._exit(EXIT_PEER_LOST)


def watch_peers(resume_hint: Callable[[], str] = lambda: "", *, interval_s: float = 0.5,
                lost_after_s: float = 30.0) -> bool:
    """Starts the heartbeat thread when several processes run (after `initialize_distributed`).

    `resume_hint` returns the sentence about what was kept (e.g. the last complete
    checkpoint), called only when a peer is lost. Returns whether a watch runs.
    """
    global _watch
    from jax._src import distributed as jax_distributed  # the coordination service's client
    client = jax_distributed.global_state.client
    if client is None or jax.process_count() < 2:
        return False
    _watch = _PeerWatch(client, jax.process_index(), jax.process_count(), resume_hint, interval_s,
                        lost_after_s)
    threading.Thread(target=_watch.run, name="jaxbn-peer-heartbeat", daemon=True).start()
    return True


def finish_watch() -> None:
    """This process is done (its peers may still be finishing): stops the heartbeat and marks
    the process finished, so that peers do not report it lost."""
    global _watch
    if _watch is not None:
        _watch.finish()
        _watch = None


def watching() -> bool:
    """Whether `watch_peers` runs a heartbeat in this process."""
    return _watch is not None


def is_peer_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because a peer went away (gloo/TCP errors)."""
    text = str(e)
    return isinstance(e, jax.errors.JaxRuntimeError) and any(s in text for s in (
        "Gloo", "gloo", "Connection reset by peer", "Connection closed by peer", "Broken pipe",
        "heartbeat", "UNAVAILABLE"))


def exit_if_peer_lost(e: BaseException, *, wait_s: float = 15.0, silent_s: float = 3.0) -> None:
    """When `e` is a peer failure and a watch runs: waits (at most `wait_s`) until some peer's
    heartbeat has been silent for `silent_s` seconds, then ends the process (status 4) with one
    line naming the lost peer(s) and how to resume. Returns otherwise."""
    if _watch is None or not is_peer_failure(e):
        return
    deadline = time.monotonic() + wait_s
    lost: Dict[int, float] = {}
    while time.monotonic() < deadline:
        lost = {p: s for p, s in _watch.silent().items() if s >= silent_s and _watch.values.get(p) != "done"}
        if lost:
            break
        time.sleep(0.2)
    cause = " ".join(str(e).split())
    cause = cause if len(cause) <= 160 else cause[:157] + "..."
    _watch.exit_lost(lost, f"a collective failed: {cause}")


def lost_peers() -> List[int]:
    """Peers silent for longer than the watch's limit (for tests and reports)."""
    return [] if _watch is None else [p for p, s in _watch.silent().items() if s >= _watch.lost_after_s]
