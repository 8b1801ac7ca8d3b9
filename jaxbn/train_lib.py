"""Data-parallel training of `jaxbn.models` with synchronized BatchNorm.

`train_and_evaluate(config, workdir)` trains one of the models on an in-memory
dataset (`jaxbn.data`), on every device of every process, and evaluates it on
the whole test set after each epoch. The parts are small top-level functions
(`create_model`, `create_optimizer`, `create_train_state`, `train_step`,
`eval_step`, `make_steps`) that tests and notebooks can use on their own.

Parallel modes (``config.parallel``), over a 1-D mesh ``('batch',)`` of all
devices, all giving the same mathematics:

* ``'shard_map'`` (default): ``jit(shard_map(train_step))``. Each device holds
  its slice of the batch, BatchNorm synchronizes with ``axis_name='batch'``, the
  loss is ``psum(local sum) / global count`` and ``jax.value_and_grad`` runs
  inside the body: with shard_map's type checks (``check_vma=True``) autodiff
  returns the exact, replicated gradient of the global loss. This is JAX's
  recommended explicit-collectives API (``pmap`` is now built on it).
* ``'pmap'``: the legacy API. The gradient of each device's *local* mean loss is
  averaged with ``lax.pmean`` (the gradient of a psum'd loss would be N times
  too large under pmap); BatchNorm synchronizes with ``axis_name='batch'``.
* ``'jit'``: plain ``jit`` on a batch sharded with ``NamedSharding(mesh,
  P('batch'))``; BatchNorm gets ``axis_name=None`` because XLA already makes
  every reduction over the batch global.

Non-finite steps: when the loss or any gradient is NaN/Inf, the step leaves the
parameters, the BatchNorm running statistics and the optimizer state unchanged
and increments ``TrainState.nonfinite_steps``.

Work directory layout::

    workdir/config.json          the run's config (a resumed run must match it)
    workdir/metrics.jsonl        one JSON object per log/eval event, then "final"
    workdir/metrics.png          train/test loss and accuracy against steps
    workdir/checkpoints/<step>/  orbax: state (params, batch_stats, opt_state,
                                 step, nonfinite_steps) and meta (data position)

Running again in the same workdir resumes from the latest checkpoint and
continues exactly where the interrupted run would have been: the data order of
epoch ``e`` is a pure function of ``(seed, e)`` and the position in the epoch is
``step % steps_per_epoch``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxbn import data as data_lib
from jaxbn import linen as bn_linen
from jaxbn import models

__all__ = [
    "AXIS",
    "PARALLEL_MODES",
    "NORMS",
    "ConfigError",
    "CheckpointError",
    "TrainState",
    "check_config",
    "create_model",
    "create_learning_rate_schedule",
    "create_optimizer",
    "create_train_state",
    "train_step",
    "eval_step",
    "Steps",
    "make_steps",
    "make_mesh",
    "checkpoint_manager",
    "restore_checkpoint",
    "evaluate",
    "save_plot",
    "initialize_distributed",
    "train_and_evaluate",
]

AXIS = "batch"
PARALLEL_MODES = ("shard_map", "pmap", "jit")
NORMS = ("jaxbn", "flax")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")

# Config fields that may change when a run is resumed: they do not change the
# trajectory of the parameters.
RUN_CONTROL_FIELDS = frozenset({
    "stop_after_steps", "log_every_steps", "checkpoint_every_steps",
    "max_checkpoints_to_keep", "progress_bar", "eval_batch_size",
})


class ConfigError(ValueError):
    """A config field has an invalid value or does not fit the devices/data."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored or does not belong to this run."""


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes (a pytree; checkpointed as a whole)."""

    step: jax.Array  # () int32, steps taken = global batches consumed (skipped ones too).
    params: Any  # the model's 'params' collection.
    batch_stats: Any  # the model's 'batch_stats' collection (running mean/var).
    opt_state: Any  # optax state.
    nonfinite_steps: jax.Array  # () int32, steps skipped because loss/grads were not finite.


# ---------------------------------------------------------------------------
# Config, model, optimizer, state
# ---------------------------------------------------------------------------


def _choice(config, field, choices):
    value = config[field]
    if value not in choices:
        raise ConfigError(f"config.{field} must be one of {list(choices)}, got {value!r}")


def _positive(config, field, allow_zero=False, allow_minus_one=False):
    value = config[field]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value > 0 or (allow_zero and value == 0) or (allow_minus_one and value == -1))
    if not ok:
        what = "positive" + (" or 0" if allow_zero else "") + (" or -1" if allow_minus_one else "")
        raise ConfigError(f"config.{field} must be {what}, got {value!r}")


def check_config(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> None:
    """Validates `config` for `num_devices` devices over `process_count` processes.

    Raises:
      ConfigError: a field is missing or out of range, or the global batch does
        not split evenly over the devices. The message names the field, the
        expected and the actual value.
    """
    required = ("dataset", "model", "norm", "parallel", "optimizer", "lr_schedule",
                "learning_rate", "global_batch_size", "eval_batch_size", "num_epochs",
                "num_train_steps", "bn_momentum", "bn_epsilon", "seed",
                "log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep",
                "stop_after_steps", "debug_nan_step", "train_examples", "test_examples",
                "warmup_epochs", "momentum", "nesterov", "weight_decay", "progress_bar")
    missing = [f for f in required if f not in config]
    if missing:
        raise ConfigError(f"config is missing fields {missing}; start from configs/default.py")
    _choice(config, "model", tuple(models.MODELS))
    _choice(config, "norm", NORMS)
    _choice(config, "parallel", PARALLEL_MODES)
    _choice(config, "optimizer", OPTIMIZERS)
    _choice(config, "lr_schedule", SCHEDULES)
    for field in ("global_batch_size", "eval_batch_size", "learning_rate", "log_every_steps",
                  "checkpoint_every_steps", "max_checkpoints_to_keep"):
        _positive(config, field)
    _positive(config, "num_epochs", allow_zero=True)
    _positive(config, "num_train_steps", allow_minus_one=True)
    for field in ("train_examples", "test_examples"):
        _positive(config, field, allow_zero=True)
    if config.num_epochs == 0 and config.num_train_steps == -1:
        raise ConfigError("set config.num_epochs > 0 or config.num_train_steps > 0, got "
                          f"num_epochs={config.num_epochs} and num_train_steps={config.num_train_steps}")
    if not 0.0 <= config.bn_momentum <= 1.0:
        raise ConfigError(f"config.bn_momentum must be in [0, 1] (Flax convention: weight of the "
                          f"old running value), got {config.bn_momentum!r}")
    if not config.bn_epsilon >= 0:
        raise ConfigError(f"config.bn_epsilon must be >= 0, got {config.bn_epsilon!r}")
    if not config.warmup_epochs >= 0:
        raise ConfigError(f"config.warmup_epochs must be >= 0, got {config.warmup_epochs!r}")
    if not (isinstance(config.seed, int) and config.seed >= 0):
        raise ConfigError(f"config.seed must be a non-negative int, got {config.seed!r}")
    b = config.global_batch_size
    if b % num_devices:
        lo, hi = (b // num_devices) * num_devices, (b // num_devices + 1) * num_devices
        hint = f"{lo} or {hi}" if lo else f"{hi}"
        raise ConfigError(
            f"config.global_batch_size={b} must be divisible by the number of devices "
            f"({num_devices} over {process_count} process(es)) so that every device gets the same "
            f"number of examples; use e.g. {hint}")
    if b % process_count:
        raise ConfigError(f"config.global_batch_size={b} must be divisible by the number of "
                          f"processes ({process_count})")


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The model `config.model` with `config.norm` BatchNorm layers.

    `norm='jaxbn'` uses `jaxbn.linen.BatchNorm`, `'flax'` uses
    `flax.linen.BatchNorm`, both with ``axis_name='batch'`` under shard_map and
    pmap, and ``axis_name=None`` under sharded jit (where the statistics are
    global: jaxbn/partitioning.py merges them in one all-reduce).
    """
    axis_name = None if config.parallel == "jit" else AXIS
    cls = bn_linen.BatchNorm if config.norm == "jaxbn" else nn.BatchNorm
    norm = functools.partial(cls, axis_name=axis_name, momentum=config.bn_momentum,
                             epsilon=config.bn_epsilon)
    return models.MODELS[config.model](num_classes=num_classes, norm=norm)


