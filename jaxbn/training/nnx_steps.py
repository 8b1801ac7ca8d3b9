"""The NNX path's train and eval steps (``config.api='nnx'``), compiled with ``nnx.jit``.

Data parallel the NNX way: a ``('batch',)`` mesh over every device (of every
process), the trainer's state replicated (``NamedSharding(mesh, P())``) and each
batch sharded over ``'batch'``; ``nnx.jit`` compiles the step on the whole
sharded batch and XLA inserts the collectives. BatchNorm has ``axis_name=None``:
under a sharded jit its statistics are those of the global batch. The math is
the Linen path's (steps.py) in its ``'jit'`` mode, and so are the data order,
the metrics and the non-finite-step guard: a step whose loss or any gradient is
NaN/Inf leaves the parameters, running statistics and optimizer state unchanged
and increments ``nonfinite_steps``.

`NNXSteps` offers what the training loop uses of `steps.Steps`: ``init``,
``train``, ``eval``, ``put_batch``, ``to_device`` / ``from_device`` (an
`NNXTrainState` pytree <-> the `NNXTrainer` the steps mutate), ``fetch``,
``replicated`` and ``traces``.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxbn.training.nnx_state import NNXTrainer, NNXTrainState, create_trainer, trainer_from_state, trainer_state
from jaxbn.training.parallel import JIT, make_mesh
from jaxbn.training.state import create_learning_rate_schedule, create_optimizer

__all__ = ["train_step", "eval_step", "NNXSteps", "make_nnx_steps", "nnx_steps_for"]


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_step(trainer: NNXTrainer, batch: Dict[str, jax.Array], *,
               replicated: NamedSharding) -> Dict[str, jax.Array]:
    """One optimizer step on the global (sharded) batch; updates `trainer` in place.

    Returns metrics ``loss`` (mean cross-entropy), ``accuracy``, ``finite``
    (whether the step was applied) and ``nonfinite_steps`` (the running count).
    """
    labels = batch["label"]
    before = nnx.to_pure_dict(nnx.state(trainer))  # the values to keep on a non-finite step

    def loss_fn(model):
        logits = model(batch["image"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(trainer.model)
    trainer.optimizer.update(trainer.model, grads)

    finite = jnp.isfinite(loss) & _all_finite(grads)
    after = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                         nnx.to_pure_dict(nnx.state(trainer)), before)
    after["step"] = before["step"] + 1
    after["nonfinite_steps"] = before["nonfinite_steps"] + jnp.logical_not(finite).astype(jnp.int32)
    after = jax.lax.with_sharding_constraint(after, replicated)  # the state stays replicated
    state = nnx.state(trainer)
    nnx.replace_by_pure_dict(state, after)
    nnx.update(trainer, state)
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels), "finite": finite,
            "nonfinite_steps": after["nonfinite_steps"]}


def eval_step(model: nnx.Module, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """Sums of loss, correct predictions and examples over the unmasked rows (`model` in
    eval mode: running statistics; padding rows, ``batch['mask']`` False, weigh zero)."""
    logits = model(batch["image"])
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {
        "loss": jnp.sum(jnp.where(mask, loss, 0.0)),
        "correct": jnp.sum(mask & (jnp.argmax(logits, -1) == batch["label"])),
        "count": jnp.sum(mask.astype(jnp.int32)),
    }


class NNXSteps:
    """Compiled NNX steps over `mesh`, with the placement they expect (see the module doc).

    `train` donates the trainer's arrays and returns the same (updated) trainer;
    `traces` counts how often each step was traced (1 each after a run).
    """

    parallel = "nnx.jit"

    def __init__(self, mesh: jax.sharding.Mesh, graphdef, abstract: nnx.State, init: Callable,
                 train: Callable, eval_fn: Callable, traces: Dict[str, int]):
        self.mesh, self._graphdef, self._abstract = mesh, graphdef, abstract
        self.init = init  # rng -> NNXTrainState, replicated
        self._train, self._eval, self.traces = train, eval_fn, traces
        self._bound = (None, None)  # (trainer, the train step with its graph traversal cached)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def train(self, trainer: NNXTrainer, batch) -> Tuple[NNXTrainer, Dict[str, jax.Array]]:
        """One step; `trainer` is updated in place (its arrays donated) and returned."""
        if self._bound[0] is not trainer:  # nnx.cached_partial: no graph traversal per call
            self._bound = (trainer, nnx.cached_partial(self._train, trainer))
        return trainer, self._bound[1](batch)

    def eval(self, trainer: NNXTrainer, batch) -> Dict[str, jax.Array]:
        trainer.model.eval()
        try:
            return self._eval(trainer.model, batch)
        finally:
            trainer.model.train()

    def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
        """This process's share of a global batch -> arrays sharded over ``'batch'``."""
        return JIT.put_batch(batch, self.mesh)

    def to_device(self, state: NNXTrainState) -> NNXTrainer:
        """Checkpointed (replicated) state -> a new trainer holding its arrays."""
        return trainer_from_state(self._graphdef, self._abstract, state)

    def from_device(self, trainer: NNXTrainer) -> NNXTrainState:
        """The trainer's arrays, as checkpointed."""
        return trainer_state(trainer)

    def fetch(self, tree):
        """Replicated device values -> NumPy on the host (any process)."""
        return JIT.fetch(tree)


