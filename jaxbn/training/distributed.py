"""Starting several processes: `initialize_distributed`, with a watchdog for missing peers."""

from __future__ import annotations

import os
import sys
import threading
from typing import Optional

from absl import logging
import jax

from jaxbn.training.config import ConfigError

__all__ = ["initialize_distributed"]


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *,
                           timeout_s: int = 300, auto_detect: bool = False) -> bool:
    """Calls `jax.distributed.initialize` when several processes are asked for.

    With any of `coordinator_address`, `num_processes`, `process_id` given (the
    others come from JAX's cluster auto-detection or ``JAX_COORDINATOR_ADDRESS``),
    or with `auto_detect` (SLURM, Open MPI, Kubernetes, Cloud TPU), joins the
    cluster; otherwise does nothing and returns False.

    JAX aborts the process (SIGABRT, a C++ stack trace) when a peer does not show
    up within its initialization timeout. A watchdog thread ends the process
    first, after `timeout_s` seconds, with exit status 3 and a message saying
    which process waited for how many peers where.

    Must run before any other JAX call.
    """
    if all(v is None for v in (coordinator_address, num_processes, process_id)) and not auto_detect:
        return False
    if timeout_s <= 0:
        raise ConfigError(f"distributed timeout must be positive, got {timeout_s}")
    who = (f"process {process_id if process_id is not None else '?'} of "
           f"{num_processes if num_processes is not None else '?'}")
    where = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "(auto-detected)")
    done = _start_watchdog(timeout_s, who, where)
    logging.info("Joining %s via coordinator %s (timeout %d s)", who, where, timeout_s)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s + 60)
    done.set()
    logging.info("Distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _start_watchdog(timeout_s: int, who: str, where: str) -> threading.Event:
    """A daemon thread that ends the process (status 3) unless the returned event is set in time."""
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout_s):
            sys.stderr.write(
                f"\nerror: jax.distributed.initialize timed out after {timeout_s} s: {who} could not "
                f"gather all processes at coordinator {where}. Start every process (--process_id 0 .. "
                f"num_processes-1) with the same --coordinator_address and --num_processes, check "
                f"that process 0 runs and its address is reachable, or raise --distributed_timeout.\n")
            sys.stderr.flush()
            os._exit(3)

    threading.Thread(target=watchdog, name="distributed-init-watchdog", daemon=True).start()
    return done
