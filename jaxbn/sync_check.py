"""A checker for synchronized-BatchNorm semantics of any Flax model.

Data-parallel training with BatchNorm is right when one step on N devices equals
one step on one device over the concatenated global batch. `check_sync_bn` runs
both, under `shard_map`, and compares layer by layer:

* every module's output (Linen: captured intermediates; NNX: the model output),
* every BatchNorm layer's new running statistics, on every device,
* every parameter's gradient of ``L = Σ w · model(x)`` (w random, fixed),

and names BatchNorm layers left without the data axis name (per-device
statistics, flax#877), found both from their attributes and from their numbers.
Such a layer is what makes JAX's ``shard_map`` stop a training step with
"out_specs which require replication which can't be statically inferred" (its
statistics, gradients or outputs differ per device where ``out_specs=P()``
promises one value): give the layer ``axis_name``; ``check_vma=False`` would only
hide the difference.

The training flag is found in the model's ``__call__`` signature (``train``,
``training``, ``is_training`` set True, ``use_running_average`` set False);
otherwise pass it with ``apply_kwargs``. A run in which no BatchNorm updated its
running statistics (an NNX model left in ``eval()`` mode, Linen BatchNorms with
``use_running_average=True``) compares nothing of synchronization: the report
says so and fails.
Works for `jaxbn.linen`/`jaxbn.nnx` and Flax's own BatchNorm modules, and for
their subclasses whatever their names (`jaxbn._detect.is_batch_norm`).

Example:
  >>> report = check_sync_bn(model, variables, x, axis_name="batch")  # doctest: +SKIP
  >>> print(report); assert report.ok
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxbn._checks import axis_names
from jaxbn._detect import is_batch_norm

__all__ = ["SyncReport", "check_sync_bn", "assert_sync_bn"]


@dataclasses.dataclass
class Row:
    kind: str  # 'output', 'batch_stats' or 'grad'
    path: str
    error: float  # max relative error, data-parallel vs one device
    ok: bool


@dataclasses.dataclass
class SyncReport:
    """Layer-by-layer comparison of N devices with one device on the global batch."""

    num_devices: int
    axis_name: str
    rows: list
    unsynced_layers: list  # paths of BatchNorm layers not reducing over axis_name
    rtol: float
    # BatchNorm layers (paths) whose running statistics the step left unchanged: they ran
    # with running averages (evaluation mode). All of them: nothing was checked.
    eval_layers: list = dataclasses.field(default_factory=list)
    num_batch_norms: int = 0
    apply_kwargs: Optional[dict] = None  # what the model was called with

    @property
    def not_training(self) -> bool:
        """No BatchNorm ran in training mode: the comparison says nothing about synchronization."""
        return bool(self.num_batch_norms) and len(self.eval_layers) == self.num_batch_norms

    @property
    def ok(self) -> bool:
        return not self.unsynced_layers and not self.not_training and all(r.ok for r in self.rows)

    @property
    def failures(self) -> list:
        return [r for r in self.rows if not r.ok]

    def __str__(self) -> str:
        lines = [
            f"sync-BN check: {self.num_devices} devices on axis {self.axis_name!r} vs 1 device, rtol={self.rtol:g}: "
            + ("OK" if self.ok else "FAILED")
        ]
        if self.not_training:
            lines.append(
                f"  NO BatchNorm ran in training mode: all {self.num_batch_norms} kept their running "
                f"statistics (called with {self.apply_kwargs}), so nothing about synchronization was "
                "checked. Linen: pass the training flag, e.g. apply_kwargs={'train': True} or "
                "{'use_running_average': False}; NNX: call model.train() first."
            )
        for path in self.unsynced_layers:
            lines.append(
                f"  UNSYNCED BatchNorm {path}: axis_name does not include {self.axis_name!r}; "
                "its statistics are per device (flax#877)"
            )
        if self.unsynced_layers:
            lines.append(
                f"  (under shard_map with out_specs=P() this is JAX's error \"out_specs which require "
                f"replication which can't be statically inferred\": give these layers "
                f"axis_name={self.axis_name!r}; check_vma=False would only hide the per-device statistics)"
            )
        if self.eval_layers and not self.not_training:
            lines.append(f"  (running averages, not checked: {', '.join(self.eval_layers)})")
        width = max([len(r.path) for r in self.rows] + [10])
        for r in self.rows:
            lines.append(f"  {'ok ' if r.ok else 'BAD'} {r.kind:<11} {r.path:<{width}} rel.err {r.error:.2e}")
        return "\n".join(lines)


def _rel_err(a, ref, floor: float = 1e-12) -> float:
    """max|a - ref| / max(max|ref|, floor); inf when shapes differ."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return float("inf")
    return float(np.abs(a - ref).max(initial=0.0) / max(np.abs(ref).max(initial=0.0), floor))


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _synced(axis_name_attr, axis_name: str) -> bool:
    """Whether a BatchNorm's `axis_name` attribute reduces over `axis_name`."""
    return axis_name in (axis_names(axis_name_attr) or ())