def create_learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Constant or cosine-decayed `config.learning_rate`, after a linear warm-up."""
    lr = config.learning_rate
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=0.0)
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def _kernels_only(params):
    """Weight-decay mask: convolution and dense kernels, not biases or BN parameters."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
    """Adam, AdamW or SGD with momentum, with `create_learning_rate_schedule`."""
    lr = create_learning_rate_schedule(config, steps_per_epoch, total_steps)
    wd = config.weight_decay
    if config.optimizer == "adam":
        tx = optax.adam(lr)
    elif config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=wd, mask=_kernels_only)
    else:
        tx = optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov)
    if wd:
        tx = optax.chain(optax.add_decayed_weights(wd, mask=_kernels_only), tx)
    return tx


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: Tuple[int, ...]) -> TrainState:
    """Initial `TrainState` (call under ``jit`` to place it, see `make_steps`)."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_step(state: TrainState, batch: Dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, parallel: str) -> Tuple[TrainState, Dict[str, jax.Array]]:
    """One optimizer step on the global batch; see the module docstring for `parallel`.

    Under ``'shard_map'`` and ``'pmap'`` this is the per-device body (the batch is
    the device's slice); under ``'jit'`` it sees the whole (sharded) batch.

    Returns:
      ``(new_state, metrics)`` with metrics ``loss`` (global mean cross-entropy),
      ``accuracy`` (global), ``finite`` (whether the step was applied) and
      ``nonfinite_steps`` (the running count), all replicated scalars.
    """
    labels = batch["label"]
    local = labels.shape[0]
    if parallel == "shard_map":
        count = local * jax.lax.axis_size(AXIS)  # global batch size
    else:
        count = local  # jit: the global batch; pmap: the device's slice

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"],
            train=True, mutable=["batch_stats"])
        loss_sum = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        if parallel == "shard_map":
            loss_sum = jax.lax.psum(loss_sum, AXIS)
        return loss_sum / count, (updates["batch_stats"], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    if parallel == "pmap":
        # Gradient of the local mean loss, averaged: the global mean loss's gradient.
        grads, loss = jax.lax.pmean((grads, loss), AXIS)
    if parallel != "jit":
        correct = jax.lax.psum(correct, AXIS)
        total = local * jax.lax.axis_size(AXIS)
    else:
        total = local
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    finite = jnp.isfinite(loss) & _all_finite(grads)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_steps=state.nonfinite_steps + jnp.logical_not(finite).astype(jnp.int32),
    )
    metrics = {"loss": loss, "accuracy": correct / total, "finite": finite,
               "nonfinite_steps": new_state.nonfinite_steps}
    return new_state, metrics


def eval_step(state: TrainState, batch: Dict[str, jax.Array], *, model: nn.Module,
              parallel: str) -> Dict[str, jax.Array]:
    """Sums of loss, correct predictions and examples over the unmasked rows.

    Uses the running statistics. Padding rows (``batch['mask']`` False) weigh
    zero, so the sums over all evaluation batches cover the test set exactly.
    """
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=False)
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    sums = {
        "loss": jnp.sum(jnp.where(mask, loss, 0.0)),
        "correct": jnp.sum(mask & (jnp.argmax(logits, -1) == batch["label"])),
        "count": jnp.sum(mask.astype(jnp.int32)),
    }
    if parallel != "jit":
        sums = jax.lax.psum(sums, AXIS)
    return sums


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D ``('batch',)`` mesh over all devices (of all processes), Auto axis type."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


@dataclasses.dataclass
class Steps:
    """Compiled steps for one parallel mode, with the placement they expect.

    `train` donates its state argument. `traces` counts how often each step was
    traced: after a run both must be 1 (each step compiled once).
    """

    parallel: str
    mesh: jax.sharding.Mesh
    init: Callable[[jax.Array], TrainState]  # rng -> state placed for `train`/`eval`
    train: Callable  # (state, batch) -> (state, metrics)
    eval: Callable  # (state, batch) -> sums
    traces: Dict[str, int]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def _local_mesh(self):
        return jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))

    def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
        """This process's share of a global batch -> device arrays."""
        if self.parallel == "pmap":
            n = jax.local_device_count()
            sharding = NamedSharding(self._local_mesh(), P(AXIS))
            return {k: jax.device_put(v.reshape((n, -1) + v.shape[1:]), sharding)
                    for k, v in batch.items()}
        sharding = NamedSharding(self.mesh, P(AXIS))
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    def to_device(self, state: TrainState) -> TrainState:
        """Replicated global state (as checkpointed) -> the layout `train` takes."""
        if self.parallel != "pmap":
            return state
        n = jax.local_device_count()
        sharding = NamedSharding(self._local_mesh(), P(AXIS))
        return jax.tree.map(lambda x: jax.device_put(np.stack([_local_value(x)] * n), sharding), state)

    def from_device(self, state: TrainState) -> TrainState:
        """The layout `train` returns -> replicated global state (for checkpoints)."""
        if self.parallel != "pmap":
            return state
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.replicated, _local_value(x)[0]), state)

    def fetch(self, tree):
        """Replicated device values -> NumPy on the host (any mode, any process)."""
        if self.parallel == "pmap":
            return jax.tree.map(lambda x: _local_value(x)[0], tree)
        return jax.tree.map(_local_value, tree)


