r"""Batch Renormalization and virtual batches against batch_norm and Flax Linen's BatchNorm,
as users call them.

  python benchmarks/bn_variants.py [--rounds 11]

Times the gradient of ``sum(g * y**2)`` with respect to x, scale and bias inside one
jitted function (float32, NHWC) at the article's CNN shape and a ResNet shape, for
``jaxbn.batch_norm``, ``jaxbn.batch_renorm`` (r_max = 3, d_max = 5, running statistics
away from the batch's so that r and d are active), ``batch_norm(virtual_batch_size=32)``
and ``flax.linen.BatchNorm``, interleaved in one process, medians; and counts the
all-reduces of the same gradient under ``shard_map`` on 8 virtual devices (batch_norm and
batch_renorm: 1 + 1; virtual batches inside a device: 1 + 0, spanning two devices: 1 + 1).
Results: results/bn_variants.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402

SHAPES = {"cnn": (128, 26, 26, 32), "resnet-s1": (128, 32, 32, 16)}
COUNT_CODE = r"""
import jax, jax.numpy as jnp, jaxbn
from jax.sharding import PartitionSpec as P
from jaxbn import _hlo
n = jax.device_count(); C = 8
x = jnp.ones((4 * n, 6, 6, C)); p = jaxbn.init_params(C); st = jaxbn.init_state(C)
out = {}
for name, layer in (("batch_norm", lambda x, p: jaxbn.batch_norm(x, p, st, training=True, axis_name="d")),
                    ("virtual(V=2, inside a device)", lambda x, p: jaxbn.batch_norm(x, p, st, training=True,
                                                                                   axis_name="d", virtual_batch_size=2)),
                    ("virtual(V=8, two devices)", lambda x, p: jaxbn.batch_norm(x, p, st, training=True,
                                                                               axis_name="d", virtual_batch_size=8)),
                    ("batch_renorm", lambda x, p: jaxbn.batch_renorm(x, p, st, training=True, r_max=3.0, d_max=5.0,
                                                                     axis_name="d"))):
    body = lambda x, p: jax.grad(lambda x, p: jax.lax.psum(jnp.sum(layer(x, p)[0] ** 2), "d"), argnums=(0, 1))(x, p)
    f = jax.shard_map(body, mesh=jax.make_mesh((n,), ("d",), axis_types=(jax.sharding.AxisType.Auto,)),
                      in_specs=(P("d"), P()), out_specs=(P("d"), P()))
    out[name] = _hlo.count_collectives(_hlo.compiled_text(jax.jit(f), x, p))
import json
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    _common.ensure_env({"GLIBC_TUNABLES": _common.RECOMMENDED_GLIBC_TUNABLES})
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbn

    results = {"environment": _common.environment(), "command": _common.command(), "rounds": args.rounds, "shapes": {}}
    rows = []
    for name, shape in SHAPES.items():
        C = shape[-1]
        x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
        g = jax.random.normal(jax.random.key(1), shape)
        p = {"scale": jnp.ones(C), "bias": jnp.zeros(C)}
        state = jaxbn.BatchNormState(mean=jnp.full(C, 0.5), var=jnp.full(C, 2.0), count=jnp.int32(0))
        bn = nn.BatchNorm(use_running_average=False)
        stats = bn.init(jax.random.key(0), x[:2])["batch_stats"]

        losses = {
            "batch_norm": lambda x, p: jaxbn.batch_norm(x, p, state, training=True)[0],
            "batch_renorm": lambda x, p: jaxbn.batch_renorm(x, p, state, training=True, r_max=3.0, d_max=5.0)[0],
            "virtual(V=32)": lambda x, p: jaxbn.batch_norm(x, p, state, training=True, virtual_batch_size=32)[0],
            "flax.linen": lambda x, p: bn.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])[0],
        }
        fs = {k: jax.jit(jax.grad(lambda x, p, f=f: jnp.sum(g * f(x, p) ** 2), argnums=(0, 1))) for k, f in losses.items()}
        smp = _common.interleave({k: (lambda f=f: f(x, p)) for k, f in fs.items()}, rounds=args.rounds, calls=3, warmup=2)
        med = {k: float(np.median(v) * 1e3) for k, v in smp.items()}
        row = {"median_ms": med, "renorm_over_batch_norm": _common.ratio(smp, "batch_renorm", "batch_norm"),
               "virtual_over_batch_norm": _common.ratio(smp, "virtual(V=32)", "batch_norm"),
               "renorm_speedup_vs_flax": _common.ratio(smp, "flax.linen", "batch_renorm")}
        results["shapes"][name] = {"shape": shape, **row}
        rows.append([name, *(f"{med[k]:.2f}" for k in fs), f"{row['renorm_over_batch_norm']:.2f}",
                     f"{row['virtual_over_batch_norm']:.2f}", f"x{row['renorm_speedup_vs_flax']:.2f}"])
    print(_common.fmt_table(["shape", *(f"{k} ms" for k in losses), "renorm / batch_norm time",
                             "virtual / batch_norm time", "renorm vs flax"], rows))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", COUNT_CODE], env=env, capture_output=True, text=True, check=True)
    results["all_reduces_fwd_plus_bwd_shard_map_8_devices"] = json.loads(out.stdout.strip().splitlines()[-1])
    print("all-reduces, gradient under shard_map (8 devices):", results["all_reduces_fwd_plus_bwd_shard_map_8_devices"])
    print(f"wrote {_common.save_json('bn_variants.json', results)}")


if __name__ == "__main__":
    main()
