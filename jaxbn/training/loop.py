"""The training loop: `train_and_evaluate(config, workdir)` and its small helpers.

Trains `config.model` on an in-memory dataset (datasets.py, batches.py), on every device of
every process in the parallel mode `config.parallel` (parallel.py), and
evaluates it on the whole test set after each epoch.

Work directory layout::

    workdir/config.json          the run's config (a resumed run must match it)
    workdir/metrics.jsonl        one JSON object per log/eval event, then "final"
    workdir/metrics.png          train/test loss and accuracy against steps
    workdir/checkpoints/<step>/  orbax: state (params, batch_stats, opt_state,
                                 step, nonfinite_steps) and meta (data position)

Running again in the same workdir resumes from the latest checkpoint and
continues exactly where the interrupted run would have been: the data order of
epoch ``e`` is a pure function of ``(seed, e)`` and the position in the epoch is
``step % steps_per_epoch``. A workdir that holds the run finished (its final
record and last checkpoint) is only evaluated: nothing is trained or written
(it may be read-only), and the summary carries the finished run's figures
(``already_finished``, ``original``).

Faults of the workdir raise `workdir.WorkdirError` with one clear message: an
unwritable workdir before anything is compiled, a full disk naming the file, the
free space and the last complete checkpoint (the rerun resumes from it).

Two config fields exercise the loop's failure handling on purpose:
``stop_after_steps`` ends the run after that step as if it were interrupted
(checkpoints and metrics stay as a crash there would leave them; running again
resumes), and ``debug_nan_step`` replaces the images of that step index with
NaNs, so that the step is skipped as non-finite (see steps.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxbn.training import batches, datasets
from jaxbn.training.checkpoints import (CheckpointError, abstract_state, check_resume_config,
                                        checkpoint_manager, restore_checkpoint, save_checkpoint)
from jaxbn.training.config import ConfigError, check_config, save_config
from jaxbn.training.metrics import MetricsWriter, fmt, progress_bar, read_jsonl, save_plot
from jaxbn.training.parallel import local_value
from jaxbn.training.state import TrainState
from jaxbn.training.steps import Steps, evaluate, steps_for
from jaxbn.training.workdir import check_writable, disk_full_error, is_disk_full

__all__ = ["train_and_evaluate"]


@dataclasses.dataclass
class _Run:
    """What the loop's helpers share: one run's settings, data, steps and writers."""

    config: ml_collections.ConfigDict
    workdir: str
    train_split: Dict[str, np.ndarray]
    test_split: Dict[str, np.ndarray]
    steps_per_epoch: int
    total_steps: int
    eval_batch_size: int
    manager: ocp.CheckpointManager
    metrics: MetricsWriter
    steps: Steps
    schedule: Any  # optax.Schedule
    process_index: int
    process_count: int
    # The workdir's final metrics record when it holds this run finished (nothing to
    # train, nothing written); None otherwise.
    finished: Optional[Dict[str, Any]] = None

    @property
    def primary(self) -> bool:
        return self.process_index == 0

    @property
    def show_bar(self) -> bool:
        return self.primary and self.config.progress_bar

    def report(self, bar, msg: str) -> None:
        """`msg` above the progress bar, or in the log (tagged with the process) without one."""
        if self.show_bar:
            bar.write(msg)
        else:
            logging.info("[process %d/%d] %s", self.process_index, self.process_count, msg)


class _Throughput:
    """Training images per second, leaving out compilation (the first step), evaluation and saving."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.t0: Optional[float] = None  # start of the timed window; None before the first step ends
        self.steps = 0  # steps in the window
        self.seconds = 0.0  # timed, over all windows
        self.images = 0  # timed, over all windows

    def step_done(self, metrics) -> None:
        if self.t0 is None:  # the first step (compilation) starts the clock
            jax.block_until_ready(metrics)
            self.t0 = time.perf_counter()
        else:
            self.steps += 1

    def lap(self) -> Optional[float]:
        """Images/s of the window (None when nothing was timed); starts the next window."""
        now = time.perf_counter()
        ips = None
        if self.t0 is not None and self.steps:
            self.seconds += now - self.t0
            self.images += self.steps * self.images_per_step
            ips = self.steps * self.images_per_step / (now - self.t0)
            self.t0 = now
        self.steps = 0
        return ips

    def restart(self) -> None:
        """Starts the window anew after a pause (evaluation, saving)."""
        self.t0 = time.perf_counter()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Tuple[TrainState, Dict[str, Any]]:
    """Trains `config`'s model, resuming from `workdir`'s latest checkpoint if any.

    Args:
      config: see configs/default.py for the fields.
      workdir: where checkpoints, metrics.jsonl, metrics.png and config.json go.

    Returns:
      ``(state, summary)``: the final `TrainState` (replicated global arrays) and
      a dict with ``step``, ``test_accuracy``, ``test_loss``, ``nonfinite_steps``,
      ``wall_time_s``, ``images_per_sec``, ``traces`` and ``stopped`` (True when
      `config.stop_after_steps` ended the run early).

    Raises:
      ConfigError, datasets.DataError, CheckpointError: with a message naming the
      field, file or directory, and what to do.
    """
    t_start = time.perf_counter()
    run = _setup(config, os.path.abspath(workdir))
    try:
        state, start = _restore_or_init(run)
        if run.finished is None:
            logging.info("%s (%s BN, %s) on %d device(s) x %d process(es); %d steps of %d images, "
                         "%d steps/epoch", config.model, config.norm, run.steps.parallel, jax.device_count(),
                         run.process_count, run.total_steps, config.global_batch_size, run.steps_per_epoch)
        state, step, stopped, last_eval, throughput = _train(run, run.steps.to_device(state), start)
        state = run.steps.from_device(state)
        summary = _summary(run, state, step, stopped, throughput, t_start)
        if not stopped:
            _finish(run, state, summary, last_eval)
    except OSError as e:  # save_config, save_plot, ...: checkpoints and metrics say it themselves
        if not is_disk_full(e):
            raise
        path = e.filename or run.workdir
        raise disk_full_error(f"writing {path}", path, run.workdir, run.manager.latest_step()) from e
    finally:
        _close(run.manager)
    return state, summary


