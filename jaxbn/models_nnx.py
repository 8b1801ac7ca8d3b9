"""Flax NNX models: the article's CNN, the CIFAR-style ResNet-20 and the test-only MLP.

The NNX twins of `jaxbn.models`' Linen models: the same layers in the same
order, the same initializers and the same parameter counts. The normalization
layer is a constructor argument, a factory called as
``norm(num_features, rngs=rngs)`` (plus ``scale_init=`` for the last BatchNorm
of a residual block), so the same model runs with `jaxbn.nnx.BatchNorm` or
`flax.nnx.BatchNorm`::

    CNNNNX(norm=functools.partial(jaxbn.nnx.BatchNorm, momentum=0.9), rngs=nnx.Rngs(0))
    CNNNNX(norm=functools.partial(flax.nnx.BatchNorm, axis_name="batch"), rngs=nnx.Rngs(0))

Training or evaluation is the NNX way: ``model.train()`` / ``model.eval()``
(BatchNorm's ``use_running_average``); the call takes only the images. Under a
sharded ``jit`` (the batch split over devices) the default ``axis_name=None``
already gives global statistics; give an ``axis_name`` under ``shard_map``.

NNX needs the input size at construction (Linen infers it): ``in_features``
(channels) and, for the CNN and the MLP, ``image_size``. Submodules carry the
Linen models' names (``Conv_0``, ``BatchNorm_0``, ``Block_0_0``, ...), so
`load_linen_variables` maps a Linen model's variables one to one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn import conv as bn_conv
from jaxbn import nnx as bn_nnx
from jaxbn.max_pool import max_pool

__all__ = ["CNN", "ResNet", "ResNet20", "ResNetBlock", "MLP", "MODELS", "count_params",
           "load_linen_variables"]


class CNN(nnx.Module):
    """The article's CNN, as `jaxbn.models.CNN`: Conv(32, 3×3, VALID) → ReLU →
    BatchNorm → MaxPool(2×2) → Dense(128) → ReLU → Dense(num_classes); logits.
    On 28×28×1 inputs: 694,026 parameters and 64 running statistics. `pool` is
    the Linen model's (`jaxbn.max_pool.max_pool`, Flax's values and gradient)."""

    def __init__(self, num_classes: int = 10, *, in_features: int = 1,
                 image_size: Tuple[int, int] = (28, 28), features: int = 32, hidden: int = 128,
                 norm: Callable[..., nnx.Module] = bn_nnx.BatchNorm, use_norm: bool = True,
                 pool: Callable[..., Any] = max_pool, rngs: nnx.Rngs):
        self.Conv_0 = nnx.Conv(in_features, features, (3, 3), padding="VALID",
                               conv_general_dilated=bn_conv.conv_general_dilated, rngs=rngs)
        self.BatchNorm_0 = norm(features, rngs=rngs) if use_norm else None
        h, w = ((image_size[0] - 2) // 2, (image_size[1] - 2) // 2)  # VALID 3×3, then 2×2/2 pool
        self.Dense_0 = nnx.Linear(h * w * features, hidden, rngs=rngs)
        self.Dense_1 = nnx.Linear(hidden, num_classes, rngs=rngs)
        self.pool = pool

    def __call__(self, x):
        x = nnx.relu(self.Conv_0(x))
        if self.BatchNorm_0 is not None:
            x = self.BatchNorm_0(x)
        x = self.pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        return self.Dense_1(nnx.relu(self.Dense_0(x)))


def _conv(in_f, out_f, kernel, strides, rngs):
    return nnx.Conv(in_f, out_f, kernel, strides, use_bias=False, kernel_init=nnx.initializers.he_normal(),
                    conv_general_dilated=bn_conv.conv_general_dilated, rngs=rngs)


class ResNetBlock(nnx.Module):
    """Basic residual block, as `jaxbn.models.ResNetBlock`: conv-BN-ReLU-conv-BN
    (last BN's scale starts at zero) + shortcut (projected when the shape changes), ReLU."""

    def __init__(self, in_filters: int, filters: int, *, norm: Callable[..., nnx.Module],
                 strides: int = 1, rngs: nnx.Rngs):
        self.Conv_0 = _conv(in_filters, filters, (3, 3), (strides, strides), rngs)
        self.BatchNorm_0 = norm(filters, rngs=rngs)
        self.Conv_1 = _conv(filters, filters, (3, 3), (1, 1), rngs)
        self.BatchNorm_1 = norm(filters, scale_init=nnx.initializers.zeros_init(), rngs=rngs)
        if strides != 1 or in_filters != filters:  # projection shortcut (He et al.'s option B)
            self.Conv_proj = _conv(in_filters, filters, (1, 1), (strides, strides), rngs)
            self.BatchNorm_proj = norm(filters, rngs=rngs)
        else:
            self.Conv_proj = self.BatchNorm_proj = None

    def __call__(self, x):
        y = nnx.relu(self.BatchNorm_0(self.Conv_0(x)))
        y = self.BatchNorm_1(self.Conv_1(y))
        if self.Conv_proj is not None:
            x = self.BatchNorm_proj(self.Conv_proj(x))
        return nnx.relu(x + y)


class ResNet(nnx.Module):
    """CIFAR-style ResNet (He et al. 2016, §4.2), as `jaxbn.models.ResNet`: 6n+2 layers,
    16/32/64 filters, global average pooling, Dense head."""

    def __init__(self, num_classes: int = 10, *, in_features: int = 1,
                 stage_sizes: Sequence[int] = (3, 3, 3), width: int = 16,
                 image_size: Any = None, norm: Callable[..., nnx.Module] = bn_nnx.BatchNorm, rngs: nnx.Rngs):
        del image_size  # any size works (global average pooling); accepted as the other models do
        self.Conv_stem = nnx.Conv(in_features, width, (3, 3), use_bias=False,
                                  conv_general_dilated=bn_conv.conv_general_dilated, rngs=rngs)
        self.BatchNorm_stem = norm(width, rngs=rngs)
        names, f = [], width
        for i, n in enumerate(stage_sizes):
            for j in range(n):
                name, filters = f"Block_{i}_{j}", width * 2**i
                setattr(self, name, ResNetBlock(f, filters, norm=norm, strides=2 if i > 0 and j == 0 else 1,
                                                rngs=rngs))
                names.append(name)
                f = filters
        self.block_names = tuple(names)
        self.Dense_head = nnx.Linear(f, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.BatchNorm_stem(self.Conv_stem(x)))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.Dense_head(jnp.mean(x, axis=(1, 2)))


ResNet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3))