def _counted(traces: Dict[str, int], name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args):
        traces[name] += 1  # runs at trace time only
        return fn(*args)
    return wrapper


def make_nnx_steps(config, num_classes: int, image_shape: Tuple[int, ...], tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh = None) -> NNXSteps:
    """Builds (compiling lazily) the NNX init, train and eval steps over `mesh` (default: all devices)."""
    mesh = make_mesh() if mesh is None else mesh
    replicated = NamedSharding(mesh, P())
    create = functools.partial(create_trainer, config=config, num_classes=num_classes,
                               image_shape=tuple(image_shape), tx=tx)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create(jax.random.key(0))))
    init = jax.jit(lambda rng: trainer_state(create(rng)), out_shardings=replicated)
    traces = {"train": 0, "eval": 0}
    train = nnx.jit(_counted(traces, "train", functools.partial(train_step, replicated=replicated)),
                    donate_argnums=0)
    eval_fn = nnx.jit(_counted(traces, "eval", eval_step))
    return NNXSteps(mesh, graphdef, abstract, init, train, eval_fn, traces)


# Config fields that determine the compiled NNX steps (through the model and optimizer).
_STEP_FIELDS = ("model", "norm", "bn_momentum", "bn_epsilon", "optimizer", "learning_rate", "lr_schedule",
                "warmup_epochs", "momentum", "nesterov", "weight_decay")


@functools.lru_cache(maxsize=8)
def _cached(fields: tuple, num_classes: int, image_shape: tuple, steps_per_epoch: int, total_steps: int,
            device_ids: tuple) -> Tuple[NNXSteps, optax.Schedule]:
    config = ml_collections.ConfigDict(dict(fields))
    tx = create_optimizer(config, steps_per_epoch, total_steps)
    devices = {d.id: d for d in jax.devices()}
    mesh = make_mesh([devices[i] for i in device_ids])
    return (make_nnx_steps(config, num_classes, image_shape, tx, mesh),
            create_learning_rate_schedule(config, steps_per_epoch, total_steps))


def nnx_steps_for(config, num_classes: int, image_shape, steps_per_epoch: int,
                  total_steps: int) -> Tuple[NNXSteps, optax.Schedule]:
    """`make_nnx_steps` for `config` and its learning-rate schedule, shared by runs in one
    process that compile the same steps (as `steps.steps_for`)."""
    fields = tuple((f, config[f]) for f in _STEP_FIELDS)
    return _cached(fields, num_classes, tuple(image_shape), steps_per_epoch, total_steps,
                   tuple(d.id for d in jax.devices()))