def _close(manager: ocp.CheckpointManager) -> None:
    """Closes `manager`; after a failed save this may fail too, which must not hide the cause."""
    try:
        manager.close()
    except Exception as e:  # pylint: disable=broad-except
        logging.warning("closing the checkpoint manager failed: %s: %s", type(e).__name__, str(e)[:200])


def _subset(split, n: int, field: str):
    total = len(split["label"])
    if n == 0:
        return split
    if n > total:
        raise ConfigError(f"config.{field}={n} exceeds the {total} examples of the split")
    return {k: v[:n] for k, v in split.items()}


def _eval_batch_size(config, num_devices: int) -> int:
    """config.eval_batch_size rounded up to a multiple of the device count (padding is masked)."""
    return -(-config.eval_batch_size // num_devices) * num_devices


def _setup(config, workdir: str) -> _Run:
    """Checks `config`, loads the data, opens the workdir and gets the compiled steps."""
    pidx, pcount = jax.process_index(), jax.process_count()
    check_config(config, jax.device_count(), pcount)
    ds = datasets.load_dataset(config.dataset)
    train_split = _subset(ds.train, config.train_examples, "train_examples")
    test_split = _subset(ds.test, config.test_examples, "test_examples")
    spe = batches.steps_per_epoch(len(train_split["label"]), config.global_batch_size)
    total = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * spe
    eval_bs = _eval_batch_size(config, jax.device_count())

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    finished = _finished_record(workdir, metrics_path, total)
    if finished is None:  # a finished run is only evaluated: nothing is written
        check_writable(workdir)  # before compiling or training anything
    manager = checkpoint_manager(workdir, config.max_checkpoints_to_keep, read_only=finished is not None)
    metrics = MetricsWriter(metrics_path, pidx == 0, manager.latest_step)
    if manager.latest_step() is not None:  # before compiling anything
        check_resume_config(config, os.path.join(workdir, "config.json"))
    if config.get("api", "linen") == "nnx":  # jaxbn/training/nnx_steps.py: nnx.jit on a sharded batch
        from jaxbn.training.nnx_steps import nnx_steps_for
        steps, schedule = nnx_steps_for(config, ds.num_classes, ds.image_shape, spe, total)
    else:
        steps, schedule = steps_for(config, ds.num_classes, ds.image_shape, spe, total)
    return _Run(config, workdir, train_split, test_split, spe, total, eval_bs, manager, metrics, steps,
                schedule, pidx, pcount, finished)


def _finished_record(workdir: str, metrics_path: str, total: int) -> Optional[Dict[str, Any]]:
    """The final record of metrics.jsonl when `workdir` holds a finished run of `total` steps
    (that record, and the checkpoint of step `total`); None otherwise."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints", str(total))):
        return None
    records = read_jsonl(metrics_path)
    if records and records[-1].get("final") and records[-1]["step"] == total:
        return records[-1]
    return None


def _restore_or_init(run: _Run) -> Tuple[TrainState, int]:
    """The latest checkpoint's state and step, or a fresh state at step 0."""
    config, manager, spe = run.config, run.manager, run.steps_per_epoch
    rng = jax.random.key(config.seed)
    if manager.latest_step() is None:
        run.metrics.truncate_after(-1)
        if run.primary:
            save_config(config, os.path.join(run.workdir, "config.json"))
        return run.steps.init(rng), 0
    target = abstract_state(jax.eval_shape(run.steps.init, rng), run.steps.replicated)
    state, meta = restore_checkpoint(manager, target)
    start, gbs = int(meta["step"]), config.global_batch_size
    if meta.get("steps_per_epoch") != spe or meta.get("global_batch_size") != gbs:
        raise CheckpointError(
            f"checkpoint {manager.directory}/{start} was written with steps_per_epoch="
            f"{meta.get('steps_per_epoch')} and global_batch_size={meta.get('global_batch_size')}, this "
            f"run has {spe} and {gbs}: use a new --workdir")
    if run.finished is not None:
        logging.info("%s holds this run, finished at step %d: nothing to train; evaluating its last "
                     "checkpoint", run.workdir, start)
        return state, start
    logging.info("Resuming from %s at step %d (epoch %d, step %d in epoch)", manager.directory, start,
                 start // spe, start % spe)
    run.metrics.truncate_after(start)  # records after the checkpoint will be written again
    return state, start


def _train(run: _Run, state: TrainState, start: int):
    """Steps from `start` to the end (or `config.stop_after_steps`), logging, evaluating and
    saving on the way; returns ``(state, step, stopped, last_eval, throughput)``."""
    config, spe, total = run.config, run.steps_per_epoch, run.total_steps
    throughput = _Throughput(config.global_batch_size)
    window: List[Dict[str, jax.Array]] = []  # step metrics since the last train record
    last_eval: Optional[Dict[str, float]] = None
    stopped, step = False, start
    with progress_bar(total, start, run.show_bar) as bar:
        while step < total and not stopped:
            epoch, in_epoch = divmod(step, spe)
            for batch in batches.train_batches(
                    run.train_split, global_batch_size=config.global_batch_size, seed=config.seed,
                    epoch=epoch, process_index=run.process_index, process_count=run.process_count,
                    start_step=in_epoch):
                state, m = _train_one(run, state, batch, step)
                step += 1
                window.append(m)
                throughput.step_done(m)
                bar.update(1)
                last_eval = _after_step(run, state, step, window, throughput, bar) or last_eval
                if step == config.stop_after_steps:
                    logging.warning("Stopping at step %d (config.stop_after_steps), as if interrupted", step)
                    stopped = True
                if stopped or step >= total:
                    break
    return state, step, stopped, last_eval, throughput


def _train_one(run: _Run, state: TrainState, batch, step: int):
    """One train step on the host batch of step index `step` (NaNs at `config.debug_nan_step`)."""
    if step == run.config.debug_nan_step:
        batch["image"] = np.full_like(batch["image"], np.nan)
    batch = run.steps.put_batch(batch)
    with jax.transfer_guard("disallow"):  # no implicit host<->device copies in the step
        return run.steps.train(state, batch)


def _after_step(run: _Run, state: TrainState, step: int, window: list, throughput: _Throughput,
                bar) -> Optional[Dict[str, float]]:
    """Logs, evaluates (after each epoch) and saves as due after `step` steps; returns the
    evaluation if one ran."""
    config = run.config
    eval_due = step % run.steps_per_epoch == 0 or step == run.total_steps
    save_due = step % config.checkpoint_every_steps == 0 or step == run.total_steps
    if step % config.log_every_steps == 0 or eval_due or save_due:
        _log_train(run, step, window, throughput, bar)
        window.clear()
    result = _evaluate_and_log(run, state, step, bar) if eval_due else None
    if save_due:
        save_checkpoint(run.manager, step, run.steps.from_device(state),
                        steps_per_epoch=run.steps_per_epoch, global_batch_size=config.global_batch_size,
                        seed=config.seed)
    if eval_due or save_due:
        throughput.restart()
    return result


def _log_train(run: _Run, step: int, window: list, throughput: _Throughput, bar) -> None:
    """Writes the train record of the steps in `window` (the finite ones' mean loss and accuracy)."""
    fetched = run.steps.fetch(window)
    ips = throughput.lap()
    ok = [m for m in fetched if bool(m["finite"])]
    rec = {
        "step": step, "epoch": round(step / run.steps_per_epoch, 4),
        "train_loss": float(np.mean([m["loss"] for m in ok])) if ok else None,
        "train_accuracy": float(np.mean([m["accuracy"] for m in ok])) if ok else None,
        "images_per_sec": ips, "learning_rate": float(run.schedule(step - 1)),
        "nonfinite_steps": int(fetched[-1]["nonfinite_steps"]),
    }
    run.metrics.write(rec)
    if run.show_bar:
        bar.set_postfix(loss=fmt(rec["train_loss"]), acc=fmt(rec["train_accuracy"]),
                        img_s=f"{ips:.0f}" if ips else "-", refresh=False)
    else:
        logging.info("[process %d/%d] step %d: train_loss=%r train_accuracy=%r images/s=%s",
                     run.process_index, run.process_count, step, rec["train_loss"],
                     rec["train_accuracy"], f"{ips:.0f}" if ips else "-")


def _evaluate_and_log(run: _Run, state: TrainState, step: int, bar) -> Dict[str, float]:
    result = evaluate(run.steps, state, run.test_split, global_batch_size=run.eval_batch_size)
    run.metrics.write({"step": step, "epoch": round(step / run.steps_per_epoch, 4), **result})
    run.report(bar, f"epoch {step / run.steps_per_epoch:.2f} step {step}: test_loss="
                    f"{result['test_loss']:.4f} test_accuracy={100 * result['test_accuracy']:.2f}%")
    return result


def _summary(run: _Run, state: TrainState, step: int, stopped: bool, throughput: _Throughput,
             t_start: float) -> Dict[str, Any]:
    config = run.config
    return {
        "step": step, "stopped": stopped, "nonfinite_steps": int(local_value(state.nonfinite_steps)),
        "model": config.model, "norm": config.norm, "parallel": run.steps.parallel,
        "api": config.get("api", "linen"),
        "devices": jax.device_count(), "processes": run.process_count,
        "traces": dict(run.steps.traces), "wall_time_s": time.perf_counter() - t_start,
        "train_time_s": throughput.seconds,
        "images_per_sec": throughput.images / throughput.seconds if throughput.seconds else None,
    }


def _finish(run: _Run, state: TrainState, summary: Dict[str, Any],
            last_eval: Optional[Dict[str, float]]) -> None:
    """Completes `summary` with the final evaluation; writes the final record and the plot."""
    if last_eval is None:  # the run was already complete: evaluate the checkpoint
        last_eval = evaluate(run.steps, run.steps.to_device(state), run.test_split,
                             global_batch_size=run.eval_batch_size)
    summary.update(last_eval)
    if run.finished is not None:  # report the run that trained, not this one (which wrote nothing)
        summary["already_finished"] = True
        summary["original"] = {k: run.finished.get(k) for k in (
            "wall_time_s", "train_time_s", "images_per_sec", "test_accuracy", "test_examples",
            "nonfinite_steps")}
        logging.info("Test accuracy %.2f%% on %d images at step %d (the finished run reported %s)",
                     100 * summary["test_accuracy"], summary["test_examples"], summary["step"],
                     "-" if run.finished.get("test_accuracy") is None
                     else f"{100 * run.finished['test_accuracy']:.2f}%")
        return
    for name, count in run.steps.traces.items():
        if count > 1:
            logging.warning("the %s step was traced %d times (expected once): shapes or shardings "
                            "changed between calls", name, count)
    run.metrics.write({"step": summary["step"], "final": True,
                       **{k: v for k, v in summary.items() if k != "stopped"}})
    if run.primary:
        save_plot(run.metrics.path, os.path.join(run.workdir, "metrics.png"))
    if summary["nonfinite_steps"]:
        logging.warning("%d step(s) had a non-finite loss or gradient and were skipped",
                        summary["nonfinite_steps"])
    logging.info("Final test accuracy %.2f%% on %d images at step %d", 100 * summary["test_accuracy"],
                 summary["test_examples"], summary["step"])