# Training flags found in a model's __call__ signature, and the value that means training.
TRAINING_FLAGS = (("train", True), ("training", True), ("is_training", True), ("use_running_average", False))


def training_kwargs(model: Any) -> dict:
    """``{flag: value}`` that puts `model` in training mode, from its ``__call__`` signature
    (`TRAINING_FLAGS`); ``{}`` when it has none of them (NNX models use ``model.train()``)."""
    try:
        params = inspect.signature(model.__call__).parameters
    except (TypeError, ValueError):
        return {}
    for name, value in TRAINING_FLAGS:
        if name in params:
            return {name: value}
    return {}


def _call_signature(model: Any) -> str:
    try:
        return f"{type(model).__name__}.__call__{inspect.signature(model.__call__)}"
    except (TypeError, ValueError):
        return f"{type(model).__name__}.__call__"


def _eval_layers(before, after) -> tuple:
    """(layers whose running statistics `after` left as in `before`, number of layers), by the
    paths of the statistics with their last component (mean, var) dropped. `after` carries a
    leading device axis."""
    old = {_path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(before)[0]}
    layers: dict = {}
    for p, v in jax.tree_util.tree_flatten_with_path(after)[0]:
        path = _path_str(p)
        layer = path.rsplit("/", 1)[0] if "/" in path else path
        same = path in old and np.array_equal(np.asarray(v)[0], old[path])
        layers[layer] = layers.get(layer, True) and same
    return sorted(k for k, same in layers.items() if same), len(layers)


def _mesh(n: int, axis_name: str, devices):
    return jax.sharding.Mesh(np.asarray(devices[:n]), (axis_name,))


def _cotangent(out, axis_name, seed):
    """A fixed random w for the global output, sliced to this device's rows."""
    k = jax.lax.axis_size(axis_name)
    rows = out.shape[0]
    w = jax.random.normal(jax.random.key(seed), (k * rows,) + out.shape[1:], jnp.float32)
    return jax.lax.dynamic_slice_in_dim(w, jax.lax.axis_index(axis_name) * rows, rows)


def _loss(out, axis_name, seed):
    return jax.lax.psum(jnp.sum(_cotangent(out, axis_name, seed) * out.astype(jnp.float32)), axis_name)


def _stack(tree):
    return jax.tree.map(lambda a: jnp.asarray(a)[None], tree)


