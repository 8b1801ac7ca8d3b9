r"""A masked BatchNorm layer: jaxbn with and without its CPU kernels, and Flax Linen.

  python benchmarks/masked_layer.py [--rounds 11]

Times the gradient of ``sum(g * y**2)`` (x, scale and bias; the cotangent depends
on y as in a network) for one float32 NHWC shape and four masks: none, per example
``(N, 1, 1, 1)``, per position ``(N, H, W, 1)`` (both leave out whole rows: the
kernel path) and per entry ``(N, H, W, C)`` (the XLA formulation's select path).
The mask is an input of the jitted function, as a padded batch's would be (a mask
closed over as a constant lets XLA fold the count away). 90 % of the entries are
kept. Peers: ``jaxbn`` (kernels where usable), ``jaxbn[xla]`` (kernels off) and
``flax.linen.BatchNorm(..., mask=...)``, interleaved in one process, medians.
Results: results/masked_layer.json.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402

SHAPE = (16, 56, 56, 64)
MASKS = {"none": None, "per_example": (16, 1, 1, 1), "per_position": (16, 56, 56, 1), "per_entry": SHAPE}


def _loss_fn(peer: str, C: int):
    import flax.linen as nn
    import jax.numpy as jnp

    import jaxbn

    if peer == "flax.linen":
        bn = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-5)
        variables = bn.init(__import__("jax").random.key(0), jnp.zeros((2, 1, 1, C)))

        def loss(x, p, g, mask):
            v = {"params": p, "batch_stats": variables["batch_stats"]}
            y, _ = bn.apply(v, x, mask=mask, mutable=["batch_stats"])
            return jnp.sum(g * y**2)
    else:
        def loss(x, p, g, mask):
            y = jaxbn.batch_norm(x, p, jaxbn.init_state(C), training=True, mask=mask)[0]
            return jnp.sum(g * y**2)
    return loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    _common.ensure_env({"GLIBC_TUNABLES": _common.RECOMMENDED_GLIBC_TUNABLES})
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxbn import cpu_kernel

    C = SHAPE[-1]
    x = jax.random.normal(jax.random.key(0), SHAPE) * 2 + 1
    g = jax.random.normal(jax.random.key(1), SHAPE)
    p = {"scale": jnp.ones(C), "bias": jnp.zeros(C)}
    rng = np.random.default_rng(2)
    masks = {k: None if s is None else jnp.asarray(rng.uniform(size=s) < 0.9) for k, s in MASKS.items()}
    peers = (("jaxbn", "auto"), ("jaxbn[xla]", "0"), ("flax.linen", "0"))

    fs, uses_kernel = {}, {}
    for mname, mask in masks.items():
        for peer, mode in peers:
            with cpu_kernel.use(mode):
                f = jax.jit(jax.grad(_loss_fn(peer, C), argnums=(0, 1)))
                hlo = f.lower(x, p, g, mask).compile().as_text()
            fs[(mname, peer)] = (f, mask)
            uses_kernel[(mname, peer)] = "jaxbn_masked_moments" in hlo or "jaxbn_moments" in hlo
    cands = {f"{m}|{peer}": (lambda f=f, mask=mask: f(x, p, g, mask)) for (m, peer), (f, mask) in fs.items()}
    smp = _common.interleave(cands, rounds=args.rounds, calls=3, warmup=2)

    results = {"environment": _common.environment(), "shape": SHAPE, "kept": 0.9, "rounds": args.rounds,
               "masks": {}}
    rows = []
    for m in masks:
        row = {
            "median_ms": {peer: float(np.median(smp[f"{m}|{peer}"]) * 1e3) for peer, _ in peers},
            "stats_kernel": {peer: uses_kernel[(m, peer)] for peer, _ in peers},
            "speedup_vs_flax": {peer: _common.ratio(smp, f"{m}|flax.linen", f"{m}|{peer}") for peer, _ in peers},
            "speedup_vs_xla": _common.ratio(smp, f"{m}|jaxbn[xla]", f"{m}|jaxbn"),
        }
        results["masks"][m] = row
        rows.append([m, *(f"{row['median_ms'][peer]:.2f}" for peer, _ in peers),
                     f"x{row['speedup_vs_xla']:.2f}", f"x{row['speedup_vs_flax']['jaxbn']:.2f}",
                     "yes" if row["stats_kernel"]["jaxbn"] else "no"])
    print(_common.fmt_table(["mask", *(f"{peer} ms" for peer, _ in peers), "jaxbn / [xla]", "jaxbn / flax",
                             "kernel stats"], rows))
    print(f"wrote {_common.save_json('masked_layer.json', results)}")


if __name__ == "__main__":
    main()
