"""The one place that inspects the context a computation is traced in.

* `kind()`: how the program being traced is split among devices —
  ``"single"`` (one device), ``"manual"`` (inside ``shard_map``/``pmap`` with every
  mesh axis manual), ``"partial"`` (a ``shard_map`` with some axes left to XLA), or
  ``"spmd"`` (several devices and no manual axis: plain or sharded ``jit``, where
  XLA's SPMD partitioner splits the program).
* `vmap_axes`: which named axes are ``vmap`` axes (a psum there is a local sum).
* `varying` / `vary_like`: shard_map's varying-axes types of values, which the
  custom calls' results do not carry by themselves.
* `param_cotangent`: a parameter's cotangent reduced to what JAX's autodiff would
  return in this context.
* `custom_partitioning(enabled)`: the switch for jaxbn's declared partitioning of
  the statistics under sharded jit (on by default; benchmarks compare with XLA's own).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import jax

__all__ = ["kind", "platform", "vmap_axes", "varying", "vary_like", "param_cotangent", "custom_partitioning",
           "partitioning_enabled"]

_partitioning: bool = True


def kind() -> str:
    """``'single'``, ``'manual'``, ``'partial'`` or ``'spmd'`` (see the module docstring)."""
    if jax.device_count() == 1:
        return "single"
    types = jax.sharding.get_abstract_mesh().axis_types
    manual = [t == jax.sharding.AxisType.Manual for t in types]
    if not any(manual):
        return "spmd"
    return "manual" if all(manual) else "partial"


def vmap_axes(names) -> tuple:
    """Those of the named axes that are ``vmap`` axes, not mesh (device) axes."""
    if not names:
        return ()
    mesh = set(jax.sharding.get_abstract_mesh().axis_names)
    return tuple(a for a in names if a not in mesh)


def platform() -> str:
    """The platform the computation being traced will run on, as far as tracing can tell:
    the devices of the mesh in context (``jax.set_mesh``), else the default device
    (``jax.default_device``), else JAX's default backend."""
    try:
        mesh = jax.sharding.get_mesh()
        devices = getattr(mesh, "devices", None)
        if devices is not None and getattr(devices, "size", 0):
            return devices.flat[0].platform
    except (AttributeError, ValueError, RuntimeError):
        pass
    device = jax.config.jax_default_device
    if device is not None:
        return device if isinstance(device, str) else device.platform
    return jax.default_backend()


@contextlib.contextmanager
def custom_partitioning(enabled: bool):
    """Within the block, traced functions use (True) or skip (False) jaxbn's declared
    partitioning of the statistics under sharded jit; XLA then splits the plain
    formulation itself (two all-reduces forward, and CPU kernels are not used)."""
    global _partitioning
    old, _partitioning = _partitioning, bool(enabled)
    try:
        yield
    finally:
        _partitioning = old


def partitioning_enabled() -> bool:
    return _partitioning


def varying(a) -> frozenset:
    """The named axes that `a` varies over under shard_map's type checks (else empty)."""
    aval = a if isinstance(a, jax.core.AbstractValue) else jax.typeof(a)
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", frozenset()) if mat is not None else frozenset()
    return frozenset(vma)


def vary_like(outs: tuple, *ins) -> tuple:
    """`outs` typed as varying over every axis that one of `ins` varies over.

    A custom call's results carry no varying axes under shard_map's type checks;
    left so, per-device statistics would pass for replicated ones.
    """
    v = frozenset().union(*(varying(a) for a in ins))
    if not v:
        return outs
    axes = tuple(sorted(v))
    pcast = getattr(jax.lax, "pcast", None)
    cast = (lambda o: pcast(o, axes, to="varying")) if pcast else (lambda o: jax.lax.pvary(o, axes))
    return tuple(cast(o) if varying(o) != v else o for o in outs)


def param_cotangent(p, local, glob, x, names: Optional[tuple]):
    """The cotangent of parameter `p` (an array or its abstract value) as JAX's autodiff
    would return it here.

    `local` is this device's sum, `glob` the sum over `names` (already all-reduced).
    Under shard_map's type checks a parameter's cotangent must vary over exactly the
    axes the parameter varies over; autodiff of the same math would sum the
    per-device contributions over the others (the transpose of the implicit pvary).
    The sums over `names` are already global; any other axis x varies over but the
    parameter does not (e.g. axis_name=None inside shard_map) is summed here.
    Outside such checks (pmap, vmap, check_vma=False) the varying sets are empty and
    the device's own sum is returned: the caller reduces parameter gradients itself.
    """
    if p is None:
        return None
    vx, vp = varying(x), varying(p)
    synced = names is not None and set(names) <= vx
    g, have = (glob, vx - set(names)) if synced and not set(names) <= vp else (local, vx)
    extra = tuple(sorted(have - vp))
    if extra:
        g = jax.lax.psum(g, extra)
    return g.astype(p.dtype)
