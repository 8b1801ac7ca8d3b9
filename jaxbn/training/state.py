"""What is trained: the model, the learning-rate schedule, the optimizer, `TrainState`.

`create_model` builds `config.model` with `config.norm` BatchNorm layers whose
``axis_name`` the parallel mode gives; `create_optimizer` is Adam, AdamW or SGD
with `create_learning_rate_schedule`; `create_train_state` initializes a
`TrainState`, the pytree a step changes and a checkpoint holds.
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxbn import linen as bn_linen
from jaxbn import models
from jaxbn.batch_renorm import renorm_limits
from jaxbn.training.config import variant_field
from jaxbn.training.parallel import get_mode

__all__ = ["TrainState", "create_model", "create_learning_rate_schedule", "create_optimizer",
           "create_train_state"]


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes (a pytree; checkpointed as a whole)."""

    step: jax.Array  # () int32, steps taken = global batches consumed (skipped ones too).
    params: Any  # the model's 'params' collection.
    batch_stats: Any  # the model's 'batch_stats' collection (running mean/var).
    opt_state: Any  # optax state.
    nonfinite_steps: jax.Array  # () int32, steps skipped because loss/grads were not finite.


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The model `config.model` with `config.norm` BatchNorm layers.

    `norm='jaxbn'` uses `jaxbn.linen.BatchNorm`, `'flax'` uses
    `flax.linen.BatchNorm`, both with ``axis_name='batch'`` under shard_map and
    pmap, and ``axis_name=None`` under sharded jit (where the statistics are
    global: jaxbn/backends/spmd.py merges them in one all-reduce). The variants
    (`config.norm` 'batch_renorm', 'group_norm', 'none'; `config.bn_sync`,
    `config.cnn_norm_before_relu`, `config.resnet_width`, `config.resnet_blocks`)
    are described in configs/default.py; see `create_norm`.
    """
    kwargs = {}
    if config.model == "cnn" and variant_field(config, "cnn_norm_before_relu"):
        kwargs["norm_before_relu"] = True
    if config.model == "resnet20":
        kwargs["width"] = variant_field(config, "resnet_width")
        kwargs["stage_sizes"] = (variant_field(config, "resnet_blocks"),) * 3
    return models.MODELS[config.model](num_classes=num_classes, norm=create_norm(config), **kwargs)


def create_norm(config: ml_collections.ConfigDict):
    """The normalization factory for `config.norm`, called by the models as
    ``norm(use_running_average=..., name=..., [scale_init=...])``.

    'jaxbn', 'flax' and 'batch_renorm' (`jaxbn.linen.BatchRenorm`, limits from
    `config.renorm_warmup_steps`) take the parallel mode's ``axis_name``, or None
    (each device's own statistics) when `config.bn_sync` is False. 'group_norm' is
    `flax.linen.GroupNorm` with `config.group_norm_groups` groups (no running
    statistics: training and evaluation compute the same); 'none' is the identity.
    """
    axis_name = get_mode(config.parallel).bn_axis_name if variant_field(config, "bn_sync") else None
    common = dict(axis_name=axis_name, momentum=config.bn_momentum, epsilon=config.bn_epsilon)
    if config.norm == "jaxbn":
        return functools.partial(bn_linen.BatchNorm, **common)
    if config.norm == "flax":
        return functools.partial(nn.BatchNorm, **common)
    if config.norm == "batch_renorm":
        warmup = variant_field(config, "renorm_warmup_steps")
        limits = {} if warmup == 0 else {"schedule": functools.partial(
            renorm_limits, warmup_steps=warmup, r_max_steps=8 * warmup, d_max_steps=5 * warmup)}
        return functools.partial(bn_linen.BatchRenorm, **common, **limits)
    if config.norm == "group_norm":
        return functools.partial(_group_norm, num_groups=variant_field(config, "group_norm_groups"),
                                 epsilon=config.bn_epsilon)
    if config.norm == "none":
        return _no_norm
    raise ValueError(f"unknown config.norm {config.norm!r}")  # check_config refuses it first


def _group_norm(*, use_running_average=None, **kwargs) -> nn.Module:
    """`flax.linen.GroupNorm`, called like a BatchNorm factory (it has no running statistics)."""
    del use_running_average
    return nn.GroupNorm(**kwargs)


def _no_norm(**kwargs):
    """No normalization: the identity, called like a BatchNorm factory."""
    del kwargs
    return lambda x: x


def create_learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Constant or cosine-decayed `config.learning_rate`, after a linear warm-up."""
    lr = config.learning_rate
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "cosine" and warmup == 0:
        # What warmup_cosine_decay_schedule computes with no warm-up, without its
        # zero-step linear piece (which optax logs about on every call).
        return optax.cosine_decay_schedule(lr, decay_steps=max(total_steps, 1), alpha=0.0)
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
    """Adam, AdamW or SGD with momentum, with `create_learning_rate_schedule`.

    Weight decay (`config.weight_decay`) applies to kernels only: AdamW's own,
    or an `optax.add_decayed_weights` before Adam or SGD.
    """
    lr = create_learning_rate_schedule(config, steps_per_epoch, total_steps)
    wd = config.weight_decay
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=wd, mask=_kernels_only)
    if config.optimizer == "adam":
        tx = optax.adam(lr)
    else:
        tx = optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov)
    if wd:
        tx = optax.chain(optax.add_decayed_weights(wd, mask=_kernels_only), tx)
    return tx


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: Tuple[int, ...]) -> TrainState:
    """Initial `TrainState` (call under ``jit`` to place it, see `steps.make_steps`)."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )
