"""What the NNX path trains: the NNX model, `NNXTrainer` (model + `nnx.Optimizer` +
counters) and `NNXTrainState`, the pytree a checkpoint holds.

The NNX counterpart of state.py (``config.api='nnx'``). A step mutates an
`NNXTrainer` in place; checkpoints and the training loop's state in between are
`NNXTrainState`, plain arrays (``nnx.split``'s state as a pure dict), with the
`step` and `nonfinite_steps` fields the loop and checkpoints.py read. The
optimizer and learning-rate schedule are state.py's (`create_optimizer`).
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxbn import models_nnx
from jaxbn import nnx as bn_nnx

__all__ = ["Count", "NNXTrainer", "NNXTrainState", "create_nnx_model", "create_trainer", "trainer_state",
           "trainer_from_state"]


class Count(nnx.Variable):
    """A training counter: steps taken, or steps skipped as non-finite."""


class NNXTrainer(nnx.Module):
    """Everything a training step changes: the model, its `nnx.Optimizer` (over
    `nnx.Param` only: BatchNorm's running statistics are `nnx.BatchStat`) and the counters."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.step = Count(jnp.zeros((), jnp.int32))  # global batches consumed (skipped ones too)
        self.nonfinite_steps = Count(jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class NNXTrainState:
    """An `NNXTrainer`'s arrays (what a checkpoint holds; replicated global arrays)."""

    step: jax.Array  # () int32
    nonfinite_steps: jax.Array  # () int32
    model: Any  # the model's nnx.Param and nnx.BatchStat values, as a pure dict
    optimizer: Any  # the optimizer's state (its own step and optax state), as a pure dict


def create_nnx_model(config: ml_collections.ConfigDict, num_classes: int, image_shape: Tuple[int, ...],
                     rngs: nnx.Rngs) -> nnx.Module:
    """The NNX model `config.model` with `config.norm` BatchNorm layers (`jaxbn.nnx.BatchNorm`
    or `flax.nnx.BatchNorm`), ``axis_name=None``: the NNX path runs a sharded ``nnx.jit``,
    where the statistics of a batch sharded over devices are global."""
    cls = bn_nnx.BatchNorm if config.norm == "jaxbn" else nnx.BatchNorm
    norm = functools.partial(cls, momentum=config.bn_momentum, epsilon=config.bn_epsilon)
    h, w, c = image_shape
    return models_nnx.MODELS[config.model](num_classes, in_features=c, image_size=(h, w), norm=norm,
                                           rngs=rngs)


def create_trainer(rng: jax.Array, config, num_classes: int, image_shape, tx) -> NNXTrainer:
    """A fresh `NNXTrainer` (model initialized from `rng`), in training mode."""
    model = create_nnx_model(config, num_classes, tuple(image_shape), nnx.Rngs(rng))
    model.train()
    return NNXTrainer(model, tx)


def trainer_state(trainer: NNXTrainer) -> NNXTrainState:
    """`trainer`'s arrays (shared, not copied)."""
    pure = nnx.to_pure_dict(nnx.state(trainer))
    return NNXTrainState(step=pure["step"], nonfinite_steps=pure["nonfinite_steps"], model=pure["model"],
                         optimizer=pure["optimizer"])


def trainer_from_state(graphdef, abstract: nnx.State, state: NNXTrainState) -> NNXTrainer:
    """A new `NNXTrainer` of `graphdef` (from ``nnx.split``) holding `state`'s arrays;
    `abstract` is a state of the same structure (e.g. ``nnx.eval_shape``'s)."""
    full = jax.tree.map(lambda x: x, abstract)  # a new State to fill
    nnx.replace_by_pure_dict(full, {"step": state.step, "nonfinite_steps": state.nonfinite_steps,
                                    "model": state.model, "optimizer": state.optimizer})
    return nnx.merge(graphdef, full)