class MLP(nnx.Module):
    """Test-only tiny model, as `jaxbn.models.MLP`: Dense (no bias) → BatchNorm → ReLU → Dense."""

    def __init__(self, num_classes: int = 10, *, in_features: int = 1,
                 image_size: Tuple[int, int] = (28, 28), hidden: int = 16,
                 norm: Callable[..., nnx.Module] = bn_nnx.BatchNorm, rngs: nnx.Rngs):
        self.Dense_0 = nnx.Linear(image_size[0] * image_size[1] * in_features, hidden, use_bias=False,
                                  rngs=rngs)
        self.BatchNorm_0 = norm(hidden, rngs=rngs)
        self.Dense_1 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return self.Dense_1(nnx.relu(self.BatchNorm_0(self.Dense_0(x))))


MODELS = {"cnn": CNN, "resnet20": ResNet20, "mlp": MLP}


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (`nnx.Param` entries)."""
    return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> None:
    """Sets `model`'s parameters and running statistics, in place, to those of the
    matching Linen model's `variables` (``{'params': ..., 'batch_stats': ...}``).

    Raises:
      ValueError: the trees differ (another model, or another size).
    """
    merged: dict = {}

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, Mapping):
                merge(dst.setdefault(k, {}), v)
            else:
                dst[k] = v

    for collection in ("params", "batch_stats"):
        merge(merged, variables.get(collection, {}))
    state = nnx.state(model, nnx.Param, nnx.BatchStat)
    state = nnx.merge_state(*state) if isinstance(state, tuple) else state
    want = jax.tree.structure(nnx.to_pure_dict(state))
    if jax.tree.structure(merged) != want:
        raise ValueError(f"the Linen variables do not match the model: {jax.tree.structure(merged)} vs {want}")
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(model, state)
