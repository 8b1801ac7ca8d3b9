"""Checkpoints: the orbax manager of ``workdir/checkpoints``, save, restore, `CheckpointError`.

A checkpoint ``workdir/checkpoints/<step>/`` holds two items: ``state`` (the
`TrainState`: params, batch_stats, opt_state, step, nonfinite_steps) and
``meta`` (JSON: the data position ``step``, ``epoch``, ``step_in_epoch``,
``steps_per_epoch``, ``global_batch_size`` and ``seed``), from which a resumed
run continues exactly where the interrupted one would have been.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxbn.training.config import saved_config_diffs
from jaxbn.training.parallel import local_value
from jaxbn.training.workdir import disk_full_error, is_disk_full

__all__ = ["CheckpointError", "checkpoint_manager", "abstract_state", "save_checkpoint",
           "restore_checkpoint", "check_resume_config"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored or does not belong to this run."""


def checkpoint_manager(workdir: str, max_to_keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """An orbax manager for ``workdir/checkpoints``.

    Saves are synchronous (the state is donated to the next step right after)
    and atomic: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it to
    ``<step>`` when complete, so a crash during a save leaves the previous
    checkpoint as the latest; leftover temporary directories are ignored and
    removed when the manager is created. A `read_only` manager (to restore or
    evaluate a finished run) creates and removes nothing.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, create=not read_only, enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only, read_only=read_only)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def abstract_state(state_shapes, sharding):
    """`state_shapes` (from `jax.eval_shape`) as ``jax.ShapeDtypeStruct``s placed with `sharding`."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), state_shapes)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, *, steps_per_epoch: int,
                    global_batch_size: int, seed: int) -> None:
    """Saves `state` (replicated global arrays) and the data position of `step`; waits."""
    meta = {"step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
            "steps_per_epoch": steps_per_epoch, "global_batch_size": global_batch_size, "seed": seed}
    kept = manager.latest_step()
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    except Exception as e:  # orbax/tensorstore raise ValueError(RESOURCE_EXHAUSTED...), OSError, ...
        if not is_disk_full(e):
            raise
        directory = str(manager.directory)
        _remove_partial(directory, step)  # gives the space back; a rerun would remove it anyway
        raise disk_full_error(f"saving the checkpoint of step {step}", directory,
                              os.path.dirname(directory), kept) from e


def _remove_partial(directory: str, step: int) -> None:
    """Removes orbax's temporary directories of `step` (what an interrupted save leaves)."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(f"{step}.orbax-checkpoint-tmp"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def restore_checkpoint(manager: ocp.CheckpointManager, target, step: Optional[int] = None):
    """Restores ``(state, meta)`` of `step` (default: the latest) into `target`'s structure.

    `target` is a `TrainState` of arrays or of ``jax.ShapeDtypeStruct`` with
    shardings (or of NumPy arrays, to restore on the host).

    Raises:
      CheckpointError: the step does not exist, or its files are unreadable or do
        not match the model (the message names the directory and what to do).
    """
    steps = sorted(manager.all_steps())
    step = manager.latest_step() if step is None else step
    path = os.path.join(str(manager.directory), str(step))
    if step is None or step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {manager.directory} (steps: {steps})")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/tensorstore raise many types for bad files
        older = [s for s in steps if s < step]
        hint = (f"delete {path} to resume from the previous checkpoint (step {older[-1]})" if older
                else f"delete {path} to start from scratch")
        raise CheckpointError(
            f"checkpoint {path} is corrupt, incomplete or from a different model and cannot be "
            f"restored ({type(e).__name__}: {str(e)[:500]}). To continue, {hint}, or train in a new "
            f"--workdir.") from e
    state, meta = restored["state"], restored["meta"]
    if meta is None or int(meta.get("step", -1)) != step or int(np.asarray(local_value(state.step))) != step:
        raise CheckpointError(f"checkpoint {path} is inconsistent: directory step {step}, metadata "
                              f"{meta}; delete {path} to resume from the previous checkpoint")
    return state, meta


def check_resume_config(config, path: str) -> None:
    """Raises CheckpointError when the config saved at `path` (workdir/config.json)
    differs from `config` in a field that changes the run (see config.RUN_CONTROL_FIELDS)."""
    diffs = saved_config_diffs(config, path)
    if diffs:
        raise CheckpointError(
            f"{os.path.dirname(path)} holds a run with a different config ({'; '.join(diffs)}). "
            f"Resuming would mix two runs: use a new --workdir, or delete {os.path.dirname(path)}.")
