r"""jaxbn.equinox.BatchNorm against eqx.nn.BatchNorm(mode="batch"), as Equinox users call it.

  python benchmarks/equinox_layer.py [--batch 256 --channels 64 --size 8 --rounds 7]

Times the gradient of ``sum(y²)`` through the layer vmapped over the batch (per-example
``(C, H, W)`` calls, ``axis_name="batch"``) inside one jit, for both layers, and the core
on the whole ``(B, C, H, W)`` batch (``axis=1``) as a floor; interleaved, medians, XLA
temp memory. Results: results/equinox_layer.json.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbn
    import jaxbn.equinox

    B, C, H = args.batch, args.channels, args.size
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, C, H, H)), jnp.float32)

    def step_fn(model, state):
        def loss(x, model):
            y, new = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
            return jnp.sum(y * y), new

        return jax.jit(lambda x: eqx.filter_grad(lambda xm: loss(*xm), has_aux=True)((x, model)))

    ours, s1 = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(C, "batch")
    theirs, s2 = eqx.nn.make_with_state(eqx.nn.BatchNorm)(C, "batch", mode="batch")
    p, st = jaxbn.init_params(C), jaxbn.init_state(C)
    core = jax.jit(lambda x: jax.grad(lambda x, p: jnp.sum(jaxbn.batch_norm(x, p, st, training=True, axis=1)[0] ** 2),
                                      argnums=(0, 1))(x, p))
    fs = {"jaxbn.equinox": step_fn(ours, s1), "eqx.nn.BatchNorm": step_fn(theirs, s2), "core (B,C,H,W)": core}
    smp = _common.interleave({k: (lambda f=f: f(x)) for k, f in fs.items()}, rounds=args.rounds, calls=3, warmup=1)
    results = {"environment": _common.environment(), "command": _common.command(), "shape": [B, C, H, H], "peers": {}}
    rows = []
    for k, f in fs.items():
        temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
        med = float(np.median(smp[k]) * 1e3)
        results["peers"][k] = {"median_ms": med, "temp_bytes": int(temp),
                               "speedup_vs_equinox": _common.ratio(smp, "eqx.nn.BatchNorm", k)}
        rows.append([k, f"{med:.2f}", f"{temp / 2**20:.2f}", f"x{results['peers'][k]['speedup_vs_equinox']:.2f}"])
    print(_common.fmt_table(["peer", "ms (median)", "temp MiB", "vs eqx.nn.BatchNorm"], rows))
    print(f"wrote {_common.save_json('equinox_layer.json', results)}")


if __name__ == "__main__":
    main()
