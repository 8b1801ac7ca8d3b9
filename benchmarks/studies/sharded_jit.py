r"""BatchNorm under sharded jit (2 virtual CPU devices): before and after jaxbn/backends/spmd.py.

  python benchmarks/studies/sharded_jit.py

Times the training layer's gradient (loss sum(g * y**2), x sharded over the batch)
three ways in one process, interleaved: "before" = XLA's SPMD partitioner splits the
core's reductions itself (partitioning turned off, kernels off: what jaxbn did
before); the custom_partitioning path with the XLA formulation; and with the CPU
kernels on each device's rows (the default). Then the same with a per-example mask
(the last eighth of the examples left out, as in a padded last batch), where the
kernels do not apply: "before" against the custom_partitioning path. Counts
all-reduces and all-gathers in the compiled program. Results: benchmarks/results/studies/sharded_jit.json.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: _common and the other shared modules

import _common  # noqa: E402

SHAPES = [(32, 32, 32, 16), (16, 56, 56, 64)]


def main():
    _common.ensure_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                        "GLIBC_TUNABLES": _common.RECOMMENDED_GLIBC_TUNABLES})
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbn
    from jaxbn import _hlo, backends, cpu_kernel

    env = _common.environment()
    mesh = jax.make_mesh((2,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    variants = (("before", "0", False), ("partitioned[xla]", "0", True), ("partitioned+kernels", "auto", True))
    results = {"environment": env, "shapes": {}, "masked": {}}
    for masked in (False, True):
        for shape in SHAPES:
            C = shape[-1]
            sh = NamedSharding(mesh, P("b"))
            x = jax.device_put(jax.random.normal(jax.random.key(0), shape), sh)
            g = jax.device_put(jax.random.normal(jax.random.key(1), shape), sh)
            p = {"scale": jnp.ones(C), "bias": jnp.zeros(C)}
            mask = jax.device_put((np.arange(shape[0]) < shape[0] * 7 // 8).reshape(-1, 1, 1, 1), sh) if masked else None

            def loss(x, p, mask):  # the mask is an input, as a padded batch's would be
                y = jaxbn.batch_norm(x, p, jaxbn.init_state(C), training=True, mask=mask)[0]
                return jnp.sum(g * y**2)

            fs, coll = {}, {}
            for name, mode, part in variants[:2] if masked else variants:
                with backends.custom_partitioning(part), cpu_kernel.use(mode):
                    f = jax.jit(jax.grad(loss, argnums=(0, 1)))
                    n = _hlo.collectives(_hlo.compiled_text(f, x, p, mask))
                fs[name] = f
                coll[name] = {k: n[k] for k in ("all-reduce", "all-gather")}
            smp = _common.interleave({k: (lambda f=f: [f(x, p, mask) for _ in range(5)]) for k, f in fs.items()},
                                     rounds=15, warmup=2)
            row = {"collectives": coll, "median_ms": {k: float(np.median(v) / 5 * 1e3) for k, v in smp.items()},
                   "speedup_vs_before": {k: _common.ratio(smp, "before", k) for k in smp}}
            results["masked" if masked else "shapes"]["x".join(map(str, shape))] = row
            for k in fs:
                print(f"{'masked ' if masked else ''}{'x'.join(map(str, shape))} {k:20s} {row['median_ms'][k]:.2f} ms  "
                      f"x{row['speedup_vs_before'][k]:.2f}  {coll[k]}", flush=True)
    print(f"wrote {_common.save_json('studies/sharded_jit.json', results)}")


if __name__ == "__main__":
    main()
