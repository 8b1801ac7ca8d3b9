"""Recognising BatchNorm modules: one rule for every tool that looks for them.

A module is a BatchNorm when it is an instance of `flax.linen.BatchNorm`,
`jaxbn.linen.BatchNorm`, `flax.nnx.BatchNorm` or `jaxbn.nnx.BatchNorm`, or of a
subclass of one of them, whatever the subclass is called. Class names are never
read: ``Forgetful(jaxbn.linen.BatchNorm)`` is one, ``MyBatchNormLike(nn.Module)``
is not.

Flax and the adapters are imported here on first use, not when this module is
(`import jaxbn` must not import Flax), and imported rather than looked up as
attributes of an imported package: a process may not have loaded `jaxbn.linen`
yet when it asks. Linen and NNX are looked at separately, so asking about a Linen
module never imports `flax.nnx`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Optional

__all__ = ["is_batch_norm"]

# (Flax's module package, jaxbn's adapter for it): Linen first, NNX second.
_FAMILIES = (("flax.linen", "jaxbn.linen"), ("flax.nnx", "jaxbn.nnx"))


def _load(name: str) -> Optional[ModuleType]:
    try:
        return importlib.import_module(name)
    except ImportError:  # Flax is optional for jaxbn's core.
        return None


def is_batch_norm(module: Any) -> bool:
    """Whether `module` is a Flax or jaxbn BatchNorm (Linen or NNX), subclasses included."""
    for flax_name, ours_name in _FAMILIES:
        flax_pkg = _load(flax_name)
        if flax_pkg is None or not isinstance(module, flax_pkg.Module):
            continue
        ours = _load(ours_name)
        types = (flax_pkg.BatchNorm,) + ((ours.BatchNorm,) if ours is not None else ())
        return isinstance(module, types)
    return False
