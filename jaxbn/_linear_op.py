"""A linear map with a hand-written transpose, as a JAX primitive.

JAX differentiates a `custom_jvp` function in reverse mode by transposing the
linear map its JVP rule returns, primitive by primitive. To keep a hand-written
backward pass (one collective, one-sweep kernels) while supporting forward mode,
the training layer's tangent map is one primitive made here: its forward
evaluation is a plain ``jnp`` function (`impl`), its transpose is the hand-written
backward (`transpose`). Higher-order derivatives differentiate `impl` (and the
transpose's own operations), and `vmap` batches `impl` (so under `vmap` the
transpose is JAX's own, with the same values). `jax.custom_derivatives.linear_call`
does the first two but has no batching rule and no derivative with respect to its
residuals (needed for grad of grad), hence this file.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["linear_op"]


def _varying(aval) -> frozenset:
    """The named axes an abstract value varies over under shard_map's type checks."""
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", None) if mat is not None else None
    return frozenset(vma or ())


def linear_op(name: str, impl: Callable, transpose: Callable, out_aval: Callable):
    """A primitive ``p`` with ``p.bind(*linear, *residual, **params) == impl(*linear, *residual, **params)``.

    `impl` is linear in its leading arguments, the others are residuals.
    ``transpose(ct, *args, **params)`` returns one cotangent (or None) per leading
    linear argument, those among `args` that are `ad.UndefinedPrimal` (the others get None). ``out_aval(*avals, **params)`` gives
    the result's (shape, dtype); it varies over every named axis an input varies over.
    """
    p = Primitive(name)
    p.def_impl(impl)

    def abstract_eval(*avals, **params):
        shape, dtype = out_aval(*avals, **params)
        # The result varies wherever an operand does: typed like the operand of its
        # shape that varies the most (its sharding and varying axes carry over).
        base = max((a for a in avals if a.shape == shape), key=lambda a: len(_varying(a)))
        return base.update(shape=shape, dtype=dtype, weak_type=False)

    p.def_abstract_eval(abstract_eval)
    mlir.register_lowering(p, mlir.lower_fun(impl, multiple_results=False))

    def jvp(primals, tangents, **params):
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        _, out_dot = jax.jvp(functools.partial(impl, **params), primals, tangents)
        return p.bind(*primals, **params), out_dot

    ad.primitive_jvps[p] = jvp

    def transpose_rule(ct, *args, **params):
        if type(ct) is ad.Zero:
            return [None] * len(args)
        cts = transpose(ct, *args, **params)
        return list(cts) + [None] * (len(args) - len(cts))

    ad.primitive_transposes[p] = transpose_rule

    def batch(axis_data, args, dims, **params):
        in_axes = [d if isinstance(d, int) else None for d in dims]  # None: not batched
        fun = jax.vmap(functools.partial(impl, **params), in_axes=in_axes, axis_name=axis_data.name,
                       axis_size=axis_data.size, spmd_axis_name=axis_data.spmd_name)
        return fun(*args), 0

    batching.fancy_primitive_batchers[p] = batch
    return p
