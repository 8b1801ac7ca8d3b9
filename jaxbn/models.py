"""Flax Linen models: the article's CNN and a CIFAR-style ResNet.

The normalization layer is a constructor argument (a factory called as
``norm(use_running_average=..., name=...)``), so the same model runs with
`jaxbn.linen.BatchNorm` or `flax.linen.BatchNorm` for A/B comparisons::

    CNN(norm=functools.partial(jaxbn.linen.BatchNorm, axis_name="batch"))
    CNN(norm=functools.partial(flax.linen.BatchNorm, momentum=0.9))
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxbn import conv as bn_conv
from jaxbn import linen as bn_linen
from jaxbn.max_pool import max_pool

__all__ = ["CNN", "ResNet", "ResNet20", "ResNetBlock", "MLP", "MODELS"]

ModuleDef = Any

# The models' convolutions take `jaxbn.conv.conv_general_dilated` (lax's values; im2col on the CPU
# for narrow patches, such as a first layer's); if a Flax release drops Linen's (deprecated)
# ``conv_general_dilated`` field, they fall back to Flax's own convolution.
_CONV = (functools.partial(nn.Conv, conv_general_dilated=bn_conv.conv_general_dilated)
         if "conv_general_dilated" in getattr(nn.Conv, "__dataclass_fields__", {}) else nn.Conv)


class CNN(nn.Module):
    """The article's CNN (Ioffe & Szegedy 2015 as applied to MNIST).

    Conv(32, 3×3, VALID) → ReLU → BatchNorm → MaxPool(2×2) → Dense(128) → ReLU →
    Dense(num_classes). Returns logits (softmax lives in the loss). On 28×28×1
    inputs: 694,026 parameters and 64 running statistics.

    `pool` is called as ``pool(x, (2, 2), strides=(2, 2))``; the default,
    `jaxbn.max_pool.max_pool`, has ``flax.linen.max_pool``'s values and exact
    gradient (ties to the first maximum) and is much faster to differentiate on
    XLA:CPU. ``pool=flax.linen.max_pool`` gives the same model (no parameters
    change); it is there for A/B timing.

    ``norm_before_relu=True`` swaps the first ReLU and BatchNorm (Conv → BatchNorm →
    ReLU, where Ioffe & Szegedy place it; the article places it after the ReLU):
    the same parameters, another function.
    """

    num_classes: int = 10
    features: int = 32
    hidden: int = 128
    norm: Callable[..., nn.Module] = bn_linen.BatchNorm
    use_norm: bool = True  # False gives the article's no-BN baseline.
    pool: Callable[..., Any] = max_pool
    norm_before_relu: bool = False  # True: Conv → BatchNorm → ReLU (Ioffe & Szegedy's order).

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = _CONV(self.features, (3, 3), padding="VALID", name="Conv_0")(x)
        if self.use_norm and self.norm_before_relu:
            x = self.norm(use_running_average=not train, name="BatchNorm_0")(x)
        x = nn.relu(x)
        if self.use_norm and not self.norm_before_relu:
            x = self.norm(use_running_average=not train, name="BatchNorm_0")(x)
        x = self.pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, name="Dense_0")(x))
        return nn.Dense(self.num_classes, name="Dense_1")(x)


class ResNetBlock(nn.Module):
    """Basic residual block: conv-BN-ReLU-conv-BN + shortcut, ReLU."""

    filters: int
    norm: ModuleDef
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(_CONV, use_bias=False, kernel_init=nn.initializers.he_normal())
        y = conv(self.filters, (3, 3), (self.strides, self.strides), name="Conv_0")(x)
        y = nn.relu(self.norm(name="BatchNorm_0")(y))
        y = conv(self.filters, (3, 3), name="Conv_1")(y)
        y = self.norm(name="BatchNorm_1", scale_init=nn.initializers.zeros)(y)
        if x.shape != y.shape:  # projection shortcut (He et al.'s option B)
            x = conv(self.filters, (1, 1), (self.strides, self.strides), name="Conv_proj")(x)
            x = self.norm(name="BatchNorm_proj")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, §4.2): 6n+2 layers, 16/32/64 filters."""

    stage_sizes: Sequence[int] = (3, 3, 3)
    num_classes: int = 10
    width: int = 16
    norm: Callable[..., nn.Module] = bn_linen.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(self.norm, use_running_average=not train)
        x = _CONV(self.width, (3, 3), use_bias=False, name="Conv_stem")(x)
        x = nn.relu(norm(name="BatchNorm_stem")(x))
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                x = ResNetBlock(self.width * 2**i, norm=norm, strides=strides, name=f"Block_{i}_{j}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="Dense_head")(x)


ResNet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3))


class MLP(nn.Module):
    """Test-only tiny model: Dense (no bias: BN removes it) → BatchNorm → ReLU → Dense."""

    num_classes: int = 10
    hidden: int = 16
    norm: Callable[..., nn.Module] = bn_linen.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden, use_bias=False, name="Dense_0")(x)
        x = nn.relu(self.norm(use_running_average=not train, name="BatchNorm_0")(x))
        return nn.Dense(self.num_classes, name="Dense_1")(x)


MODELS = {"cnn": CNN, "resnet20": ResNet20, "mlp": MLP}

# The NNX twins (jaxbn/models_nnx.py: the same layers, initializers and parameter counts; the
# norm a factory ``norm(num_features, rngs=...)``, default jaxbn.nnx.BatchNorm).
from jaxbn.models_nnx import CNN as CNNNNX  # noqa: E402
from jaxbn.models_nnx import MLP as MLPNNX  # noqa: E402
from jaxbn.models_nnx import MODELS as NNX_MODELS  # noqa: E402
from jaxbn.models_nnx import ResNet as ResNetNNX  # noqa: E402
from jaxbn.models_nnx import ResNet20 as ResNet20NNX  # noqa: E402

__all__ += ["CNNNNX", "ResNetNNX", "ResNet20NNX", "MLPNNX", "NNX_MODELS"]
