"""The train and eval steps, compiled for a parallel mode, and `evaluate` over a split.

`train_step` and `eval_step` are the per-device bodies (the whole sharded batch
under ``'jit'``); the parallel mode (parallel.py) supplies their collectives.
`make_steps` compiles them into a `Steps`, which also places states and batches
the way its mode expects.

Non-finite steps: when the loss or any gradient is NaN/Inf, the step leaves the
parameters, the BatchNorm running statistics and the optimizer state unchanged
and increments ``TrainState.nonfinite_steps``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxbn.training import batches
from jaxbn.training.config import VARIANT_FIELDS, variant_field
from jaxbn.training.parallel import JIT, ParallelMode, get_mode, make_mesh
from jaxbn.training.state import (TrainState, create_learning_rate_schedule, create_model,
                                  create_optimizer, create_train_state)

__all__ = ["train_step", "eval_step", "Steps", "make_steps", "steps_for", "evaluate"]


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_step(state: TrainState, batch: Dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, parallel,
               local_stats: bool = False) -> Tuple[TrainState, Dict[str, jax.Array]]:
    """One optimizer step on the global batch under `parallel` (a mode or its name).

    Under ``'shard_map'`` and ``'pmap'`` this is the per-device body (the batch is
    the device's slice); under ``'jit'`` it sees the whole (sharded) batch.
    `local_stats`: the model's norm layers use each device's own statistics
    (``config.bn_sync=False``); their running statistics are then averaged over
    the devices, so that the state stays one replicated value.

    Returns:
      ``(new_state, metrics)`` with metrics ``loss`` (global mean cross-entropy),
      ``accuracy`` (global), ``finite`` (whether the step was applied) and
      ``nonfinite_steps`` (the running count), all replicated scalars.
    """
    mode = get_mode(parallel)
    labels = batch["label"]
    local = labels.shape[0]

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"],
            train=True, mutable=["batch_stats"])
        loss_sum = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        return mode.mean_loss(loss_sum, local), (updates["batch_stats"], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if local_stats:
        batch_stats = mode.device_mean(batch_stats)
    grads, loss = mode.reduce_grads(grads, loss)
    correct = mode.global_sum(jnp.sum(jnp.argmax(logits, -1) == labels))
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
    metrics = {"loss": loss, "accuracy": correct / mode.global_size(local), "finite": finite,
               "nonfinite_steps": new_state.nonfinite_steps}
    return new_state, metrics


def eval_step(state: TrainState, batch: Dict[str, jax.Array], *, model: nn.Module,
              parallel) -> Dict[str, jax.Array]:
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
    return get_mode(parallel).global_sum(sums)


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
    def mode(self) -> ParallelMode:
        return get_mode(self.parallel)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
        """This process's share of a global batch -> device arrays."""
        return self.mode.put_batch(batch, self.mesh)

    def to_device(self, state: TrainState) -> TrainState:
        """Replicated global state (as checkpointed) -> the layout `train` takes."""
        return self.mode.to_device(state, self.mesh)

    def from_device(self, state: TrainState) -> TrainState:
        """The layout `train` returns -> replicated global state (for checkpoints)."""
        return self.mode.from_device(state, self.mesh)

    def fetch(self, tree):
        """Replicated device values -> NumPy on the host (any mode, any process)."""
        return self.mode.fetch(tree)


def _counted(traces: Dict[str, int], name: str, fn: Callable) -> Callable:
    def wrapper(*args):
        traces[name] += 1  # runs at trace time only
        return fn(*args)
    return wrapper


def make_steps(config, model: nn.Module, tx: optax.GradientTransformation,
               image_shape: Tuple[int, ...], mesh: Optional[jax.sharding.Mesh] = None) -> Steps:
    """Compiles (lazily) the init, train and eval steps for `config.parallel`."""
    mesh = make_mesh() if mesh is None else mesh
    mode = get_mode(config.parallel)
    traces = {"train": 0, "eval": 0}
    local_stats = not variant_field(config, "bn_sync")
    tstep = _counted(traces, "train", functools.partial(train_step, model=model, tx=tx, parallel=mode,
                                                        local_stats=local_stats))
    estep = _counted(traces, "eval", functools.partial(eval_step, model=model, parallel=mode))
    init = jax.jit(functools.partial(create_train_state, model=model, tx=tx, image_shape=image_shape),
                   out_shardings=NamedSharding(mesh, P()))
    return Steps(config.parallel, mesh, init, mode.wrap(tstep, mesh, donate_state=True),
                 mode.wrap(estep, mesh), traces)


# Config fields that determine the compiled steps (through the model and optimizer).
_STEP_FIELDS = ("model", "norm", "bn_momentum", "bn_epsilon", "parallel", "optimizer",
                "learning_rate", "lr_schedule", "warmup_epochs", "momentum", "nesterov",
                "weight_decay") + tuple(VARIANT_FIELDS)

# Initialization runs no collective, so every mode shares the one compiled for this mode.
_INIT_MODE = JIT.name


@functools.lru_cache(maxsize=8)
def _cached_steps(fields: tuple, num_classes: int, image_shape: tuple, steps_per_epoch: int,
                  total_steps: int, device_ids: tuple) -> Tuple[Steps, optax.Schedule]:
    config = ml_collections.ConfigDict(dict(fields))
    model = create_model(config, num_classes)
    tx = create_optimizer(config, steps_per_epoch, total_steps)
    devices = {d.id: d for d in jax.devices()}
    mesh = make_mesh([devices[i] for i in device_ids])
    steps = make_steps(config, model, tx, image_shape, mesh)
    init_fields = tuple((k, _INIT_MODE if k == "parallel" else v) for k, v in fields)
    if init_fields != fields:
        init_steps, _ = _cached_steps(init_fields, num_classes, image_shape, steps_per_epoch,
                                      total_steps, device_ids)
        steps = dataclasses.replace(steps, init=init_steps.init)
    return steps, create_learning_rate_schedule(config, steps_per_epoch, total_steps)


def steps_for(config, num_classes: int, image_shape, steps_per_epoch: int,
              total_steps: int) -> Tuple[Steps, optax.Schedule]:
    """`make_steps` for `config` and its learning-rate schedule, shared by runs in one
    process that compile the same steps (tests, notebooks); jit's cache alone would
    not see that two runs' models are equal."""
    fields = tuple((f, variant_field(config, f) if f in VARIANT_FIELDS else config[f]) for f in _STEP_FIELDS)
    return _cached_steps(fields, num_classes, tuple(image_shape), steps_per_epoch, total_steps,
                         tuple(d.id for d in jax.devices()))


def evaluate(steps: Steps, state: TrainState, split, *, global_batch_size: int) -> Dict[str, float]:
    """Loss and accuracy of `state` (running statistics) on every example of `split`.

    Raises:
      RuntimeError: the masked count differs from the split size (a bug).
    """
    pidx, pcount = jax.process_index(), jax.process_count()
    sums = [steps.eval(state, steps.put_batch(b)) for b in batches.eval_batches(
        split, global_batch_size=global_batch_size, process_index=pidx, process_count=pcount)]
    sums = steps.fetch(sums)
    loss = sum(float(s["loss"]) for s in sums)
    correct = sum(int(s["correct"]) for s in sums)
    count = sum(int(s["count"]) for s in sums)
    n = len(split["label"])
    if count != n:
        raise RuntimeError(f"evaluation covered {count} examples, expected the {n} of the test split")
    return {"test_loss": loss / max(n, 1), "test_accuracy": correct / max(n, 1), "test_examples": n}
