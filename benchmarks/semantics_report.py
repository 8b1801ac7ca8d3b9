"""Semantics figures for the README: collectives per layer and numerical errors.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/semantics_report.py

Prints a table and writes benchmarks/results/semantics.json. Peers: Flax Linen
BatchNorm with its default fast variance and with use_fast_variance=False.
Counts collectives in the lowered StableHLO of one BatchNorm layer under
shard_map over 8 devices (forward, and forward+backward of a scalar loss).
"""

import json
import os
import platform

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import _hlo
from jaxbn import linen as bl


def layer_collectives(module, x):
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    v = module.init(jax.random.key(0), x[:1], use_running_average=False)

    def fwd(p, x):
        y, upd = module.apply({"params": p, "batch_stats": v["batch_stats"]}, x, use_running_average=False, mutable=["batch_stats"])
        return y, upd

    f = jax.shard_map(fwd, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))

    def loss(p, x):
        y, _ = f(p, x)
        return jnp.sum(jnp.sin(y))

    n_fwd = _hlo.count_collectives(_hlo.lowered_text(f, v["params"], x))
    n_both = _hlo.count_collectives(_hlo.lowered_text(jax.grad(loss, argnums=(0, 1)), v["params"], x))
    return n_fwd, n_both - n_fwd


def variance_error(module, mean):
    x = (np.random.default_rng(0).normal(size=(256, 16)) + mean).astype(np.float32)
    ref = x.astype(np.float64).var(0)
    v = module.init(jax.random.key(0), x, use_running_average=False)
    _, upd = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    got = np.asarray(upd["batch_stats"]["var"], np.float64)  # momentum 0 => the batch variance
    return float(np.abs(got - ref).max() / ref.max())


def main():
    x = jax.random.normal(jax.random.key(0), (64, 4, 4, 16))
    peers = {
        "jaxbn": lambda **kw: bl.BatchNorm(**kw),
        "flax (fast variance, default)": lambda **kw: nn.BatchNorm(**kw),
        "flax (use_fast_variance=False)": lambda **kw: nn.BatchNorm(use_fast_variance=False, **kw),
    }
    rows = {}
    for name, make in peers.items():
        fwd, bwd = layer_collectives(make(axis_name="batch"), x)
        errs = {f"var_rel_err_mean_{m:g}": variance_error(make(momentum=0.0), m) for m in (1e3, 1e4)}
        rows[name] = {"collectives_forward": fwd, "collectives_backward": bwd, **errs}
    print(f"{'':34} {'fwd':>4} {'bwd':>4} {'var err @1e3':>13} {'var err @1e4':>13}")
    for name, r in rows.items():
        print(f"{name:34} {r['collectives_forward']:>4} {r['collectives_backward']:>4} "
              f"{r['var_rel_err_mean_1000']:>13.1e} {r['var_rel_err_mean_10000']:>13.1e}")
    out = {
        "machine": platform.processor() or platform.machine(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "jaxbn": jaxbn.__version__},
        "results": rows,
    }
    path = os.path.join(os.path.dirname(__file__), "results", "semantics.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