def _local_value(x) -> np.ndarray:
    """This process's first shard of `x` as NumPy: the whole value of a replicated
    array, or the first device's row ``(1, ...)`` of a pmap-stacked one."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


def make_steps(config, model: nn.Module, tx: optax.GradientTransformation,
               image_shape: Tuple[int, ...], mesh: Optional[jax.sharding.Mesh] = None) -> Steps:
    """Compiles (lazily) the init, train and eval steps for `config.parallel`."""
    mesh = make_mesh() if mesh is None else mesh
    parallel = config.parallel
    traces = {"train": 0, "eval": 0}

    def counted(name, fn):
        def wrapper(*args):
            traces[name] += 1  # runs at trace time only
            return fn(*args)
        return wrapper

    tstep = counted("train", functools.partial(train_step, model=model, tx=tx, parallel=parallel))
    estep = counted("eval", functools.partial(eval_step, model=model, parallel=parallel))
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    init = jax.jit(functools.partial(create_train_state, model=model, tx=tx, image_shape=image_shape),
                   out_shardings=repl)
    if parallel == "shard_map":
        train = jax.jit(jax.shard_map(tstep, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P())),
                        donate_argnums=0)
        evaluate_ = jax.jit(jax.shard_map(estep, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P()))
    elif parallel == "jit":
        train = jax.jit(tstep, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=0)
        evaluate_ = jax.jit(estep, in_shardings=(repl, data), out_shardings=repl)
    else:
        train = jax.pmap(tstep, axis_name=AXIS, donate_argnums=0)
        evaluate_ = jax.pmap(estep, axis_name=AXIS)
    return Steps(parallel, mesh, init, train, evaluate_, traces)


# Config fields that determine the compiled steps (through the model and optimizer).
_STEP_FIELDS = ("model", "norm", "bn_momentum", "bn_epsilon", "parallel", "optimizer",
                "learning_rate", "lr_schedule", "warmup_epochs", "momentum", "nesterov", "weight_decay")


@functools.lru_cache(maxsize=8)
def _cached_steps(fields: tuple, num_classes: int, image_shape: tuple, steps_per_epoch: int,
                  total_steps: int, device_ids: tuple) -> Tuple[Steps, optax.Schedule]:
    config = ml_collections.ConfigDict(dict(fields))
    model = create_model(config, num_classes)
    tx = create_optimizer(config, steps_per_epoch, total_steps)
    devices = {d.id: d for d in jax.devices()}
    mesh = make_mesh([devices[i] for i in device_ids])
    steps = make_steps(config, model, tx, image_shape, mesh)
    if config.parallel != "jit":
        # Initialization runs no collective, so every mode can share one compiled init.
        init_fields = tuple((k, "jit" if k == "parallel" else v) for k, v in fields)
        init_steps, _ = _cached_steps(init_fields, num_classes, image_shape, steps_per_epoch,
                                      total_steps, device_ids)
        steps = dataclasses.replace(steps, init=init_steps.init)
    return steps, create_learning_rate_schedule(config, steps_per_epoch, total_steps)


def _steps_for(config, num_classes, image_shape, steps_per_epoch, total_steps):
    """`make_steps` for `config`, shared by runs in one process that compile the same steps
    (tests, notebooks); jit's cache alone would not see that two runs' models are equal."""
    fields = tuple((f, config[f]) for f in _STEP_FIELDS)
    return _cached_steps(fields, num_classes, tuple(image_shape), steps_per_epoch, total_steps,
                         tuple(d.id for d in jax.devices()))


# ---------------------------------------------------------------------------
# Evaluation, metrics, plot
# ---------------------------------------------------------------------------


def evaluate(steps: Steps, state: TrainState, split, *, global_batch_size: int) -> Dict[str, float]:
    """Loss and accuracy of `state` (running statistics) on every example of `split`.

    Raises:
      RuntimeError: the masked count differs from the split size (a bug).
    """
    pidx, pcount = jax.process_index(), jax.process_count()
    sums = [steps.eval(state, steps.put_batch(b)) for b in data_lib.eval_batches(
        split, global_batch_size=global_batch_size, process_index=pidx, process_count=pcount)]
    sums = steps.fetch(sums)
    loss = sum(float(s["loss"]) for s in sums)
    correct = sum(int(s["correct"]) for s in sums)
    count = sum(int(s["count"]) for s in sums)
    n = len(split["label"])
    if count != n:
        raise RuntimeError(f"evaluation covered {count} examples, expected the {n} of the test split")
    return {"test_loss": loss / max(n, 1), "test_accuracy": correct / max(n, 1), "test_examples": n}


def _read_jsonl(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_plot(metrics_path: str, out_path: str) -> None:
    """Plots train/test loss and accuracy from a metrics.jsonl against steps (PNG, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in _read_jsonl(metrics_path) if not r.get("final")]
    train = [r for r in rows if "train_loss" in r and r["train_loss"] is not None]
    test = [r for r in rows if "test_loss" in r]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate((("loss", "cross-entropy loss"), ("accuracy", "accuracy"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot([r["step"] for r in train], [r[f"train_{key}"] for r in train], label="train (running)")
        ax.plot([r["step"] for r in test], [r[f"test_{key}"] for r in test], "o-", label="test")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)


class _MetricsWriter:
    """Appends JSON lines to workdir/metrics.jsonl on the primary process only."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drops records a resumed run will write again (after `step`, and 'final')."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [r for r in _read_jsonl(self.path) if r["step"] <= step and not r.get("final")]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def checkpoint_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """An orbax manager for ``workdir/checkpoints``.

    Saves are synchronous (the state is donated to the next step right after)
    and atomic: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it to
    ``<step>`` when complete, so a crash during a save leaves the previous
    checkpoint as the latest; leftover temporary directories are ignored and
    removed when the manager is created.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def _abstract(state_shapes, sharding):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), state_shapes)


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
    if meta is None or int(meta.get("step", -1)) != step or int(np.asarray(_local_value(state.step))) != step:
        raise CheckpointError(f"checkpoint {path} is inconsistent: directory step {step}, metadata "
                              f"{meta}; delete {path} to resume from the previous checkpoint")
    return state, meta


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _check_resume_config(config, path: str) -> None:
    """Raises CheckpointError when workdir/config.json differs in a field that matters."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    now = _config_dict(config)
    diffs = [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if k not in RUN_CONTROL_FIELDS and saved.get(k) != now.get(k)]
    if diffs:
        raise CheckpointError(
            f"{os.path.dirname(path)} holds a run with a different config ({'; '.join(diffs)}). "
            f"Resuming would mix two runs: use a new --workdir, or delete {os.path.dirname(path)}.")


# ---------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------


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
    done = threading.Event()
    who = (f"process {process_id if process_id is not None else '?'} of "
           f"{num_processes if num_processes is not None else '?'}")
    where = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "(auto-detected)")

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
    logging.info("Joining %s via coordinator %s (timeout %d s)", who, where, timeout_s)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s + 60)
    done.set()
    logging.info("Distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


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
      ConfigError, data.DataError, CheckpointError: with a message naming the
      field, file or directory, and what to do.
    """
    t_start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    pidx, pcount = jax.process_index(), jax.process_count()
    primary = pidx == 0
    check_config(config, jax.device_count(), pcount)

    ds = data_lib.load_dataset(config.dataset)
    train_split = _subset(ds.train, config.train_examples, "train_examples")
    test_split = _subset(ds.test, config.test_examples, "test_examples")
    gbs = config.global_batch_size
    spe = data_lib.steps_per_epoch(len(train_split["label"]), gbs)
    total = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * spe
    eval_bs = _eval_batch_size(config, jax.device_count())

    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint_manager(workdir, config.max_checkpoints_to_keep)
    metrics = _MetricsWriter(os.path.join(workdir, "metrics.jsonl"), primary)
    if manager.latest_step() is not None:  # before compiling anything
        _check_resume_config(config, os.path.join(workdir, "config.json"))
    steps, schedule = _steps_for(config, ds.num_classes, ds.image_shape, spe, total)
    state, start = _restore_or_init(config, workdir, manager, steps, metrics, spe)
    logging.info("%s (%s BN, %s) on %d device(s) x %d process(es); %d steps of %d images, "
                 "%d steps/epoch", config.model, config.norm, config.parallel, jax.device_count(),
                 pcount, total, gbs, spe)

    state = steps.to_device(state)
    show_bar = primary and config.progress_bar
    bar = _progress_bar(total, start, show_bar)
    window, window_steps, window_t0 = [], 0, None
    train_time, timed_images = 0.0, 0
    last_eval: Optional[Dict[str, float]] = None
    stopped = False
    step = start

    def log_train():
        nonlocal window, window_steps, window_t0, train_time, timed_images
        fetched = steps.fetch(window)
        now = time.perf_counter()
        ips = None
        if window_t0 is not None and window_steps:
            train_time += now - window_t0
            timed_images += window_steps * gbs
            ips = window_steps * gbs / (now - window_t0)
            window_t0 = now
        ok = [m for m in fetched if bool(m["finite"])]
        rec = {
            "step": step, "epoch": round(step / spe, 4),
            "train_loss": float(np.mean([m["loss"] for m in ok])) if ok else None,
            "train_accuracy": float(np.mean([m["accuracy"] for m in ok])) if ok else None,
            "images_per_sec": ips, "learning_rate": float(schedule(step - 1)),
            "nonfinite_steps": int(fetched[-1]["nonfinite_steps"]),
        }
        metrics.write(rec)
        if show_bar:
            bar.set_postfix(loss=_fmt(rec["train_loss"]), acc=_fmt(rec["train_accuracy"]),
                            img_s=f"{ips:.0f}" if ips else "-", refresh=False)
        else:
            logging.info("[process %d/%d] step %d: train_loss=%r train_accuracy=%r images/s=%s",
                         pidx, pcount, step, rec["train_loss"], rec["train_accuracy"],
                         f"{ips:.0f}" if ips else "-")
        window, window_steps = [], 0

    with bar:
        while step < total and not stopped:
            epoch, in_epoch = divmod(step, spe)
            batches = data_lib.train_batches(train_split, global_batch_size=gbs, seed=config.seed,
                                             epoch=epoch, process_index=pidx, process_count=pcount,
                                             start_step=in_epoch)
            for batch in batches:
                if step == config.debug_nan_step:
                    batch["image"] = np.full_like(batch["image"], np.nan)
                batch = steps.put_batch(batch)
                with jax.transfer_guard("disallow"):  # no implicit host<->device copies in the step
                    state, m = steps.train(state, batch)
                step += 1
                window.append(m)
                if window_t0 is None:  # exclude the first step (compilation) from the timings
                    jax.block_until_ready(m)
                    window_t0 = time.perf_counter()
                else:
                    window_steps += 1
                bar.update(1)
                eval_due = step % spe == 0 or step == total
                save_due = step % config.checkpoint_every_steps == 0 or step == total
                if step % config.log_every_steps == 0 or eval_due or save_due:
                    log_train()
                paused = False
                if eval_due:
                    last_eval = evaluate(steps, state, test_split, global_batch_size=eval_bs)
                    metrics.write({"step": step, "epoch": round(step / spe, 4), **last_eval})
                    msg = (f"epoch {step / spe:.2f} step {step}: test_loss={last_eval['test_loss']:.4f} "
                           f"test_accuracy={100 * last_eval['test_accuracy']:.2f}%")
                    if show_bar:
                        bar.write(msg)
                    else:
                        logging.info("[process %d/%d] %s", pidx, pcount, msg)
                    paused = True
                if save_due:
                    _save(manager, step, steps.from_device(state), spe, gbs, config)
                    paused = True
                if paused:
                    window_t0 = time.perf_counter()
                if step == config.stop_after_steps:
                    logging.warning("Stopping at step %d (config.stop_after_steps), as if interrupted", step)
                    stopped = True
                if stopped or step >= total:
                    break

    state = steps.from_device(state)
    nonfinite = int(_local_value(state.nonfinite_steps))
    summary: Dict[str, Any] = {
        "step": step, "stopped": stopped, "nonfinite_steps": nonfinite, "model": config.model,
        "norm": config.norm, "parallel": config.parallel, "devices": jax.device_count(),
        "processes": pcount,
        "traces": dict(steps.traces), "wall_time_s": time.perf_counter() - t_start,
        "train_time_s": train_time,
        "images_per_sec": timed_images / train_time if train_time else None,
    }
    if stopped:
        manager.close()
        return state, summary
    if last_eval is None:  # the run was already complete: evaluate the checkpoint
        last_eval = evaluate(steps, steps.to_device(state), test_split, global_batch_size=eval_bs)
    summary.update(last_eval)
    for name, count in steps.traces.items():
        if count > 1:
            logging.warning("the %s step was traced %d times (expected once): shapes or shardings "
                            "changed between calls", name, count)
    metrics.write({"step": step, "final": True, **{k: v for k, v in summary.items() if k != "stopped"}})
    if primary:
        save_plot(metrics.path, os.path.join(workdir, "metrics.png"))
    if nonfinite:
        logging.warning("%d step(s) had a non-finite loss or gradient and were skipped", nonfinite)
    logging.info("Final test accuracy %.2f%% on %d images at step %d", 100 * summary["test_accuracy"],
                 summary["test_examples"], step)
    manager.close()
    return state, summary