def _linen_step(model, variables, axis_name, apply_kwargs, seen, seed):
    import flax.linen as nn

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and is_batch_norm(m):
            seen["/".join(m.path)] = m.axis_name
        return next_fun(*args, **kwargs)

    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def body(params, rest, x):
        def loss(params):
            with nn.intercept_methods(interceptor):
                out, upd = model.apply(
                    {"params": params, **rest},
                    x,
                    mutable=["batch_stats", "intermediates"],
                    capture_intermediates=True,
                    **apply_kwargs,
                )
            return _loss(out, axis_name, seed), (out, upd)

        (_, (out, upd)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        inter = {
            _path_str(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(upd.get("intermediates", {}))[0]
            if jnp.ndim(v) >= 1 and _path_str(p[:1]) != "__call__"  # the model output is compared already
        }
        return out, inter, _stack(upd.get("batch_stats", {})), _stack(grads)

    return body, (params, rest), variables.get("batch_stats", {})


def _nnx_step(model, axis_name, apply_kwargs, seen, seed):
    from flax import nnx

    for path, m in nnx.iter_graph(model):
        if is_batch_norm(m):
            seen[_path_str(path)] = m.axis_name
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

    def body(params, stats_rest, x):
        stats, rest = stats_rest

        def loss(params, stats, rest):
            m = nnx.merge(graphdef, params, stats, rest, copy=True)
            out = m(x, **apply_kwargs)
            return _loss(out, axis_name, seed), (out, nnx.state(m, nnx.BatchStat))

        (_, (out, new_stats)), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, rest)
        return out, {}, _stack(nnx.to_pure_dict(new_stats)), _stack(nnx.to_pure_dict(grads))

    return body, (params, (stats, rest)), nnx.to_pure_dict(stats)


def check_sync_bn(
    model: Any,
    variables: Optional[dict],
    x: jax.typing.ArrayLike,
    *,
    axis_name: str = "batch",
    num_devices: Optional[int] = None,
    apply_kwargs: Optional[dict] = None,
    rtol: float = 1e-4,
    seed: int = 0,
) -> SyncReport:
    """Compares one data-parallel training step with one device on the global batch.

    Args:
      model: a `flax.linen.Module` (then `variables` holds its 'params' and
        'batch_stats') or a `flax.nnx.Module` in training mode (`variables` None).
        Its BatchNorm layers should use ``axis_name``.
      variables: Linen variables, or None for NNX.
      x: the global batch; its leading axis must divide by `num_devices`.
      axis_name: the data-parallel axis name the model's BatchNorms should use.
      num_devices: devices for the data-parallel run (default: all, at least 2).
      apply_kwargs: extra call arguments that put the model in training mode. Default:
        found from the ``__call__`` signature (``train``/``training``/``is_training``
        True, or ``use_running_average`` False), else none.
      rtol: tolerance on the max relative error of each compared array.
      seed: seed of the random cotangent w.

    Returns:
      A `SyncReport`; ``report.ok`` is the verdict, ``str(report)`` the table.

    Raises:
      ValueError: fewer than 2 devices, or a batch that does not split evenly.
      TypeError: the model does not take `apply_kwargs` (the message shows its
        ``__call__`` signature and what to pass).
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 2 <= n <= len(devices):
        raise ValueError(f"num_devices must be in [2, {len(devices)}] (the available devices), got {n}")
    x = jnp.asarray(x)
    if x.shape[0] % n:
        raise ValueError(f"x's leading (batch) axis {x.shape[0]} must be divisible by num_devices={n}")
    is_linen = variables is not None
    if apply_kwargs is None:
        apply_kwargs = training_kwargs(model)

    seen: dict = {}
    if is_linen:
        body, state, stats_before = _linen_step(model, variables, axis_name, apply_kwargs, seen, seed)
    else:
        body, state, stats_before = _nnx_step(model, axis_name, apply_kwargs, seen, seed)

    def run(k):
        f = jax.shard_map(
            body,
            mesh=_mesh(k, axis_name, devices),
            in_specs=(P(), P(), P(axis_name)),
            out_specs=(P(axis_name), P(axis_name), P(axis_name), P(axis_name)),
        )
        return jax.jit(f)(*state, x)

    try:
        ref = run(1)
        par = run(n)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e) and "missing" not in str(e):
            raise
        names = ", ".join(f"{{{k!r}: {v}}}" for k, v in TRAINING_FLAGS)
        raise TypeError(
            f"check_sync_bn called the model with {apply_kwargs} and it failed: {e}. Its signature is "
            f"{_call_signature(model)}; pass the arguments that select training mode as "
            f"check_sync_bn(..., apply_kwargs={{...}}) (flags found automatically: {names})"
        ) from e
    except (ValueError, NameError) as e:
        if "not bound" in str(e) or "unbound axis" in str(e):
            raise ValueError(
                f"a BatchNorm uses an axis_name other than {axis_name!r} ({e}); pass the model's data axis as axis_name"
            ) from e
        if "require replication" in str(e):  # a shard_map inside the model, P() out_specs
            unsynced = sorted(p for p, names in seen.items() if not _synced(names, axis_name))
            raise ValueError(
                f"the model's own shard_map needs replicated values it cannot prove: "
                + (f"BatchNorm layer(s) {', '.join(unsynced)} lack axis_name={axis_name!r} (their statistics "
                   "differ per device); give them axis_name" if unsynced else
                   "some value differs per device where out_specs=P() says it is replicated")
                + f" rather than check_vma=False ({str(e).splitlines()[0]})"
            ) from e
        raise

    compared = [("output", "(model output)", par[0], ref[0])]
    compared += [("output", p, par[1].get(p), ref[1][p]) for p in ref[1]]
    for kind, i in (("batch_stats", 2), ("grad", 3)):
        flat_ref = jax.tree_util.tree_flatten_with_path(ref[i])[0]
        flat_par = jax.tree_util.tree_flatten_with_path(par[i])[0]
        # Every device's copy against the reference.
        compared += [(kind, _path_str(p), a, jnp.broadcast_to(r, a.shape)) for (p, r), (_, a) in zip(flat_ref, flat_par)]
    # Arrays that are zero in exact arithmetic (e.g. the gradient of a bias right
    # before a BatchNorm) are float noise: errors are measured against at least
    # 1e-3 of the largest value of the same kind.
    biggest = {}
    for kind, _, _, r in compared:
        biggest[kind] = max(biggest.get(kind, 0.0), float(np.abs(np.asarray(r)).max(initial=0.0)))
    rows = []
    for kind, path, a, r in compared:
        err = _rel_err(a, r, floor=max(1e-3 * biggest[kind], 1e-12))
        rows.append(Row(kind, path, err, err <= rtol))

    unsynced = sorted(p for p, names in seen.items() if not _synced(names, axis_name))
    eval_layers, num_bn = _eval_layers(stats_before, ref[2])
    return SyncReport(num_devices=n, axis_name=axis_name, rows=rows, unsynced_layers=unsynced, rtol=rtol,
                      eval_layers=eval_layers, num_batch_norms=max(num_bn, len(seen)),
                      apply_kwargs=dict(apply_kwargs))


def assert_sync_bn(*args, **kwargs) -> SyncReport:
    """`check_sync_bn`, raising AssertionError with the report when it fails (for pytest)."""
    report = check_sync_bn(*args, **kwargs)
    if not report.ok:
        raise AssertionError(str(report))
    return report