def _restore_or_init(config, workdir, manager, steps: Steps, metrics: _MetricsWriter, spe: int):
    """The latest checkpoint's state and step, or a fresh state at step 0."""
    rng = jax.random.key(config.seed)
    if manager.latest_step() is None:
        metrics.truncate_after(-1)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                json.dump(_config_dict(config), f, indent=2, sort_keys=True)
        return steps.init(rng), 0
    target = _abstract(jax.eval_shape(steps.init, rng), steps.replicated)
    state, meta = restore_checkpoint(manager, target)
    start, gbs = int(meta["step"]), config.global_batch_size
    if meta.get("steps_per_epoch") != spe or meta.get("global_batch_size") != gbs:
        raise CheckpointError(
            f"checkpoint {manager.directory}/{start} was written with steps_per_epoch="
            f"{meta.get('steps_per_epoch')} and global_batch_size={meta.get('global_batch_size')}, this "
            f"run has {spe} and {gbs}: use a new --workdir")
    logging.info("Resuming from %s at step %d (epoch %d, step %d in epoch)", manager.directory, start,
                 start // spe, start % spe)
    metrics.truncate_after(start)  # records after the checkpoint will be written again
    return state, start


def _save(manager, step, state, spe, gbs, config):
    meta = {"step": step, "epoch": step // spe, "step_in_epoch": step % spe, "steps_per_epoch": spe,
            "global_batch_size": gbs, "seed": config.seed}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def _fmt(x):
    return "-" if x is None else f"{x:.4f}"


def _progress_bar(total, initial, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0, smoothing=0.1)
